"""Tile configs: stored as data keyed by device and shape; tuning refuses to run in the interpreter."""

from __future__ import annotations

import json

import pytest
import torch
from moeflow.kernels import config as config_mod
from moeflow.kernels.backend import INTERPRETING
from moeflow.kernels.config import TileConfig, get_config, shape_key
from moeflow.kernels.tune import TuneSettings, settings_from_argv, tune


def test_every_stored_config_file_parses() -> None:
    files = sorted(config_mod.CONFIG_DIR.glob("fused_moe_*.json"))
    assert {p.name for p in files} >= {"fused_moe_default.json", "fused_moe_interpreter.json"}
    for path in files:
        for by_t in json.loads(path.read_text())["configs"].values():
            assert by_t and all(TileConfig(**cfg) for cfg in by_t.values()), path.name


@pytest.mark.skipif(not INTERPRETING, reason="checks the interpreter's entry")
def test_interpreter_uses_its_own_large_tiles() -> None:
    cfg = get_config(7, 5, 48, 40, 2, torch.float32, torch.device("cpu"))
    assert cfg == TileConfig(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=1)


def test_lookup_takes_largest_token_bucket_not_above_t(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_mod, "device_key", lambda device: "a-gpu-without-a-file")
    default = json.loads((config_mod.CONFIG_DIR / "fused_moe_default.json").read_text())["configs"]["default"]
    buckets = sorted(int(t) for t in default)
    for T in (1, buckets[1] - 1, buckets[1], buckets[-1] * 10):
        want = max(b for b in buckets if b <= T)
        assert get_config(T, 8, 64, 64, 2, torch.bfloat16, torch.device("cpu")) == TileConfig(**default[str(want)])


def test_fp32_takes_its_own_default_entry_with_half_the_block_k(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 operands are twice as wide: the generic tiles would not fit an sm_86 GPU's shared memory."""
    monkeypatch.setattr(config_mod, "device_key", lambda device: "a-gpu-without-a-file")
    for T in (1, 100, 5000):
        fp32 = get_config(T, 8, 64, 64, 2, torch.float32, torch.device("cpu"))
        bf16 = get_config(T, 8, 64, 64, 2, torch.bfloat16, torch.device("cpu"))
        assert (fp32.block_m, fp32.block_n, 2 * fp32.block_k) == (bf16.block_m, bf16.block_n, bf16.block_k)


def test_a_tuned_shape_entry_wins_over_default(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    tuned = TileConfig(block_m=32, block_n=128, block_k=32, num_warps=8, num_stages=4)
    key = shape_key(8, 64, 96, 2, torch.bfloat16)
    data = {"configs": {"default": {"1": TileConfig(block_m=16, block_n=16, block_k=16).to_json()},
                        key: {"1": tuned.to_json()}}}  # fmt: skip
    (tmp_path / "fused_moe_test-gpu.json").write_text(json.dumps(data))
    monkeypatch.setattr(config_mod, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(config_mod, "device_key", lambda device: "test-gpu")
    config_mod._load.cache_clear()
    try:
        assert get_config(300, 8, 64, 96, 2, torch.bfloat16, torch.device("cpu")) == tuned
        assert get_config(300, 8, 64, 96, 2, torch.float16, torch.device("cpu")).block_n == 16
    finally:
        config_mod._load.cache_clear()


def test_tile_must_be_a_power_of_two_of_at_least_16() -> None:
    with pytest.raises(ValueError, match="powers of two"):
        TileConfig(block_m=24, block_n=32, block_k=32)
    with pytest.raises(ValueError, match="powers of two"):
        TileConfig(block_m=8, block_n=32, block_k=32)


@pytest.mark.skipif(not INTERPRETING, reason="checks the interpreter refusal")
def test_tuning_refuses_under_the_interpreter() -> None:
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tune(TuneSettings(experts=4, hidden=32, inter=32, top_k=2))


def test_tune_cli_is_generated_from_the_settings_dataclass() -> None:
    settings = settings_from_argv(["--experts", "8", "--hidden", "64", "--inter", "32", "--top-k", "2",
                                   "--tokens", "1", "64"])  # fmt: skip
    assert settings == TuneSettings(experts=8, hidden=64, inter=32, top_k=2, dtype="bfloat16", tokens=(1, 64), seed=0)
    with pytest.raises(SystemExit):  # a required option left out
        settings_from_argv(["--experts", "8"])
    with pytest.raises(ValueError, match="torch dtype"):
        TuneSettings(experts=8, hidden=64, inter=32, top_k=2, dtype="float33")
