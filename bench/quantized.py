"""Quantized experts: tokens/s and bytes per token from disk at a 25% budget, and what quantizing costs in perplexity.

Three parts, one run, one JSON + PNG (``bench/results/quantized/``):

- ``speed``: the I/O-bound model (the shipped model's experts zero-widened to ~18 MiB in fp32,
  ``moeflow.tools.widen``) as stored in fp32, and written by ``moeflow quantize`` as int8 and int4
  (group 128). Each contender decodes the same held-out prompts, a fresh process in a cgroup
  memory group with the same limit for all (runtime + dense weights + the fp32 contender's 25% budget +
  slack), page cache dropped before each, experts read with O_DIRECT; rounds interleave the contenders,
  the order rotating each round after fp32 opens the first, with a pause before every run
  (``harness.round_order``: this VM's disk reads faster after an idle spell); each one's best round and
  median are kept. fp32 decodes greedily; the quantized contenders decode the same text
  (each step's input is fp32's token, teacher forcing), so all read experts for the same tokens and bytes per
  token compare the formats, not two different texts; how often their own greedy choice was fp32's token is
  reported beside (``greedy_agreement``). Reports decode tokens/s, bytes read per decode token and per miss.
  The zero padding quantizes to zeros (scale 1), which changes nothing for bytes and time.
- ``quality``: perplexity of the shipped model on its held-out files (``moeflow.model.corpus``) with its
  experts in fp32, bf16 (``--expert-dtype bf16``), int8, int4 group 128 and int4 group 32 (the last three
  written by ``moeflow quantize``, read quantized), through the engine, all experts resident; int8/int4 with
  decoding's arithmetic on every row (``perplexity``).
- ``kernels``: ms per expert use at T = 1 on the I/O-bound geometry, each CPU formulation of
  ``quantized_experts_forward`` side by side (fp32 slots, int8/int4 dequantize + mm, int8/int4 through torch's
  packed matmuls), and what repacking a miss into torch's int4 layout would cost.

    python bench/quantized.py --out bench/results/quantized
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from expertflow import heldout_prompts  # noqa: E402
from harness import (  # noqa: E402
    WIDE_INTERMEDIATE,
    dense_bytes,
    disk_bandwidth,
    drop_caches,
    machine,
    prepare_model,
    quantized_folder,
    round_order,
    run_child,
    runtime_baseline_bytes,
)

SLACK_BYTES = 640 << 20  # activations, KV caches, reader bounce buffers, the dequantization scratch: same for all
SPEED_FORMATS = (("fp32", None, 0), ("int8", "int8", 0), ("int4-g128", "int4", 128))
QUALITY_FORMATS = (("fp32", None, 0), ("bf16", "bf16", 0), ("int8", "int8", 0), ("int4-g128", "int4", 128),
                   ("int4-g32", "int4", 32))  # fmt: skip


# ---- one contender, in a child process ------------------------------------------------------------------


def decode_child(spec: dict) -> dict:
    import moeflow
    from moeflow.engine import peak_rss_bytes

    with moeflow.load(spec["model"], expert_budget=spec["budget"], store="disk", **spec["options"]) as engine:
        decode_s, decode_bytes, decode_tokens, misses, agree, stall = 0.0, 0, 0, 0, 0, 0.0
        tokens = []
        forced_texts = spec.get("forced") or [None] * len(spec["prompts"])
        for prompt, forced in zip(spec["prompts"], forced_texts, strict=True):
            seq = engine.new_sequence(prompt, max_new_tokens=spec["tokens"])
            batch = engine.new_batch()
            batch.prefill(seq)
            if forced is not None:
                agree += force_token(seq, forced)
            engine.settle()
            before = engine.stats()
            t0 = time.perf_counter()
            batch.add(seq)
            while not seq.done:
                batch.step()
                if forced is not None:
                    agree += force_token(seq, forced)
            decode_s += time.perf_counter() - t0
            engine.settle()
            after = engine.stats()
            decode_bytes += after.bytes_read - before.bytes_read
            misses += after.misses - before.misses
            stall += after.stall_s - before.stall_s
            decode_tokens += len(seq.generated) - 1
            tokens.append(list(seq.generated))
        stats = engine.stats()
        fmt = engine.expert_format
    return {
        "tokens": tokens, "decode_s": decode_s, "decode_tokens": decode_tokens,
        "decode_tokens_per_s": decode_tokens / decode_s, "decode_bytes_per_token": decode_bytes / decode_tokens,
        "decode_misses_per_token": misses / decode_tokens, "bytes_per_miss": decode_bytes / max(misses, 1),
        "decode_stall_ms_per_token": 1e3 * stall / decode_tokens,
        "hit_rate": stats.hit_rate, "capacity_slots": stats.capacity_slots, "slot_bytes": stats.slot_bytes,
        "expert_format": None if fmt is None else fmt.name, "peak_rss_bytes": peak_rss_bytes(),
        "forced": spec.get("forced") is not None,
        "greedy_agreement": agree / sum(map(len, tokens)) if spec.get("forced") else None,
    }  # fmt: skip


def force_token(seq: object, forced: list[int]) -> bool:
    """Teacher forcing: the token just sampled becomes the reference's token at that position (the next step
    reads it), the sequence ends where the reference ended. Whether the sampled one was it."""
    i = len(seq.generated) - 1
    agreed = seq.generated[i] == forced[i]
    seq.generated[i] = forced[i]
    seq.finish_reason = None if i + 1 < len(forced) else "length"
    return agreed


def perplexity(model: Path, options: dict, max_tokens: int, context: int) -> dict:
    """Mean next-token loss over the held-out files, in windows of `context` tokens, all experts resident.

    int8/int4 are scored with the arithmetic decoding uses, torch's packed matmuls with bf16 activations, on every
    row (the engine dequantizes a slot serving more than PACKED_MAX_ROWS rows of a step, as these windows do;
    measured on 8192 tokens: the two differ by at most 0.05% in perplexity)."""
    import moeflow.kernels.quant
    import torch
    from transformers import AutoTokenizer

    import moeflow
    from moeflow.config import DEFAULT_MODEL
    from moeflow.model.corpus import model_corpus

    moeflow.kernels.quant.PACKED_MAX_ROWS = context  # this child process only

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    ids: list[int] = []
    for f in model_corpus(DEFAULT_MODEL, "heldout"):
        ids += tokenizer(f.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    ids = ids[: max_tokens + 1]
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    with moeflow.load(model, expert_budget="all", store="ram", **options) as engine, torch.no_grad():
        for start in range(0, len(ids) - 1, context):
            window = torch.tensor([ids[start : start + context + 1]])
            logits = engine.model(window[:, :-1]).logits[0]
            loss = torch.nn.functional.cross_entropy(logits.float(), window[0, 1:], reduction="sum")
            nll, count = nll + loss.item(), count + window.shape[1] - 1
    return {"tokens": count, "loss": nll / count, "perplexity": math.exp(nll / count), "s": time.perf_counter() - t0}


# ---- the parent -----------------------------------------------------------------------------------------


def memory_limit(model: Path, budget: str, runtime: int) -> int:
    """The fp32 contender's ceiling, given to every contender: runtime + dense weights + its budget + slack."""
    from moeflow.model.checkpoint import open_checkpoint
    from moeflow.offload.budget import resolve_budget

    ckpt = open_checkpoint(model)
    loc = next(iter(ckpt.experts.values()))
    slot_bytes = 3 * loc.inter * loc.hidden * 4
    top_k = int(ckpt.config["num_experts_per_tok"])
    b = resolve_budget(budget, slot_bytes=slot_bytes, total_experts=len(ckpt.experts), top_k=top_k)
    return runtime + dense_bytes(model) + b.slots * slot_bytes + SLACK_BYTES


