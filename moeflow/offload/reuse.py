"""A learned reuse model: P(a resident expert is used within its layer's next few runs), for eviction.

Belady evicts the expert whose next use is farthest; an online policy can only estimate it. What an
estimate must see ahead: demand eviction that knows the next h tokens' routing exactly reads 1.49x /
1.33x / 1.12x Belady's bytes per token at h = 1 / 2 / 4 (iobound model at 25%, held-out text, LRU 1.68x;
`bench/admission.py`'s horizon oracles). So the model here is trained to answer for `horizon` (4) tokens
ahead, from what an online policy has seen: the routing of the previous step, decayed use counts at a
few half-lives, and the uses of the current step so far (with how far into the step it is). A small
MLP, fitted on a routing trace of training text (`moeflow predictor train --predictors reuse`), evaluated
in numpy from features kept up to date use by use (`LearnedReuse`). Only the routing stream goes in, so
it knows nothing of the tokens and applies to any batch, though it was trained on one token per step.
Replayed on the same held-out text and budget, path's prefetch with it reads 1.45x Belady's bytes per
token against 1.56x evicting by `NextUse`.

For a key of a layer that has run in the current step the answer is about the next `horizon` steps;
for one that has not, about this step and the `horizon - 1` after it.

Shapes: see the legend in `moeflow/__init__.py` (here F input features, H hidden units, O = L x E outputs:
one per expert of every MoE layer, N training samples).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy.special import expit
from torch import nn

from moeflow.errors import MoeflowError
from moeflow.model.checkpoint import ExpertKey

FORMAT = "moeflow-reuse-1"
NAME = "reuse"
HALF_LIVES = (2.0, 8.0, 32.0)  # decayed use counts, in steps


def reuse_files(folder: str | Path) -> tuple[Path, Path]:
    """Where a reuse model lives in a predictor folder: its weights and its record."""
    return Path(folder) / f"{NAME}.safetensors", Path(folder) / f"{NAME}.json"


@dataclass(frozen=True, kw_only=True)
class ReuseShape:
    layers: tuple[int, ...]  # MoE layers, in order
    num_experts: int
    horizon: int = 4
    hidden: int = 128

    @property
    def width(self) -> int:
        """Input features: previous step, one decayed count per half-life, current step (L x E each), position."""
        le = len(self.layers) * self.num_experts
        return (2 + len(HALF_LIVES)) * le + len(self.layers) + 1


class ReuseModel:
    """The trained MLP; `fit` trains it on a trace's routing, `probabilities_F` answers one feature vector."""

    def __init__(self, shape: ReuseShape) -> None:
        self.shape = shape
        for name, size in _weight_shapes(shape).items():  # untrained: 1/2 for everything
            setattr(self, name, np.zeros(size, np.float32))

    def probabilities_F(self, x_F: np.ndarray) -> np.ndarray:
        """P(used within the horizon) of every (layer position, expert), flat [L x E], from one feature vector."""
        return self.answer(x_F @ self.w1_FH + self.b1_H)

    def answer(self, h_H: np.ndarray) -> np.ndarray:
        """`probabilities_F` from the first layer's pre-activation."""
        return expit(np.maximum(h_H, 0.0) @ self.w2_HO + self.b2_O)  # ReLU: one ufunc (GELU cost 6 us here)

    # ---- training -----------------------------------------------------------------------------------------

    def fit(self, experts_NLK: np.ndarray, *, epochs: int = 12, seed: int = 0, progress: bool = True) -> list[float]:
        """Fit on a routing trace (one token per step, in order); returns the mean loss per epoch.

        Each epoch draws N random (token, position in the step) samples, position -1 meaning nothing of
        the token's routing is known yet."""
        shape = self.shape
        N, L, _ = experts_NLK.shape
        E = shape.num_experts
        if L != len(shape.layers) or N < shape.horizon + 1:
            raise MoeflowError(f"a reuse model of {len(shape.layers)} layers needs a trace of that many layers and "
                               f"more than {shape.horizon} tokens; got {N} tokens x {L} layers")
        history = ReuseHistory.of(experts_NLK, num_experts=E, horizon=shape.horizon)
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        net = nn.Sequential(nn.Linear(shape.width, shape.hidden), nn.ReLU(), nn.Linear(shape.hidden, L * E))
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        losses = []
        bar = _progress(epochs * N, progress)
        batch = min(2048, max(32, N // 64))  # at least ~64 steps an epoch on a short trace
        for _ in range(epochs):
            total = 0.0
            for start in range(0, N, batch):
                n = rng.integers(0, N - 1, size=min(batch, N - start))  # not the last step: nothing follows it
                p = rng.integers(-1, L, size=len(n))
                x, y = history.samples(n, p)
                loss = nn.functional.binary_cross_entropy_with_logits(net(torch.from_numpy(x)), torch.from_numpy(y))
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(n)
                bar.update(len(n))
            losses.append(total / N)
        bar.close()
        first, second = net[0], net[2]
        self.w1_FH = first.weight.detach().T.contiguous().numpy()
        self.b1_H = first.bias.detach().numpy().copy()
        self.w2_HO = second.weight.detach().T.contiguous().numpy()
        self.b2_O = second.bias.detach().numpy().copy()
        return losses

    # ---- files --------------------------------------------------------------------------------------------

    def save(self, folder: str | Path, meta: dict | None = None) -> Path:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        tensors_path, record_path = reuse_files(out)
        save_file({name: torch.from_numpy(np.ascontiguousarray(getattr(self, name))) for name in _WEIGHTS},
                  tensors_path)
        s = self.shape
        record = {"name": NAME, "format": FORMAT, "layers": list(s.layers), "num_experts": s.num_experts,
                  "horizon": s.horizon, "hidden": s.hidden, "half_lives": list(HALF_LIVES), "training": meta or {}}
        record_path.write_text(json.dumps(record, indent=1))
        return tensors_path

    @classmethod
    def load(cls, folder: str | Path, *, layers: Sequence[int], num_experts: int) -> ReuseModel:
        """The reuse model saved in `folder` for a model with these MoE `layers` and `num_experts`; a
        MoeflowError that says what to do if it is missing, unreadable or for another model."""
        tensors_path, record_path = reuse_files(folder)
        retrain = f"run `moeflow predictor train --predictors reuse --out {folder} --force`"
        if not tensors_path.is_file() or not record_path.is_file():
            raise MoeflowError(f"no reuse model in {folder} ({tensors_path.name} + {record_path.name}); {retrain}")
        try:
            record = json.loads(record_path.read_text())
            if not isinstance(record, dict) or record.get("format") != FORMAT:
                raise ValueError(f"it is not a {FORMAT} record")
            shape = ReuseShape(layers=tuple(int(x) for x in record["layers"]), num_experts=int(record["num_experts"]),
                               horizon=int(record["horizon"]), hidden=int(record["hidden"]))
            if [float(x) for x in record["half_lives"]] != list(HALF_LIVES):
                raise ValueError(f"half-lives {record['half_lives']} are not this moeflow's {list(HALF_LIVES)}")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise MoeflowError(f"{record_path} is not a readable reuse model record ({e}); {retrain} again") from e
        if shape.horizon < 1 or shape.hidden < 1:
            raise MoeflowError(f"{record_path} is not a readable reuse model record (horizon {shape.horizon}, hidden "
                               f"{shape.hidden}: both must be positive); {retrain} again")
        if shape.layers != tuple(layers) or shape.num_experts != num_experts:
            raise MoeflowError(f"{tensors_path} was trained for another model (MoE layers {list(shape.layers)}, "
                               f"{shape.num_experts} experts); {retrain}")
        try:
            tensors = load_file(tensors_path)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type; any unreadable file: same advice
            raise MoeflowError(f"{tensors_path} is not a readable safetensors file ({e}); {retrain} again") from e
        for name, want in _weight_shapes(shape).items():  # before allocating anything the record asks for
            got = tensors.get(name)
            if got is None or tuple(got.shape) != want or got.dtype != torch.float32:
                raise MoeflowError(f"{tensors_path} does not hold a reuse model ({name}: expected float32 {want}, got "
                                   f"{None if got is None else (got.dtype, tuple(got.shape))}); {retrain} again")
        model = cls(shape)
        for name in _WEIGHTS:
            setattr(model, name, tensors[name].numpy())
        return model


_WEIGHTS = ("w1_FH", "b1_H", "w2_HO", "b2_O")


def _weight_shapes(shape: ReuseShape) -> dict[str, tuple[int, ...]]:
    outputs = len(shape.layers) * shape.num_experts
    return {"w1_FH": (shape.width, shape.hidden), "b1_H": (shape.hidden,), "w2_HO": (shape.hidden, outputs),
            "b2_O": (outputs,)}


class LearnedReuse:
    """`NextUse`'s interface (`on_use`, `probabilities`) answered by a `ReuseModel` from the live use stream.

    Keeps the features the model was trained on up to date as uses arrive. A use within a step turns on
    one input feature (and perhaps moves the position), so the first layer's pre-activation is updated
    by a row or two of its weights instead of being recomputed (recomputed whole once a step); the
    answer for every expert is then one small matmul, kept until the next use that changes anything (the
    whole policy's bookkeeping with it: 134 us a token on the shipped model, bench/predictor_cost.py)."""

    def __init__(self, model: ReuseModel) -> None:
        self.model = model
        s = model.shape
        E = self._E = s.num_experts
        self._pos = {layer: i for i, layer in enumerate(s.layers)}
        self._index = {(layer, e): i * E + e for layer, i in self._pos.items() for e in range(E)}
        le = len(s.layers) * s.num_experts
        self._cur_at = (1 + len(HALF_LIVES)) * le  # where the current step's uses start in the features
        self._pos_at = self._cur_at + le  # ...and the position
        self._decays = np.array([0.5 ** (1.0 / h) for h in HALF_LIVES], np.float32)[:, None]
        self._acc = np.zeros((len(HALF_LIVES), le), np.float32)  # decayed counts without the (1 - d) factor
        self._prev = np.zeros(le, np.float32)
        self._cur = np.zeros(le, np.float32)
        self._position = -1  # the last layer position used in the current step
        self._step = 0
        self._h_H = self.features_F() @ model.w1_FH + model.b1_H  # the first layer's pre-activation
        self._answer: list[float] | None = None

    def features_F(self) -> np.ndarray:
        """The model's input now: what `ReuseModel.fit` trains on for the same history."""
        pos = np.zeros(len(self._pos) + 1, np.float32)
        pos[self._position + 1] = 1.0
        return np.concatenate([self._prev, (self._acc * (1.0 - self._decays)).reshape(-1), self._cur, pos])

    def begin_step(self, step: int) -> None:
        """Step `step` begins: before its first layer runs, the answers are about it (position -1)."""
        if step > self._step:
            self._roll(step - self._step)
            self._step = step

    def on_use(self, key: ExpertKey, step: int) -> None:
        pos = self._pos.get(key[0])
        if pos is None:
            return
        self.begin_step(step)
        i = pos * self._E + key[1]
        w1_FH = self.model.w1_FH
        if self._cur[i] == 0.0:
            self._cur[i] = 1.0
            self._h_H += w1_FH[self._cur_at + i]
            self._answer = None
        if pos > self._position:
            self._h_H += w1_FH[self._pos_at + pos + 1] - w1_FH[self._pos_at + self._position + 1]
            self._position = pos
            self._answer = None

    def _roll(self, gap: int) -> None:
        d = self._decays
        self._acc = self._acc * d**gap + self._cur * d ** (gap - 1)
        self._prev = self._cur if gap == 1 else np.zeros_like(self._cur)
        self._cur = np.zeros_like(self._cur)
        self._position = -1
        self._h_H = self.features_F() @ self.model.w1_FH + self.model.b1_H
        self._answer = None

    def probability(self, key: ExpertKey) -> float:
        return self.probabilities((key,))[0]

    def probabilities(self, keys: Sequence[ExpertKey]) -> list[float]:
        answer = self._answer
        if answer is None:
            answer = self._answer = self.model.answer(self._h_H).tolist()
        index = self._index
        return [answer[index[k]] if k in index else 0.0 for k in keys]


@dataclass(frozen=True)
class ReuseHistory:
    """A routing trace as the model's training samples: (step n, layer position p) -> (features, targets)."""

    used_NO: np.ndarray  # 1 where step n used expert e of layer position l (column l x E + e)
    past_NF: np.ndarray  # step n - 1's uses and the decayed counts over the steps before n
    within_NO: np.ndarray  # used in steps n .. n + h - 1
    after_NO: np.ndarray  # used in steps n + 1 .. n + h
    num_layers: int

    @classmethod
    def of(cls, experts_NLK: np.ndarray, *, num_experts: int, horizon: int) -> ReuseHistory:
        from scipy.signal import lfilter  # training only: ~0.4 s to import, which loading an engine need not pay

        N, L, K = experts_NLK.shape
        used_NO = np.zeros((N, L * num_experts), np.float32)
        cols = (np.arange(L)[None, :, None] * num_experts + experts_NLK).reshape(N, L * K)
        used_NO[np.arange(N)[:, None], cols] = 1.0
        prev = np.zeros_like(used_NO)
        prev[1:] = used_NO[:-1]
        parts = [prev]
        for half_life in HALF_LIVES:
            d = 0.5 ** (1.0 / half_life)
            acc = lfilter([1.0], [1.0, -d], used_NO, axis=0)  # acc[n] = used[n] + d acc[n - 1]
            decayed = np.zeros_like(used_NO)
            decayed[1:] = acc[:-1] * (1.0 - d)
            parts.append(decayed)
        within_NO = used_NO.copy()
        for j in range(1, horizon):
            np.maximum(within_NO[:-j], used_NO[j:], out=within_NO[:-j])
        after_NO = np.zeros_like(within_NO)
        after_NO[:-1] = within_NO[1:]
        return cls(used_NO, np.hstack(parts).astype(np.float32), within_NO, after_NO, L)

    def samples(self, n: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Features and targets of steps `n` at layer positions `p` (-1: before the step's first layer): the
        step's uses of layers up to p are known, and their targets are about the steps after it."""
        L = self.num_layers
        E = self.used_NO.shape[1] // L
        known_NO = np.repeat(np.arange(L), E)[None, :] <= p[:, None]
        pos = np.zeros((len(n), L + 1), np.float32)
        pos[np.arange(len(n)), p + 1] = 1.0
        x = np.hstack([self.past_NF[n], self.used_NO[n] * known_NO, pos])
        return x, np.where(known_NO, self.after_NO[n], self.within_NO[n])


def _progress(total: int, show: bool):  # noqa: ANN202 - tqdm's type, imported lazily
    from tqdm import tqdm

    return tqdm(total=total, desc="training reuse", unit="sample", disable=not show)
