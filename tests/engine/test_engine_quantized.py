"""Quantized experts through the engine: equal to transformers running the same stored weights dequantized.

The contract (docs/quantization.md): a folder written by `moeflow quantize` (or a full-precision one read with
--expert-dtype int8/int4/bf16/fp16) computes, in fp32 on the CPU, what plain transformers computes when its
experts hold the dequantized weights, and greedy tokens equal on the test prompts. Logits:
- with `exact_quantized` (each used expert dequantized) and for bf16/fp16 slots: within fp32 summation-order noise
  (LOGITS_TOL; the full-precision engine differs from transformers by ~3e-8 too: another experts implementation,
  waves under a budget), far below the quantization's own effect (the full-precision logits are outside it);
- by default int8/int4 go through torch's packed matmuls with bf16 activations: within PACKED_TOL x max|logits|
  (measured up to 3.0e-4 x), and closer to the reference than the full-precision logits are.
"""

import json

import pytest
import torch
from moeflow.kernels.quant import ExpertFormat, _int4pack_layout_matches, dequantize, int4pack_scales_nbytes, quantize
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import moeflow
from moeflow.errors import CheckpointError, MoeflowError
from moeflow.model.checkpoint import open_checkpoint
from moeflow.model.families import experts_modules
from moeflow.model.quantized import CONFIG_KEY
from moeflow.testing import FAMILY_NAMES, FULL_MATRIX_FAMILIES, save_tiny_checkpoint
from moeflow.tools.quantize import quantize_checkpoint, save_ordered

PROMPT = [3, 17, 29, 44, 5, 61, 90, 12, 7, 33, 101, 58]
NEW_TOKENS = 8
LOGITS_TOL = {"rtol": 1e-5, "atol": 1e-5}
PACKED_TOL = 1e-3  # bf16 activations: |logits - reference| <= PACKED_TOL * max|reference logits|
FORMATS = {"int8": ExpertFormat(kind="int8"), "int4-g32": ExpertFormat(kind="int4", group_size=32),
           "int4-g128": ExpertFormat(kind="int4", group_size=128)}  # fmt: skip


def _write(src, out, fmt: ExpertFormat):
    return quantize_checkpoint(src, out, fmt.kind, group_size=fmt.group_size or 128, progress=False)


def _dequantized_reference(full_precision, quantized, fmt: ExpertFormat | None, cast: torch.dtype | None = None):
    """Plain transformers on the full-precision folder, every expert weight replaced by the quantized folder's
    stored weight dequantized (or, with `cast`, by the weight rounded to that dtype)."""
    model = AutoModelForCausalLM.from_pretrained(full_precision, dtype=torch.float32).eval()
    ckpt = open_checkpoint(quantized if quantized is not None else full_precision)
    modules = experts_modules(model)
    files = {s.file for loc in ckpt.experts.values() for s in loc.spans}
    with torch.no_grad():
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118
                    source = ckpt.family.expert_source(name)
                    if source is None:
                        continue
                    stored = f.get_tensor(name)
                    if cast is not None:
                        w = stored.to(cast).float()
                    else:
                        w = dequantize(stored, f.get_tensor(name + "_scale"), fmt)
                    param = getattr(modules[source.layer], source.param)
                    rows = w.shape[0]
                    param[source.expert, source.part * rows : (source.part + 1) * rows] = w
    return model


def _engine_logits(engine, ids):
    with torch.no_grad():
        return engine.model(torch.tensor([ids])).logits


def _assert_packed_close(got, want, full):
    """The packed formulation's stated tolerance, and its error below what quantizing did to the logits."""
    torch.testing.assert_close(got, want, rtol=0, atol=PACKED_TOL * want.abs().max().item())
    assert (got - want).abs().max() < (full - want).abs().max()


