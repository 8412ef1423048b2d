"""`kernels="triton"` (`--kernels triton`): every slot through the fused Triton kernels, run here by Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1). Their contract is fp32 rounding, not transformers' bits:
logits close to the torch path's, the same greedy tokens; and the kernels really ran. Without a GPU or the
interpreter the option is refused with what to do. `kernels="fast"` on the CPU: the same contract for
`kernels.cpu`'s plan (numpy's BLAS on one thread for one-row GEMMs), every family's gate and expert biases included."""

import moeflow.kernels.cpu
import moeflow.kernels.experts
import pytest
import torch
from moeflow.kernels import backend
from threadpoolctl import threadpool_info, threadpool_limits

import moeflow
import moeflow.offload.layer
from moeflow.errors import MoeflowError
from moeflow.tools.quantize import quantize_checkpoint

PROMPT = [3, 17, 29, 44, 5, 61, 90, 12]


def _counting(monkeypatch, where, name: str) -> list[int]:
    """Count the calls of `where`'s `name` (a module's attribute, or a dict's entry)."""
    calls = [0]
    real = where[name] if isinstance(where, dict) else getattr(where, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    if isinstance(where, dict):
        monkeypatch.setitem(where, name, counted)
    else:
        monkeypatch.setattr(where, name, counted)
    return calls


def _logits_and_tokens(path, **options) -> tuple[torch.Tensor, list[int]]:
    with moeflow.load(path, expert_budget="25%", **options) as engine, torch.no_grad():
        logits = engine.model(torch.tensor([PROMPT])).logits
        return logits, engine.generate(PROMPT, max_new_tokens=4).token_ids


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_triton_kernels_match_the_torch_path(tiny_checkpoints, monkeypatch, family):
    want_logits, want_tokens = _logits_and_tokens(tiny_checkpoints[family])
    fused = _counting(monkeypatch, moeflow.kernels.experts, "fused_moe")
    got_logits, got_tokens = _logits_and_tokens(tiny_checkpoints[family], kernels="triton")
    assert fused[0] > 0
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    assert got_tokens == want_tokens


@pytest.mark.slow
def test_triton_kernels_take_quantized_slots(tiny_checkpoints, tmp_path, monkeypatch):
    path = quantize_checkpoint(tiny_checkpoints["mixtral"], tmp_path / "int8", "int8", progress=False)
    want_logits, want_tokens = _logits_and_tokens(path, exact_quantized=True)
    fused = _counting(monkeypatch, moeflow.offload.layer, "quant_fused_moe")
    got_logits, got_tokens = _logits_and_tokens(path, kernels="triton")
    assert fused[0] > 0
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    assert got_tokens == want_tokens


def test_triton_kernels_need_a_gpu(tiny_checkpoints, monkeypatch):
    monkeypatch.setattr(backend, "INTERPRETING", False)
    with pytest.raises(MoeflowError, match="need a CUDA device.*--device cuda, or --kernels torch"):
        moeflow.load(tiny_checkpoints["mixtral"], kernels="triton")


def test_unknown_kernels_name_the_choices(tiny_checkpoints):
    with pytest.raises(MoeflowError, match="unknown kernels 'cuda'; choose one of: torch, triton"):
        moeflow.load(tiny_checkpoints["mixtral"], kernels="cuda")


@pytest.fixture
def blas_threads_restored(monkeypatch):
    """`--kernels fast` sets numpy's BLAS threads process-wide: put them (and the plan's view of them) back after."""
    before = max((lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"), default=None)
    monkeypatch.setattr(moeflow.kernels.cpu, "_blas_threads", moeflow.kernels.cpu._blas_threads)
    yield
    if before is not None:
        threadpool_limits(limits=before, user_api="blas")


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "qwen2_moe"])  # SiLU; gpt-oss' own gate and biases; shared
def test_fast_kernels_match_the_torch_path(family_checkpoints, monkeypatch, blas_threads_restored, family):
    path = family_checkpoints[family]
    want_logits, want_tokens = _logits_and_tokens(path)
    monkeypatch.setattr(moeflow.kernels.cpu, "BLAS_MIN_DI", 0)  # the tiny experts take the BLAS GEMM too
    blas = _counting(monkeypatch, moeflow.kernels.cpu.GEMMS, "blas")
    planned = _counting(monkeypatch, moeflow.kernels.experts, "planned_moe")
    got_logits, got_tokens = _logits_and_tokens(path, kernels="fast", threads=1)
    assert planned[0] > 0 and blas[0] > 0
    assert [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"] in ([], [1], [1, 1])
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    assert got_tokens == want_tokens
