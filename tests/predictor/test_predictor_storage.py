"""Predictors are stored as safetensors + JSON and loaded without pickle: the shipped ones were converted
from torch pickles (.pt) and predict exactly what they predicted before; anything else is refused by name.

data/shipped_scores.safetensors holds the shipped predictors' scores on held-out histories, computed from the
.pt files before the conversion (`_scores` below, the same histories and routing).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from moeflow.predictor.base import FORMAT, RoutingShape, load_saved, predictor_dir, save_predictor
from moeflow.predictor.predictors import PREDICTORS, TokenFrequencyPredictor
from safetensors.torch import load_file, save_file

from moeflow.config import DEFAULT_MODEL
from moeflow.errors import MoeflowError
from moeflow.offload.reuse import NAME as REUSE
from moeflow.offload.reuse import ReuseModel

SHIPPED = ("path", "token_freq", "frequency", "transition")
BEFORE = Path(__file__).parent / "data" / "shipped_scores.safetensors"


def _shape() -> RoutingShape:
    return RoutingShape.from_dict(json.loads((predictor_dir(DEFAULT_MODEL) / "path.json").read_text())["shape"])


def _histories() -> list[list[int]]:
    """64 held-out prefixes (3 to 168 tokens) of the default model's first four held-out files."""
    from transformers import AutoTokenizer

    from moeflow.model.corpus import model_corpus

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    out = []
    for f in model_corpus(DEFAULT_MODEL, "heldout")[:4]:
        ids = tokenizer(f.read_text(encoding="utf-8")[:4000], add_special_tokens=False)["input_ids"]
        out += [ids[: 3 + 11 * i] for i in range(16)]
    return out


def _scores(shape: RoutingShape, folder: Path) -> dict[str, torch.Tensor]:
    histories = _histories()
    gen = torch.Generator().manual_seed(0)
    topk_TK = torch.stack([torch.randperm(shape.num_experts, generator=gen)[: shape.top_k] for _ in histories])
    out = {"routing_topk": topk_TK}
    for name in SHIPPED:
        p = load_saved(PREDICTORS[name], DEFAULT_MODEL, shape, folder=folder)
        for pos, s in p.on_step(histories, 1).items():
            out[f"{name}.step.{pos}"] = s.float()
        for pos in range(len(shape.layers)):
            for t, s in p.on_routing(pos, topk_TK).items():
                out[f"{name}.routing.{pos}.{t}"] = s.float()
    return out


def test_shipped_predictors_predict_what_they_did_before_conversion():
    before = load_file(BEFORE)
    after = _scores(_shape(), predictor_dir(DEFAULT_MODEL))
    assert sorted(after) == sorted(before)
    assert torch.equal(after["routing_topk"], before["routing_topk"])
    for key in before:  # to float rounding at the scores' scale (numpy's BLAS sums in another order on one thread)
        scale = max(1.0, float(before[key].abs().max()))
        torch.testing.assert_close(after[key], before[key], rtol=1e-6, atol=1e-6 * scale, msg=key)


def test_shipped_folder_is_safetensors_and_json_only():
    files = sorted(p.name for p in predictor_dir(DEFAULT_MODEL).iterdir())
    assert files == sorted(f"{n}.{ext}" for n in (*SHIPPED, REUSE) for ext in ("json", "safetensors"))
    for name in SHIPPED:
        record = json.loads((predictor_dir(DEFAULT_MODEL) / f"{name}.json").read_text())
        assert record["format"] == FORMAT and record["name"] == name and record["training"]["train_tokens"] > 0
    # The eviction policy's reuse model, beside them: it loads, and it was trained.
    folder = predictor_dir(DEFAULT_MODEL)
    shape = _shape()
    ReuseModel.load(folder, layers=shape.layers, num_experts=shape.num_experts)
    assert json.loads((folder / f"{REUSE}.json").read_text())["training"]["train_tokens"] > 0


def test_loading_never_unpickles(monkeypatch):
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a predictor was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    for name in SHIPPED:
        assert load_saved(PREDICTORS[name], DEFAULT_MODEL, _shape()).name == name


