"""The routing predictors: ExpertFlow-style path network, gate lookahead, and the baselines.

Shape legend: N trace tokens, T tokens of one forward, W context window, V vocabulary,
L MoE layers, E experts per layer, K top-k, H hidden.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moeflow.config import DEFAULT_LOOKAHEAD
from moeflow.errors import MoeflowError
from moeflow.model.anatomy import moe_layer_parts

from .base import RoutePredictor, RoutingShape, Scores


def context_windows(histories: Sequence[Sequence[int]], n_new: int, window: int, pad_id: int) -> torch.Tensor:
    """[T, W]: for each of the last `n_new` tokens of every history, it and the W-1 tokens before it."""
    rows = []
    for hist in histories:
        h = list(hist)
        for i in range(len(h) - n_new, len(h)):
            ctx = h[max(0, i - window + 1) : i + 1]
            rows.append([pad_id] * (window - len(ctx)) + ctx)
    return torch.tensor(rows, dtype=torch.long)


def trace_windows(token_ids_N: np.ndarray, positions_N: np.ndarray, window: int, pad_id: int) -> np.ndarray:
    """[N, W] windows over a trace: token n and the W-1 before it within its own sequence."""
    N = len(token_ids_N)
    out = np.full((N, window), pad_id, dtype=np.int64)
    tok = np.asarray(token_ids_N, dtype=np.int64)
    pos = np.asarray(positions_N, dtype=np.int64)
    for back in range(window):
        src = np.arange(N) - back
        ok = (src >= 0) & (pos >= back)
        out[ok, window - 1 - back] = tok[src[ok]]
    return out


def multi_hot(experts_NLK: np.ndarray, num_experts: int) -> np.ndarray:
    """[N, L, E] float32 targets: 1 where the expert was among the token's top-k at that layer."""
    N, L, _ = experts_NLK.shape
    out = np.zeros((N, L, num_experts), dtype=np.float32)
    np.put_along_axis(out, experts_NLK.astype(np.int64), 1.0, axis=2)
    return out


# ---- ExpertFlow-style routing-path predictor ----------------------------------------------------------


class _PathNet(nn.Module):
    def __init__(self, vocab: int, window: int, dim: int, hidden: int, layers: int, experts: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab + 1, dim)  # the last row pads short contexts
        self.slot = nn.Parameter(torch.zeros(window, dim))  # where in the window a token sits
        self.mlp = nn.Sequential(nn.Linear(window * dim, hidden), nn.GELU(), nn.Linear(hidden, layers * experts))
        self.out_shape = (layers, experts)

    def forward(self, win_TW: torch.Tensor) -> torch.Tensor:
        x_TWD = self.embed(win_TW) + self.slot
        return self.mlp(x_TWD.flatten(1)).view(-1, *self.out_shape)


