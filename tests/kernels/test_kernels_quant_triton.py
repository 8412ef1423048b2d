"""The Triton quantized MoE (kernels/quant_moe.py) against the torch reference: under the interpreter here
(TRITON_INTERPRET=1, tests/conftest.py), on a GPU when one is present."""

import pytest
import torch
import triton
import triton.language as tl
from moeflow.kernels.quant import (
    _FP4_VALUES,
    GATE_UP_PIECES,
    ExpertFormat,
    QuantizedPool,
    quantize,
    quantized_experts_forward,
)
from moeflow.kernels.quant_moe import _e2m1_times_e8m0, _e4m3fn_to_f32, quant_fused_moe

FORMATS = [ExpertFormat(kind="int8"), ExpertFormat(kind="int4", group_size=32)]


def _pool(fmt: ExpertFormat, S: int, inter: int, hidden: int, device: str = "cpu") -> QuantizedPool:
    g = torch.Generator().manual_seed(S * 100 + inter)
    gu = [quantize(torch.randn(2 * inter, hidden, generator=g) / 4, fmt, pieces=GATE_UP_PIECES) for _ in range(S)]
    dn = [quantize(torch.randn(hidden, inter, generator=g) / 4, fmt) for _ in range(S)]

    def stack(xs: list) -> torch.Tensor:
        return torch.stack(xs).to(device)

    return QuantizedPool(fmt=fmt, gate_up_q=stack([q for q, _ in gu]), down_q=stack([q for q, _ in dn]),
                         gate_up_scale=stack([s for _, s in gu]), down_scale=stack([s for _, s in dn]),
                         inter=inter, hidden=hidden)  # fmt: skip


def _cpu(pool: QuantizedPool) -> QuantizedPool:
    return QuantizedPool(fmt=pool.fmt, gate_up_q=pool.gate_up_q.cpu(), down_q=pool.down_q.cpu(),
                         gate_up_scale=pool.gate_up_scale.cpu(), down_scale=pool.down_scale.cpu(),
                         inter=pool.inter, hidden=pool.hidden)  # fmt: skip


# (S, I, D, ids): why each row exists
CASES = [
    (3, 48, 64, [[2, 0]]),  # T = 1: one block per used slot
    (3, 48, 64, [[0, 1], [1, 2], [2, -1], [0, 2], [1, 0]]),  # a sentinel pair (another wave's)
    (4, 32, 64, [[1, 1]] * 6),  # every pair on one slot; slots 0, 2, 3 get nothing
    (2, 32, 64, [[0, 1], [1, 0], [0, 1]]),  # K == S
    # prime S; I, D not multiples of the blocks; int4: an 8-column group, gate_up halves of 24 rows (all in the
    # pair-packed tail), down's 40 rows (a 32-row block and an 8-row tail)
    (5, 24, 40, [[4, 3], [0, 2], [1, 4], [3, 0]]),
]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize(("S", "I", "D", "ids"), CASES)
def test_triton_quantized_moe_matches_torch_fp32(fmt, S, I, D, ids):
    pool = _pool(fmt, S, I, D)
    T = len(ids)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(T))
    ids_TK, w_TK = torch.tensor(ids), torch.rand(T, 2, generator=torch.Generator().manual_seed(1))
    want = quantized_experts_forward(x, pool, w_TK, ids_TK, packed=False)  # the exact formulation
    got = quant_fused_moe(x, pool, w_TK, ids_TK)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_triton_quantized_moe_fp16_activations(fmt):
    """fp16 activations in, fp16 out, fp32 accumulation: within fp16 rounding of the fp32 reference."""
    pool = _pool(fmt, 3, 48, 64)
    x = torch.randn(5, 64)
    ids_TK, w_TK = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0]]), torch.rand(5, 2)
    want = quantized_experts_forward(x.half().float(), pool, w_TK, ids_TK, packed=False)
    got = quant_fused_moe(x.half(), pool, w_TK.half(), ids_TK)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


# Checkpoint formats read, never chosen (DeepSeek-V3's block-wise fp8, gpt-oss's MXFP4): sizes their blocks divide
READ_FORMATS = [ExpertFormat(kind="fp8", block=(16, 16)), ExpertFormat(kind="fp8", block=(32, 64)),
                ExpertFormat(kind="mxfp4")]  # fmt: skip
READ_CASES = [
    (3, 64, 64, [[2, 0]]),  # T = 1
    (3, 64, 128, [[0, 1], [1, 2], [2, -1], [0, 2], [1, 0]]),  # a sentinel pair; D != I
    (5, 32, 64, [[4, 3], [0, 2], [1, 4], [3, 0]]),  # prime S, I of one fp8 block of 32 rows
]


