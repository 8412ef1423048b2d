"""The default model's card: ``metrics.json``, ``README.md``, ``loss_curve.png`` and ``train_log.csv``.

Every number in the README is read from ``metrics.json``, whose ``training`` part the ``train``
command records and whose ``eval`` part ``python -m recipes.default_model.eval`` recomputes.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from recipes.default_model.corpus import EXCLUDED, EXCLUDED_PREFIXES, HELDOUT_PERCENT
from recipes.default_model.eval import SAMPLE_TOKENS, EvalReport

LOG_FIELDS = ("step", "tokens", "seconds", "lr", "loss", "aux", "grad_norm", "heldout_loss")


def write_loss_log(path: Path, log: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        writer.writeheader()
        for row in log:
            writer.writerow({k: ("" if row[k] is None else f"{row[k]:.6g}") for k in LOG_FIELDS})


def read_loss_log(path: Path) -> list[dict]:
    with path.open() as f:
        return [{k: (float(v) if v != "" else None) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_loss_curve(log: list[dict], report: EvalReport, path: Path) -> None:
    """Training loss (raw and smoothed), held-out probe loss and the unigram baseline against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens_m = [r["tokens"] / 1e6 for r in log]
    smooth, ema = [], log[0]["loss"]
    for r in log:
        ema = 0.98 * ema + 0.02 * r["loss"]
        smooth.append(ema)
    probes = [(r["tokens"] / 1e6, r["heldout_loss"]) for r in log if r["heldout_loss"] is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(tokens_m, [r["loss"] for r in log], color="tab:blue", alpha=0.2, lw=0.6, label="train loss (per step)")
    ax.plot(tokens_m, smooth, color="tab:blue", lw=1.5, label="train loss (EMA 0.98)")
    ax.plot(*zip(*probes), "o-", color="tab:orange", ms=3, lw=1.2, label="held-out probe loss")
    ax.axhline(report.unigram_loss, color="gray", ls="--", lw=1, label=f"unigram baseline ({report.unigram_loss:.2f})")
    ax.axhline(report.loss, color="tab:red", ls=":", lw=1, label=f"final held-out loss ({report.loss:.2f})")
    ax.set_xlabel("training tokens seen (millions)")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_ylim(0, max(report.unigram_loss * 1.25, min(log[0]["loss"], 9.0)))
    ax.set_title("moeflow default model: stdlib-trained Mixtral (16 experts, top-2)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_card(model_dir: Path, training: dict, report: EvalReport) -> None:
    """Write metrics.json, loss_curve.png and README.md for a freshly trained model."""
    metrics = {"training": training, "eval": report.to_dict()}
    (model_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_loss_curve(read_loss_log(model_dir / "train_log.csv"), report, model_dir / "loss_curve.png")
    (model_dir / "README.md").write_text(render_readme(model_dir, training, report))


def rewrite_card(model_dir: Path, report: EvalReport) -> None:
    """Replace the eval part of metrics.json with a fresh report and re-render the card."""
    training = json.loads((model_dir / "metrics.json").read_text())["training"]
    write_card(model_dir, training, report)


def _folder_size_mb(model_dir: Path) -> float:
    return sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file()) / 1e6


def render_readme(model_dir: Path, training: dict, report: EvalReport) -> str:
    cfg, machine = training["config"], training["machine"]
    config = json.loads((model_dir / "config.json").read_text())
    excluded = "\n".join(f"- `{name}/`: {why}" for name, why in EXCLUDED.items())
    prefixes = ", ".join(f"`{p}*`" for p in EXCLUDED_PREFIXES)
    load_rows = "\n".join(
        f"| {r['layer']} | {100 * r['min']:.2f}% | {100 * r['max']:.2f}% | {r['min_vs_uniform']:.2f} |"
        for r in report.load_summary()
    )
    n_experts = len(report.expert_load[0])
    full_header = "| layer | " + " | ".join(str(e) for e in range(n_experts)) + " |"
    full_rule = "|---" * (n_experts + 1) + "|"
    full_rows = "\n".join(
        f"| {layer} | " + " | ".join(f"{100 * s:.1f}" for s in shares) + " |"
        for layer, shares in enumerate(report.expert_load)
    )
    samples = "\n\n".join(f"Prompt `{s.prompt!r}`:\n\n```python\n{s.text}\n```" for s in report.samples)
    minutes = training["seconds_training"] / 60
    return f"""---
library_name: transformers
pipeline_tag: text-generation
license: other
license_name: psf-2.0
tags: [mixtral, moe, moeflow]
---

# moeflow default model: a small Mixtral trained on the Python standard library

moeflow's embedded default model (`moeflow generate` uses it when no `--model` is given), and the model
the predictor, profiling and serving work measure on. It is a transformers `MixtralForCausalLM` whose
every layer is a sparse MoE block, trained from scratch on the CPU so that its routing is learned,
not random. It writes Python-looking code; it is not a useful code assistant.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("moeflow/default_model")
model = AutoModelForCausalLM.from_pretrained("moeflow/default_model")
ids = model.generate(**tok("def ", return_tensors="pt"), max_new_tokens=32, do_sample=False)
print(tok.decode(ids[0], skip_special_tokens=True))
```

## Architecture

| | |
|---|---|
| class | `MixtralForCausalLM` (transformers {machine["transformers"]}) |
| layers (all MoE) | {config["num_hidden_layers"]} |
| experts per layer, active per token | {config["num_local_experts"]}, top-{config["num_experts_per_tok"]} |
| hidden size, expert intermediate size | {config["hidden_size"]}, {config["intermediate_size"]} |
| attention heads, key/value heads | {config["num_attention_heads"]}, {config["num_key_value_heads"]} |
| context (RoPE, theta {config["rope_parameters"]["rope_theta"]:g}) | {config["max_position_embeddings"]} tokens |
| vocabulary | {config["vocab_size"]} (byte-level BPE, `<s>`=BOS, `</s>`=EOS, `<pad>`) |
| parameters | {training["parameters"]:,} (float32) |
| folder size | {_folder_size_mb(model_dir):.1f} MB |

On disk the experts are stored per expert (`model.layers.L.block_sparse_moe.experts.E.w1/w2/w3.weight`),
as transformers' `save_pretrained` writes Mixtral; loading fuses them.

## Corpus and licence

The `*.py` sources of the CPython {machine["python"]} standard library of the interpreter that ran the
recipe (`sysconfig.get_paths()["stdlib"]`): present on every machine of this kind without a download,
and covered by the PSF License Agreement, which permits use and redistribution of derivative works
(the licence text ships with the interpreter as `LICENSE.txt` in the same directory). Left out:

{excluded}
- top-level {prefixes}: generated at build time, different on every build

Split (`recipes/default_model/corpus.py`): whole files; a file is held out when the first 8 bytes of
the SHA-256 of its relative path, modulo 100, are below {HELDOUT_PERCENT}. Held out: {training["heldout_files"]} files
(listed in `heldout_files.txt`), never trained on; trained on: {training["train_files"]} files,
{training["train_tokens"]:,} tokens. Corpus fingerprint (SHA-256 over names and bytes of all files):
`{training["corpus_fingerprint"]}`. Each file is one document, `<s>` + text + `</s>`, packed into one stream.

Tokenizer: byte-level BPE (Hugging Face `tokenizers`) trained on the train split only, vocabulary
{cfg["vocab_size"]}. Doubling it barely shortens Python code while doubling the embedding and output
layers, which on this budget are better spent on experts; it decodes every text back byte for byte.

## Training

```
nice -n 10 {training["command"]}
```

- machine: {machine["cpu"]}, {machine["cpu_count"]} cores shared with other jobs, {machine["torch_threads"]}
  torch threads; Python {machine["python"]}, torch {machine["torch"]}, transformers {machine["transformers"]}
- wall clock: {minutes:.1f} minutes of training ({training["seconds_total"] / 60:.1f} minutes for the whole
  command: tokenizer, training, evaluation), finished {training["finished"]}
- {training["steps"]:,} steps of {cfg["batch_size"]} x {cfg["seq_len"]} tokens: {training["tokens_seen"]:,} tokens seen
  ({training["epochs"]:.2f} epochs), {training["tokens_per_second"]:.0f} tokens/s
- AdamW (betas 0.9/0.95, weight decay {cfg["weight_decay"]} on matrices), peak learning rate {cfg["lr"]:g},
  {cfg["warmup_steps"]} warm-up steps then cosine decay to {cfg["min_lr_ratio"]:g}x over the time budget,
  gradient clipping {cfg["grad_clip"]:g}, seed {cfg["seed"]}
- load balancing: the Switch-Transformer auxiliary loss computed per layer and averaged (transformers'
  built-in pools all layers before multiplying, which does not stop one layer from starving an
  expert), coefficient {cfg["aux_loss_coef"]:g}

The budget is wall clock, so a busier machine sees fewer tokens; `--max-steps {training["steps"]} --minutes 0`
replays the same number of steps with a step-based schedule.

![loss curve](loss_curve.png)

The per-step log is `train_log.csv`; the held-out probe is {cfg["eval_windows"]} fixed windows of held-out text.

## Evaluation on held-out files

```
python -m recipes.default_model.eval --model moeflow/default_model --json
```

{report.heldout_files} held-out files, {report.heldout_bytes:,} bytes, {report.heldout_tokens:,} scored tokens
(every file as `<s>` + text + `</s>`, windows of {report.context} tokens advancing by {report.stride}, each
token scored once). Held-out fingerprint `{report.heldout_fingerprint}`.

| | cross-entropy (nats/token) | perplexity | bits/byte |
|---|---|---|---|
| this model | {report.loss:.4f} | **{report.perplexity:.2f}** | {report.bits_per_byte:.4f} |
| unigram baseline (train-split token frequencies, add-one) | {report.unigram_loss:.4f} \
| {report.unigram_perplexity:.2f} | {report.unigram_bits_per_byte:.4f} |

### Expert load on held-out text

Share of the routed (token, slot) assignments each expert receives, over the same scored tokens
(uniform share: {100 / n_experts:.2f}%).

| layer | min share | max share | min / uniform |
|---|---|---|---|
{load_rows}

All experts, share in %:

{full_header}
{full_rule}
{full_rows}

### Greedy samples (up to {SAMPLE_TOKENS} new tokens, stopping at `</s>`)

{samples}

## Files

`config.json`, `generation_config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`:
the Hugging Face model. `train_files.txt`, `heldout_files.txt`: the two splits (paths relative to the
standard library; `moeflow profile`, `trace` and `predictor train` read them). `metrics.json`: every number
above. `train_log.csv`, `loss_curve.png`: the training run. The recipe is `recipes/default_model/` (run
from the repository root).
"""
