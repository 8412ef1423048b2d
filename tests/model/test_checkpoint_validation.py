"""A model folder can neither make moeflow read outside itself nor give silent wrong output through a
corrupt safetensors header: every such case is refused at load, naming the file, the tensor and what to do.

Header cases are checked against the safetensors library too: what it refuses, moeflow refuses. Each
corruption hits an expert the test prompt really routes to (`used`), so a load that let it through would
compute that prompt with wrong weights.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import moeflow
from moeflow.errors import CheckpointError
from moeflow.model.checkpoint import open_checkpoint

PROMPT = "def f(x):"
EXPERT = "model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}.weight"


@pytest.fixture(scope="module")
def used(tiny_checkpoints) -> list[tuple[int, int]]:
    """The (layer, expert) pairs PROMPT routes to on the tiny Mixtral, in the order first used."""
    seen: list[tuple[int, int]] = []
    with moeflow.load(tiny_checkpoints["mixtral"], expert_budget="all") as engine:
        close = engine.runtime.routing.subscribe(
            lambda e: seen.extend((e.plan.layer, x) for x in e.plan.expert_ids if (e.plan.layer, x) not in seen)
        ).close
        engine.generate(PROMPT, max_new_tokens=4)
        close()
    assert seen
    return seen


@pytest.fixture
def model(tiny_checkpoints, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_checkpoints["mixtral"], tmp_path / "model"))


def _header(shard: Path) -> tuple[dict, bytes]:
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write(shard: Path, header: dict | list | str, body: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + body)


def _edit(model: Path, change: Callable[[dict], object]) -> Path:
    shard = model / "model.safetensors"
    header, body = _header(shard)
    change(header)
    _write(shard, header, body)
    return shard


def _refused(model: Path, match: str) -> CheckpointError:
    with pytest.raises(CheckpointError, match=match) as err:
        moeflow.load(model, expert_budget="all")
    return err.value


def _library_refuses(shard: Path) -> None:
    with pytest.raises(Exception):  # noqa: B017 - safetensors raises its own SafetensorError
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                f.get_tensor(key)


def _key(used: list[tuple[int, int]], proj: str = "w1", which: int = 0) -> str:
    layer, expert = used[which]
    return EXPERT.format(layer=layer, expert=expert, proj=proj)


# ---- paths -------------------------------------------------------------------------------------------


def _outside_shard(model: Path, tmp_path: Path) -> Path:
    """The model's own shard moved outside the folder (a valid file: an old loader would read it)."""
    outside = tmp_path / "elsewhere" / "x.safetensors"
    outside.parent.mkdir()
    (model / "model.safetensors").rename(outside)
    return outside


def test_index_naming_a_shard_outside_the_folder_is_refused(model, tmp_path):
    _outside_shard(model, tmp_path)
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "../elsewhere/x.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    err = _refused(model, r"model.safetensors.index.json names '../elsewhere/x.safetensors'.*outside the model folder")
    assert "download the model again" in str(err)


