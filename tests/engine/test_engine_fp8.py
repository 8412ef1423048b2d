"""DeepSeek-V3-style block-wise FP8 checkpoints (float8_e4m3fn weights, a per-block `weight_scale_inv` beside
each): moeflow reads the FP8 experts from disk, holds them FP8 in the slot pool, and computes what transformers
computes loading the same checkpoint on the CPU (it dequantizes every FP8 weight as it loads:
`transformers.integrations.finegrained_fp8.Fp8Dequantize`, float(q) * scale_inv of the block)."""

import json
import shutil

import pytest
import torch
from moeflow.kernels.quant import ExpertFormat, quantize
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import moeflow
from moeflow.errors import CheckpointError
from moeflow.model.checkpoint import open_checkpoint

PROMPT = [3, 17, 29, 44, 5, 61, 90, 12, 7, 33, 101, 58]
NEW_TOKENS = 8
BLOCK = (16, 16)  # the tiny model's sizes (hidden 32, expert intermediate 16) in whole blocks; DeepSeek-V3: 128


def save_fp8_checkpoint(src, out, *, dense: tuple[str, ...] = ("self_attn.o_proj.weight",)):
    """`src` with every routed expert weight (and the dense weights ending in `dense`) block-FP8 quantized, the
    config declaring DeepSeek-V3's quantization_config."""
    out.mkdir(parents=True)
    fmt = ExpertFormat(kind="fp8", block=BLOCK)
    ckpt = open_checkpoint(src)
    tensors = {}
    for file in src.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                w = f.get_tensor(name)
                source = ckpt.family.expert_source(name)
                if (source is not None and source.expert is not None) or name.endswith(dense):
                    tensors[name], tensors[name + "_scale_inv"] = quantize(w, fmt)
                else:
                    tensors[name] = w
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(BLOCK),
                                     "activation_scheme": "dynamic"}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return out


@pytest.fixture(scope="module")
def fp8_checkpoint(tiny_checkpoints, tmp_path_factory):
    return save_fp8_checkpoint(tiny_checkpoints["deepseek_v3"], tmp_path_factory.mktemp("fp8") / "ds")


@pytest.fixture(scope="module")
def transformers_fp8(fp8_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(fp8_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits
    tokens = model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=NEW_TOKENS)[0, len(PROMPT) :]
    return logits, tokens.tolist()


def test_fp8_checkpoint_through_the_triton_kernels(fp8_checkpoint, transformers_fp8, check_triton_kernels):
    """--kernels triton: the fp8 bytes decoded inside the fused kernels, as transformers computes them."""
    check_triton_kernels(fp8_checkpoint, transformers_fp8, PROMPT, NEW_TOKENS)


@pytest.mark.parametrize(("budget", "store"), [("all", "disk"), ("25%", "disk"), ("50%", "ram")])
def test_fp8_checkpoint_equals_transformers_loading_it(fp8_checkpoint, transformers_fp8, budget, store):
    want_logits, want_tokens = transformers_fp8
    with moeflow.load(fp8_checkpoint, dtype="float32", expert_budget=budget, store=store) as engine:
        assert engine.expert_format == ExpertFormat(kind="fp8", block=BLOCK)
        loc = next(iter(engine.checkpoint.experts.values()))
        assert loc.dtype == torch.float8_e4m3fn  # read as FP8 from disk: one byte a weight, plus the scales
        assert engine.cache.pool.gate_up_S2ID.dtype == torch.float8_e4m3fn
        with torch.no_grad():
            logits = engine.model(torch.tensor([PROMPT])).logits
        torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
        assert engine.generate(PROMPT, max_new_tokens=NEW_TOKENS).token_ids == want_tokens
        stats = engine.stats()
    assert stats.resident_peak_bytes <= stats.budget_bytes


def test_fp8_dense_weights_are_dequantized_not_cast(fp8_checkpoint, tiny_checkpoints):
    """A dense FP8 weight loads as float(q) * scale_inv, near the original (a plain cast would be far off)."""
    with safe_open(next(tiny_checkpoints["deepseek_v3"].glob("*.safetensors")), framework="pt") as f:
        name = next(n for n in f.keys() if n.endswith("layers.0.self_attn.o_proj.weight"))  # noqa: SIM118
        original = f.get_tensor(name)
    with moeflow.load(fp8_checkpoint, dtype="float32") as engine:
        loaded = engine.model.get_parameter(name)
    assert (loaded - original).abs().max() <= original.abs().max() / 16  # e4m3: 3 mantissa bits


def test_unsupported_quantization_names_itself_and_the_supported(fp8_checkpoint, tmp_path):
    path = tmp_path / "q"
    shutil.copytree(fp8_checkpoint, path)
    config = json.loads((path / "config.json").read_text())
    for spec, message in (
        ({"quant_method": "gptq", "bits": 4}, r"quant_method 'gptq', which moeflow does not read; supported: int8"),
        ({**config["quantization_config"], "fmt": "e5m2"}, r"fmt 'e5m2' .* moeflow reads block-wise e4m3"),
        ({**config["quantization_config"], "weight_block_size": [12, 16]}, r"not a whole number of 12 x 16"),
    ):  # fmt: skip
        (path / "config.json").write_text(json.dumps({**config, "quantization_config": spec}))
        with pytest.raises(CheckpointError, match=message):
            moeflow.load(path)


def test_missing_scale_inv_is_refused(fp8_checkpoint, tmp_path):
    path = tmp_path / "q"
    shutil.copytree(fp8_checkpoint, path)
    shard = path / "model.safetensors"
    with safe_open(shard, framework="pt") as f:
        tensors = {n: f.get_tensor(n).clone() for n in f.keys()}  # noqa: SIM118 - copies: the file is rewritten
    del tensors[next(n for n in tensors if n.endswith("experts.3.down_proj.weight_scale_inv"))]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"scale of the down rows 0..32 of expert 3 .*weight_scale_inv.* missing"):
        moeflow.load(path)


def test_quantize_refuses_an_fp8_checkpoint_by_name(fp8_checkpoint, tmp_path):
    from moeflow.errors import MoeflowError
    from moeflow.tools.quantize import quantize_checkpoint

    message = r"already quantized \(fp8-b16x16 experts\).*moeflow reads fp8-b16x16 experts"
    with pytest.raises(MoeflowError, match=message):
        quantize_checkpoint(fp8_checkpoint, tmp_path / "q", "int8", progress=False)
