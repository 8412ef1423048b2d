"""gpt-oss's MXFP4 experts (FP4 e2m1 codes two per byte in `<experts>.<param>_blocks`, one E8M0 exponent per 32
columns in `..._scales`): moeflow reads the packed experts from disk, holds them packed in the slot pool (with
gpt-oss's biases and clamped SwiGLU) and computes what transformers computes loading the same checkpoint on the
CPU (without the `kernels` package it dequantizes them as it loads: `integrations.mxfp4.convert_moe_packed_tensors`,
FP4[code] * 2^(e - 127))."""

import json

import pytest
import torch
from moeflow.kernels.quant import ExpertFormat, quantize
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import moeflow
from moeflow.errors import CheckpointError
from moeflow.testing import save_tiny_checkpoint

PROMPT = [3, 17, 29, 44, 5, 61, 90, 12, 7, 33, 101, 58]
NEW_TOKENS = 8
MXFP4 = ExpertFormat(kind="mxfp4")


def save_mxfp4_checkpoint(src, out):
    """`src` (gpt-oss, full precision) with its experts stored as gpt-oss ships them: MXFP4 blocks and scales."""
    out.mkdir(parents=True)
    tensors = {}
    with safe_open(src / "model.safetensors", framework="pt") as f:
        for name in f.keys():  # noqa: SIM118
            w = f.get_tensor(name)
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # in memory [E, in, out]
                packed = [quantize(w[e].t().contiguous(), MXFP4) for e in range(w.shape[0])]
                tensors[name + "_blocks"] = torch.stack([q.view(q.shape[0], -1, 16) for q, _ in packed])
                tensors[name + "_scales"] = torch.stack([s for _, s in packed])
            else:
                tensors[name] = w
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("mxfp4")
    # Hidden and expert sizes in whole 32-column MXFP4 blocks.
    src = save_tiny_checkpoint("gpt_oss", root / "src", hidden_size=64, intermediate_size=32, head_dim=16)
    return save_mxfp4_checkpoint(src, root / "mxfp4")


@pytest.fixture(scope="module")
def transformers_mxfp4(mxfp4_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(mxfp4_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits
    tokens = model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=NEW_TOKENS)[0, len(PROMPT) :]
    return logits, tokens.tolist()


def test_mxfp4_checkpoint_through_the_triton_kernels(mxfp4_checkpoint, transformers_mxfp4, check_triton_kernels):
    """--kernels triton: the mxfp4 bytes decoded inside the fused kernels, as transformers computes them."""
    check_triton_kernels(mxfp4_checkpoint, transformers_mxfp4, PROMPT, NEW_TOKENS)


@pytest.mark.parametrize(("budget", "store"), [("all", "disk"), ("25%", "disk"), ("50%", "ram")])
def test_mxfp4_checkpoint_equals_transformers_loading_it(mxfp4_checkpoint, transformers_mxfp4, budget, store):
    want_logits, want_tokens = transformers_mxfp4
    with moeflow.load(mxfp4_checkpoint, dtype="float32", expert_budget=budget, store=store) as engine:
        assert engine.expert_format == MXFP4
        pool = engine.cache.pool
        assert pool.gate_up_S2ID.dtype == torch.uint8 and pool.gate_up_S2ID.shape[1:] == (64, 32)  # [2I, D/2]
        assert pool.slot_bytes == MXFP4.nbytes(64, 64) + MXFP4.nbytes(64, 32)  # 4.25 bits a weight
        with torch.no_grad():
            logits = engine.model(torch.tensor([PROMPT])).logits
        torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
        assert engine.generate(PROMPT, max_new_tokens=NEW_TOKENS).token_ids == want_tokens
        stats = engine.stats()
    assert stats.resident_peak_bytes <= stats.budget_bytes


def test_mxfp4_missing_scales_are_refused(mxfp4_checkpoint, tmp_path):
    path = tmp_path / "q"
    path.mkdir()
    with safe_open(mxfp4_checkpoint / "model.safetensors", framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys() if not n.endswith("layers.1.mlp.experts.down_proj_scales")}  # noqa: SIM118
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text((mxfp4_checkpoint / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"scale of the down rows 0..64 of expert 0 in layer 1 .*down_proj_scale"):
        moeflow.load(path)


def test_quantize_refuses_an_mxfp4_checkpoint_by_name(mxfp4_checkpoint, tmp_path):
    from moeflow.errors import MoeflowError
    from moeflow.tools.quantize import quantize_checkpoint

    with pytest.raises(MoeflowError, match=r"already quantized \(mxfp4 experts\).*Load this folder as it is"):
        quantize_checkpoint(mxfp4_checkpoint, tmp_path / "q", "int4", progress=False)
    assert not (tmp_path / "q").exists()
