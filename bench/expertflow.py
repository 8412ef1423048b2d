"""ExpertFlow's promise, measured in tokens/s: predictive prefetch (and the default policy, auto) vs LRU, and the token
re-batcher vs FIFO.

Three models, because prediction must pay where users are and must not cost where it cannot help:

- ``iobound``: the shipped model with every expert zero-widened to ~18 MiB (`moeflow.tools.widen`):
  the same routing and tokens as the shipped model, learned (hence predictable) routing, and an
  expert read costs far more than its compute — a Mixtral on a small GPU. Built on demand.
- ``default``: the shipped model itself (0.4 MiB experts): compute-bound.
- ``random``: a Mixtral-shaped checkpoint with random weights (bench/offload_decode.py's): routing
  no predictor has seen; prediction must know when not to trust itself.

LRU, auto, path and path (no trial) also run with reader threads in the engine's process (``--no-read-process``)
beside the reader process the engine reads in by default (`moeflow.offload.mover`). On ``iobound``, LRU and
path (no trial) also run with ``--kernels fast`` (experts computed by numpy's BLAS, within fp32 rounding): what
faster expert compute does to an I/O-bound decode. On ``iobound``, the perfect-foresight contenders of
``bench/oracle.py`` too: the routing recorded beforehand, answered with certainty, eviction knowing 1, 2 or 4 tokens
ahead (``oracle (h tokens)``) or by the trained reuse model (``oracle (path's role)``): what prediction could win.

Every contender is a fresh process inside a cgroup memory group with the same limit for all
(runtime + dense weights + the expert budget + slack), started after the page cache is dropped,
experts read from disk with O_DIRECT; rounds interleave the contenders, the order rotating each round
and a pause (``--pause``) before every run: this VM's disk reads faster after an idle spell, and a fixed
order gave it to whoever ran first (``harness.round_order``). Each one's best round is kept, its
median, and the median of its per-round ratios to LRU (``round_ratio``; the table's ``rnd x``). Each
contender's tokens must equal LRU's (checked). ``decode`` reports decode tokens/s,
bytes read per decode token and decode hit rate, with Belady's offline optimum replayed on LRU's own
decode routing as the bytes reference, and each predictive contender's own decode replayed
(`moeflow.tools.profile.replay`, with the overlap and contention the live engine used) next to its live hit
rate; ``rebatch`` runs ``generate --prompts``-style batches on the I/O-bound model at B = 8 and 32,
FIFO vs the re-batcher, under each eviction policy of ``--policies`` (LRU and LRFU: a batch step needs more
experts than the budget holds, where LRU evicts each one just before it is needed again).

    python bench/expertflow.py --out bench/results                      # everything
    python bench/expertflow.py --models iobound --part decode --repeats 1
    python bench/expertflow.py --models iobound --part decode --contenders auto,predictive/path
    python bench/expertflow.py --models iobound --part decode --contenders predictive/path --baseline 76599a8

``--baseline COMMIT`` runs every decode contender a second time from that commit's tree (a git worktree, its own
bench/expertflow.py as the child), named "... (before)", interleaved with the rest: an engine change before and
after in one run, beside LRU of this tree.

Writes ``expertflow.json`` and ``expertflow.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    check_commit,
    checkout,
    dense_bytes,
    describe_commits,
    disk_bandwidth,
    drop_caches,
    machine,
    prepare_model,
    round_order,
    run_child,
    runtime_baseline_bytes,
)

PROMPT_TOKENS = 24
ORACLE = "oracle_horizon"  # a contender's option (not the engine's): tokens of routing it knows ahead
ORACLE_HORIZONS = (None, 1, 2, 4)  # None: the shipped predictors' part alone, eviction by the trained reuse model
SLACK_BYTES = 640 << 20  # activations, KV caches, reader bounce buffers (<= 256 MiB), predictor tables: same for all


# ---- models and prompts ---------------------------------------------------------------------------------


def heldout_prompts(n: int) -> list[list[int]]:
    """`n` prompts of about PROMPT_TOKENS tokens (as token ids): windows of 12 lines starting every 8 lines of
    the held-out files, `n` of them evenly spaced over all (fewer only if the files hold fewer)."""
    from transformers import AutoTokenizer

    from moeflow.config import DEFAULT_MODEL
    from moeflow.model.corpus import model_corpus

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    windows: list[list[int]] = []
    for f in model_corpus(DEFAULT_MODEL, "heldout"):
        lines = f.read_text(encoding="utf-8").splitlines(keepends=True)
        for i in range(0, len(lines), 8):
            ids = tokenizer("".join(lines[i : i + 12]), add_special_tokens=False)["input_ids"][:PROMPT_TOKENS]
            if len(ids) >= PROMPT_TOKENS // 2:
                windows.append(ids)
    return [windows[i * len(windows) // n] for i in range(min(n, len(windows)))]


def random_prompts(n: int, vocab: int) -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[rng.randrange(vocab) for _ in range(PROMPT_TOKENS)] for _ in range(n)]


# ---- one contender, in a child process ------------------------------------------------------------------


def oracle_name(horizon: int | None) -> str:
    return "oracle (path's role)" if horizon is None else f"oracle ({horizon} token{'s' if horizon > 1 else ''})"


def decode_child(spec: dict) -> dict:
    """Greedy decode of every prompt, one at a time; prefill and decode measured apart."""
    import moeflow

    foresight = None
    if "oracle" in spec:  # perfect foresight (bench/oracle.py): an engine without a predictor's hooks, fed the record
        from oracle import attach_oracle

        from moeflow.config import EngineConfig
        from moeflow.engine import Engine

        engine = Engine(spec["model"], EngineConfig(expert_budget=spec["budget"], store="disk", **spec["options"]))
        try:
            foresight = attach_oracle(engine, spec["oracle"]["sequences"], spec["oracle"]["horizon"])
        except BaseException:
            engine.close()
            raise
    else:
        engine = moeflow.load(spec["model"], expert_budget=spec["budget"], store="disk", **spec["options"])
    with engine:
        prefill_s = decode_s = 0.0
        decode_bytes = decode_tokens = decode_hits = decode_misses = 0
        decode_reading_s = 0.0  # seconds the store had a read in progress during decode steps
        trial = engine.prefetcher.trial if engine.prefetcher is not None else None
        by_mode = {True: [0, 0], False: [0, 0]}  # predicting? -> [hits, misses] of its decode steps
        tokens: list[list[int]] = []
        routing: list[list[list[int]]] = []  # decode step -> MoE layer -> top-k experts
        stall_by_layer = [0.0] * len(engine.checkpoint.moe_layers)  # decode stall, by MoE layer position
        for prompt in spec["prompts"]:
            seq = engine.new_sequence(prompt, max_new_tokens=spec["tokens"])
            batch = engine.new_batch()
            t0 = time.perf_counter()
            batch.prefill(seq)
            t1 = time.perf_counter()
            before = mark = engine.stats()
            batch.add(seq)
            while not seq.done:
                predicting = engine.prefetcher is not None and (trial is None or trial.predicting)  # this step's mode
                result = batch.step()
                now = engine.stats()  # one read a step: its end is the next step's start
                by_mode[predicting][0] += now.hits - mark.hits
                by_mode[predicting][1] += now.misses - mark.misses
                mark = now
                if spec["record_routing"]:
                    routing.append([e.top_k_index_TK[0].tolist() for e in result.routing])
            t2 = time.perf_counter()
            engine.settle()
            after = engine.stats()
            for i, (a, b) in enumerate(zip(after.per_layer, before.per_layer)):
                stall_by_layer[i] += a.stall_s - b.stall_s
            decode_bytes += after.bytes_read - before.bytes_read
            decode_reading_s += after.reading_s - before.reading_s
            decode_hits += after.hits - before.hits
            decode_misses += after.misses - before.misses
            decode_tokens += len(seq.generated) - 1
            prefill_s, decode_s = prefill_s + t1 - t0, decode_s + t2 - t1
            tokens.append(list(seq.generated))
        stats = engine.stats()
        counters = engine.prefetcher.counters.to_dict() if engine.prefetcher is not None else None
        overlap = engine.prefetcher.overlap if engine.prefetcher is not None else None
        # what admission assumed on average over the run's predicting decode steps: what its replay assumes
        used = engine.prefetcher.mean_admission if engine.prefetcher is not None else None
        windows = engine.prefetcher.windows if engine.prefetcher is not None else None  # layers read ahead -> steps
        verdicts = None if trial is None else {"trials": trial.trials, "switches": trial.switches,
                                               "predicting_at_end": trial.best,
                                               "ms_per_row": {("predicting" if k else "lru"): 1e3 * v
                                                              for k, v in trial.seconds_per_row.items()}}  # fmt: skip
    return {
        "tokens": tokens, "routing": routing, "prefill_s": prefill_s, "decode_s": decode_s,
        "decode_tokens": decode_tokens, "decode_tokens_per_s": decode_tokens / decode_s,
        "decode_bytes_per_token": decode_bytes / decode_tokens, "hit_rate": stats.hit_rate,
        # the store's read rate while it read (against the raw O_DIRECT `disk_gib_s`), and its busy share of decode
        "decode_read_gib_s": decode_bytes / decode_reading_s / 2**30 if decode_reading_s > 0 else None,
        "decode_reading_share": decode_reading_s / decode_s,
        "misses": stats.misses, "prefetch_hits": stats.prefetch_hits, "wasted_prefetches": stats.wasted_prefetches,
        "stall_s": stats.stall_s, "capacity_slots": stats.capacity_slots, "prefetch": counters,
        "decode_hit_rate": decode_hits / max(decode_hits + decode_misses, 1), "overlap": overlap,
        "mean_overlap": None if used is None else used[0], "mean_contention": None if used is None else used[1],
        "read_ahead_steps": windows,
        "decode_stall_ms_per_token_by_layer": [1e3 * s / decode_tokens for s in stall_by_layer],
        "trial": verdicts,
        "oracle_disagreements": None if foresight is None else foresight.disagreements,
        # The decode steps run predicting, and those the trial ran as plain LRU, apart: replay always predicts.
        "decode_hit_rate_by_mode": {("predicting" if mode else "lru"): {"hit_rate": h / max(h + m, 1), "lookups": h + m}
                                    for mode, (h, m) in by_mode.items() if h + m},
    }  # fmt: skip


def rebatch_child(spec: dict) -> dict:
    import moeflow
    from moeflow.build import make_admission
    from moeflow.scheduler import run_batch

    with moeflow.load(spec["model"], expert_budget=spec["budget"], store="disk", policy=spec["policy"]) as engine:
        run = run_batch(engine, spec["prompts"], batch_size=spec["batch_size"],
                        admission=make_admission(spec["admission"], engine), max_new_tokens=spec["tokens"])
        stats = engine.stats()
    tokens = sum(len(r.token_ids) for r in run.results)
    return {
        "tokens": [r.token_ids for r in run.results], "elapsed_s": run.elapsed_s,
        "tokens_per_s": tokens / run.elapsed_s,
        "distinct_experts_per_step": sum(run.distinct_experts) / len(run.distinct_experts),
        "mean_batch": sum(run.batch_sizes) / len(run.batch_sizes), "hit_rate": stats.hit_rate,
        "bytes_per_token": stats.bytes_read / tokens, "stall_s": stats.stall_s,
        "read_gib_s": stats.bytes_read / stats.stall_s / 2**30 if stats.stall_s else None,
    }  # fmt: skip


# ---- the parent: contenders, equal limits, interleaved rounds ---------------------------------------------


def memory_limit(model: Path, budget: str, runtime: int) -> int:
    """The same ceiling for every contender on `model`: runtime + dense weights + the expert budget + slack."""
    from moeflow.model.checkpoint import open_checkpoint
    from moeflow.offload.budget import resolve_budget

    ckpt = open_checkpoint(model)
    loc = next(iter(ckpt.experts.values()))
    inter, hidden = loc.inter, loc.hidden
    slot_bytes = 3 * inter * hidden * 4  # the CPU engine computes in float32
    top_k = int(ckpt.config["num_experts_per_tok"])
    b = resolve_budget(budget, slot_bytes=slot_bytes, total_experts=len(ckpt.experts), top_k=top_k)
    return runtime + dense_bytes(model) + b.slots * slot_bytes + SLACK_BYTES


def child_command(spec: dict) -> list[str]:
    """The command of one contender's run: this script as the child, or where the spec names a "tree" (`--baseline`),
    that tree's own script with the tree first on the import path."""
    tree = spec.get("tree")
    if tree is None:
        return [sys.executable, __file__, "--child", json.dumps(spec)]
    return ["env", f"PYTHONPATH={tree}", sys.executable, str(Path(tree) / "bench" / "expertflow.py"), "--child",
            json.dumps(spec)]  # fmt: skip