def speed_part(args: argparse.Namespace) -> dict:
    base = prepare_model("iobound", args.workdir)
    prompts = heldout_prompts(args.prompts)
    limit = memory_limit(base, args.budget, runtime_baseline_bytes())
    jobs = []
    for name, kind, group in SPEED_FORMATS:
        spec = {"kind": "decode", "model": str(quantized_folder(base, kind, group, args.workdir)),
                "budget": args.budget, "options": {"threads": args.threads}, "prompts": prompts,
                "tokens": args.tokens}  # fmt: skip
        jobs.append((name, spec))
    best: dict[str, dict] = {}
    for rnd in range(args.repeats):
        for position, (name, spec) in enumerate(round_order(jobs, rnd)):  # round 0: fp32 first, for its text
            if name != "fp32" and "tokens" in best.get("fp32", {}):
                spec["forced"] = best["fp32"]["tokens"]  # the same text as fp32 (greedy: every round's)
            time.sleep(args.pause)
            dropped = drop_caches()
            row = run_child([sys.executable, __file__, "--child", json.dumps(spec)], limit_bytes=limit,
                            timeout_s=args.child_timeout)  # fmt: skip
            row.update(name=name, round=rnd, position=position, page_cache_dropped=dropped)
            speed = row.get("decode_tokens_per_s", 0.0)
            print(f"[round {rnd + 1}/{args.repeats}] {name:>10}: "
                  + (f"{speed:6.2f} tok/s, {row['decode_bytes_per_token'] / 2**20:7.2f} MiB/token, "
                     f"stall {row['decode_stall_ms_per_token']:5.1f} ms/token"
                     + (f", greedy agreement {row['greedy_agreement']:.1%}" if row["forced"] else "")
                     if "error" not in row else f"failed: {row['error'][-300:]}"), flush=True)  # fmt: skip
            rounds = [*best.get(name, {}).get("all_rounds_tokens_per_s", []), speed]
            if name not in best or "error" in best[name] or speed > best[name].get("decode_tokens_per_s", -1):
                best[name] = row
            best[name]["all_rounds_tokens_per_s"] = rounds
            best[name]["median_tokens_per_s"] = statistics.median(rounds)
    fp32 = best["fp32"]
    rows = []
    for name, _ in jobs:
        r = best[name]
        if "error" not in r and "error" not in fp32:
            r["speedup_vs_fp32"] = r["decode_tokens_per_s"] / fp32["decode_tokens_per_s"]
            r["median_speedup_vs_fp32"] = r["median_tokens_per_s"] / fp32["median_tokens_per_s"]
            r["bytes_per_token_vs_fp32"] = r["decode_bytes_per_token"] / fp32["decode_bytes_per_token"]
            r["bytes_per_miss_vs_fp32"] = r["bytes_per_miss"] / fp32["bytes_per_miss"]
            if not r["forced"]:  # forced contenders decode fp32's text by construction (greedy_agreement instead)
                r["tokens_equal_fp32"] = r["tokens"] == fp32["tokens"]
        rows.append(r)
    for r in rows:
        r.pop("tokens", None)
    # The disk decides these figures more than anything else on this VM: its cold read rate, after the run.
    disk = disk_bandwidth(sorted(base.glob("*.safetensors"))[-1]) / 2**30
    return {"model": str(base), "budget": args.budget, "memory_limit_bytes": limit, "prompts": len(prompts),
            "disk_gib_s": disk,
            "max_new_tokens": args.tokens, "repeats": args.repeats, "threads": args.threads or "auto",
            "contenders": rows}  # fmt: skip


