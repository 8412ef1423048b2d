"""What the trace itself shows, whatever the cache: which experts are hot, how soon an expert is
used again, which experts follow which across layers.

Shapes: see the legend in `moeflow/__init__.py` (here N trace tokens).
"""

from __future__ import annotations

import numpy as np

from moeflow.tools.profile.report import LayerPair, ReuseHistogram, TraceAnalysis
from moeflow.tools.trace import Trace


def activation_counts(trace: Trace) -> np.ndarray:
    """[L, E]: how often each expert of each MoE layer was routed to."""
    experts_NLK = np.asarray(trace.experts).astype(np.int64)
    N, L, K = experts_NLK.shape
    counts_LE = np.zeros((L, trace.num_experts), dtype=np.int64)
    for pos in range(L):
        counts_LE[pos] = np.bincount(experts_NLK[:, pos].reshape(-1), minlength=trace.num_experts)
    return counts_LE


def reuse_distances(trace: Trace) -> np.ndarray:
    """Stack distance of every access: distinct other experts (any layer) used since this expert's last use.

    -1 for a first use. With capacity C, an LRU cache without prefetch hits exactly the accesses
    whose distance is below C (up to the experts of one step, which are pinned together).
    """
    experts_NLK = np.asarray(trace.experts).astype(np.int64)
    N, L, K = experts_NLK.shape
    keys = (np.arange(L)[None, :, None] * trace.num_experts + experts_NLK).reshape(-1).tolist()
    stack: list[int] = []  # most recent first
    out = np.empty(len(keys), dtype=np.int64)
    for i, key in enumerate(keys):
        try:
            d = stack.index(key)
            del stack[d]
        except ValueError:
            d = -1
        out[i] = d
        stack.insert(0, key)
    return out


def coactivation(trace: Trace) -> np.ndarray:
    """[L-1, E, E]: tokens routed to expert i in MoE layer l and to expert j in layer l+1."""
    experts_NLK = np.asarray(trace.experts).astype(np.int64)
    N, L, K = experts_NLK.shape
    E = trace.num_experts
    out = np.zeros((max(L - 1, 0), E, E), dtype=np.int64)
    for pos in range(L - 1):
        a = np.repeat(experts_NLK[:, pos], K, axis=1).reshape(-1)
        b = np.tile(experts_NLK[:, pos + 1], (1, K)).reshape(-1)
        np.add.at(out[pos], (a, b), 1)
    return out


def analyse(trace: Trace) -> TraceAnalysis:
    dist = reuse_distances(trace)
    warm = dist[dist >= 0]
    longest = int(warm.max(initial=0))
    # One bin per distance while that stays readable, else logarithmic bins.
    if longest < 160:
        edges = np.arange(longest + 1)
    else:
        edges = np.unique(np.r_[0, np.geomspace(1, longest + 1, 40).astype(np.int64)])
    counts, _ = np.histogram(warm, bins=np.r_[edges, edges[-1] + 1])
    pairs = coactivation(trace)
    # Layer l -> l+1 for a few l (all when there are few layers).
    shown = sorted({0, len(pairs) // 2, len(pairs) - 1}) if len(pairs) > 4 else list(range(len(pairs)))
    return TraceAnalysis(
        activation=tuple(tuple(row) for row in activation_counts(trace).tolist()),
        reuse_distance=ReuseHistogram(
            bin_starts=tuple(edges.tolist()), counts=tuple(counts.tolist()), first_uses=int((dist < 0).sum())
        ),
        coactivation=tuple(
            LayerPair(layers=(trace.layers[p], trace.layers[p + 1]), counts=tuple(tuple(r) for r in pairs[p].tolist()))
            for p in shown
        ),
    )