def rounds(jobs: list[tuple[str, dict, int]], repeats: int, timeout_s: float, pause_s: float = 0.0) -> dict[str, dict]:
    """Run every (name, spec, limit) job `repeats` times, interleaved, the order rotating each round (`round_order`:
    with as many rounds as jobs, each runs once in every position), after `pause_s` idle before each; keep each
    one's fastest round, and the median of all."""
    best: dict[str, dict] = {}
    for rnd in range(repeats):
        for position, (name, spec, limit) in enumerate(round_order(jobs, rnd)):
            time.sleep(pause_s)
            dropped = drop_caches()
            t0 = time.perf_counter()
            row = run_child(child_command(spec), limit_bytes=limit, timeout_s=timeout_s)
            row.update(name=name, round=rnd, position=position, page_cache_dropped=dropped,
                       wall_s=time.perf_counter() - t0)
            speed = row.get("decode_tokens_per_s", row.get("tokens_per_s", 0.0))
            print(f"[round {rnd + 1}/{repeats}] {name:>36}: "
                  + (f"{speed:7.2f} tok/s" if "error" not in row else f"failed: {row['error'][-300:]}"), flush=True)
            runs = best.get(name, {}).get("all_rounds_tokens_per_s", [])
            if name not in best or "error" in best[name] or speed > best[name].get("speed", -1):
                best[name] = {**row, "speed": speed}
            best[name]["all_rounds_tokens_per_s"] = [*runs, speed]
            best[name]["median_tokens_per_s"] = statistics.median(best[name]["all_rounds_tokens_per_s"])
    return best


