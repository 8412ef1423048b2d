"""The default model's evaluation: every number of its model card, recomputed from the saved folder.

    python -m recipes.default_model.eval --model moeflow/default_model --json

Loads the folder with plain ``transformers`` (``AutoModelForCausalLM``, ``AutoTokenizer``) and measures,
on the held-out files of ``recipes.default_model.corpus`` (never trained on):

- perplexity: every file as BOS + tokens + EOS, read in windows of ``context`` tokens that advance by
  ``stride``, each target scored once with at least ``context - stride`` tokens of context (or all
  the file before it);
- a unigram baseline on exactly the same targets: token frequencies of the train split, add-one
  smoothed;
- expert load: per layer, the fraction of routed (token, slot) assignments each expert receives over
  the same scored tokens;
- greedy samples from a few prompts.

Shapes: the project legend (moeflow/__init__.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeflow.model.corpus import SPLITS, split_list_path
from recipes.default_model.corpus import corpus_files, read_text, relative_name

SAMPLE_PROMPTS = ("def ", "import ", "class ")
SAMPLE_TOKENS = 48


@dataclass(frozen=True, kw_only=True)
class Sample:
    prompt: str
    text: str  # prompt + greedy continuation
    new_token_ids: list[int]


@dataclass(frozen=True, kw_only=True)
class EvalReport:
    heldout_files: int
    heldout_fingerprint: str  # SHA-256 over the held-out files' names and bytes
    heldout_bytes: int
    heldout_tokens: int  # scored targets
    context: int
    stride: int
    loss: float  # nats per token
    perplexity: float
    unigram_loss: float
    unigram_perplexity: float
    bits_per_byte: float
    unigram_bits_per_byte: float
    expert_load: list[list[float]]  # [layer][expert]: share of routed assignments
    samples: list[Sample]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EvalReport:
        return cls(**{**data, "samples": [Sample(**s) for s in data["samples"]]})

    def load_summary(self) -> list[dict]:
        """Per layer: min and max expert share, and the min as a fraction of the uniform share."""
        rows = []
        for layer, shares in enumerate(self.expert_load):
            uniform = 1.0 / len(shares)
            rows.append(
                {"layer": layer, "min": min(shares), "max": max(shares), "min_vs_uniform": min(shares) / uniform}
            )
        return rows

    def summary(self) -> str:
        lines = [
            f"held-out: {self.heldout_files} files, {self.heldout_tokens} tokens, {self.heldout_bytes} bytes",
            f"perplexity {self.perplexity:.3f} (unigram baseline {self.unigram_perplexity:.3f}); "
            f"bits/byte {self.bits_per_byte:.4f} (unigram {self.unigram_bits_per_byte:.4f})",
        ]
        for row in self.load_summary():
            lines.append(
                f"layer {row['layer']}: expert share min {row['min']:.4f} max {row['max']:.4f} "
                f"(min = {row['min_vs_uniform']:.2f} x uniform)"
            )
        lines += [f"sample {s.prompt!r}: {s.text!r}" for s in self.samples]
        return "\n".join(lines)


def heldout_fingerprint(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(relative_name(path).encode("utf-8") + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _documents(tokenizer, texts: list[str]) -> list[list[int]]:
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, verbose=False)["input_ids"]]


def unigram_log_probs(tokenizer, texts: list[str]) -> torch.Tensor:
    """log p(token) from the targets (every token but the leading BOS) of the texts, add-one smoothed."""
    counts_V = torch.ones(len(tokenizer), dtype=torch.float64)
    for doc in _documents(tokenizer, texts):
        counts_V += torch.bincount(torch.tensor(doc[1:]), minlength=len(tokenizer)).double()
    return (counts_V / counts_V.sum()).log()


def window_spans(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window: inputs ids[begin:end] predict targets ids[begin+1:end+1],
    of which those at index >= first_scored are new. Every target index 1..n-1 is scored once."""
    spans, scored_to, begin = [], 0, 0
    while scored_to < n_tokens - 1:
        end = min(begin + context, n_tokens - 1)
        spans.append((begin, end, scored_to + 1))
        scored_to, begin = end, begin + stride
    return spans