class PathPredictor(RoutePredictor):
    """From the last W tokens alone, before the forward, the experts of every MoE layer (one small MLP)."""

    name = "path"
    trainable = True
    window = 8
    dim = 64
    hidden = 512

    def __init__(self, shape: RoutingShape, *, lookahead: int = DEFAULT_LOOKAHEAD) -> None:
        super().__init__(shape, lookahead=lookahead)
        self.net = _PathNet(shape.vocab_size, self.window, self.dim, self.hidden, self.num_layers, shape.num_experts)
        self.net.eval()

    @torch.inference_mode()
    def on_step(self, histories: Sequence[Sequence[int]], n_new: int) -> Scores:
        win = context_windows(histories, n_new, self.window, self.shape.vocab_size)
        logits_TLE = self.net(win)
        return {p: logits_TLE[:, p] for p in range(self.num_layers)}

    def fit(self, token_ids: np.ndarray, positions: np.ndarray, experts: np.ndarray, *, epochs: int = 4,
            batch_size: int = 512, lr: float = 2e-3, seed: int = 0, progress: bool = True) -> list[float]:
        """Binary cross-entropy on multi-hot top-k targets; returns the mean loss of each epoch."""
        from tqdm import tqdm

        torch.manual_seed(seed)
        win = torch.from_numpy(trace_windows(token_ids, positions, self.window, self.shape.vocab_size))
        target = torch.from_numpy(multi_hot(np.asarray(experts), self.shape.num_experts))
        opt = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=0.01)
        steps = epochs * ((len(win) + batch_size - 1) // batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
        gen = torch.Generator().manual_seed(seed)
        losses = []
        self.net.train()
        with tqdm(total=steps, desc="train path", unit="step", disable=not progress) as bar:
            for _ in range(epochs):
                perm = torch.randperm(len(win), generator=gen)
                total, count = 0.0, 0
                for i in range(0, len(win), batch_size):
                    idx = perm[i : i + batch_size]
                    loss = F.binary_cross_entropy_with_logits(self.net(win[idx]), target[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    total += float(loss.detach()) * len(idx)
                    count += len(idx)
                    bar.update(1)
                    bar.set_postfix(loss=f"{total / count:.4f}")
                losses.append(total / count)
        self.net.eval()
        return losses

    def state(self) -> dict:
        return {"net": self.net.state_dict()}

    def restore(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])


# ---- gate lookahead -----------------------------------------------------------------------------------


class GateLookahead(RoutePredictor):
    """Training-free: layer p+d's own router applied to the residual stream entering layer p's MoE block.

    Before the first layer the embedding output stands in for the residual. Needs the model's
    routers and their pre-MoE norms (`from_model`).
    """

    name = "gate"

    def __init__(self, shape: RoutingShape, *, lookahead: int = DEFAULT_LOOKAHEAD) -> None:
        super().__init__(shape, lookahead=lookahead)
        self.norms: list[nn.Module] = []
        self.router_weights: list[torch.Tensor] = []  # [E, D] per layer position
        self.router_bias: list[torch.Tensor | None] = []  # DeepSeek-V3 selection bias

    @classmethod
    def from_model(cls, model: nn.Module, shape: RoutingShape, *, lookahead: int = DEFAULT_LOOKAHEAD) -> GateLookahead:
        self = cls(shape, lookahead=lookahead)
        for layer in shape.layers:
            try:
                parts = moe_layer_parts(model, layer)
            except MoeflowError as e:
                raise MoeflowError(f"gate lookahead needs each MoE layer's router and norm; {e} — use 'path'") from None
            self.norms.append(parts.norm)
            self.router_weights.append(parts.router_weight_ED)
            self.router_bias.append(parts.router_bias_E)
        return self

    @torch.inference_mode()
    def on_residual(self, pos: int, residual_TD: torch.Tensor) -> Scores:
        targets = range(0, self.lookahead) if pos < 0 else [pos + self.lookahead]
        out = {}
        for t in targets:
            if t >= self.num_layers:
                continue
            h = self.norms[t].forward(residual_TD)  # .forward: not through the hooks that feed us
            logits = F.linear(h.to(self.router_weights[t].dtype), self.router_weights[t]).float()
            if self.router_bias[t] is not None:  # sigmoid routing chooses by score + bias
                logits = torch.sigmoid(logits) + self.router_bias[t].float()
            out[t] = logits
        return out


# ---- baselines ----------------------------------------------------------------------------------------


class FrequencyPredictor(RoutePredictor):
    """The experts each layer used most often in the training trace, for every token alike."""

    name = "frequency"
    trainable = True

    def __init__(self, shape: RoutingShape, *, lookahead: int = DEFAULT_LOOKAHEAD) -> None:
        super().__init__(shape, lookahead=lookahead)
        self.counts_LE = torch.zeros(self.num_layers, shape.num_experts)

    def fit(self, token_ids: np.ndarray, positions: np.ndarray, experts: np.ndarray, **_: object) -> list[float]:
        self.counts_LE = torch.from_numpy(multi_hot(np.asarray(experts), self.shape.num_experts).sum(0))
        return []

    def on_step(self, histories: Sequence[Sequence[int]], n_new: int) -> Scores:
        T = len(histories) * n_new
        return {p: self.counts_LE[p].expand(T, -1) for p in range(self.num_layers)}

    def state(self) -> dict:
        return {"counts": self.counts_LE}

    def restore(self, state: dict) -> None:
        self.counts_LE = state["counts"]


class TokenFrequencyPredictor(FrequencyPredictor):
    """Per current token id: the experts that token was routed to most often (global counts break ties)."""

    name = "token_freq"

    def __init__(self, shape: RoutingShape, *, lookahead: int = DEFAULT_LOOKAHEAD) -> None:
        super().__init__(shape, lookahead=lookahead)
        self.table_VLE = torch.zeros(shape.vocab_size, self.num_layers, shape.num_experts)

    def fit(self, token_ids: np.ndarray, positions: np.ndarray, experts: np.ndarray, **_: object) -> list[float]:
        super().fit(token_ids, positions, experts)
        hot = torch.from_numpy(multi_hot(np.asarray(experts), self.shape.num_experts))
        self.table_VLE = torch.zeros(self.shape.vocab_size, self.num_layers, self.shape.num_experts)
        self.table_VLE.index_add_(0, torch.from_numpy(np.asarray(token_ids, dtype=np.int64)), hot)
        return []

    def on_step(self, histories: Sequence[Sequence[int]], n_new: int) -> Scores:
        tok = context_windows(histories, n_new, 1, 0)[:, 0]
        prior = self.counts_LE / self.counts_LE.sum(-1, keepdim=True).clamp(min=1)
        scores_TLE = self.table_VLE[tok] + prior  # prior < 1: only breaks ties and covers unseen tokens
        return {p: scores_TLE[:, p] for p in range(self.num_layers)}

    def state(self) -> dict:
        return {"counts": self.counts_LE, "table": self.table_VLE.to_sparse()}

    def restore(self, state: dict) -> None:
        self.counts_LE = state["counts"]
        self.table_VLE = state["table"].to_dense()


class TransitionPredictor(FrequencyPredictor):
    """Layer transitions: P(expert at layer p+d | the real experts at layer p), counted on the trace.

    The first d layers, before any routing is known, fall back to global frequency.
    """

    name = "transition"

    def __init__(self, shape: RoutingShape, *, lookahead: int = DEFAULT_LOOKAHEAD) -> None:
        super().__init__(shape, lookahead=lookahead)
        E = shape.num_experts
        self.trans_PEE = torch.zeros(max(self.num_layers - lookahead, 0), E, E)

    def fit(self, token_ids: np.ndarray, positions: np.ndarray, experts: np.ndarray, **_: object) -> list[float]:
        super().fit(token_ids, positions, experts)
        hot = torch.from_numpy(multi_hot(np.asarray(experts), self.shape.num_experts))  # [N, L, E]
        d = self.lookahead
        self.trans_PEE = torch.stack(
            [hot[:, p].T @ hot[:, p + d] for p in range(self.num_layers - d)]
        ) if self.num_layers > d else torch.zeros(0, self.shape.num_experts, self.shape.num_experts)
        return []

    def on_step(self, histories: Sequence[Sequence[int]], n_new: int) -> Scores:
        freq = super().on_step(histories, n_new)
        return {p: s for p, s in freq.items() if p < self.lookahead}

    def on_routing(self, pos: int, topk_TK: torch.Tensor) -> Scores:
        t = pos + self.lookahead
        if t >= self.num_layers:
            return {}
        rows_TKE = self.trans_PEE[pos][topk_TK.long().cpu()]
        prior = self.counts_LE[t] / self.counts_LE[t].sum().clamp(min=1)
        return {t: rows_TKE.sum(1) + prior}

    def state(self) -> dict:
        return {"counts": self.counts_LE, "trans": self.trans_PEE}

    def restore(self, state: dict) -> None:
        self.counts_LE = state["counts"]
        self.trans_PEE = state["trans"]


class SklearnPredictor(RoutePredictor):
    """scikit-learn baseline: one-vs-rest logistic regression (SGD) per layer on the last tokens' ids."""

    name = "sklearn"
    trainable = True
    window = 2
    max_train = 120_000

    def __init__(self, shape: RoutingShape, *, lookahead: int = DEFAULT_LOOKAHEAD) -> None:
        super().__init__(shape, lookahead=lookahead)
        self.models: list[object] = []

    def _features(self, win_TW: np.ndarray) -> object:
        from scipy import sparse

        T, W = win_TW.shape
        V1 = self.shape.vocab_size + 1
        cols = (win_TW + np.arange(W) * V1).reshape(-1)
        rows = np.repeat(np.arange(T), W)
        return sparse.csr_matrix((np.ones(T * W, dtype=np.float32), (rows, cols)), shape=(T, W * V1))

    def fit(self, token_ids: np.ndarray, positions: np.ndarray, experts: np.ndarray, *, seed: int = 0,
            progress: bool = True, **_: object) -> list[float]:
        from sklearn.linear_model import SGDClassifier
        from sklearn.multiclass import OneVsRestClassifier
        from tqdm import tqdm

        n = min(len(token_ids), self.max_train)
        x = self._features(trace_windows(token_ids[:n], positions[:n], self.window, self.shape.vocab_size))
        hot = multi_hot(np.asarray(experts[:n]), self.shape.num_experts).astype(np.int64)
        self.models = []
        for p in tqdm(range(self.num_layers), desc="train sklearn", unit="layer", disable=not progress):
            clf = OneVsRestClassifier(SGDClassifier(loss="log_loss", alpha=1e-5, max_iter=8, tol=None,
                                                    random_state=seed))
            self.models.append(clf.fit(x, hot[:, p]))
        return []

    def on_step(self, histories: Sequence[Sequence[int]], n_new: int) -> Scores:
        win = context_windows(histories, n_new, self.window, self.shape.vocab_size).numpy()
        x = self._features(win)
        return {p: torch.from_numpy(np.asarray(m.decision_function(x), dtype=np.float32)).reshape(len(win), -1)
                for p, m in enumerate(self.models)}

    def state(self) -> dict:
        return {"models": self.models}

    def restore(self, state: dict) -> None:
        self.models = state["models"]


PREDICTORS: dict[str, type[RoutePredictor]] = {
    cls.name: cls
    for cls in (PathPredictor, GateLookahead, SklearnPredictor, FrequencyPredictor, TokenFrequencyPredictor,
                TransitionPredictor)
}