def round_ratio(row: dict, lru: dict) -> float:
    """The median over rounds of `row`'s tokens/s over LRU's in the same round: each round runs every contender
    once, close together in time, so this pairs away the drift of this VM's speed from round to round (runs
    minutes apart moved by 20-30% on 2026-12-03), which the ratio of best or of medians keeps."""
    pairs = zip(row["all_rounds_tokens_per_s"], lru["all_rounds_tokens_per_s"], strict=True)
    return statistics.median(r / base for r, base in pairs if base > 0)


def replay_on_routing(model: Path, routing: list[list[list[int]]], slots: int) -> dict:
    """Replay LRU's own decode routing through the real cache (no disk) with LRU and with Belady's offline
    optimum: bytes per decode token and hit rate, the reference for every contender's bytes."""
    import numpy as np

    from moeflow.model.checkpoint import open_checkpoint
    from moeflow.tools.profile.replay import replay
    from moeflow.tools.profile.setting import BudgetPoint, Geometry
    from moeflow.tools.trace import Trace

    ckpt = open_checkpoint(model)
    geometry = Geometry.of(ckpt, int(ckpt.config["num_experts_per_tok"]))
    experts_NLK = np.asarray(routing, dtype=np.int16)
    N = len(experts_NLK)
    zeros = np.zeros(N, dtype=np.int32)
    meta = {"layers": list(geometry.layers), "num_experts": geometry.num_experts, "top_k": geometry.top_k}
    trace = Trace(meta=meta, token_ids=zeros, positions=np.arange(N, dtype=np.int32), seq_ids=zeros, doc_ids=zeros,
                  experts=experts_NLK, weights=np.zeros(experts_NLK.shape, dtype=np.float16))
    budget = BudgetPoint(spec=f"{slots} slots", fraction=slots / geometry.total_experts, slots=slots)
    out = {}
    for policy in ("lru", "belady"):
        stats = replay(trace, geometry, policy=policy, budget=budget).stats
        out[policy] = {"bytes_per_token": stats.bytes_read / N, "hit_rate": stats.hit_rate}
    return out


