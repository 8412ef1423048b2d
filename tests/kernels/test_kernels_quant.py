"""Quantized experts: round trips with stated error bounds, the stored layout, and the expert MLP over a
quantized pool against the exact path on the dequantized weights: bit for bit with ``packed=False``, within
PACKED_ATOL through torch's packed matmuls."""

import dataclasses

import pytest
import torch
from moeflow.kernels import experts_forward, experts_rows, weighted_sum
from moeflow.kernels.quant import (
    GATE_UP_PIECES,
    PACKED_ATOL,
    ExpertFormat,
    QuantizedPool,
    _int4pack_layout_matches,
    dequantize,
    fill_int4pack_scales,
    int4pack_scales_shapes,
    quantize,
    quantized_experts_forward,
    slot_halves,
)

INT8 = ExpertFormat(kind="int8")
INT4 = {g: ExpertFormat(kind="int4", group_size=g) for g in (32, 64, 128)}
ALL = [INT8, *INT4.values(), ExpertFormat(kind="bf16"), ExpertFormat(kind="fp16")]


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 1, rows)[:, None]  # rows of very different scale
    w[3] = 0  # an all-zero row: scale 1, q 0, exact
    return w


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.name)
@pytest.mark.parametrize("cols", [192, 256, 40])  # 192: group 128 leaves a 64-column group; 40: below every group
def test_round_trip_within_half_a_step(fmt, cols):
    """|dequantize(quantize(w)) - w| <= scale / 2 per element (round to nearest; no clamping at max|w| / qmax),
    bf16 / fp16 within half an ulp of their own rounding (of the smallest normal's, below it)."""
    w = _weight(24, cols)
    q, scale = quantize(w, fmt)
    assert q.dtype == fmt.weight_dtype and tuple(q.shape) == fmt.weight_shape(24, cols)
    nbytes = q.nbytes + (0 if scale is None else scale.nbytes)
    assert nbytes == fmt.nbytes(24, cols)
    d = dequantize(q, scale, fmt)
    assert d.dtype == torch.float32 and d.shape == w.shape
    err = (d - w).abs()
    if fmt.kind == "int8":
        bound = scale.expand_as(w) / 2
    elif fmt.kind == "int4":
        bound = scale.float().repeat_interleave(fmt.group_size, dim=1)[:, :cols] / 2
    else:
        info = torch.finfo(fmt.weight_dtype)  # relative half ulp; fp16 subnormals: half their absolute spacing
        bound = torch.maximum(w.abs(), torch.tensor(info.smallest_normal)) * info.eps / 2
    assert (err <= bound * (1 + 1e-6) + 1e-30).all(), (err - bound).max()
    assert torch.equal(d[3], torch.zeros(cols))


