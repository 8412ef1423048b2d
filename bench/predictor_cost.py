"""What a routing prediction costs per token: each predictor alone, and with its bookkeeping, before vs after.

Bookkeeping is everything `PredictorHooks` adds to a decode step: its listener before the forward,
its embedding and pre-MoE norm hooks, its routing-event listener (measured with a sink that does
nothing: `hooks_us`), and then the sink that turns scores into what the prefetcher is offered
(`apply_prediction`'s, `prefetcher.offer` included, and, where the tree has it, the next-token lens of
`moeflow.predictor.ahead` with its offer of the next step's first layer: `total_us`; since 855117b the lens runs only
while reads are dear, `PredictivePrefetcher.reads_dear`, and here the overlap stays at its initial one read a layer,
as on the shipped model at 25%, where decoding measures ~1.5: a tree from then on leaves it out), and then the
prefetcher's own work at every layer as the engine calls it (`prefetcher.on_routing`: scoring the layer's
predictions, dropping the wrong reads ahead, deciding the next layer's: `step_us`, everything prediction
adds to a step). Each is called exactly as the forward calls it (the hooks and listeners the predictor
registered, found by comparing the engine's before and after `apply_prediction` and
`apply_next_token_prefetch`), on the shipped model at
25%, with real routing events and held-out token histories. The prefetcher's step begins (untimed)
before every timed step, and its reads are not issued (they are the transfer engine's cost, not
the prediction's).

It also times the eviction policy's own bookkeeping (``policy``): the held-out histories' real routing
(one prefill each) fed, token by token and layer by layer, to a fresh `PredictivePolicy` over a slot pool
of the engine's capacity, as `ExpertCache` calls it (`on_access` per expert used, `victim` and `on_evict`
when a slot must be freed, `on_layer` as each layer runs): microseconds per token, with `LRUPolicy` on the same
stream beside it (the floor), `AutoPolicy` (the default) and, where the tree ships a trained reuse model
(`moeflow.offload.reuse`), the predictive policy evicting by it and the auto policy with it.

Trees: a baseline commit and a candidate commit, each a temporary git worktree run in its own child
process, interleaved round by round; each contender keeps its best round (the machine is shared).

    flock /tmp/moeflow-bench.lock python bench/predictor_cost.py --baseline fb73414~1 --candidate HEAD

Writes ``predictor_cost.json`` and ``predictor_cost.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import add_tree_arguments, checkout, describe_commits, machine, run_in_tree, tree_commits  # noqa: E402

PREDICTORS = ("path", "token_freq", "frequency", "transition", "gate")
HISTORY = 64  # tokens of context each sequence has when it decodes


def _mean_seconds(fn: Callable[[], object], calls: int, before: Callable[[], object]) -> float:
    """Mean seconds of `fn()` over `calls` calls (`before()` untimed ahead of each)."""
    total = 0.0
    for _ in range(calls):
        before()
        t0 = time.perf_counter()
        fn()
        total += time.perf_counter() - t0
    return total / calls


def child(spec: dict) -> dict:
    """One tree's costs: {predictor: {batch: {"predictor_us", "hooks_us", "total_us"} per token}}."""
    from moeflow.predictor.apply import PredictorHooks, apply_prediction, build_predictor

    from moeflow.config import DEFAULT_MODEL, EngineConfig
    from moeflow.engine import Engine
    from moeflow.model.anatomy import moe_layer_parts, token_embedding

    try:
        from moeflow.predictor.ahead import apply_next_token_prefetch
    except ImportError:  # a tree from before next-token prefetch
        apply_next_token_prefetch = None

    out: dict = {}
    # Always predicting: a PredictionTrial that finds decoding faster without prediction would switch the hooks off
    # (trees from before the trial have no such option).
    always = {"prediction_trial": False} if "prediction_trial" in EngineConfig.__dataclass_fields__ else {}
    engine = Engine(DEFAULT_MODEL, EngineConfig(expert_budget="25%", policy="predictive", **always))
    try:
        engine.prefetcher.issue = lambda plan: 0  # reads are the transfer engine's cost, not the prediction's
        emb = token_embedding(engine.model)
        norms = [moe_layer_parts(engine.model, layer).norm for layer in engine.checkpoint.moe_layers]
        for name in spec["predictors"]:
            predictor = build_predictor(engine, name)
            before_fwd = engine.driver.before_forward._listeners
            before_route = engine.runtime.routing._listeners
            before_emb = set(emb._forward_hooks)
            before_norm = [set(n._forward_pre_hooks) for n in norms]
            hooks = apply_prediction(engine, predictor)
            if apply_next_token_prefetch is not None:  # part of every decode step's prediction where the tree has it
                apply_next_token_prefetch(engine, predictor)
            added = {
                "forward": [f for f in engine.driver.before_forward._listeners if f not in before_fwd],
                "routing": [f for f in engine.runtime.routing._listeners if f not in before_route],
                "embedding": [h for k, h in emb._forward_hooks.items() if k not in before_emb],
                "norms": [[h for k, h in n._forward_pre_hooks.items() if k not in seen]
                          for n, seen in zip(norms, before_norm)],  # fmt: skip
            }
            histories = spec["histories"]
            out[name] = {str(B): measure(engine, predictor, added, histories[:B], spec) for B in spec["batches"]}
            hooks.close()
            _remove(emb, norms, added)  # the lens' hook (its handle closes only with the engine)
            # the same hooks with a sink that does nothing: PredictorHooks' own share
            null = PredictorHooks(engine, [predictor], lambda *_: None)
            added = {
                "forward": [f for f in engine.driver.before_forward._listeners if f not in before_fwd],
                "routing": [f for f in engine.runtime.routing._listeners if f not in before_route],
                "embedding": [h for k, h in emb._forward_hooks.items() if k not in before_emb],
                "norms": [[h for k, h in n._forward_pre_hooks.items() if k not in seen]
                          for n, seen in zip(norms, before_norm)],  # fmt: skip
            }
            for B in spec["batches"]:
                out[name][str(B)]["hooks_us"] = measure(engine, predictor, added, histories[:B], spec)["total_us"]
            null.close()
        out["policy"] = policy_cost(engine, spec)
    finally:
        engine.close()
    return out