def replay_decode(model: Path, prompts: list[list[int]], generated: list[list[int]], predictor: str, slots: int,
                  overlap: float, contention: float, *, reuse: bool, lookahead: int, read_ahead: int) -> dict:
    """The live decode replayed (`moeflow.tools.profile.replay`): each prompt + its generated tokens traced
    with `predictor` (teacher forcing gives the decode's routing exactly), each prompt replayed as one prefill
    step and its decode tokens one per step (counted) through the same cache size, with the overlap and
    contention the live engine assumed on average (it measures both as it goes:
    `PredictivePrefetcher.mean_admission`), the same `lookahead` and `read_ahead` and, if `reuse`, the model's
    trained reuse model as the live engine found it; its hit rate and bytes per decode token are what profiling would
    have predicted for that run."""
    import numpy as np
    from moeflow.predictor.apply import build_predictor

    import moeflow
    from moeflow.model.checkpoint import open_checkpoint
    from moeflow.offload.reuse import ReuseModel, reuse_files
    from moeflow.tools.profile.replay import replay
    from moeflow.tools.profile.setting import BudgetPoint, Geometry
    from moeflow.tools.trace import record_token_ids

    chunks = [(i, list(p) + list(g)) for i, (p, g) in enumerate(zip(prompts, generated))]
    with moeflow.load(model, expert_budget="all", store="ram") as engine:
        trace = record_token_ids(engine, chunks, context=max(len(c) for _, c in chunks),
                                 predictors=[build_predictor(engine, predictor, lookahead=lookahead)])
    # Each prompt is one prefill step, as the live engine ran it, before its decode steps (which alone are counted).
    starts = np.flatnonzero(np.asarray(trace.positions) == 0)
    prefill = [(int(start), int(start) + len(p)) for start, p in zip(starts, prompts, strict=True)]
    ckpt = open_checkpoint(model)
    geometry = Geometry.of(ckpt, int(ckpt.config["num_experts_per_tok"]))
    budget = BudgetPoint(spec=f"{slots} slots", fraction=slots / geometry.total_experts, slots=slots)
    folder = model / "predictors"
    reuse_model = None
    if reuse and reuse_files(folder)[0].is_file():
        reuse_model = ReuseModel.load(folder, layers=geometry.layers, num_experts=geometry.num_experts)
    r = replay(trace, geometry, policy="predictive", budget=budget, predictor=predictor, overlap=overlap,
               contention=contention, reuse=reuse_model, prefill=prefill, read_ahead=read_ahead)
    return {"hit_rate": r.stats.hit_rate, "bytes_per_token": r.stats.bytes_read / r.tokens, "tokens": r.tokens}