@pytest.fixture(scope="module")
def quantized_folders(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    return {(fam, name): _write(tiny_checkpoints[fam], root / f"{fam}-{name}", fmt)
            for fam in FAMILY_NAMES for name, fmt in FORMATS.items()}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("fmt_name", list(FORMATS))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_quantized_folder_equals_dequantized_transformers(tiny_checkpoints, quantized_folders, family, fmt_name):
    path = quantized_folders[(family, fmt_name)]
    ref = _dequantized_reference(tiny_checkpoints[family], path, FORMATS[fmt_name])
    want_tokens = ref.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=NEW_TOKENS)[0, len(PROMPT) :]
    with torch.no_grad():
        want_logits = ref(torch.tensor([PROMPT])).logits
    with moeflow.load(tiny_checkpoints[family], expert_budget="all") as engine:
        full_logits = _engine_logits(engine, PROMPT)
    assert not torch.allclose(full_logits, want_logits, **LOGITS_TOL)  # the tolerance tells quantized from not
    with moeflow.load(path, expert_budget="25%", exact_quantized=True) as engine:
        torch.testing.assert_close(_engine_logits(engine, PROMPT), want_logits, **LOGITS_TOL)
    with moeflow.load(path, expert_budget="25%") as engine:
        assert engine.expert_format == FORMATS[fmt_name]
        assert engine.dtype == torch.float32
        _assert_packed_close(_engine_logits(engine, PROMPT), want_logits, full_logits)
        result = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS)
        stats = engine.stats()
    assert result.token_ids == want_tokens.tolist()
    assert stats.resident_peak_bytes <= stats.budget_bytes
    assert stats.misses > stats.capacity_slots  # the budget forced re-reads of quantized bytes


@pytest.mark.slow
@pytest.mark.parametrize("expert_dtype", ["int8", "int4", "bf16", "fp16"])
def test_full_precision_folder_held_quantized_or_cast(tiny_checkpoints, quantized_folders, expert_dtype):
    """--expert-dtype on a full-precision folder: quantized as read, the same bytes `moeflow quantize` stores."""
    full = tiny_checkpoints["qwen3_moe"]
    if expert_dtype in ("int8", "int4"):
        key = "int8" if expert_dtype == "int8" else "int4-g128"
        ref = _dequantized_reference(full, quantized_folders[("qwen3_moe", key)], FORMATS[key])
    else:
        ref = _dequantized_reference(full, None, None, cast=torch.bfloat16 if expert_dtype == "bf16" else torch.float16)
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits
    with moeflow.load(full, expert_budget="all") as engine:
        full_logits = _engine_logits(engine, PROMPT)
    for store in ("disk", "ram"):
        with moeflow.load(full, expert_budget="50%", expert_dtype=expert_dtype, store=store) as engine:
            if expert_dtype in ("int8", "int4"):
                _assert_packed_close(_engine_logits(engine, PROMPT), want, full_logits)
            else:
                torch.testing.assert_close(_engine_logits(engine, PROMPT), want, **LOGITS_TOL)