def _remove(emb: object, norms: list, added: dict) -> None:
    """Take the `added` module hooks that are still attached off the model (the engine's close removes them again,
    which a module tolerates). Listeners stay: the lens' only notes whether a forward decodes, and each predictor's
    `added` holds only the listeners its own apply registered."""
    for k in [k for k, h in emb._forward_hooks.items() if h in added["embedding"]]:
        del emb._forward_hooks[k]
    for norm, hs in zip(norms, added["norms"]):
        for k in [k for k, h in norm._forward_pre_hooks.items() if h in hs]:
            del norm._forward_pre_hooks[k]


def policy_cost(engine: object, spec: dict) -> dict:
    """Microseconds per token of the eviction policies' bookkeeping on real routing ({"predictive_us", "lru_us",
    "auto_us", ...}; "reuse_us" and "auto_reuse_us": predictive and auto with the trained reuse model)."""
    import torch

    from moeflow.offload.policy import LRUPolicy, PredictivePolicy

    stream = []  # per token: each MoE layer's distinct experts, in layer order
    with torch.inference_mode():
        for history in spec["histories"]:
            events = engine.driver.forward(torch.tensor([history]), histories=[history], n_new=len(history)).routing
            for t in range(len(history)):
                stream.append([(e.plan.layer, sorted(set(e.top_k_index_TK[t].tolist()))) for e in events])
    capacity = engine.stats().capacity_slots

    def replay(policy: object) -> float:
        resident: list = []  # slot order does not matter to the policies
        t0 = time.perf_counter()
        for token in stream:
            if hasattr(policy, "begin_step"):
                policy.begin_step()
            for layer, experts in token:
                if hasattr(policy, "on_layer"):  # the layer runs (trees before the policy clock have none)
                    policy.on_layer(layer)
                pinned = {(layer, e) for e in experts}
                for e in experts:
                    key = (layer, e)
                    if key not in resident:
                        if len(resident) >= capacity:
                            victim = policy.victim([k for k in resident if k not in pinned])
                            resident.remove(victim)
                            policy.on_evict(victim)
                        resident.append(key)
                        policy.on_insert(key)
                    policy.on_access(key)
        return (time.perf_counter() - t0) * 1e6 / len(stream)

    makers = {"predictive_us": PredictivePolicy, "lru_us": LRUPolicy}
    try:
        from moeflow.offload.policy import AutoPolicy
    except ImportError:  # a tree from before the auto policy
        AutoPolicy = None  # noqa: N806
    if AutoPolicy is not None:
        makers["auto_us"] = AutoPolicy
    try:
        from moeflow.offload.reuse import LearnedReuse, ReuseModel, reuse_files
    except ImportError:  # a tree from before the trained reuse model
        pass
    else:
        from moeflow.predictor.apply import engine_predictor_dir, routing_shape

        folder, shape = engine_predictor_dir(engine), routing_shape(engine)
        if reuse_files(folder)[0].is_file():
            model = ReuseModel.load(folder, layers=shape.layers, num_experts=shape.num_experts)

            def with_reuse() -> PredictivePolicy:
                policy = PredictivePolicy()
                policy.estimate_with(LearnedReuse(model))
                return policy

            makers["reuse_us"] = with_reuse
            if AutoPolicy is not None and hasattr(AutoPolicy, "estimate_with"):

                def auto_with_reuse() -> AutoPolicy:
                    policy = AutoPolicy()
                    policy.estimate_with(LearnedReuse(model))
                    return policy

                makers["auto_reuse_us"] = auto_with_reuse
    return {name: min(replay(make()) for _ in range(spec["repeats"])) for name, make in makers.items()}