def decode_part(args: argparse.Namespace, runtime: int, baseline: Path | None = None) -> dict:
    """Every model's decode contenders, interleaved; with `baseline` (a tree, `--baseline`), each again from it."""
    out = {}
    for model_name in args.models:
        model = prepare_model(model_name, args.workdir)
        trained = model_name != "random"
        if trained:
            # The shipped model decodes ~10x faster than the I/O-bound one: more prompts give its contenders runs of
            # ~15 s, long enough to measure a few percent on a shared machine.
            prompts = heldout_prompts(args.default_prompts if model_name == "default" else args.decode_prompts)
        else:
            from moeflow.model.checkpoint import open_checkpoint

            # As many prompts as the I/O-bound model: with a third of them (128 tokens, ~10 s a run) the same contender
            # ranged 10.8-13.4 tok/s over 3 rounds, wider than the 5% the criterion asks about.
            prompts = random_prompts(args.decode_prompts, int(open_checkpoint(model).config["vocab_size"]))
        predictors = ("path", "token_freq", "gate") if trained else ("gate",)
        # auto: the engine's default, no predictor (LRU, LRFU or, on the trained models, the reuse model)
        contenders = [("lru", {"policy": "lru"}), ("auto", {"policy": "auto"})]
        contenders += [(f"predictive/{p}", {"policy": "predictive", "predictor": p}) for p in predictors]
        if trained:  # the eviction estimate side by side: the trained reuse model (above) against the online one
            contenders.append(("predictive/path (next-use)",
                               {"policy": "predictive", "predictor": "path", "reuse_model": False}))
            # reads ahead for the next token's first layer (`moeflow.predictor.ahead`) against none
            contenders += [(f"predictive/{p} (no next-token)",
                            {"policy": "predictive", "predictor": p, "next_token_prefetch": False})
                           for p in ("path", "token_freq")]
            # prediction on at every step, against the trial that times steps with and without it (`PredictionTrial`)
            contenders.append(("predictive/path (no trial)",
                               {"policy": "predictive", "predictor": "path", "prediction_trial": False}))
            # path's offers read one or two layers ahead, against the window chosen from the overlap (`--read-ahead`)
            contenders += [(f"predictive/path (read ahead {n})", {"policy": "predictive", "predictor": "path",
                                                                   "read_ahead": n}) for n in (1, 2)]
        # Reader threads in the engine's process (`--no-read-process`) beside the reader process (the default)
        contenders += [(f"{name} (reader threads)", {**options, "read_process": False}) for name, options in contenders
                       if name in ("lru", "auto", "predictive/path", "predictive/path (no trial)")]  # fmt: skip
        if model_name == "iobound":  # the experts computed by `--kernels fast` (numpy's BLAS), beside torch's MKL
            contenders += [(f"{name} (fast kernels)", {**options, "kernels": "fast"}) for name, options in contenders
                           if name in ("lru", "predictive/path (no trial)")]  # fmt: skip
        if model_name == "iobound":  # perfect foresight (bench/oracle.py): what prediction could win
            contenders += [(oracle_name(h), {"policy": "predictive", "prediction_trial": False, ORACLE: h})
                           for h in ORACLE_HORIZONS]
        if args.contenders:
            contenders = [c for c in contenders if c[0] == "lru" or c[0] in args.contenders]
        trees = {"": None} if baseline is None else {"": None, " (before)": str(baseline)}
        contenders = [(name + tag, options, tree) for tag, tree in trees.items() for name, options in contenders
                      if tree is None or ORACLE not in options]  # (an older tree has no oracle)
        recorded = None
        if any(ORACLE in options for _, options, _ in contenders):
            from oracle import record_routing

            recorded = record_routing(model, prompts, args.tokens, args.budget)
        limit = memory_limit(model, args.budget, runtime)
        jobs = [
            (f"{model_name} {name}", {"kind": "decode", "model": str(model), "budget": args.budget,
                                      "options": {k: v for k, v in options.items() if k != ORACLE},
                                      "prompts": prompts, "tokens": args.tokens, "record_routing": name == "lru",
                                      **({} if tree is None else {"tree": tree}),
                                      **({"oracle": {"horizon": options[ORACLE], "sequences": recorded}}
                                         if ORACLE in options else {})}, limit)
            for name, options, tree in contenders
        ]  # fmt: skip
        best = rounds(jobs, args.repeats, args.child_timeout, args.pause)
        rows = [best[name] for name, _, _ in jobs]
        lru = rows[0]
        for r in rows:
            r["tokens_equal_lru"] = "error" not in r and "error" not in lru and r["tokens"] == lru["tokens"]
            if "error" not in r and "error" not in lru:
                r["median_round_ratio"] = round_ratio(r, lru)
        reference = {}
        if "error" not in lru:
            reference = replay_on_routing(model, lru["routing"], lru["capacity_slots"])
        for (_, options, tree), r in zip(contenders, rows):
            if "predictor" in options and "error" not in r and tree is None:  # this tree's replay: its own runs
                r["replay"] = replay_decode(model, prompts, r["tokens"], options["predictor"], r["capacity_slots"],
                                            r["mean_overlap"], r["mean_contention"],
                                            reuse=options.get("reuse_model", True),
                                            lookahead=options.get("lookahead", 1),
                                            read_ahead=options.get("read_ahead", 0))
        for r in rows:
            r.pop("routing", None)
            r.pop("tokens", None)
        out[model_name] = {"model": str(model), "budget": args.budget, "memory_limit_bytes": limit,
                           "prompts": len(prompts), "max_new_tokens": args.tokens, "contenders": rows,
                           "replay_on_lru_routing": reference}  # fmt: skip
    return out