def test_index_naming_an_absolute_path_is_refused(model, tmp_path):
    outside = _outside_shard(model, tmp_path)
    index = {"metadata": {}, "weight_map": {"lm_head.weight": str(outside)}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(model, "outside the model folder")
    index["weight_map"]["lm_head.weight"] = "/etc/passwd"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(model, "'/etc/passwd'.*outside the model folder")


def test_a_symlink_out_of_the_folder_is_refused(model, tmp_path):
    outside = _outside_shard(model, tmp_path)
    (model / "model.safetensors").symlink_to(outside)
    _refused(model, "'model.safetensors', which resolves to .*x.safetensors', outside the model folder")


def test_a_symlinked_tokenizer_out_of_the_folder_is_refused(model):
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to("/proc/self/environ")
    _refused(model, "'tokenizer.json'.*outside the model folder")


def test_a_hub_snapshot_whose_symlinks_point_into_its_blobs_loads(tiny_checkpoints, tmp_path, transformers_greedy):
    """The Hugging Face cache layout: snapshots/<rev>/<file> -> ../../blobs/<hash>, inside the repository."""
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(Path(tiny_checkpoints["mixtral"]).iterdir())):
        shutil.copy(f, repo / "blobs" / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    prompt = [5, 9, 17, 3]
    with moeflow.load(snapshot, expert_budget="25%") as engine:
        assert engine.generate(prompt, max_new_tokens=4).token_ids == transformers_greedy("mixtral", prompt, 4)


def _opens_within(fn: Callable[[], object], fifo: Path, seconds: float = 20.0) -> BaseException | None:
    """Run `fn` in a thread; a loader hanging on `fifo` fails the test (the FIFO is then opened for
    writing and closed, so the stuck read ends and the thread exits)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(seconds)
        pytest.fail(f"loading hung on the FIFO {fifo.name}")
    return outcome[0]


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_fifo_in_the_folder_is_refused_not_waited_on(model, name):
    (model / name).unlink()
    os.mkfifo(model / name)
    err = _opens_within(lambda: open_checkpoint(model), model / name)
    assert isinstance(err, CheckpointError), err
    assert f"'{name}', which is a FIFO (named pipe), not a regular file" in str(err)


def test_a_fifo_listed_in_the_index_is_refused(model):
    os.mkfifo(model / "model-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model.safetensors", "b": "model-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    err = _opens_within(lambda: open_checkpoint(model), model / "model-00002.safetensors")
    assert isinstance(err, CheckpointError) and "FIFO" in str(err), err


# ---- headers: what the safetensors library refuses -------------------------------------------------------


def test_the_tiny_checkpoint_itself_is_valid(model, used):
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        assert _key(used) in f.keys()
    assert open_checkpoint(model).experts


def _span(header: dict, key: str) -> list[int]:
    return header[key]["data_offsets"]


def test_an_expert_sharing_another_experts_bytes_is_refused(model, used):
    other = next(k for k in used if k[0] == used[0][0] and k != used[0])
    shard = _edit(model, lambda h: h[_key(used)].update(data_offsets=list(_span(h, _key([other])))))
    _library_refuses(shard)
    err = _refused(model, f"tensors .*'{_key(used)}'.* share data bytes .* may not overlap")
    assert "model.safetensors has a corrupt safetensors header" in str(err) and "download" in str(err)


def test_lm_head_pointing_at_the_embedding_bytes_is_refused(tiny_checkpoints, tmp_path, used):
    model = Path(shutil.copytree(tiny_checkpoints["mixtral"], tmp_path / "model"))
    shard = _edit(model, lambda h: h["lm_head.weight"].update(data_offsets=_span(h, "model.embed_tokens.weight")))
    _library_refuses(shard)
    _refused(model, "tensors 'lm_head.weight' and 'model.embed_tokens.weight' share data bytes")


def _shift_start(h: dict, key: str, to: int) -> None:
    start, end = _span(h, key)
    h[key]["data_offsets"] = [to, end]


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda h, k: h[k].update(data_offsets=[-4, _span(h, k)[1]]), "must be two non-negative integers"),
        (lambda h, k: h[k].update(data_offsets=_span(h, k)[::-1]), "which end before they start"),
        (lambda h, k: h[k].update(data_offsets=[_span(h, k)[0], _span(h, k)[1] - 4]), "needs 6144 bytes but .* 6140"),
        (lambda h, k: h[k].update(data_offsets=[_span(h, k)[0], _span(h, k)[1] + 4]), "needs 6144 bytes but .* 6148"),
        (lambda h, k: h[k].update(dtype="F16"), r"\(F16 \[48, 32\]\) needs 3072 bytes but .* hold 6144"),
        (lambda h, k: h[k].update(data_offsets=[float(o) for o in _span(h, k)]), "must be two non-negative integers"),
        (lambda h, k: h[k].update(shape=[48, -32]), "a shape is a list of non-negative integers"),
        (lambda h, k: h[k].update(shape=[48, 32.0]), "a shape is a list of non-negative integers"),
        (lambda h, k: h[k].pop("dtype"), "lacks its dtype, shape or data_offsets"),
        (lambda h, k: h[k].update(dtype="Q7"), "dtype 'Q7', which moeflow does not read"),
        (lambda h, k: h.update(__metadata__={"format": 1}), "__metadata__ must map strings to strings"),
    ],
    ids=["negative-start", "reversed", "short", "long", "f16-over-f32", "float-offsets", "negative-dim",
         "float-dim", "no-dtype", "unknown-dtype", "metadata-not-strings"],
)
def test_a_malformed_expert_entry_is_refused(model, used, change, match):
    shard = _edit(model, lambda h: change(h, _key(used)))
    _library_refuses(shard)
    err = _refused(model, match)
    assert str(shard) in str(err)
    if "metadata" not in match:
        assert _key(used) in str(err)


def test_a_header_that_is_not_a_json_object_is_refused(model):
    shard = model / "model.safetensors"
    _, body = _header(shard)
    _write(shard, ["not", "an", "object"], body)
    _library_refuses(shard)
    _refused(model, "corrupt safetensors header: its header is not a JSON object")


def test_a_header_length_past_the_end_of_the_file_is_refused(model):
    shard = model / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", len(data)) + data[8:])
    _library_refuses(shard)
    _refused(model, f"its header claims {len(data)} bytes but the file has {len(data)}")


def test_bytes_after_the_last_tensor_are_refused(model):
    shard = model / "model.safetensors"
    shard.write_bytes(shard.read_bytes() + b"\0" * 64)
    _library_refuses(shard)
    _refused(model, "its tensors end at byte .* but the file has")


def test_a_tensor_stored_in_two_shards_is_refused(model):
    header, body = _header(model / "model.safetensors")
    _write(model / "model-00002.safetensors", {"lm_head.weight": header["lm_head.weight"] | {}}, b"")
    h2 = {"lm_head.weight": {**header["lm_head.weight"], "data_offsets": [0, 128 * 32 * 4]}}
    start, end = header["lm_head.weight"]["data_offsets"]
    _write(model / "model-00002.safetensors", h2, body[start:end])
    _refused(model, "tensor 'lm_head.weight' is stored twice, in model-00002.safetensors and model.safetensors")


# ---- headers: valid files whose contents do not fit the model --------------------------------------------


def test_an_integer_expert_is_refused_not_read_as_numbers(model, used):
    shard = _edit(model, lambda h: h[_key(used)].update(dtype="I32"))
    with safe_open(str(shard), "pt") as f:  # a valid file: the library reads it, as integers
        assert f.get_tensor(_key(used)).dtype == torch.int32
    err = _refused(model, f"expert weight '{_key(used)}' is stored as I32, not as floating point")
    assert "download or convert it again" in str(err)


def test_an_expert_of_the_wrong_shape_is_refused(model, used):
    shard = _edit(model, lambda h: h[_key(used)].update(shape=[32, 48]))
    with safe_open(str(shard), "pt") as f:
        assert f.get_slice(_key(used)).get_shape() == [32, 48]
    _refused(model, rf"expert {used[0][1]} of layer {used[0][0]}.*\(32, 48\)")


def test_an_lm_head_of_the_wrong_shape_is_refused(model):
    _edit(model, lambda h: h["lm_head.weight"].update(shape=[32, 128]))
    _refused(model, r"lm_head.weight has shape \(32, 128\), the model expects \(128, 32\)")


# ---- config.json: MoE settings the model would fail on mid-forward -----------------------------------------


@pytest.mark.parametrize(
    "family, change, match",
    [
        ("mixtral", {"num_experts_per_tok": 0}, "num_experts_per_tok is 0; it must be a positive integer"),
        ("mixtral", {"num_experts_per_tok": -1}, "num_experts_per_tok is -1; it must be a positive integer"),
        ("mixtral", {"num_experts_per_tok": 9}, "num_experts_per_tok is 9 but the checkpoint's MoE layers have 8"),
        ("mixtral", {"num_experts_per_tok": 2.5}, "num_experts_per_tok is 2.5; it must be a positive integer"),
        ("mixtral", {"num_experts_per_tok": True}, "num_experts_per_tok is True"),
        ("mixtral", {"num_experts_per_tok": None}, "num_experts_per_tok is None"),
        ("mixtral", {"num_local_experts": -1}, "num_local_experts is -1; it must be a positive integer"),
        ("mixtral", {"hidden_size": 0}, "hidden_size is 0"),
        ("qwen2_moe", {"decoder_sparse_step": 0}, "decoder_sparse_step is 0"),
        ("qwen2_moe", {"num_experts_per_tok": 17}, "num_experts_per_tok is 17 but .* have 8 experts"),
        ("deepseek_v3", {"n_group": 0}, "n_group is 0"),
        ("deepseek_v3", {"n_group": 3}, "n_group is 3: the 8 routed experts must split into n_group equal groups"),
        ("deepseek_v3", {"n_group": 8, "topk_group": 2}, "groups of at least 2"),
        ("deepseek_v3", {"topk_group": 5}, "topk_group is 5 but there are only n_group = 4 groups"),
        ("deepseek_v3", {"topk_group": 1, "num_experts_per_tok": 3}, "the 1 chosen group.* hold only 2"),
    ],
)
def test_invalid_moe_settings_are_refused_at_load(tiny_checkpoints, tmp_path, family, change, match):
    model = Path(shutil.copytree(tiny_checkpoints[family], tmp_path / "model"))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **change}))
    err = _refused(model, match)
    assert "config.json" in str(err) and "Fix config.json" in str(err)


# ---- weights that are not numbers: a warning naming them, once ------------------------------------------


def _poison(model: Path, key: str, value: float) -> None:
    """Set the first weight of tensor `key` to `value` (NaN or Inf), leaving the header as it is."""
    shard = model / "model.safetensors"
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    start = json.loads(data[8 : 8 + n])[key]["data_offsets"][0]
    data[8 + n + start : 8 + n + start + 4] = struct.pack("<f", value)
    shard.write_bytes(bytes(data))


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and text in r.getMessage()]


@pytest.mark.parametrize(
    "store, value, parts",
    [("disk", float("nan"), False), ("disk", float("inf"), False), ("ram", float("-inf"), False),
     ("disk", float("nan"), True)],
)  # fmt: skip
def test_an_expert_with_nan_or_inf_weights_warns_once(model, used, caplog, monkeypatch, store, value, parts):
    """parts: demand reads go in parts of one block (`DiskStore.read_parts`), several of them poisoned."""
    layer, expert = used[0]
    _poison(model, _key(used, "w2"), value)
    if parts:
        monkeypatch.setattr("moeflow.offload.store.READ_PART_BYTES", 4096)
        _poison(model, _key(used, "w1"), value)
    with caplog.at_level("WARNING"), moeflow.load(model, expert_budget="25%", store=store) as engine:
        for _ in range(2):  # at 25% the expert is evicted and read again: still one warning
            engine.generate([5, 9, 17, 3], max_new_tokens=3)
            engine.generate(PROMPT, max_new_tokens=4)
    found = _warnings(caplog, "NaN or Inf")
    assert found == [
        f"expert {expert} of layer {layer} in model.safetensors holds NaN or Inf weights: whatever it computes is "
        "not a number. The checkpoint is corrupt; download or convert it again"
    ]


def test_finite_experts_give_no_warning(model, caplog):
    with caplog.at_level("WARNING"), moeflow.load(model, expert_budget="25%") as engine:
        engine.generate(PROMPT, max_new_tokens=4)
    assert not _warnings(caplog, "NaN or Inf")


def test_a_non_expert_weight_with_nan_warns_at_load(model, caplog):
    _poison(model, "model.embed_tokens.weight", float("nan"))
    with caplog.at_level("WARNING"), moeflow.load(model, expert_budget="25%"):
        pass
    assert _warnings(caplog, "NaN or Inf") == [
        "model.embed_tokens.weight in model.safetensors holds NaN or Inf values: the model's output will not be "
        "numbers. The checkpoint is corrupt; download or convert it again"
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_finiteness_check_of_each_float_dtype(dtype):
    from moeflow.model.checkpoint import TensorSpan
    from moeflow.offload.store import _all_finite

    info = torch.finfo(dtype)
    good = torch.tensor([0.0, -0.0, info.max, info.min, info.tiny, info.tiny / 4, 1.0], dtype=dtype)
    for values, finite in [(good, True)] + [(torch.cat([good, torch.tensor([v], dtype=dtype)]), False)
                                            for v in (float("nan"), float("inf"), float("-inf"))]:
        raw = b"\0" * 8 + values.view(torch.uint8).numpy().tobytes()
        span = TensorSpan(file=Path("x"), offset=8, nbytes=values.nbytes, dtype=dtype, shape=tuple(values.shape))
        assert _all_finite(raw, 8, span) is finite, (dtype, values)


@pytest.mark.parametrize("key", ["lm_head.weight", "model.norm.weight"])
def test_an_integer_non_expert_weight_is_refused(model, key):
    shard = _edit(model, lambda h: h[key].update(dtype="I32"))
    with safe_open(str(shard), "pt") as f:  # a valid file, read as integers
        assert f.get_tensor(key).dtype == torch.int32
    _refused(model, f"checkpoint tensor {key} in model.safetensors is stored as torch.int32, but the model's .* holds "
                    "floating-point weights")