def measure(engine: object, predictor: object, added: dict, histories: list[list[int]], spec: dict) -> dict:
    """Microseconds per token of one decode step's predictions: the predictor alone, and with what its
    hooks add (the `added` listeners and module hooks, called as the forward calls them)."""
    import torch
    from moeflow.predictor.base import RoutePredictor

    from moeflow.engine.driver import ForwardStart
    from moeflow.model.anatomy import moe_layer_parts, token_embedding

    B = len(histories)
    emb = token_embedding(engine.model)
    norms = [moe_layer_parts(engine.model, layer).norm for layer in engine.checkpoint.moe_layers]
    ids_B1 = torch.tensor([[h[-1]] for h in histories])
    with torch.inference_mode():
        events = engine.driver.forward(ids_B1, histories=histories, n_new=1).routing  # real routing of B tokens
        emb_B1D = emb(ids_B1)
        residual_B1D = torch.randn(B, 1, emb_B1D.shape[-1])
    start = ForwardStart(histories=histories, n_new=1)

    @torch.inference_mode()
    def with_hooks() -> None:  # what PredictorHooks adds to one decode step, sink included
        for f in added["forward"]:
            f(start)
        for h in added["embedding"]:
            h(emb, (ids_B1,), emb_B1D)
        for norm, hs in zip(norms, added["norms"]):
            for h in hs:
                h(norm, (residual_B1D,))
        for e in events:
            for f in added["routing"]:
                f(e)

    def step() -> None:  # and the prefetcher's per-layer decisions, as the engine's routing listener calls them
        with_hooks()
        for e in events:
            engine.prefetcher.on_routing(e.plan.layer, e.plan.expert_ids)

    # The predictor's own answers, nothing else: only the calls the engine makes of it (`PredictorHooks` calls a
    # hook only where the predictor's class answers it), a whole-step one's fused pass where it has one.
    answers = {hook: getattr(type(predictor), hook) is not getattr(RoutePredictor, hook)
               for hook in ("on_step", "on_residual", "on_routing")}  # fmt: skip
    emb_BD, residual_BD = emb_B1D.reshape(B, -1), residual_B1D.reshape(B, -1)

    @torch.inference_mode()
    def alone() -> None:
        if predictor.whole_step:
            predictor.step_scores(histories, 1)
        elif answers["on_step"]:
            predictor.on_step(histories, 1)
        if answers["on_residual"]:
            predictor.on_residual(-1, emb_BD)
        for pos, e in enumerate(events):
            if answers["on_residual"]:
                predictor.on_residual(pos, residual_BD)
            if answers["on_routing"]:
                predictor.on_routing(pos, e.top_k_index_TK)

    result = {}
    for key, fn in {"predictor_us": alone, "total_us": with_hooks, "step_us": step}.items():
        _mean_seconds(fn, spec["warmup"], engine.prefetcher.begin_step)
        best = min(_mean_seconds(fn, spec["calls"], engine.prefetcher.begin_step) for _ in range(spec["repeats"]))
        result[key] = best * 1e6 / B
    return result