def rebatch_part(args: argparse.Namespace, runtime: int) -> dict:
    """FIFO vs the re-batcher at each batch size, under each eviction policy of `--policies`, all interleaved."""
    model = prepare_model("iobound", args.workdir)
    prompts = heldout_prompts(args.prompts)
    limit = memory_limit(model, args.budget, runtime)
    rows = []
    for batch in args.batch_sizes:
        jobs = [
            (f"B={batch} {admission} {policy}", {"kind": "rebatch", "model": str(model), "budget": args.budget,
                                                 "prompts": prompts, "tokens": args.rebatch_tokens,
                                                 "batch_size": batch, "admission": admission, "policy": policy}, limit)
            for policy in args.policies for admission in ("fifo", "rebatch")
        ]  # fmt: skip
        best = rounds(jobs, args.repeats, args.child_timeout, args.pause)
        reference = best[jobs[0][0]]  # FIFO under the first policy: every run's outputs must equal its
        for policy in args.policies:
            fifo, reb = best[f"B={batch} fifo {policy}"], best[f"B={batch} rebatch {policy}"]
            ok = "error" not in fifo and "error" not in reb and "error" not in reference
            rows.append({
                "batch_size": batch, "policy": policy, "fifo": {k: v for k, v in fifo.items() if k != "tokens"},
                "rebatch": {k: v for k, v in reb.items() if k != "tokens"},
                "outputs_equal": ok and fifo["tokens"] == reb["tokens"] == reference["tokens"],
                "speedup": reb["speed"] / fifo["speed"] if ok else None,
            })  # fmt: skip
    return {"model": str(model), "budget": args.budget, "prompts": len(prompts), "max_new_tokens": args.rebatch_tokens,
            "memory_limit_bytes": limit, "policies": args.policies, "rows": rows}


# ---- picture and entry point ---------------------------------------------------------------------------


def _bar_name(name: str) -> str:
    """'predictive/token_freq (no next-token)' -> short lines, so every label sits under its own bar unrotated."""
    return name.replace("/", "\n").replace(" (", "\n(")


def takeaway(result: dict) -> str:
    """One line: the best predictive contender against LRU on each model, and the re-batcher against FIFO."""
    parts = []
    for model_name, part in result.get("decode", {}).items():
        rows = [r for r in part["contenders"] if "error" not in r]
        lru = next((r for r in rows if r["name"].endswith(" lru")), None)
        others = [r for r in rows if r is not lru]
        if lru and others:
            best = max(others, key=lambda r: r["speed"])
            parts.append(f"{model_name} {best['speed'] / lru['speed']:.2f}x")
    text = f"best contender vs LRU, decode tokens/s: {', '.join(parts)}" if parts else ""
    rows = [row for row in result.get("rebatch", {}).get("rows", []) if row["fifo"].get("speed")]
    if rows:
        ratios = ", ".join(f"B={row['batch_size']}{_policy_tag(result, row)} "
                           + (f"{row['rebatch']['speed'] / row['fifo']['speed']:.2f}x"
                              if row["rebatch"].get("speed") else "failed")
                           for row in rows)
        text += ("; " if text else "") + f"re-batcher vs FIFO: {ratios}"
    return text