@torch.no_grad()
def evaluate(model_dir: Path, *, threads: int = 2, context: int | None = None, stride: int | None = None) -> EvalReport:
    """Recompute the card's numbers for the model folder ``model_dir``."""
    torch.set_num_threads(threads)
    model_dir = Path(model_dir)
    splits = {split: corpus_files(split) for split in SPLITS}
    for split, files in splits.items():
        listed = split_list_path(model_dir, split)
        if listed.exists() and listed.read_text().split() != [relative_name(p) for p in files]:
            raise ValueError(
                f"{listed} does not match the recipe's {split} split on this interpreter: "
                "evaluate with the Python whose standard library the model was trained on"
            )
    heldout = splits["heldout"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    context = context or model.config.max_position_embeddings
    stride = stride or context // 2
    num_layers, num_experts = model.config.num_hidden_layers, model.config.num_local_experts
    top_k = model.config.num_experts_per_tok

    heldout_texts = [read_text(p) for p in heldout]
    unigram_V = unigram_log_probs(tokenizer, [read_text(p) for p in splits["train"]])
    nll, unigram_nll, n_scored = 0.0, 0.0, 0
    counts_LE = torch.zeros(num_layers, num_experts, dtype=torch.float64)
    for doc in _documents(tokenizer, heldout_texts):
        ids = torch.tensor(doc)
        for begin, end, first in window_spans(len(ids), context, stride):
            out = model(input_ids=ids[None, begin:end], output_router_logits=True)
            keep = slice(first - 1 - begin, end - begin)  # rows whose target index is >= first
            targets_N = ids[first : end + 1]
            nll += F.cross_entropy(out.logits[0, keep].double(), targets_N, reduction="sum").item()
            unigram_nll -= unigram_V[targets_N].sum().item()
            n_scored += len(targets_N)
            for layer, logits_TE in enumerate(out.router_logits):
                topk_ids_NK = logits_TE[keep].topk(top_k, dim=-1).indices
                counts_LE[layer] += torch.bincount(topk_ids_NK.flatten(), minlength=num_experts).double()

    n_bytes = sum(len(t.encode("utf-8")) for t in heldout_texts)
    samples = []
    for prompt in SAMPLE_PROMPTS:
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        # Plain greedy, what the model itself does (the card's samples); generation_config.json's repetition
        # penalty is the runtime's sampling default, not part of the model.
        generated = model.generate(input_ids, max_new_tokens=SAMPLE_TOKENS, do_sample=False, repetition_penalty=1.0)
        new_ids = generated[0, input_ids.shape[1] :].tolist()
        samples.append(
            Sample(
                prompt=prompt, text=prompt + tokenizer.decode(new_ids, skip_special_tokens=True), new_token_ids=new_ids
            )
        )
    return EvalReport(
        heldout_files=len(heldout),
        heldout_fingerprint=heldout_fingerprint(heldout),
        heldout_bytes=n_bytes,
        heldout_tokens=n_scored,
        context=context,
        stride=stride,
        loss=nll / n_scored,
        perplexity=math.exp(nll / n_scored),
        unigram_loss=unigram_nll / n_scored,
        unigram_perplexity=math.exp(unigram_nll / n_scored),
        bits_per_byte=nll / n_bytes / math.log(2),
        unigram_bits_per_byte=unigram_nll / n_bytes / math.log(2),
        expert_load=(counts_LE / counts_LE.sum(dim=1, keepdim=True)).tolist(),
        samples=samples,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recipes.default_model.eval", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[2] / "moeflow" / "default_model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument("--write-card", action="store_true", help="rewrite metrics.json, README.md and the plot")
    args = parser.parse_args(argv)
    report = evaluate(args.model, threads=args.threads)
    if args.write_card:
        from recipes.default_model.card import rewrite_card

        rewrite_card(args.model, report)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())


if __name__ == "__main__":
    main()