def _reference_quantized_in_memory(path, fmt: ExpertFormat):
    """Plain transformers on `path`, each expert's gate_up [2I, D] and down [D, I] (the slot layout, whatever the
    family's memory layout: transposed, interleaved) replaced by its quantize -> dequantize round trip."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for module in experts_modules(model).values():
            for name in ("gate_up_proj", "down_proj"):
                param = getattr(module, name)
                for e in range(param.shape[0]):
                    w = param[e].t() if module.is_transposed else param[e]
                    w.copy_(dequantize(*quantize(w, fmt), fmt))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("family", FULL_MATRIX_FAMILIES)
def test_quantized_as_read_equals_reference_in_every_layout(family_checkpoints, family):
    """--expert-dtype int4 on a full-precision folder of a family with expert biases, transposed or interleaved
    experts, dense-first layers or hybrid caches: the reference quantizes the same slot-layout weights."""
    fmt = ExpertFormat(kind="int4", group_size=32)
    path = family_checkpoints[family]
    ref = _reference_quantized_in_memory(path, fmt)
    want = ref.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=NEW_TOKENS)[0, len(PROMPT) :]
    with moeflow.load(path, expert_budget="50%", expert_dtype="int4", group_size=32) as engine:
        assert engine.expert_format == fmt
        assert engine.generate(PROMPT, max_new_tokens=NEW_TOKENS).token_ids == want.tolist()


# Families whose checkpoints fuse a layer's experts into one tensor or keep them transposed (gpt-oss: both,
# interleaved gate/up rows and expert biases too). `moeflow quantize` stores them per expert, [out, in].
FUSED_OR_TRANSPOSED = ("gpt_oss", "aria_text", "granitemoe", "granitemoeshared", "granitemoehybrid", "granitemoe_swa",
                       "lara_mini", "gemma4_text", "minimax_m3_vl_text", "hy_v4")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("family", FUSED_OR_TRANSPOSED)
def test_quantized_folder_of_fused_or_transposed_family_equals_reference(family_checkpoints, family, tmp_path):
    src = family_checkpoints[family]
    ckpt = open_checkpoint(src)
    names = [n for file in {s.file for loc in ckpt.experts.values() for s in loc.spans}
             for n in safe_open(file, framework="pt").keys()]  # fmt: skip
    fused = any(getattr(ckpt.family.expert_source(n), "expert", 0) is None for n in names)
    assert fused or ckpt.family.layout.transposed  # the list above stays what it says
    fmt_name = "int8" if family == "granitemoe" else "int4-g32"
    fmt = FORMATS[fmt_name]
    path = _write(src, tmp_path / "q", fmt)
    stored = open_checkpoint(path)
    assert stored.experts.keys() == ckpt.experts.keys()
    assert all(not p.transposed and len(p.span.shape) == 2 for loc in stored.experts.values() for p in loc.pieces)
    ref = _reference_quantized_in_memory(src, fmt)
    want = ref.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=NEW_TOKENS)[0, len(PROMPT) :]
    with torch.no_grad():
        want_logits = ref(torch.tensor([PROMPT])).logits
    with moeflow.load(path, expert_budget="50%", exact_quantized=True) as engine:
        torch.testing.assert_close(_engine_logits(engine, PROMPT), want_logits, **LOGITS_TOL)
    with moeflow.load(path, expert_budget="50%") as engine:
        assert engine.expert_format == fmt
        assert engine.generate(PROMPT, max_new_tokens=NEW_TOKENS).token_ids == want.tolist()
        assert engine.stats().misses > 0


def test_budget_counts_quantized_bytes(tiny_checkpoints):
    """Slots hold quantized bytes: the same byte budget holds ~4x (int8) / ~6x (int4) the fp32 experts. An int4
    slot computed by torch's CPU matmul also holds its scales in that matmul's layout: counted too."""
    path = tiny_checkpoints["mixtral"]
    with moeflow.load(path) as engine:
        fp32_slot = engine.cache.pool.slot_bytes
        inter, hidden = engine.cache.pool.inter, engine.cache.pool.hidden
    budget = 3 * fp32_slot
    for expert_dtype, fmt in (("int8", FORMATS["int8"]), ("int4", FORMATS["int4-g128"])):
        stored = fmt.nbytes(2 * inter, hidden) + fmt.nbytes(hidden, inter)
        with moeflow.load(path, expert_budget=budget, expert_dtype=expert_dtype, exact_quantized=True) as engine:
            assert engine.cache.pool.slot_bytes == stored
        with moeflow.load(path, expert_budget=budget, expert_dtype=expert_dtype) as engine:
            pool = engine.cache.pool
            torch_layout = int4pack_scales_nbytes(fmt, inter, hidden) if expert_dtype == "int4" else 0
            # (where torch's int4 matmul takes the stored layout: AVX2; on AVX-512 int4 slots are dequantized)
            assert (torch_layout > 0) == (expert_dtype == "int4" and _int4pack_layout_matches())
            assert pool.slot_bytes == stored + torch_layout
            assert pool.nbytes <= budget
            assert pool.capacity == min(budget // pool.slot_bytes, len(engine.checkpoint.experts)) > 3 * 3
            engine.generate(PROMPT, max_new_tokens=4)
            assert engine.stats().resident_peak_bytes <= budget


def test_missing_scale_is_refused_at_load(tiny_checkpoints, tmp_path):
    path = _write(tiny_checkpoints["mixtral"], tmp_path / "q", FORMATS["int8"])
    shard = next(path.glob("*.safetensors"))
    with safe_open(shard, framework="pt") as f:
        tensors = {n: f.get_tensor(n).clone() for n in f.keys()}  # noqa: SIM118 - copies: the file is rewritten
    victim = next(n for n in tensors if n.endswith(".experts.1.w3.weight_scale"))
    del tensors[victim]
    save_ordered(tensors, shard)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    del index["weight_map"][victim]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"scale of the gate_up rows 48..96 of expert 1 in layer \d .* missing"):
        moeflow.load(path)


def test_unsupported_quantized_layouts_name_the_supported_ones(tiny_checkpoints, tmp_path):
    path = _write(tiny_checkpoints["olmoe"], tmp_path / "q", FORMATS["int4-g32"])
    config = json.loads((path / "config.json").read_text())
    for spec, message in (
        ({**config[CONFIG_KEY], "expert_dtype": "int3"},
         r"dtype 'int3' .* not supported; supported: int8, int4 with group size 32 / 64 / 128"),
        ({**config[CONFIG_KEY], "group_size": 100}, r"int4 group size 100 is not supported; use one of \(32, 64, 128"),
        ({**config[CONFIG_KEY], "version": 9}, r"this moeflow reads version 2"),
        ({**config[CONFIG_KEY], "version": 1}, r"int4 experts of version 1 pack their nibbles by column halves"),
    ):  # fmt: skip
        (path / "config.json").write_text(json.dumps({**config, CONFIG_KEY: spec}))
        with pytest.raises(CheckpointError, match=message):
            moeflow.load(path)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"stores its experts as int4-g32; --expert-dtype int8 cannot be made"):
        moeflow.load(path, expert_dtype="int8")
    with pytest.raises(CheckpointError, match=r"--expert-dtype int4 --group-size 128 cannot be made"):
        moeflow.load(path, expert_dtype="int4")
    with pytest.raises(MoeflowError, match=r"--group-size must be one of \(32, 64, 128\), got 48"):
        moeflow.load(path, group_size=48)


def test_quantize_refuses_to_overwrite_or_requantize(tiny_checkpoints, tmp_path):
    out = tmp_path / "q"
    _write(tiny_checkpoints["mixtral"], out, FORMATS["int8"])
    with pytest.raises(MoeflowError, match="already exists and is not an empty folder; moeflow quantize never"):
        _write(tiny_checkpoints["mixtral"], out, FORMATS["int8"])
    with pytest.raises(MoeflowError, match="is already quantized"):
        _write(out, tmp_path / "q2", FORMATS["int4-g32"])
    with pytest.raises(MoeflowError, match="moeflow quantize writes int8 or int4 experts, not 'bf16'"):
        quantize_checkpoint(tiny_checkpoints["mixtral"], tmp_path / "q3", "bf16")


def test_quantize_refuses_sizes_int4_cannot_pack_and_leaves_nothing_behind(tmp_path):
    src = save_tiny_checkpoint("mixtral", tmp_path / "src", intermediate_size=47)  # odd rows: no int4 byte pairs
    out = tmp_path / "q"
    with pytest.raises(MoeflowError, match=r"experts\.0\.w1\.weight: int4 packs two rows .* to int8 \(any size\)"):
        quantize_checkpoint(src, out, "int4", group_size=32, progress=False)
    assert not out.exists()  # no half-written folder to trip the next attempt
    out.mkdir()
    with pytest.raises(MoeflowError, match="int4 packs two rows"):
        quantize_checkpoint(src, out, "int4", group_size=32, progress=False)
    assert out.is_dir() and not any(out.iterdir())  # an empty folder given as --out stays, empty
    quantize_checkpoint(src, out, "int8", progress=False)
    with moeflow.load(out, expert_budget="50%") as engine:
        assert engine.expert_format == FORMATS["int8"]
    inside = quantize_checkpoint(src, src / "int8", "int8", progress=False)  # --out inside --model
    assert not (inside / "int8").exists()
    with moeflow.load(inside, expert_budget="50%") as engine:
        assert engine.expert_format == FORMATS["int8"]
    with pytest.raises(MoeflowError, match=r"--expert-dtype int4 cannot hold this model's experts \(intermediate 47"):
        moeflow.load(src, expert_budget="50%", expert_dtype="int4", group_size=32)  # quantized as read: the same


def test_quantized_folder_is_small_and_each_expert_is_one_read(tiny_checkpoints, tmp_path):
    """The stored experts take the format's bytes, and an expert's weights and scales lie together on disk."""
    src = tiny_checkpoints["qwen2_moe"]
    path = _write(src, tmp_path / "q", FORMATS["int4-g32"])
    full, quant = open_checkpoint(src), open_checkpoint(path)
    with moeflow.load(path) as engine:
        scales = engine.cache.store._scales
    for key, loc in quant.experts.items():
        spans = [*loc.spans, *(p.span for p in scales[key])]
        lo, hi = min(s.offset for s in spans), max(s.offset + s.nbytes for s in spans)
        assert hi - lo == sum(s.nbytes for s in spans)  # contiguous
        fp = full.experts[key]
        assert sum(s.nbytes for s in loc.spans) * 8 == sum(s.nbytes for s in fp.spans)


def test_quantize_cli(tiny_checkpoints, tmp_path, capsys):
    from moeflow.cli import main

    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_checkpoints["mixtral"]), "--out", str(out), "--expert-dtype", "int4",
                 "--group-size", "64"]) == 0  # fmt: skip
    assert json.loads((out / "config.json").read_text())[CONFIG_KEY]["group_size"] == 64
    again = ["quantize", "--model", str(tiny_checkpoints["mixtral"]), "--out", str(out), "--expert-dtype", "int4"]
    assert main(again) == 2
    assert "never overwrites" in capsys.readouterr().err


def test_round_trip_through_a_written_folder_is_the_kernel_round_trip(tiny_checkpoints, tmp_path):
    """What the folder stores is exactly `quantize` of the full-precision weight."""
    src = tiny_checkpoints["mixtral"]
    path = _write(src, tmp_path / "q", FORMATS["int8"])
    with safe_open(next(src.glob("*.safetensors")), framework="pt") as f:
        name = next(n for n in f.keys() if n.endswith("experts.0.w2.weight"))  # noqa: SIM118
        w = f.get_tensor(name)
    with safe_open(next(path.glob("*.safetensors")), framework="pt") as f:
        q, s = f.get_tensor(name), f.get_tensor(name + "_scale")
    want_q, want_s = quantize(w, FORMATS["int8"])
    assert torch.equal(q, want_q) and torch.equal(s, want_s)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize("fmt_name", ["int8", "int4-g128"])
def test_quantized_folder_on_gpu_uses_triton_and_matches_cpu(quantized_folders, fmt_name):
    path = quantized_folders[("mixtral", fmt_name)]
    with moeflow.load(path, expert_budget="all", exact_quantized=True) as engine:
        want = _engine_logits(engine, PROMPT)
    with moeflow.load(path, expert_budget="25%", device="cuda") as engine:
        got = _engine_logits(engine, PROMPT).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