def _policy_tag(result: dict, row: dict) -> str:
    """' lrfu' where the batch runs compare eviction policies (results of old runs have one, unnamed: lru)."""
    return f" {row.get('policy', 'lru')}" if len(result["rebatch"].get("policies", ["lru"])) > 1 else ""


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode = result.get("decode", {})
    rows = len(decode) + (1 if "rebatch" in result else 0)
    fig, grid = plt.subplots(rows, 2, figsize=(11, 3.5 * rows + 0.6), squeeze=False)
    axes = list(grid.reshape(-1))

    def label_bars(ax, bars, texts) -> None:
        for bar, text in zip(bars, texts):
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points")
        ax.set_ylim(0, 1.18 * max(bar.get_height() for bar in bars))

    for model_name, part in decode.items():
        rows = [r for r in part["contenders"] if "error" not in r]
        names = [_bar_name(r["name"].split(" ", 1)[1]) for r in rows]
        lru = rows[0] if rows else None
        colors = ["#888"] + ["#1f77b4"] * (len(rows) - 1)
        hatches = ["//" if r["name"].endswith(" (before)") else "" for r in rows]  # `--baseline`'s runs
        ax = axes.pop(0)
        bars = ax.bar(names, [r["speed"] for r in rows], color=colors, hatch=hatches, edgecolor="white")
        label_bars(ax, bars, [f"{r['speed']:.1f} ({r['speed'] / lru['speed']:.2f}x)" for r in rows])
        ax.set_ylabel("decode tokens/s (higher is better)")
        ax.set_title(f"{model_name}: decode speed at {part['budget']} of experts, disk (x LRU)", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax = axes.pop(0)
        mib = [r["decode_bytes_per_token"] / 2**20 for r in rows]
        bars = ax.bar(names, mib, color=["#888"] + ["#2ca02c"] * (len(rows) - 1))
        label_bars(ax, bars, [f"{m:.2f}" if m < 10 else f"{m:.1f}" for m in mib])
        if "belady" in part["replay_on_lru_routing"]:
            ax.axhline(part["replay_on_lru_routing"]["belady"]["bytes_per_token"] / 2**20, color="black",
                       linestyle="--", label="Belady (offline optimum, on LRU's routing)")
            ax.legend(fontsize=7, loc="upper right")
        ax.set_ylabel("MiB read per decode token")
        ax.set_title(f"{model_name}: bytes read per token (lower is better)", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    if "rebatch" in result:
        r = result["rebatch"]
        ax = axes.pop(0)
        labels = [f"B={row['batch_size']}{_policy_tag(result, row)}" for row in r["rows"]]
        x = range(len(labels))
        fifo = [row["fifo"].get("speed", 0) for row in r["rows"]]
        rebatch = [row["rebatch"].get("speed", 0) for row in r["rows"]]
        bars_f = ax.bar([i - 0.2 for i in x], fifo, 0.4, label="fifo", color="#888")
        bars_r = ax.bar([i + 0.2 for i in x], rebatch, 0.4, label="re-batcher", color="#ff7f0e")
        label_bars(ax, [*bars_f, *bars_r], [f"{v:.1f}" for v in fifo] +
                   [(f"{v:.1f} ({v / f:.2f}x)" if f else f"{v:.1f}") if v else "failed" for v, f in zip(rebatch, fifo)])
        ax.set_xticks(list(x), labels)
        ax.set_ylabel("tokens/s (higher is better)")
        ax.set_title(f"token re-batcher vs FIFO: iobound, {r['prompts']} prompts, batch size B"
                     + (" and eviction policy" if len(r.get("policies", ["lru"])) > 1 else ""), fontsize=9)
        ax.legend(fontsize=8, loc="upper left")
        axes.pop(0).axis("off")
    m = result["machine"]
    equal = all(r.get("tokens_equal_lru", True) for part in decode.values() for r in part["contenders"])
    equal = equal and all(row.get("outputs_equal", True) for row in result.get("rebatch", {}).get("rows", []))
    fig.suptitle(f"{takeaway(result)}\n{m['cpu']}, {m['cores']} cores, disk {result['disk_gib_s']:.2f} GiB/s "
                 f"O_DIRECT, {m['date']}" + ("; every contender's tokens equal LRU's (FIFO's)" if equal else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/moeflow-bench"))
    parser.add_argument("--models", type=lambda s: s.split(","), default=["iobound", "default", "random"])
    parser.add_argument("--part", choices=("decode", "rebatch", "all"), default="all")
    parser.add_argument("--budget", default="25%")
    parser.add_argument("--tokens", type=int, default=64, help="decode: new tokens per prompt")
    parser.add_argument("--decode-prompts", type=int, default=6)
    parser.add_argument("--contenders", type=lambda s: s.split(","), default=None,
                        help="decode: only these besides lru (e.g. auto,predictive/path; default: all)")
    parser.add_argument("--default-prompts", type=int, default=24, help="decode: prompts on the shipped model")
    parser.add_argument("--prompts", type=int, default=256, help="rebatch: prompts in the batch job")
    parser.add_argument("--rebatch-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32])
    parser.add_argument("--policies", type=lambda s: s.split(","), default=["lru", "lrfu"],
                        help="rebatch: eviction policies, each run with FIFO and the re-batcher")
    parser.add_argument("--repeats", type=int, default=2, help="rounds; the best of each contender is kept")
    parser.add_argument("--pause", type=float, default=15.0, help="seconds idle before each run (the disk recovers)")
    parser.add_argument("--baseline", default=None,
                        help="decode: also run every contender from this commit's tree, named '... (before)'")
    parser.add_argument("--child-timeout", type=float, default=3600)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        spec = json.loads(args.child)
        print(json.dumps(decode_child(spec) if spec["kind"] == "decode" else rebatch_child(spec)))
        return 0
    if args.baseline:
        check_commit(parser, "--baseline", args.baseline)
    args.workdir.mkdir(parents=True, exist_ok=True)
    iobound = prepare_model("iobound", args.workdir)
    result: dict = {"machine": machine(), "command": " ".join(sys.argv),
                    "disk_gib_s": disk_bandwidth(sorted(iobound.glob("*.safetensors"))[-1]) / 2**30}  # fmt: skip
    runtime = runtime_baseline_bytes()
    if args.part in ("decode", "all"):
        if args.baseline:
            result["baseline"] = describe_commits({"baseline": args.baseline})["baseline"]
            with checkout(args.baseline) as tree:
                result["decode"] = decode_part(args, runtime, tree)
        else:
            result["decode"] = decode_part(args, runtime)
    if args.part in ("rebatch", "all"):
        result["rebatch"] = rebatch_part(args, runtime)
    args.out.mkdir(parents=True, exist_ok=True)
    previous = args.out / "expertflow.json"
    if args.part != "all" and previous.is_file():  # one part re-run: keep the other part's last results
        kept = json.loads(previous.read_text())
        kept.pop(args.part, None)
        result = {**{k: v for k, v in kept.items() if k in ("decode", "rebatch")}, **result}
    (args.out / "expertflow.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "expertflow.png")
    summary(result)
    return 0


def summary(result: dict) -> None:
    for model_name, part in result.get("decode", {}).items():
        rows = [r for r in part["contenders"] if "error" not in r]
        if not rows:
            continue
        lru = rows[0]
        belady = part["replay_on_lru_routing"].get("belady", {}).get("bytes_per_token")
        print(f"\n{model_name} at {part['budget']} (disk): {'contender':>22} {'tok/s':>8} {'x lru':>6} "
              f"{'med x':>6} {'rnd x':>6} {'MiB/tok':>8} {'x belady':>8} {'hit':>6} {'h pred':>6} {'replay':>6} "
              f"{'pred%':>5} exact")
        for r in rows:
            over_belady = r["decode_bytes_per_token"] / belady if belady else float("nan")
            replayed = r.get("replay", {}).get("hit_rate")
            counters = r.get("prefetch")  # the share of steps that predicted (the rest: the trial found LRU faster)
            share = 1 - counters.get("dormant_steps", 0) / counters["steps"] if counters else None
            predicting = f"{100 * share:5.0f}" if share is not None else " " * 5
            on_predicting = r.get("decode_hit_rate_by_mode", {}).get("predicting", {}).get("hit_rate")
            median = r.get("median_tokens_per_s", r["speed"])
            print(f"{'':>{len(model_name) + 18}}{r['name'].split(' ', 1)[1]:>22} {r['speed']:8.2f} "
                  f"{r['speed'] / lru['speed']:6.2f} {median / lru.get('median_tokens_per_s', lru['speed']):6.2f} "
                  f"{round_ratio(r, lru):6.2f} "
                  f"{r['decode_bytes_per_token'] / 2**20:8.2f} {over_belady:8.2f} "
                  f"{r.get('decode_hit_rate', r['hit_rate']):6.3f} "
                  f"{'' if on_predicting is None else f'{on_predicting:.3f}':>6} "
                  f"{'' if replayed is None else f'{replayed:.3f}':>6} {predicting} {r['tokens_equal_lru']}")
        for r in rows:
            if "decode_stall_ms_per_token_by_layer" in r:
                by_layer = " / ".join(f"{ms:.1f}" for ms in r["decode_stall_ms_per_token_by_layer"])
                reading = "" if r.get("decode_read_gib_s") is None else (
                    f"; reading {100 * r['decode_reading_share']:.0f}% of the time, "
                    f"at {r['decode_read_gib_s']:.2f} GiB/s")
                print(f"{'':>{len(model_name) + 18}}{r['name'].split(' ', 1)[1]:>22} decode stall ms/token by layer: "
                      f"{by_layer}{reading}")
    for row in result.get("rebatch", {}).get("rows", []):
        fifo, reb = row["fifo"], row["rebatch"]
        print(f"rebatch B={row['batch_size']} {row.get('policy', 'lru')}: fifo {fifo.get('speed', 0):.2f} tok/s "
              f"({fifo.get('bytes_per_token', 0) / 2**20:.1f} MiB/token, hit {fifo.get('hit_rate', 0):.3f}), "
              f"re-batcher {reb.get('speed', 0):.2f} tok/s ({reb.get('bytes_per_token', 0) / 2**20:.1f} MiB/token, hit "
              f"{reb.get('hit_rate', 0):.3f}), x{row['speedup'] or 0:.2f}, outputs equal: {row['outputs_equal']}")


if __name__ == "__main__":
    sys.exit(main())
