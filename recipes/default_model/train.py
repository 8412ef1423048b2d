"""The recipe that trains moeflow's shipped default model, on the CPU, from the stdlib corpus.

One command trains a byte-level BPE tokenizer, then a small Mixtral (transformers' own
``MixtralForCausalLM``) with a per-layer load-balancing loss, saves both as a Hugging Face folder
with the lists of its train and held-out files, evaluates it on the held-out files and writes the
model card. From the repository root (the recipe is not installed):

    nice -n 10 python -m recipes.default_model.train --out moeflow/default_model --minutes 38
    python -m recipes.default_model.eval --model moeflow/default_model --json

Training stops by wall clock (``--minutes``) or by step count (``--max-steps``), whichever comes
first; the learning-rate schedule follows that same progress, so a step-limited run is step-exact
while a time-limited one sees as many tokens as the machine allows. Every option is a field of
``TrainConfig``; the CLI is generated from it.

Shapes: the project legend (moeflow/__init__.py); here A is the positions of one training window
(``seq_len``, or ``seq_len + 1`` counting the last target).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

from moeflow.options import add_options, options_from_args
from recipes.default_model.corpus import corpus_files, corpus_fingerprint, read_text, write_split_lists

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2 in this order
PROG = "recipes.default_model.train"
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "moeflow" / "default_model"
REPETITION_PENALTY = 1.2  # the shipped generation_config.json's sampling default (why: where run_train saves the model)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that defines a training run; the ``train`` CLI has one option per field."""

    out: Path = DEFAULT_OUT
    minutes: float = 38.0  # wall-clock budget of the training loop; 0 = no time limit
    max_steps: int = 0  # 0 = no step limit
    seed: int = 0
    threads: int = 2
    vocab_size: int = 4096
    hidden_size: int = 192
    intermediate_size: int = 192
    num_layers: int = 4
    num_heads: int = 6
    num_kv_heads: int = 2
    num_experts: int = 16
    top_k: int = 2
    seq_len: int = 512
    rope_theta: float = 10000.0
    batch_size: int = 8
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.02
    eval_every: int = 100  # steps between held-out loss probes
    eval_windows: int = 16  # held-out windows of seq_len tokens per probe

    def __post_init__(self) -> None:
        if self.minutes <= 0 and self.max_steps <= 0:
            raise ValueError("give a time budget (--minutes > 0) or a step budget (--max-steps > 0)")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads and num_heads by num_kv_heads")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError("top_k must lie between 1 and num_experts")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the texts; encoding prepends BOS, decoding restores the text byte for byte."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, clean_up_tokenization_spaces=False
    )


def encode_documents(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    """Each text as BOS + tokens + EOS, the way files appear in the training stream."""
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, verbose=False)["input_ids"]]