@pytest.mark.parametrize("g", [32, 128])
def test_int4_representable_weights_are_exact_and_packed_low_nibble_first(g):
    """Weights already on the int4 grid survive exactly: every code -8..7 in every nibble position."""
    codes = torch.arange(-8, 8, dtype=torch.float32).repeat(2, g // 8)  # [2, 2g]: each group sees -8..7
    scale = torch.tensor([[0.5, 0.25], [2.0, 1.0]])  # powers of two: exact in fp16 and in the products
    w = codes * scale.repeat_interleave(g, dim=1)
    w[:, ::g] = -8 * scale  # the group's max |w| is 8 * scale: max / 7 rounds to a different fp16 scale,
    w[:, 1::g] = 7 * scale  # so quantize the grid as the format defines: max / 7
    q, s = quantize(w, INT4[g])
    d = dequantize(q, s, INT4[g])
    assert (d - w).abs().max() <= s.float().max() / 2


def test_int4_layout_is_torchs_cpu_int4pack():
    """Codes q + 8; in each 32-row block byte (k, d) holds rows d (low nibble) and d + 16 (high) of column k, a last
    block of R < 32 rows pairs rows 2j (low) and 2j + 1 (high) as [C, R/2]: what torch's CPU int4 matmul takes
    (its own converter on AVX2), so a miss needs no repacking. Each piece (a gate_up half) is packed on its own."""
    w = torch.zeros(48, 64)  # a 32-row block and a 16-row tail
    w[0, 5], w[16, 5], w[32, 2], w[33, 2] = 7, -7, -1, 3  # block pair (0, 16); tail pair (32, 33)
    w[32, 3] = w[33, 3] = 7  # max|w| 7 in every row: scale 1
    q, s = quantize(w, INT4[32])
    assert torch.equal(s, torch.ones_like(s))
    flat = q.reshape(-1)
    assert flat[5 * 16 + 0].item() == (7 + 8) | ((-7 + 8) << 4)
    tail = flat[32 * 64 // 2 :].view(64, 16 // 2)  # [C, R/2]
    assert tail[2, 0].item() == (-1 + 8) | ((3 + 8) << 4) and tail[3, 0].item() == 0xFF
    assert torch.equal(dequantize(q, s, INT4[32]), w)
    q2, s2 = quantize(torch.cat([w, w]), INT4[32], pieces=2)
    assert torch.equal(q2, torch.cat([q, q])) and torch.equal(dequantize(q2, s2, INT4[32], pieces=2), torch.cat([w, w]))
    if hasattr(torch, "_convert_weight_to_int4pack_for_cpu") and torch.backends.cpu.get_cpu_capability() == "AVX2":
        g = torch.Generator().manual_seed(0)
        grid = torch.randint(-7, 8, (80, 64), generator=g).float()
        grid[:, ::32] = 7  # scale 1 in every group: the stored codes are grid + 8
        q, _ = quantize(grid, INT4[32])
        assert torch.equal(q, torch._convert_weight_to_int4pack_for_cpu(grid.int() + 8, 1))


@pytest.mark.parametrize("block", [(16, 16), (128, 128), (8, 32)])
def test_fp8_block_round_trip(block):
    """fp8 e4m3 keeps 3 mantissa bits: |error| <= |w| / 16 (normal range), or half the smallest subnormal step
    (2^-10) of the block's scale below it; dequantize is transformers' float(q) * scale_inv of the block."""
    fmt = ExpertFormat(kind="fp8", block=block)
    w = _weight(256, 256)
    q, scale_inv = quantize(w, fmt)
    assert q.dtype == torch.float8_e4m3fn and tuple(scale_inv.shape) == (256 // block[0], 256 // block[1])
    assert q.nbytes + scale_inv.nbytes == fmt.nbytes(256, 256)
    d = dequantize(q, scale_inv, fmt)
    per_elem = scale_inv.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    assert torch.equal(d, q.float() * per_elem)
    assert ((d - w).abs() <= torch.maximum(w.abs() / 16, per_elem * 2**-10)).all()
    with pytest.raises(ValueError, match="not a whole number of"):
        fmt.scale_shape(100, 256)


def test_mxfp4_round_trip_and_layout():
    """FP4 e2m1 keeps 1 mantissa bit: |error| <= a quarter of the block's scale 2^(e-127) times the code's step;
    bounded here by |w| / 4 + 2^(e-127) / 4. Codes: column 2j in the low nibble, 2j+1 in the high one."""
    fmt = ExpertFormat(kind="mxfp4")
    w = _weight(8, 64)
    q, e = quantize(w, fmt)
    assert q.shape == (8, 32) and e.shape == (8, 2) and q.nbytes + e.nbytes == fmt.nbytes(8, 64)
    d = dequantize(q, e, fmt)
    unit = torch.ldexp(torch.ones(8, 2), e.int() - 127).repeat_interleave(32, dim=1)
    assert ((d - w).abs() <= w.abs() / 4 + unit / 4).all()
    exact = torch.zeros(1, 32)
    exact[0, 0], exact[0, 1] = 6.0, -0.5  # codes 7 and 8 | 1 at scale 2^0
    q1, e1 = quantize(exact, fmt)
    assert e1.tolist() == [[127]] and q1[0, 0].item() == 7 | (9 << 4)
    assert torch.equal(dequantize(q1, e1, fmt), exact)


def test_unsupported_layouts_name_the_supported_ones():
    with pytest.raises(ValueError, match=r"int4 group size 100 is not supported; use one of \(32, 64, 128\)"):
        ExpertFormat(kind="int4", group_size=100)
    with pytest.raises(ValueError, match="unknown expert format 'int3'; supported: int8, int4, bf16, fp16, fp8, mxfp4"):
        ExpertFormat(kind="int3")
    with pytest.raises(ValueError, match="both sizes must be even"):
        quantize(torch.randn(4, 33), INT4[32])
    with pytest.raises(ValueError, match="both sizes must be even"):
        quantize(torch.randn(5, 32), INT4[32])
    with pytest.raises(ValueError, match="cannot be packed as 2 pieces of even rows"):
        quantize(torch.randn(6, 32), INT4[32], pieces=2)


def _pool(fmt: ExpertFormat, S: int, inter: int, hidden: int, seed: int = 0):
    """A quantized pool of S random experts and the same experts dequantized (fp32 [S, 2I, D], [S, D, I])."""
    gu_q, gu_s, d_q, d_s = [], [], [], []
    for s in range(S):
        q, sc = quantize(_weight(2 * inter, hidden, seed + s) / 4, fmt, pieces=GATE_UP_PIECES)
        gu_q.append(q), gu_s.append(sc)
        q, sc = quantize(_weight(hidden, inter, seed + 100 + s) / 4, fmt)
        d_q.append(q), d_s.append(sc)
    stack = lambda xs: None if xs[0] is None else torch.stack(xs)  # noqa: E731
    pool = QuantizedPool(fmt=fmt, gate_up_q=torch.stack(gu_q), down_q=torch.stack(d_q), gate_up_scale=stack(gu_s),
                         down_scale=stack(d_s), inter=inter, hidden=hidden)  # fmt: skip
    gate_up = torch.stack([dequantize(q, s, fmt, pieces=GATE_UP_PIECES) for q, s in zip(gu_q, gu_s)])
    down = torch.stack([dequantize(q, s, fmt) for q, s in zip(d_q, d_s)])
    return pool, gate_up, down


# (T, ids): why each row exists
CASES = [
    (1, [[2, 0]]),  # decode: one token, the pair loop
    (1, [[-1, 1]]),  # decode with a pair served by another wave
    (6, [[0, 1], [1, 2], [2, 0], [0, 1], [3, -1], [1, 0]]),  # prefill: sorted by slot, a sentinel
    (4, [[1, 1], [1, 1], [1, 1], [1, 1]]),  # every pair on one slot (K == 2 to the same slot)
    (3, [[-1, -1], [-1, -1], [-1, -1]]),  # nothing here: zeros
]


@pytest.mark.parametrize("fmt", [INT8, INT4[32], INT4[128], ExpertFormat(kind="bf16")], ids=lambda f: f.name)
@pytest.mark.parametrize(("T", "ids"), CASES)
def test_quantized_forward_equals_exact_path_on_dequantized_weights(fmt, T, ids):
    """Bit for bit with ``packed=False`` (and for bf16, never packed): the exact path is transformers' grouped_mm
    experts (tests/kernels/test_kernels_experts.py)."""
    pool, gate_up, down = _pool(fmt, S=4, inter=48, hidden=64)
    x = torch.randn(T, 64, generator=torch.Generator().manual_seed(1))
    ids_TK = torch.tensor(ids)
    w_TK = torch.rand(T, 2, generator=torch.Generator().manual_seed(2))
    got = quantized_experts_forward(x, pool, w_TK, ids_TK, packed=fmt.kind == "bf16")
    want = experts_forward(x, gate_up, down, w_TK, ids_TK)
    assert torch.equal(got, want)


# (I, D, int4 packed, int8 packed): why each geometry exists
GEOMETRIES = [
    (64, 64, True, True),  # whole 32-row blocks, groups that divide C: both projections through torch's int4 matmul
    (48, 192, True, True),  # gate_up halves of 48 rows (a block and a 16-row tail); C = 192 with group 128: torch
    #                         groups of 64 (repeated scales); int4 down (C = 48, no 32-column group) is dequantized
    (24, 64, False, True),  # int4 gate_up halves of 24 rows (an 8-row tail) and down C = 24: both dequantized, exact
    (20, 36, False, False),  # C = 36 and 20: not whole 8-column vectors of torch's int8 matmul (INT8PACK_COLS; it
    #                          crashed on 2 rows), nor int4 groups: dequantized, exact (granitemoe's test widths)
]


@pytest.mark.parametrize("fmt", [INT8, INT4[32], INT4[128]], ids=lambda f: f.name)
@pytest.mark.parametrize(("I", "D", "int4_packed", "int8_packed"), GEOMETRIES)
@pytest.mark.parametrize(("T", "ids"), [*CASES, (20, [[1, 1]] * 20)])  # 40 rows on one slot: past PACKED_MAX_ROWS
def test_packed_forward_within_its_tolerance(fmt, I, D, int4_packed, int8_packed, T, ids):
    """torch's packed matmuls with bf16 activations: within PACKED_ATOL x max|exact| (a wrong byte or scale is off
    by the weights' own size), and not the exact result where they ran (so they did run)."""
    pool, gate_up, down = _pool(fmt, S=4, inter=I, hidden=D)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    ids_TK = torch.tensor(ids)
    w_TK = torch.rand(T, 2, generator=torch.Generator().manual_seed(2))
    got = quantized_experts_forward(x, pool, w_TK, ids_TK)
    want = experts_forward(x, gate_up, down, w_TK, ids_TK)
    torch.testing.assert_close(got, want, rtol=0, atol=PACKED_ATOL * want.abs().max().item())
    # int4 only where torch's int4pack layout is the stored one (AVX2; on AVX-512 both projections are dequantized)
    packed = int8_packed if fmt.kind == "int8" else int4_packed and _int4pack_layout_matches()
    ran = packed and T * 2 <= 16 and (torch.tensor(ids) >= 0).any()
    assert torch.equal(got, want) != ran


@pytest.mark.parametrize("fmt", [INT4[32], INT4[128]], ids=lambda f: f.name)
@pytest.mark.parametrize(("I", "D"), [(64, 64), (48, 192), (64, 320)])  # 320 with group 128: a partial group
def test_pool_kept_int4_scales_equal_the_ones_built_per_call(fmt, I, D):
    """A slot pool keeps its int4 scales in torch's matmul layout (filled once per read): the same result, bit for
    bit, as building them at every call, on both projections; the buffer's zero points stay zero."""
    if not _int4pack_layout_matches():
        pytest.skip("torch's int4 matmul takes another layout on this CPU (AVX-512): int4 slots are dequantized")
    pool, _, _ = _pool(fmt, S=3, inter=I, hidden=D)
    shapes = int4pack_scales_shapes(fmt, I, D)
    assert shapes[0] is not None
    kept = [None if sh is None else torch.zeros(3, *sh, 2, dtype=torch.bfloat16) for sh in shapes]
    for s in range(3):
        for buf, scale, cols in zip(kept, (pool.gate_up_scale, pool.down_scale), (D, I)):
            if buf is not None:
                fill_int4pack_scales(scale[s], fmt, cols, buf[s])
                assert not buf[s][..., 1].any() and buf[s][..., 0].ne(0).any()
    prepared = dataclasses.replace(pool, gate_up_scale_zeros=kept[0], down_scale_zeros=kept[1])
    x = torch.randn(2, D, generator=torch.Generator().manual_seed(1))
    ids_TK, w_TK = torch.tensor([[2, 0], [1, 2]]), torch.rand(2, 2, generator=torch.Generator().manual_seed(2))
    got = quantized_experts_forward(x, prepared, w_TK, ids_TK)
    assert torch.equal(got, quantized_experts_forward(x, pool, w_TK, ids_TK))


@pytest.mark.parametrize("fmt", [None, INT8, INT4[128]], ids=lambda f: "fp32" if f is None else f.name)
@pytest.mark.parametrize(("T", "ids"), CASES[:3])
def test_rows_computed_batch_by_batch_sum_to_the_whole(fmt, T, ids):
    """A layer computes its experts as they arrive (the resident ones first): each batch's pairs' rows, kept
    where the batch has the pair's slot, then one weighted sum. Bit for bit the all-at-once output."""
    pool, gate_up, down = _pool(fmt or INT8, S=4, inter=48, hidden=64)
    x = torch.randn(T, 64, generator=torch.Generator().manual_seed(1))
    ids_TK = torch.tensor(ids)
    w_TK = torch.rand(T, 2, generator=torch.Generator().manual_seed(2))

    def rows(batch_ids: torch.Tensor) -> torch.Tensor:
        if fmt is None:
            return experts_rows(x, gate_up, down, batch_ids)
        return quantized_experts_forward(x, pool, None, batch_ids)

    whole = experts_forward(x, gate_up, down, w_TK, ids_TK) if fmt is None else quantized_experts_forward(
        x, pool, w_TK, ids_TK)  # fmt: skip
    for first_batch in ({0}, {1, 2}, {0, 1, 2, 3}):
        in_first = torch.isin(ids_TK, torch.tensor(sorted(first_batch)))
        batches = [torch.where(in_first, ids_TK, -1), torch.where(in_first | (ids_TK < 0), -1, ids_TK)]
        rows_PD = rows(batches[0])
        rows_PD = torch.where(batches[1].reshape(-1, 1) >= 0, rows(batches[1]), rows_PD)
        assert torch.equal(weighted_sum(rows_PD, w_TK, x.dtype), whole)


def test_quantized_forward_with_biases_equals_exact_path():
    """Expert biases (gpt-oss) are added after each GEMM as the exact path adds them."""
    pool, gate_up, down = _pool(INT4[32], S=3, inter=32, hidden=64)
    g = torch.Generator().manual_seed(4)
    biases = (torch.randn(3, 64, generator=g), torch.randn(3, 64, generator=g))
    for T, ids in ((1, [[2, 0]]), (4, [[0, 1], [1, 2], [2, -1], [0, 2]])):
        x, ids_TK, w_TK = torch.randn(T, 64, generator=g), torch.tensor(ids), torch.rand(T, 2, generator=g)
        want = experts_forward(x, gate_up, down, w_TK, ids_TK, biases=biases)
        assert torch.equal(quantized_experts_forward(x, pool, w_TK, ids_TK, biases=biases, packed=False), want)
        got = quantized_experts_forward(x, pool, w_TK, ids_TK, biases=biases)
        torch.testing.assert_close(got, want, rtol=0, atol=PACKED_ATOL * want.abs().max().item())
        assert not torch.equal(got, quantized_experts_forward(x, pool, w_TK, ids_TK))


def test_quantized_forward_with_a_family_gate_and_given_scratch():
    pool, gate_up, down = _pool(INT8, S=3, inter=32, hidden=32)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 32, generator=g)
    ids_TK = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0]])
    w_TK = torch.rand(5, 2, generator=g)

    def gelu_gate(h):
        return torch.nn.functional.gelu(h[:, :32]) * h[:, 32:]

    scratch = (torch.empty(64, 32), torch.empty(32, 32))
    want = experts_forward(x, gate_up, down, w_TK, ids_TK, gate=gelu_gate)
    got = quantized_experts_forward(x, pool, w_TK, ids_TK, gate=gelu_gate, scratch=scratch, packed=False)
    assert torch.equal(got, want)
    got = quantized_experts_forward(x, pool, w_TK, ids_TK, gate=gelu_gate, scratch=scratch)
    torch.testing.assert_close(got, want, rtol=0, atol=PACKED_ATOL * want.abs().max().item())
    with pytest.raises(ValueError, match="activations have 16 features, the quantized experts expect 32"):
        quantized_experts_forward(torch.randn(1, 16), pool, w_TK[:1], ids_TK[:1])


@pytest.mark.parametrize("fmt", [INT8, INT4[32], INT4[128], ExpertFormat(kind="bf16")], ids=lambda f: f.name)
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize(("I", "D"), [(64, 64), (20, 36)])  # packed matmuls where they run; dequantized (GEOMETRIES)
def test_a_slot_s_mlp_in_two_halves_is_the_forward_s_row_bit_for_bit(fmt, packed, I, D):
    """`slot_halves`: one token's layer computes an expert's gate/up half once its gate/up bytes are in and its down
    half later (the engine's early replies); each pair's row is `quantized_experts_forward`'s to the last bit, the
    scratch's down buffer overwritten in between by another expert's half."""
    pool, _, _ = _pool(fmt, S=4, inter=I, hidden=D)
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(1))
    ids_TK = torch.tensor([[2, 0, 3]])
    want = quantized_experts_forward(x, pool, None, ids_TK, packed=packed)
    hidden, output = slot_halves(pool, x, packed=packed)
    firsts = {s: hidden(s, x) for s in (2, 0, 3)}  # every gate/up half first, then the down halves
    got = torch.cat([output(s, firsts[s]) for s in (2, 0, 3)])
    assert torch.equal(got, want)