def kernels_part(args: argparse.Namespace) -> dict:
    """ms per expert use at T = 1 on the I/O-bound model's geometry (one compute thread, as the engine runs), each
    formulation of `quantized_experts_forward` side by side, rounds interleaved, median; experts rotate over a pool
    larger than the last-level cache. Also what repacking a miss into torch's int4 layout would cost."""
    import torch
    from moeflow.kernels import experts_forward
    from moeflow.kernels.quant import GATE_UP_PIECES, ExpertFormat, QuantizedPool, quantize, quantized_experts_forward

    torch.set_num_threads(1)
    inter, hidden, slots = WIDE_INTERMEDIATE, 192, 16
    gen = torch.Generator().manual_seed(0)
    gate_up = torch.randn(slots, 2 * inter, hidden, generator=gen) * 0.05
    down = torch.randn(slots, hidden, inter, generator=gen) * 0.05
    x = torch.randn(1, hidden, generator=gen)
    weights = torch.tensor([[1.0]])
    calls = {"fp32": lambda s: experts_forward(x, gate_up, down, weights, torch.tensor([[s]]))}
    repack_ms = None
    for name, fmt in (("int8", ExpertFormat(kind="int8")), ("int4-g128", ExpertFormat(kind="int4", group_size=128))):
        gu = [quantize(w, fmt, pieces=GATE_UP_PIECES) for w in gate_up]
        dn = [quantize(w, fmt) for w in down]
        pool = QuantizedPool(fmt=fmt, gate_up_q=torch.stack([q for q, _ in gu]), down_q=torch.stack([q for q, _ in dn]),
                             gate_up_scale=torch.stack([s for _, s in gu]), down_scale=torch.stack([s for _, s in dn]),
                             inter=inter, hidden=hidden)  # fmt: skip
        for packed in (False, True):
            calls[f"{name} {'packed' if packed else 'dequantize'}"] = (
                lambda s, pool=pool, packed=packed: quantized_experts_forward(
                    x, pool, weights, torch.tensor([[s]]), packed=packed))  # fmt: skip
        if fmt.kind == "int4":
            codes = [torch.randint(0, 16, (2 * inter, hidden)).int(), torch.randint(0, 16, (hidden, inter)).int()]
            t0 = time.perf_counter()
            for c in codes:
                torch._convert_weight_to_int4pack_for_cpu(c, 1)
            repack_ms = (time.perf_counter() - t0) * 1e3
    times: dict[str, list[float]] = {name: [] for name in calls}
    for rnd in range(args.repeats * 10 + 2):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call(rnd % slots)
            if rnd >= 2:  # warm-up rounds
                times[name].append((time.perf_counter() - t0) * 1e3)
    rows = {name: round(statistics.median(t), 3) for name, t in times.items()}
    for name, ms in rows.items():
        print(f"[kernels] {name:>22}: {ms:.3f} ms per expert (T = 1)", flush=True)
    print(f"[kernels] repacking one int4 expert with torch's converter (if stored otherwise): {repack_ms:.1f} ms")
    return {"inter": inter, "hidden": hidden, "threads": 1, "ms_per_expert_t1": rows,
            "int4_repack_ms_per_expert": round(repack_ms, 2), "load_average": os.getloadavg()}  # fmt: skip


