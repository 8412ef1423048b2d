"""Bad input gets a clear error that names the problem and what to do."""

import json
import shutil

import pytest

import moeflow
from moeflow import BudgetError, CheckpointError, MoeflowError, RequestError, UnsupportedArchitectureError
from moeflow.cli import main


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        moeflow.load(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        moeflow.load(tmp_path)


def test_corrupt_config(tiny_checkpoints, tmp_path):
    path = _copy(tiny_checkpoints["mixtral"], tmp_path / "m")
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        moeflow.load(path)


def test_missing_shard_listed_in_index(tiny_checkpoints, tmp_path):
    path = _copy(tiny_checkpoints["mixtral"], tmp_path / "m")
    (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors .*missing"):
        moeflow.load(path)


def test_no_safetensors(tiny_checkpoints, tmp_path):
    path = _copy(tiny_checkpoints["mixtral"], tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        moeflow.load(path)


def test_truncated_shard(tiny_checkpoints, tmp_path):
    path = _copy(tiny_checkpoints["mixtral"], tmp_path / "m")
    shard = path / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        moeflow.load(path)


def test_garbage_shard(tiny_checkpoints, tmp_path):
    path = _copy(tiny_checkpoints["mixtral"], tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        moeflow.load(path)


def test_unsupported_architecture(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(tmp_path / "llama")
    with pytest.raises(UnsupportedArchitectureError, match="'llama' is not supported.*no routed experts.*families"):
        moeflow.load(tmp_path / "llama")


def test_config_and_weights_disagree(tiny_checkpoints, tmp_path):
    path = _copy(tiny_checkpoints["mixtral"], tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["num_local_experts"] = 4
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config says 4 experts, checkpoint has 8"):
        moeflow.load(path)


@pytest.mark.parametrize("budget", ["1%", "100B", "0", "-5%", "lots", "150%"])
def test_bad_or_too_small_budget(tiny_checkpoints, budget):
    with pytest.raises(BudgetError) as err:
        moeflow.load(tiny_checkpoints["mixtral"], expert_budget=budget)
    if budget in ("1%", "100B"):
        assert "the minimum is 36864 bytes" in str(err.value) and "top-2" in str(err.value)


def test_unknown_options(tiny_checkpoints):
    with pytest.raises(MoeflowError, match="unknown store 'tape'"):
        moeflow.load(tiny_checkpoints["mixtral"], store="tape")
    with pytest.raises(MoeflowError, match="unknown cache policy 'mru'"):
        moeflow.load(tiny_checkpoints["mixtral"], policy="mru")
    with pytest.raises(MoeflowError, match="unknown option"):
        moeflow.load(tiny_checkpoints["mixtral"], budget="25%")


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    with moeflow.load(tiny_checkpoints["mixtral"], expert_budget="25%") as e:
        yield e


def test_prompt_longer_than_context(engine):
    with pytest.raises(RequestError, match="context is 256 tokens; shorten the prompt"):
        engine.generate([5] * 250, max_new_tokens=10)
    with pytest.raises(RequestError, match="context is 256"):
        engine.generate("x" * 300, max_new_tokens=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1.0}, "temperature must be in"),
        ({"temperature": float("nan")}, "finite"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"top_p": 1.5}, "top_p must be in"),
        ({"max_new_tokens": 0}, "at least 1"),
        ({"max_new_tokens": 2.5}, "integer"),
        ({"seed": "x"}, "seed must be an integer"),
    ],
)
def test_bad_sampling_parameters(engine, kwargs, message):
    with pytest.raises(RequestError, match=message):
        engine.generate([1, 2, 3], **{"max_new_tokens": 4, **kwargs})


def test_bad_prompts(engine):
    with pytest.raises(RequestError, match="empty"):
        engine.generate("")
    with pytest.raises(RequestError, match="empty"):
        engine.generate([])
    with pytest.raises(RequestError, match="integers in \\[0, 128\\)"):
        engine.generate([1, 999])


def test_engine_still_works_after_errors(engine):
    with pytest.raises(RequestError):
        engine.generate([1], temperature=-3)
    assert len(engine.generate([1, 2, 3], max_new_tokens=3).token_ids) == 3


def test_cli_reports_errors_with_exit_code_2(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "moeflow: error: model folder" in capsys.readouterr().err


def test_cli_json(tiny_checkpoints, capsys):
    rc = main(
        [
            "generate",
            "--model",
            str(tiny_checkpoints["olmoe"]),
            "--prompt",
            "def f(",
            "--max-new-tokens",
            "5",
            "--expert-budget",
            "25%",
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 5 and isinstance(out["text"], str)
    assert out["tokens_per_s"] > 0 and out["peak_rss_bytes"] > 0
    cache = out["cache"]
    for key in ("hit_rate", "hits", "misses", "bytes_read", "stall_s", "budget_bytes", "resident_peak_bytes"):
        assert key in cache
    assert [row["layer"] for row in cache["per_layer"]] == [0, 1]
    assert cache["resident_peak_bytes"] <= cache["budget_bytes"]
