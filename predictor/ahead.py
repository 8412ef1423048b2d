"""Reading the next token's first-layer experts before the token exists: `apply_next_token_prefetch`.

A context predictor (token_freq, path) knows a step's experts once its token does, at the start of
the forward: the later layers' reads then overlap the earlier layers' compute, but the first MoE
layer's are needed a moment later and stall in full (on the I/O-bound bench model the first layer
was about half of path's stall). Yet most of the next token is known before the step ends: the residual
entering the last MoE layer, put through the model's own final norm and output head (a logit lens),
already ranks the token greedy decoding will pick; and the first layer's routing is mostly a function
of the token (the shipped model's held-out text: a token's own token_freq row holds 94% of its
first-layer experts in its best two). So `NextTokenLens` gives, per row of a decode step,

    P(first-layer expert e used by the next token) = sum_v softmax(head(norm(r)))_v * U[v, e]

with U[v, e] the rate at which token v used e in the token_freq table's training trace. On greedy
generations of held-out prompts (24 x 64 tokens, shipped model, ad hoc) its best two held 62% of the
next token's first-layer experts and its best four 83% (the current token's own row: 13% / 25%), and
57% of the first-layer experts that were not resident during the last layer (path, 25%, iobound).
Those predictions go to `PredictivePrefetcher.offer_next_step`, which admits them against the same
costs as any read ahead and issues them once the last layer's own reads are in.

Only where reads are dear (`PredictivePrefetcher.reads_dear`: one layer's compute hides less than one
expert's read, as measured): elsewhere the first layer's reads, issued when the step begins, are mostly
in before its routing anyway, and the lens is pure cost. On the shipped model at 25% (2-core AMD EPYC VM,
2026-12-05, py-spy on a live path decode) the lens and its offer took 6.3% of a decode step, and path decoded
at 0.92x LRU's tokens/s with it, 1.03x without (always predicting: 1.09x; bench/expertflow.py, median
per-round ratios, bench/results/expertflow_default_lens_{always,gated}.json). On the I/O-bound bench model it
runs on every predicting step after the first overlap estimate.

Shape legend: T rows of a step, D hidden, V vocabulary, E experts of the first MoE layer.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from moeflow.engine import Engine
from moeflow.engine.driver import ForwardStart
from moeflow.model.anatomy import moe_layer_parts, output_head

from .apply import build_predictor, engine_predictor_dir
from .base import saved_files
from .predictors import TokenFrequencyPredictor, rms_norm_weight


class NextTokenLens:
    """P(each first-layer expert is used by the next token) from the residual entering the last MoE layer."""

    def __init__(self, norm: nn.Module, head: nn.Module, use_VE: np.ndarray) -> None:
        self.norm = norm
        self.head = head
        self.use_VE = use_VE  # float32, on the host
        # A float32 CPU head without bias after an RMS norm runs in numpy on the host: the norm around the product on
        # the head's own memory (no copy: a real model's head is hundreds of MiB). See `probabilities`.
        w = head.weight
        plain = isinstance(head, nn.Linear) and head.bias is None and (w.device.type, w.dtype) == ("cpu", torch.float32)
        found = rms_norm_weight(norm) if plain else None
        # (norm weight [D], eps, head [V, D]) where it runs in numpy
        self._numpy = None if found is None else (*found, w.detach().numpy())

    @classmethod
    def from_table(cls, model: nn.Module, table_VE: torch.Tensor, top_k: int) -> NextTokenLens:
        """From first-layer routing counts per token (`table_VE[v, e]`: times token v was routed to e), each
        token's use rate, pulled towards the layer's overall rate by one pseudo-occurrence (unseen tokens)."""
        norm, head = output_head(model)
        counts_VE = table_VE.to(torch.float32)
        seen_V = counts_VE.sum(-1) / top_k  # occurrences of each token
        prior_E = counts_VE.sum(0) / seen_V.sum().clamp(min=1)
        use_VE = (counts_VE + prior_E) / (seen_V[:, None] + 1.0)
        return cls(norm, head, use_VE.numpy())

    @torch.inference_mode()
    def probabilities(self, r_TD: torch.Tensor) -> np.ndarray:
        """[T, E] float32. In numpy the norm's weight goes in before the head's product and its per-row scale `s`
        after (softmax(s z), z = (r w) head^T, s > 0 so max(s z) = s max(z)), and the softmax works in place.
        The shipped model at batch 1 (2-core AMD EPYC VM, ad hoc, best of 5 x 3000 calls on the head's shape):
        85 us against 103 us norm-first, with numpy's BLAS on two threads; on the one thread the engine now gives it
        (2026-12-05), 61 us, the product 38 of them (memory-bound: the head is 3 MiB), the exponential 2."""
        if self._numpy is not None and r_TD.dtype == torch.float32 and r_TD.device.type == "cpu":
            w_D, eps, head_VD = self._numpy
            x_TD = r_TD.numpy()
            z_TV = (x_TD * w_D) @ head_VD.T
            z_TV -= z_TV.max(-1, keepdims=True)
            z_TV *= 1.0 / np.sqrt(np.einsum("td,td->t", x_TD, x_TD)[:, None] / x_TD.shape[-1] + eps)
        else:
            z_TV = self.head(self.norm(r_TD)).float().cpu().numpy()  # one host sync a step: the prefetcher decides
            z_TV = z_TV - z_TV.max(-1, keepdims=True)
        e_TV = np.exp(z_TV, out=z_TV)  # the softmax, its division after the product
        return (e_TV @ self.use_VE) / e_TV.sum(-1, keepdims=True)


def apply_next_token_prefetch(engine: Engine, predictor: object | None = None) -> bool:
    """Offer the engine's prefetcher, during every decode step's last MoE layer while reads are dear
    (`PredictivePrefetcher.reads_dear`), the next step's first-layer experts (`NextTokenLens`, from the token_freq
    table in the engine's predictor folder, or `predictor`'s if it is a token_freq predictor); whether it could (a
    token_freq table is needed, and two MoE layers at least: with one, the next step's first layer is the one about
    to run)."""
    prefetcher = engine.prefetcher
    if prefetcher is None or len(engine.checkpoint.moe_layers) < 2:
        return False
    if not isinstance(predictor, TokenFrequencyPredictor):
        if not saved_files(TokenFrequencyPredictor.name, engine_predictor_dir(engine))[0].is_file():
            return False
        predictor = build_predictor(engine, TokenFrequencyPredictor.name)
    lens = NextTokenLens.from_table(engine.model, predictor.table_VLE[:, 0], engine.top_k)
    layers = engine.checkpoint.moe_layers
    first = layers[0]
    decoding = [False]  # whether the running forward is a decode step (one new token a row)

    def on_forward(start: ForwardStart) -> None:
        decoding[0] = start.n_new == 1

    def on_last_layer(module: object, args: tuple) -> None:
        if not decoding[0] or not prefetcher.predicting or not prefetcher.reads_dear:
            return
        hidden = args[0]
        p_TE = lens.probabilities(hidden.reshape(-1, hidden.shape[-1]))
        ranked_TM = np.argsort(-p_TE, axis=-1, kind="stable")[:, : prefetcher.width]
        probs_TM = np.minimum(p_TE[np.arange(len(p_TE))[:, None], ranked_TM], 1.0)  # a gather: see ranked_probabilities
        prefetcher.offer_next_step(first, ranked_TM.tolist(), probs_TM.tolist())

    subscription = engine.driver.before_forward.subscribe(on_forward)
    handle = moe_layer_parts(engine.model, layers[-1]).norm.register_forward_pre_hook(on_last_layer)
    engine.on_close(subscription.close)
    engine.on_close(handle.remove)
    return True