def heldout_histories(n: int) -> list[list[int]]:
    """`n` token histories of HISTORY tokens cut from the shipped model's held-out files."""
    from transformers import AutoTokenizer

    from moeflow.config import DEFAULT_MODEL
    from moeflow.model.corpus import model_corpus

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    out = []
    for f in model_corpus(DEFAULT_MODEL, "heldout"):
        ids = tokenizer(f.read_text(encoding="utf-8"), add_special_tokens=False, verbose=False)["input_ids"]
        out += [ids[i : i + HISTORY] for i in range(0, len(ids) - HISTORY, 4 * HISTORY)][:2]
        if len(out) >= n:
            return out[:n]
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = result["batches"]
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(6 * len(batches) + 3, 4.4), squeeze=False,
                             gridspec_kw={"width_ratios": [2] * len(batches) + [1]})  # fmt: skip
    names = result["predictors"]
    shares = [("predictor_us", "predictor", 0.25), ("hooks_us", "+ hooks", 0.5), ("total_us", "+ hooks + sink", 0.75),
              ("step_us", "+ per-layer decisions", 1.0)]  # fmt: skip
    width = 0.1
    for ax, B in zip(axes[0], batches):
        for j, (tree, color) in enumerate([("baseline", "#777"), ("candidate", "#1f77b4")]):
            rows = [result["trees"][tree]["costs"][n][str(B)] for n in names]
            for k, (key, label, alpha) in enumerate(shares):
                xs = [i + (j * len(shares) + k - len(shares) + 0.5) * width for i in range(len(names))]
                ax.bar(xs, [r.get(key, 0.0) for r in rows], width, color=color, alpha=alpha, label=f"{tree}: {label}")
        ax.axhline(50, color="#d62728", lw=1, ls="--", label="50 us target")
        ax.set_xticks(range(len(names)), names)
        ax.set_yscale("log")
        ax.set_ylabel("microseconds per token")
        ax.set_title(f"batch {B}")
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    kinds = [("predictive_us", "predictive"), ("reuse_us", "predictive\n+ reuse model"), ("auto_us", "auto"),
             ("auto_reuse_us", "auto\n+ reuse model"), ("lru_us", "lru")]
    for j, (tree, color) in enumerate([("baseline", "#777"), ("candidate", "#1f77b4")]):
        policy = result["trees"][tree]["policy"]
        ax.bar([i + (j - 0.5) * 0.35 for i in range(len(kinds))], [policy.get(k, 0.0) for k, _ in kinds], 0.35,
               color=color, label=tree)  # fmt: skip
    ax.set_xticks(range(len(kinds)), [label for _, label in kinds])
    ax.set_ylabel("microseconds per token")
    ax.set_title("eviction policy bookkeeping")
    ax.legend(fontsize=7)
    fig.suptitle(f"prediction cost per token, shipped model at 25% — {result['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_tree_arguments(ap)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each tree keeps its best")
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    spec = {"predictors": list(PREDICTORS), "batches": args.batches, "histories": heldout_histories(max(args.batches)),
            "calls": args.calls, "repeats": args.repeats, "warmup": 100}  # fmt: skip
    commits = tree_commits(ap, args)
    best: dict[str, dict] = {}
    with checkout(commits["baseline"]) as base, checkout(commits["candidate"]) as cand:
        trees = {"baseline": base, "candidate": cand}
        for _ in range(args.rounds):
            for tree, root in trees.items():
                costs = run_in_tree(__file__, root, spec, timeout_s=1200)
                policy = best.setdefault(tree, {}).setdefault("policy", {})
                for k, v in costs.pop("policy").items():
                    policy[k] = min(policy.get(k, float("inf")), v)
                for name, per_batch in costs.items():
                    for B, row in per_batch.items():
                        slot = best.setdefault(tree, {}).setdefault(name, {}).setdefault(B, {})
                        for k, v in row.items():
                            slot[k] = min(slot.get(k, float("inf")), v)
    described = describe_commits(commits)
    result = {
        "machine": machine(),
        "what": "microseconds per token: each predictor alone (predictor_us), with PredictorHooks and a sink that "
                "does nothing (hooks_us), with apply_prediction's sink and the next-token lens where the tree has it "
                "(total_us), and with the prefetcher's "
                "per-layer decisions (step_us); policy: the eviction policies' bookkeeping on the held-out routing "
                "(predictive_us; reuse_us: the same policy evicting by the trained reuse model; auto_us, "
                "auto_reuse_us: the default policy without and with it; lru_us)",
        "model": "shipped default model, expert budget 25%, policy predictive",
        "batches": args.batches,
        "predictors": list(PREDICTORS),
        "rounds": args.rounds,
        "trees": {t: {"commit": described[t], "costs": {n: best[t][n] for n in PREDICTORS}, "policy": best[t]["policy"]}
                  for t in trees},  # fmt: skip
        "speedup_total": {n: {str(B): best["baseline"][n][str(B)]["total_us"] / best["candidate"][n][str(B)]["total_us"]
                              for B in args.batches} for n in PREDICTORS},  # fmt: skip
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "predictor_cost.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "predictor_cost.png")
    for n in PREDICTORS:
        for B in args.batches:
            b, c = best["baseline"][n][str(B)], best["candidate"][n][str(B)]
            print(f"{n:>11} B={B}: predictor {b['predictor_us']:6.1f} -> {c['predictor_us']:5.1f}, "
                  f"+ hooks {b['hooks_us']:6.1f} -> {c['hooks_us']:5.1f}, "
                  f"+ hooks and sink {b['total_us']:6.1f} -> {c['total_us']:5.1f}, "
                  f"+ per-layer decisions {b['step_us']:6.1f} -> {c['step_us']:5.1f} us/token")
    b, c = best["baseline"]["policy"], best["candidate"]["policy"]
    print(f"eviction bookkeeping per token: predictive {b['predictive_us']:6.1f} -> {c['predictive_us']:5.1f} us "
          f"(lru {b['lru_us']:5.1f} -> {c['lru_us']:5.1f})"
          + "".join(f"; with the reuse model: {t} {p['reuse_us']:5.1f}" for t, p in (("baseline", b), ("candidate", c))
                    if "reuse_us" in p))


if __name__ == "__main__":
    main()