def test_token_table_round_trips(tmp_path):
    shape = RoutingShape((0, 1, 2), 8, 2, 41)
    gen = torch.Generator().manual_seed(1)
    N = 300
    tokens = torch.randint(0, 41, (N,), generator=gen).numpy()
    experts = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(N * 3)]).reshape(N, 3, 2).numpy()
    p = TokenFrequencyPredictor(shape)
    p.fit(tokens, torch.arange(N).numpy(), experts)
    save_predictor(p, tmp_path, {"note": "toy"})
    q = load_saved(TokenFrequencyPredictor, tmp_path, shape)
    assert torch.equal(q.table_VLE, p.table_VLE) and torch.equal(q.counts_LE, p.counts_LE)
    histories = [[1, 2, 3], [40], [7, 7]]
    a, b = p.on_step(histories, 1), q.on_step(histories, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def shipped_copy(tmp_path) -> Path:
    return Path(shutil.copytree(predictor_dir(DEFAULT_MODEL), tmp_path / "predictors"))


def _load(folder: Path, name: str = "frequency"):
    return load_saved(PREDICTORS[name], DEFAULT_MODEL, _shape(), folder=folder)


def _edit_record(folder: Path, predictor: str, **changes: object) -> None:
    path = folder / f"{predictor}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda f: (f / "frequency.json").write_text("{oops"), "frequency.json is not a readable predictor record"),
        (lambda f: _edit_record(f, "frequency", format="pickle"), "not a moeflow-predictor-1 record"),
        (lambda f: _edit_record(f, "frequency", name="path"), "not a moeflow-predictor-1 record"),
        (lambda f: _edit_record(f, "frequency", lookahead=0), "lookahead 0 is not a positive integer"),
        (lambda f: _edit_record(f, "frequency", shape={"layers": [0], "num_experts": 3, "top_k": 1,
                                                        "vocab_size": 9}), "trained for another model shape"),
        (lambda f: (f / "frequency.safetensors").write_bytes(b"\x80\x04K\x01."),
         "frequency.safetensors is not a readable safetensors file"),
        (lambda f: save_file({"counts": torch.zeros(4, 3)}, f / "frequency.safetensors"),
         r"counts is torch.float32 \(4, 3\), expected torch.float32 \(4, 16\)"),
        (lambda f: save_file({"table": torch.zeros(4, 16)}, f / "frequency.safetensors"),
         r"tensors \['table'\], expected \['counts'\]"),
        (lambda f: (f / "frequency.safetensors").unlink(), "has not been trained"),
    ],
    ids=["record-not-json", "record-format", "record-name", "record-lookahead", "record-shape", "tensors-pickle",
         "tensor-shape", "tensor-names", "tensors-missing"],
)
def test_a_damaged_predictor_is_refused_with_what_to_do(shipped_copy, change, match):
    change(shipped_copy)
    with pytest.raises(MoeflowError, match=match) as err:
        _load(shipped_copy)
    assert "moeflow predictor train" in str(err.value)


def test_a_token_table_out_of_range_is_refused(shipped_copy):
    flat = load_file(shipped_copy / "token_freq.safetensors")
    flat["table_indices"][0, 0] = 10**6
    save_file(flat, shipped_copy / "token_freq.safetensors")
    with pytest.raises(MoeflowError, match="does not hold a token_freq predictor"):
        _load(shipped_copy, "token_freq")


def test_predictor_files_must_be_regular_files_in_their_folder(shipped_copy, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    (shipped_copy / "frequency.safetensors").rename(outside)
    (shipped_copy / "frequency.safetensors").symlink_to(outside)
    with pytest.raises(MoeflowError, match="outside the model folder"):
        _load(shipped_copy)
    (shipped_copy / "frequency.safetensors").unlink()
    os.mkfifo(shipped_copy / "frequency.safetensors")
    with pytest.raises(MoeflowError, match="FIFO"):
        _load(shipped_copy)
