"""The routing predictors: ExpertFlow-style path network, gate lookahead, and the baselines.

Shape legend: N trace tokens, T tokens of one forward, W context window, V vocabulary,
L MoE layers, E experts per layer, K top-k, H hidden.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import expit
from torch import nn

from moeflow.config import DEFAULT_LOOKAHEAD
from moeflow.errors import MoeflowError
from moeflow.model.anatomy import moe_layer_parts

from .base import RoutePredictor, RoutingShape, Scores


def context_windows(histories: Sequence[Sequence[int]], n_new: int, window: int, pad_id: int) -> np.ndarray:
    """[T, W] int64: for each of the last `n_new` tokens of every history, it and the W-1 tokens before it.

    Reads only each history's last ``n_new + W - 1`` tokens (a slice), never the whole history.
    """
    if n_new == 1:  # decode: each row is its window (lists: numpy's per-call cost is most of it at a few rows)
        tails = [hist[-window:] for hist in histories]
        return np.array([[pad_id] * (window - len(tail)) + list(tail) for tail in tails], dtype=np.int64)
    span = n_new + window - 1
    rows = np.full((len(histories), span), pad_id, dtype=np.int64)
    for b, hist in enumerate(histories):
        tail = hist[max(0, len(hist) - span) :]
        rows[b, span - len(tail) :] = tail
    return rows[:, _window_index(n_new, window)].reshape(-1, window)


def _window_index(n_new: int, window: int) -> np.ndarray:
    """[n_new, W]: column i of a history's tail slice holds token i; row t is the t-th new token's window."""
    return np.arange(n_new)[:, None] + np.arange(window)


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


class _FoldedPath:
    """`_PathNet` in one fused pass: the embedding, slot and first Linear folded into one table.

    The first Linear sees the window's W embeddings side by side, so its output is a sum over the
    window of per-(slot, token) rows: ``table[w, v] = (embed[v] + slot[w]) @ W1[:, w].T`` (+ b1 in
    slot 0, since every window has exactly W entries). A prediction is then a gather of W rows and
    their sum (one `take`), GELU and the second Linear, for every layer at once. All in numpy on
    the calling thread: torch's small ops release the GIL and may enter an OpenMP region, and on a
    busy 2-core machine with the transfer thread alive one `F.gelu` of 512 values averaged 3.4 ms
    (median 7 us); the numpy pass averages ~26 us there, 11 us median. The table is built in
    float64 and stored in float32; scores equal the module's to float rounding (GELU by the normal
    CDF, `ndtr`: erf, as `nn.GELU`, in one ufunc where erf's form takes four).
    """

    def __init__(self, net: _PathNet) -> None:
        from scipy.special import ndtr  # scikit-learn's dependency; a numpy ufunc: the normal CDF

        self.ndtr = ndtr
        first, second = net.mlp[0], net.mlp[2]
        V1, D = net.embed.weight.shape
        W = net.slot.shape[0]
        with torch.no_grad():
            w1_HWD = first.weight.double().view(-1, W, D)
            table_WVH = torch.einsum("vd,hwd->wvh", net.embed.weight.double(), w1_HWD)
            table_WVH += torch.einsum("wd,hwd->wh", net.slot.double(), w1_HWD)[:, None]
            table_WVH[0] += first.bias.double()
            self.table_NH = table_WVH.reshape(W * V1, -1).float().numpy()  # N = W x (V + 1) rows
            self.w2_HO = second.weight.detach().t().contiguous().numpy()  # O = L x E outputs
            self.b2_O = second.bias.detach().clone().numpy()
        self.out_shape = net.out_shape
        self.row_offset_W = np.arange(W, dtype=np.int64) * V1  # slot w's rows start at w x (V + 1)

    def __call__(self, win_TW: np.ndarray) -> np.ndarray:
        """Scores [T, L, E] float32 of the windows `win_TW` (token ids, the pad id V for short contexts)."""
        h_TH = self.table_NH.take(win_TW + self.row_offset_W, axis=0).sum(axis=1)
        g_TH = self.ndtr(h_TH)  # GELU by erf, as nn.GELU: h x Phi(h), Phi(h) = (1 + erf(h / sqrt 2)) / 2
        g_TH *= h_TH
        out_TO = g_TH @ self.w2_HO
        out_TO += self.b2_O
        return out_TO.reshape(len(win_TW), *self.out_shape)

    @staticmethod
    def table_bytes(net: _PathNet) -> int:
        return net.embed.num_embeddings * net.slot.shape[0] * net.mlp[0].out_features * 4


class PathPredictor(RoutePredictor):
    """From the last W tokens alone, before the forward, the experts of every MoE layer (one small MLP)."""

    name = "path"
    whole_step = True
    trainable = True
    window = 8
    dim = 64
    hidden = 512
    max_table_bytes = 512 << 20  # the folded table is W x (V + 1) x hidden floats: 64 MiB for V = 4096

    def __init__(self, shape: RoutingShape, *, lookahead: int = DEFAULT_LOOKAHEAD) -> None:
        super().__init__(shape, lookahead=lookahead)
        self.net = _PathNet(shape.vocab_size, self.window, self.dim, self.hidden, self.num_layers, shape.num_experts)
        self.net.eval()
        self._scorer: Callable[[np.ndarray], np.ndarray] | None = None  # built on first use from the weights

    def step_scores(self, histories: Sequence[Sequence[int]], n_new: int) -> np.ndarray:
        return self.scores_TLE(context_windows(histories, n_new, self.window, self.shape.vocab_size))

    def scores_TLE(self, win_TW: np.ndarray) -> np.ndarray:
        """[T, L, E] float32 scores of every MoE layer for the windows `win_TW` [T, W]."""
        if self._scorer is None:
            self.prepare()
        return self._scorer(win_TW)

    def prepare(self) -> None:
        """Fold the network into its table (`_FoldedPath`: 64 MiB for V = 4096, 0.4-1 s on the 2-core VM, which was
        the first request's to pay before `apply_prediction` called this)."""
        if self._scorer is None:
            fits = _FoldedPath.table_bytes(self.net) <= self.max_table_bytes
            self._scorer = _FoldedPath(self.net) if fits else self._module_scores

    @torch.inference_mode()
    def _module_scores(self, win_TW: np.ndarray) -> np.ndarray:
        """The network module itself: for a vocabulary whose folded table would be too large."""
        return self.net(torch.from_numpy(win_TW)).numpy()

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
        self._scorer = None
        return losses

    def state(self) -> dict:
        return {"net": self.net.state_dict()}

    def restore(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self._scorer = None


# ---- gate lookahead -----------------------------------------------------------------------------------


class GateLookahead(RoutePredictor):
    """Training-free: layer p+d's own router applied to the residual stream entering layer p's MoE block.

    Before the first layer the embedding output stands in for the residual. Needs the model's
    routers and their pre-MoE norms (`from_model`).

    Where a layer's norm is an RMS norm with a weight, the weight is folded into the router and the scores are
    computed in numpy on the calling thread, `(x @ W') / rms(x)`: three small numpy calls, which keep the GIL
    (torch's ops release it, and with the reader threads busy each release can cost a scheduler slice: in place,
    during a decode of the random-routing Mixtral-shaped bench model at 25%, py-spy put the torch version at
    ~475 us a layer against 59 us alone). The fold is kept only if it scores random residuals as the norm and the
    router do, to float rounding; otherwise, and for other norms or devices, the modules themselves.
    """

    name = "gate"

    def __init__(self, shape: RoutingShape, *, lookahead: int = DEFAULT_LOOKAHEAD) -> None:
        super().__init__(shape, lookahead=lookahead)
        self.norms: list[nn.Module] = []
        self.router_weights: list[torch.Tensor] = []  # [E, D] per layer position
        self.router_bias: list[torch.Tensor | None] = []  # DeepSeek-V3 selection bias
        self._folded: list[tuple[np.ndarray, float] | None] = []  # ([D, E] router x norm weight, eps) per position
        self._bias_E: list[np.ndarray | None] = []  # router_bias in numpy, for the folded path

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
            self._folded.append(_fold_rms_norm(parts.norm, parts.router_weight_ED))
            bias = parts.router_bias_E
            self._bias_E.append(None if bias is None else bias.detach().float().cpu().numpy())
        return self

    @torch.inference_mode()
    def on_residual(self, pos: int, residual_TD: torch.Tensor) -> Scores:
        targets = range(0, self.lookahead) if pos < 0 else [pos + self.lookahead]
        out = {}
        for t in targets:
            if t >= self.num_layers:
                continue
            folded = self._folded[t]
            if folded is not None and residual_TD.dtype == torch.float32 and residual_TD.device.type == "cpu":
                logits = _rms_router_scores(residual_TD.numpy(), *folded)
                if self._bias_E[t] is not None:  # sigmoid routing chooses by score + bias
                    logits = expit(logits) + self._bias_E[t]
            else:
                h = self.norms[t].forward(residual_TD)  # .forward: not through the hooks that feed us
                logits = F.linear(h.to(self.router_weights[t].dtype), self.router_weights[t]).float()
                if self.router_bias[t] is not None:
                    logits = torch.sigmoid(logits) + self.router_bias[t].float()
            out[t] = logits
        return out


def _rms_router_scores(x_TD: np.ndarray, w_DE: np.ndarray, eps: float) -> np.ndarray:
    """[T, E] float32: router logits of the RMS-normed `x_TD` with the norm's weight folded into `w_DE`. At decode
    sizes: small numpy matmuls and ufuncs on fewer than 500 values, which run without releasing the GIL."""
    ss_T = (x_TD[:, None, :] @ x_TD[:, :, None]).reshape(-1)  # sum of squares per row, as a batched matmul
    inv_T = 1.0 / np.sqrt(ss_T / x_TD.shape[1] + eps)
    return ((x_TD @ w_DE) * inv_T[:, None]).astype(np.float32, copy=False)


def rms_normed(x_TD: np.ndarray, w_D: np.ndarray, eps: float) -> np.ndarray:
    """[T, D] `x_TD` through an RMS norm of weight `w_D`, in numpy."""
    return (x_TD * (1.0 / np.sqrt((x_TD * x_TD).mean(-1) + eps))[:, None]) * w_D


def rms_norm_weight(norm: nn.Module) -> tuple[np.ndarray, float] | None:
    """(weight [D] float32, eps) when `norm` is an RMS norm on the CPU (transformers' `variance_epsilon`) that
    `rms_normed` reproduces on random rows; else None."""
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 1 or not isinstance(eps, float):
        return None
    if weight.device.type != "cpu":
        return None
    w_D = weight.detach().float().numpy()
    with torch.no_grad():
        x_TD = torch.randn(8, len(w_D), generator=torch.Generator().manual_seed(0)) * 3
        ref_TD = norm.forward(x_TD).float().numpy()
    return (w_D, eps) if np.allclose(rms_normed(x_TD.numpy(), w_D, eps), ref_TD, rtol=1e-4, atol=1e-5) else None


def _fold_rms_norm(norm: nn.Module, router_ED: torch.Tensor) -> tuple[np.ndarray, float] | None:
    """(router x norm weight [D, E] float32, eps) when `norm` is an RMS norm with a weight whose folded scores match
    the norm-then-router ones on random residuals; else None."""
    found = rms_norm_weight(norm)
    if found is None or router_ED.device.type != "cpu":
        return None
    w_D, eps = found
    with torch.no_grad():
        w_DE = (router_ED.float() * torch.from_numpy(w_D)).t().contiguous().numpy()
        x_TD = torch.randn(8, router_ED.shape[1], generator=torch.Generator().manual_seed(0)) * 3
        ref = F.linear(norm.forward(x_TD).to(router_ED.dtype), router_ED).float().numpy()
    got = _rms_router_scores(x_TD.numpy(), w_DE, eps)
    scale = float(np.abs(ref).max()) or 1.0
    return (w_DE, eps) if np.allclose(got, ref, rtol=1e-4, atol=1e-5 * scale) else None


# ---- baselines ----------------------------------------------------------------------------------------


class FrequencyPredictor(RoutePredictor):
    """The experts each layer used most often in the training trace, for every token alike."""

    name = "frequency"
    whole_step = True
    trainable = True

    def __init__(self, shape: RoutingShape, *, lookahead: int = DEFAULT_LOOKAHEAD) -> None:
        super().__init__(shape, lookahead=lookahead)
        self.counts_LE = torch.zeros(self.num_layers, shape.num_experts)
        self._derive()

    def _derive(self) -> None:
        """Precompute what every step would otherwise recompute from the counted tables (after fit/restore)."""
        self.prior_LE = self.counts_LE / self.counts_LE.sum(-1, keepdim=True).clamp(min=1)

    def fit(self, token_ids: np.ndarray, positions: np.ndarray, experts: np.ndarray, **_: object) -> list[float]:
        self.counts_LE = torch.from_numpy(multi_hot(np.asarray(experts), self.shape.num_experts).sum(0))
        self._derive()
        return []

    def on_step(self, histories: Sequence[Sequence[int]], n_new: int) -> Scores:
        return self._counts(len(histories) * n_new, self.num_layers)

    def step_scores(self, histories: Sequence[Sequence[int]], n_new: int) -> np.ndarray:
        return np.broadcast_to(self.counts_LE.numpy(), (len(histories) * n_new, *self.counts_LE.shape))  # read-only

    def _counts(self, T: int, layers: int) -> Scores:
        """The first `layers` layers' counts as scores [T, E] (views, one op chain)."""
        return dict(enumerate(self.counts_LE[:layers, None].expand(-1, T, -1).unbind(0)))

    def state(self) -> dict:
        return {"counts": self.counts_LE}

    def restore(self, state: dict) -> None:
        self.counts_LE = state["counts"]
        self._derive()


class TokenFrequencyPredictor(FrequencyPredictor):
    """Per current token id: the experts that token was routed to most often (global counts break ties)."""

    name = "token_freq"

    def __init__(self, shape: RoutingShape, *, lookahead: int = DEFAULT_LOOKAHEAD) -> None:
        self.table_VLE = torch.zeros(shape.vocab_size, len(shape.layers), shape.num_experts)  # before _derive
        super().__init__(shape, lookahead=lookahead)

    def _derive(self) -> None:
        super()._derive()
        # prior < 1: only breaks ties and covers unseen tokens
        self.scores_VLE = (self.table_VLE + self.prior_LE).numpy()  # a step is one gather

    def fit(self, token_ids: np.ndarray, positions: np.ndarray, experts: np.ndarray, **_: object) -> list[float]:
        super().fit(token_ids, positions, experts)
        hot = torch.from_numpy(multi_hot(np.asarray(experts), self.shape.num_experts))
        self.table_VLE = torch.zeros(self.shape.vocab_size, self.num_layers, self.shape.num_experts)
        self.table_VLE.index_add_(0, torch.from_numpy(np.asarray(token_ids, dtype=np.int64)), hot)
        self._derive()
        return []

    on_step = RoutePredictor.on_step  # from `step_scores`, not the global counts

    def step_scores(self, histories: Sequence[Sequence[int]], n_new: int) -> np.ndarray:
        return self.scores_VLE.take(context_windows(histories, n_new, 1, 0)[:, 0], axis=0)

    def state(self) -> dict:
        table = self.table_VLE.to_sparse().coalesce()  # most (token, layer, expert) counts are 0
        return {"counts": self.counts_LE, "table_indices": table.indices(), "table_values": table.values()}

    def restore(self, state: dict) -> None:
        self.counts_LE = state["counts"]
        size = (self.shape.vocab_size, self.num_layers, self.shape.num_experts)
        self.table_VLE = torch.sparse_coo_tensor(
            state["table_indices"], state["table_values"], size, check_invariants=True
        ).to_dense()
        self._derive()


class TransitionPredictor(FrequencyPredictor):
    """Layer transitions: P(expert at layer p+d | the real experts at layer p), counted on the trace.

    The first d layers, before any routing is known, fall back to global frequency.
    """

    name = "transition"
    whole_step = False  # before any routing it answers the first layer only

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
        return self._counts(len(histories) * n_new, min(self.lookahead, self.num_layers))

    def on_routing(self, pos: int, topk_TK: torch.Tensor) -> Scores:
        t = pos + self.lookahead
        if t >= self.num_layers:
            return {}
        rows_TKE = self.trans_PEE[pos][topk_TK.long().cpu()]
        return {t: rows_TKE.sum(1) + self.prior_LE[t]}

    def state(self) -> dict:
        return {"counts": self.counts_LE, "trans": self.trans_PEE}

    def restore(self, state: dict) -> None:
        self.counts_LE = state["counts"]
        self.trans_PEE = state["trans"]
        self._derive()


class SklearnPredictor(RoutePredictor):
    """scikit-learn baseline: one-vs-rest logistic regression (SGD) per layer on the last tokens' ids."""

    name = "sklearn"
    whole_step = True
    trainable = True
    window = 2
    max_train = 120_000

    def __init__(self, shape: RoutingShape, *, lookahead: int = DEFAULT_LOOKAHEAD) -> None:
        super().__init__(shape, lookahead=lookahead)
        # Each layer's one-vs-rest decision function, kept as plain tensors (no pickled estimators, so a saved
        # predictor is tensors alone): scores = features @ coef_EF.T + intercept_E.
        self.coef_LEF = torch.zeros(0)
        self.intercept_LE = torch.zeros(0)

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
        coefs, intercepts = [], []
        for p in tqdm(range(self.num_layers), desc="train sklearn", unit="layer", disable=not progress):
            clf = OneVsRestClassifier(SGDClassifier(loss="log_loss", alpha=1e-5, max_iter=8, tol=None,
                                                    random_state=seed)).fit(x, hot[:, p])
            coef_EF = np.zeros((self.shape.num_experts, x.shape[1]), dtype=np.float32)
            intercept_E = np.zeros(self.shape.num_experts, dtype=np.float32)
            for e, est in enumerate(clf.estimators_):
                if hasattr(est, "coef_"):
                    coef_EF[e], intercept_E[e] = est.coef_[0], est.intercept_[0]
                else:  # an expert never (or always) used in training: sklearn's constant answer, 0 or 1
                    intercept_E[e] = float(est.decision_function(x[:1])[0])
            coefs.append(coef_EF)
            intercepts.append(intercept_E)
        self.coef_LEF = torch.from_numpy(np.stack(coefs))
        self.intercept_LE = torch.from_numpy(np.stack(intercepts))
        return []

    def step_scores(self, histories: Sequence[Sequence[int]], n_new: int) -> np.ndarray:
        x = self._features(context_windows(histories, n_new, self.window, self.shape.vocab_size))
        coef_LEF, intercept_LE = self.coef_LEF.numpy(), self.intercept_LE.numpy()
        return np.stack([np.asarray(x @ coef_LEF[p].T, dtype=np.float32) + intercept_LE[p]
                         for p in range(self.num_layers)], axis=1)

    def state(self) -> dict:
        return {"coef": self.coef_LEF, "intercept": self.intercept_LE}

    def restore(self, state: dict) -> None:
        self.coef_LEF, self.intercept_LE = state["coef"], state["intercept"]


PREDICTORS: dict[str, type[RoutePredictor]] = {
    cls.name: cls
    for cls in (PathPredictor, GateLookahead, SklearnPredictor, FrequencyPredictor, TokenFrequencyPredictor,
                TransitionPredictor)
}