def _tiles(fmt: ExpertFormat, I: int, D: int) -> bool:
    """Whether fmt's fp8 scale blocks tile gate_up [2I, D] and down [D, I] (mxfp4's 32 columns divide every case)."""
    bm, bn = fmt.block
    return fmt.kind != "fp8" or not ((2 * I) % bm or D % bn or D % bm or I % bn)


@pytest.mark.parametrize(
    ("fmt", "S", "I", "D", "ids"),
    [pytest.param(fmt, *case, id=f"{fmt.name}-{case[0]}x{case[1]}x{case[2]}")
     for fmt in READ_FORMATS for case in READ_CASES if _tiles(fmt, case[1], case[2])],
)  # fmt: skip
@pytest.mark.parametrize("with_biases", [False, True], ids=["", "biases"])
def test_triton_fp8_and_mxfp4_moe_match_torch_fp32(fmt, S, I, D, ids, with_biases):
    """fp8 / mxfp4 decoded in registers from the stored bytes; expert biases (gpt-oss) added after each projection."""
    pool = _pool(fmt, S, I, D)
    T = len(ids)
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, D, generator=g)
    ids_TK, w_TK = torch.tensor(ids), torch.rand(T, 2, generator=g)
    biases = (torch.randn(S, 2 * I, generator=g), torch.randn(S, D, generator=g)) if with_biases else None
    want = quantized_experts_forward(x, pool, w_TK, ids_TK, biases=biases)
    got = quant_fused_moe(x, pool, w_TK, ids_TK, biases=biases)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@triton.jit
def _decode_kernel(b_ptr, e8_ptr, out_ptr, N: tl.constexpr, FP8: tl.constexpr):
    i = tl.arange(0, N)
    b = tl.load(b_ptr + i).to(tl.int32)
    if FP8:
        v = _e4m3fn_to_f32(b)
    else:
        v = _e2m1_times_e8m0(b, tl.load(e8_ptr + i).to(tl.int32))
    tl.store(out_ptr + i, v)


def test_every_fp8_byte_decodes_as_torch_casts_it():
    b = torch.arange(256, dtype=torch.uint8)
    got = torch.empty(256)
    _decode_kernel[(1,)](b, b, got, N=256, FP8=True)
    torch.testing.assert_close(got, b.view(torch.float8_e4m3fn).float(), rtol=0, atol=0, equal_nan=True)


def test_every_mxfp4_code_and_scale_decodes_as_transformers():
    """All 16 e2m1 codes times E8M0 exponents across the range (2^-127, a subnormal fp32, included): exact."""
    e8 = torch.tensor([0, 1, 100, 126, 127, 128, 200, 250], dtype=torch.uint8)
    codes = torch.arange(16, dtype=torch.uint8).repeat(len(e8))
    e8 = e8.repeat_interleave(16)
    got = torch.empty(codes.numel())
    _decode_kernel[(1,)](codes, e8, got, N=codes.numel(), FP8=False)
    want = torch.ldexp(torch.tensor(_FP4_VALUES)[codes.long()], e8.int() - 127)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_triton_quantized_moe_refuses_other_formats():
    pool = _pool(ExpertFormat(kind="int8"), 2, 32, 32)
    bf16 = QuantizedPool(fmt=ExpertFormat(kind="bf16"), gate_up_q=pool.gate_up_q, down_q=pool.down_q,
                         gate_up_scale=None, down_scale=None, inter=32, hidden=32)  # fmt: skip
    with pytest.raises(ValueError, match="take int8, int4, fp8, mxfp4 pools, not bf16"):
        quant_fused_moe(torch.randn(1, 32), bf16, torch.rand(1, 2), torch.tensor([[0, 1]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize("fmt", FORMATS + READ_FORMATS, ids=lambda f: f.name)
def test_triton_quantized_moe_on_gpu(fmt):
    pool = _pool(fmt, 8, 256, 512, device="cuda")
    x = torch.randn(33, 512, device="cuda")
    ids_TK = torch.randint(0, 8, (33, 2), device="cuda")
    w_TK = torch.rand(33, 2, device="cuda")
    want = quantized_experts_forward(x.cpu(), _cpu(pool), w_TK.cpu(), ids_TK.cpu(), packed=False)
    torch.testing.assert_close(quant_fused_moe(x, pool, w_TK, ids_TK).cpu(), want, rtol=1e-4, atol=1e-4)