def build_model(cfg: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> MixtralForCausalLM:
    """A freshly initialised Mixtral whose every layer is MoE."""
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        max_position_embeddings=cfg.seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        router_aux_loss_coef=cfg.aux_loss_coef,
        output_router_logits=False,  # inference default; training asks for router logits per call
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    return MixtralForCausalLM(config)


def router_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-Transformer balance loss, computed per layer and averaged over layers.

    transformers' own ``load_balancing_loss_func`` pools counts and probabilities over all layers
    before multiplying, which lets one layer starve an expert that another layer overuses; here every
    layer is balanced on its own. Equals 1.0 when routing is uniform.
    """
    losses = []
    for logits_TE in router_logits:
        probs_TE = logits_TE.float().softmax(dim=-1)
        num_experts = probs_TE.shape[-1]
        topk_ids_TK = probs_TE.topk(top_k, dim=-1).indices
        counts_E = torch.zeros(num_experts, device=probs_TE.device).index_add_(
            0, topk_ids_TK.reshape(-1), torch.ones(topk_ids_TK.numel(), device=probs_TE.device)
        )
        dispatched_E = counts_E / topk_ids_TK.numel()
        losses.append(num_experts * (dispatched_E * probs_TE.mean(dim=0)).sum())
    return torch.stack(losses).mean()


class TokenBatches:
    """Epochs over non-overlapping windows of A = seq_len + 1 tokens of one packed stream, shifted and
    shuffled per epoch."""

    def __init__(self, stream: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator):
        self.stream, self.window, self.batch_size, self.gen = stream, seq_len + 1, batch_size, generator
        self.epoch, self.order, self.pos = 0, torch.empty(0, dtype=torch.long), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > len(self.order):
            shift = int(torch.randint(self.window, (1,), generator=self.gen))
            starts = torch.arange(shift, len(self.stream) - self.window, self.window)
            self.order = starts[torch.randperm(len(starts), generator=self.gen)]
            self.pos, self.epoch = 0, self.epoch + 1
        starts = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return torch.stack([self.stream[s : s + self.window] for s in starts.tolist()])  # [B, A]


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over steps, then cosine decay to ``min_lr_ratio`` over the run's progress."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * warm * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


@torch.no_grad()
def heldout_loss(model: MixtralForCausalLM, windows_BA: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) over fixed held-out windows."""
    model.eval()
    logits_BAV = model(input_ids=windows_BA[:, :-1]).logits
    model.train()
    return F.cross_entropy(logits_BAV.flatten(0, 1), windows_BA[:, 1:].flatten()).item()


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def train_model(
    cfg: TrainConfig, model: MixtralForCausalLM, train_stream: torch.Tensor, heldout_stream: torch.Tensor
) -> dict:
    """The training loop. Returns the run's record: steps, tokens, seconds and the per-step log."""
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = TokenBatches(train_stream, cfg.seq_len, cfg.batch_size, gen)
    window = cfg.seq_len + 1
    spacing = (len(heldout_stream) - window) // cfg.eval_windows
    probe_BA = torch.stack([heldout_stream[i * spacing : i * spacing + window] for i in range(cfg.eval_windows)])
    opt = _optimizer(model, cfg)
    model.train()
    budget_s = cfg.minutes * 60.0
    log: list[dict] = []
    bar = tqdm(
        total=int(budget_s) if budget_s > 0 else cfg.max_steps,
        unit="s" if budget_s > 0 else "step",
        mininterval=2.0,
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    step, progress = 0, 0.0
    while progress < 1.0:
        lr = lr_at(cfg, step, progress)
        for group in opt.param_groups:
            group["lr"] = lr
        batch_BA = batches.next()
        out = model(input_ids=batch_BA[:, :-1], output_router_logits=True)
        lm_loss = F.cross_entropy(out.logits.flatten(0, 1), batch_BA[:, 1:].flatten())
        aux_loss = router_balance_loss(out.router_logits, cfg.top_k)
        loss = lm_loss + cfg.aux_loss_coef * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        opt.step()
        step += 1
        elapsed = time.perf_counter() - start
        progress = max(elapsed / budget_s if budget_s > 0 else 0.0, step / cfg.max_steps if cfg.max_steps > 0 else 0.0)
        row = {
            "step": step,
            "tokens": step * cfg.tokens_per_step,
            "seconds": round(elapsed, 2),
            "lr": lr,
            "loss": lm_loss.item(),
            "aux": aux_loss.item(),
            "grad_norm": grad_norm,
            "heldout_loss": None,
        }
        if step % cfg.eval_every == 0 or progress >= 1.0:
            row["heldout_loss"] = heldout_loss(model, probe_BA)
        log.append(row)
        bar.n = min(int(elapsed), bar.total) if budget_s > 0 else step
        last_heldout = next((r["heldout_loss"] for r in reversed(log) if r["heldout_loss"] is not None), None)
        bar.set_postfix(
            step=step,
            loss=f"{row['loss']:.3f}",
            aux=f"{row['aux']:.3f}",
            heldout=f"{last_heldout:.3f}" if last_heldout is not None else "-",
            tok_s=f"{row['tokens'] / elapsed:.0f}",
            refresh=False,
        )
        bar.update(0)
    bar.close()
    seconds = time.perf_counter() - start
    return {
        "steps": step,
        "tokens_seen": step * cfg.tokens_per_step,
        "epochs": round(step * cfg.tokens_per_step / len(train_stream), 3),
        "train_tokens": len(train_stream),
        "heldout_stream_tokens": len(heldout_stream),
        "seconds_training": round(seconds, 1),
        "tokens_per_second": round(step * cfg.tokens_per_step / seconds, 1),
        "final_heldout_probe_loss": log[-1]["heldout_loss"],
        "log": log,
    }


def machine_description() -> dict:
    """The machine a run happened on, for the model card."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    import transformers

    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }


def run_train(cfg: TrainConfig, argv: list[str]) -> dict:
    """Tokenizer, model, training, save, evaluation, card: the whole recipe."""
    from recipes.default_model.card import write_card, write_loss_log
    from recipes.default_model.eval import evaluate

    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train_files, heldout_files = corpus_files("train"), corpus_files("heldout")
    train_texts = [read_text(p) for p in train_files]
    heldout_texts = [read_text(p) for p in heldout_files]
    print(f"corpus: {len(train_files)} train files, {len(heldout_files)} held-out files", file=sys.stderr)

    tokenizer = train_tokenizer(train_texts, cfg.vocab_size)
    train_stream = torch.tensor([t for doc in encode_documents(tokenizer, train_texts) for t in doc])
    heldout_stream = torch.tensor([t for doc in encode_documents(tokenizer, heldout_texts) for t in doc])
    print(f"tokens: {len(train_stream)} train, {len(heldout_stream)} held-out", file=sys.stderr)

    model = build_model(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters", file=sys.stderr)
    record = train_model(cfg, model, train_stream, heldout_stream)

    cfg.out.mkdir(parents=True, exist_ok=True)
    model.eval()
    # The model's sampling default (generation_config.json; transformers' generate and moeflow both apply it, to greedy
    # too): greedy alone loops ("The list of directories to the list of directories ..." after "def"); a penalty of
    # 1.2 on tokens already seen reads as Python (`moeflow generate --prompt def --repetition-penalty 1.0 / 1.2`).
    model.generation_config.repetition_penalty = REPETITION_PENALTY
    model.save_pretrained(cfg.out)
    tokenizer.model_max_length = cfg.seq_len
    tokenizer.save_pretrained(cfg.out)
    write_split_lists(cfg.out)
    write_loss_log(cfg.out / "train_log.csv", record.pop("log"))

    training = {
        "command": f"python -m {PROG} " + shlex.join(argv),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()},
        "parameters": n_params,
        "corpus_fingerprint": corpus_fingerprint("all"),
        "train_files": len(train_files),
        "heldout_files": len(heldout_files),
        "machine": machine_description(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **record,
    }
    report = evaluate(cfg.out, threads=cfg.threads)
    training["seconds_total"] = round(time.perf_counter() - t0, 1)
    write_card(cfg.out, training, report)
    return training


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n")[0])
    add_options(parser, TrainConfig)
    training = run_train(options_from_args(TrainConfig, parser.parse_args(argv)), argv)
    print(json.dumps({k: v for k, v in training.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