def quality_part(args: argparse.Namespace) -> dict:
    from moeflow.config import DEFAULT_MODEL

    rows = []
    for name, kind, group in QUALITY_FORMATS:
        folder = quantized_folder(DEFAULT_MODEL, kind, group, args.workdir)
        options = {"expert_dtype": "bf16"} if kind == "bf16" else {}
        spec = {"kind": "perplexity", "model": str(folder), "options": options, "max_tokens": args.ppl_tokens,
                "context": args.context}  # fmt: skip
        row = run_child([sys.executable, __file__, "--child", json.dumps(spec)], limit_bytes=None,
                        timeout_s=args.child_timeout)  # fmt: skip
        row["name"] = name
        print(f"[quality] {name:>10}: " + (f"perplexity {row['perplexity']:.4f} over {row['tokens']} tokens"
                                            if "error" not in row else f"failed: {row['error'][-300:]}"), flush=True)
        rows.append(row)
    fp32 = rows[0]
    for r in rows:
        if "error" not in r and "error" not in fp32:
            r["perplexity_vs_fp32"] = r["perplexity"] / fp32["perplexity"]
    return {"model": str(DEFAULT_MODEL), "split": "heldout", "context": args.context, "rows": rows}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    speed = [r for r in result.get("speed", {}).get("contenders", []) if "error" not in r]
    names = [r["name"] for r in speed]
    axes[0].bar(names, [r["decode_tokens_per_s"] for r in speed], color=["#777", "#3a7", "#37a"][: len(names)])
    for i, r in enumerate(speed):
        med = f"\nmedian {r['median_speedup_vs_fp32']:.2f}x" if "median_speedup_vs_fp32" in r else ""
        axes[0].text(i, r["decode_tokens_per_s"], f"{r.get('speedup_vs_fp32', 1):.2f}x{med}", ha="center",
                     va="bottom")  # fmt: skip
    part = result.get("speed", {})
    disk = f" ({part['disk_gib_s']:.2f} GiB/s cold)" if "disk_gib_s" in part else ""
    axes[0].set_title(f"decode tok/s (best round), I/O-bound model,\n{part.get('budget')} budget, disk{disk}")
    if speed:
        axes[0].set_ylim(0, max(r["decode_tokens_per_s"] for r in speed) * 1.25)
    colors = ["#777", "#3a7", "#37a"][: len(names)]
    axes[1].bar(names, [r["decode_bytes_per_token"] / 2**20 for r in speed], color=colors)
    for i, r in enumerate(speed):
        axes[1].text(i, r["decode_bytes_per_token"] / 2**20, f"{r.get('bytes_per_token_vs_fp32', 1):.3f}",
                     ha="center", va="bottom")  # fmt: skip
    axes[1].set_title("MiB read per decode token (ratio to fp32)")
    quality = [r for r in result.get("quality", {}).get("rows", []) if "error" not in r]
    axes[2].bar([r["name"] for r in quality], [r["perplexity"] for r in quality], color="#a73")
    for i, r in enumerate(quality):
        axes[2].text(i, r["perplexity"], f"{100 * (r.get('perplexity_vs_fp32', 1) - 1):+.2f}%", ha="center",
                     va="bottom")  # fmt: skip
    axes[2].set_title("perplexity, shipped model, held-out files")
    if quality:
        lo = min(r["perplexity"] for r in quality)
        axes[2].set_ylim(lo * 0.95, max(r["perplexity"] for r in quality) * 1.02)
    fig.suptitle(f"moeflow quantized experts — {result['machine']['cpu']}, {result['machine']['cores']} cores (shared)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path("bench/results/quantized"))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/moeflow-quantized"))
    ap.add_argument("--part", choices=("speed", "quality", "kernels", "all"), default="all")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="speed: compute threads (0: the engine's rule)")
    ap.add_argument("--ppl-tokens", type=int, default=32768)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--pause", type=float, default=15.0, help="speed: seconds idle before each run (the disk recovers)")
    ap.add_argument("--child-timeout", type=float, default=1800)
    args = ap.parse_args()
    if args.child is not None:
        spec = json.loads(args.child)
        if spec["kind"] == "decode":
            print(json.dumps(decode_child(spec)))
        else:
            print(json.dumps(perplexity(Path(spec["model"]), spec["options"], spec["max_tokens"], spec["context"])))
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "quantized.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    result["machine"] = machine()
    result["note"] = ("a 2-core machine that other work may share: compare ratios within one run, not absolute "
                      "figures across runs")  # fmt: skip
    if args.part in ("speed", "all"):
        result["speed"] = speed_part(args)
    if args.part in ("quality", "all"):
        result["quality"] = quality_part(args)
    if args.part in ("kernels", "all"):
        result["kernels"] = kernels_part(args)
    path.write_text(json.dumps(result, indent=1))
    plot(result, args.out / "quantized.png")
    print(f"[wrote {path} and quantized.png]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
