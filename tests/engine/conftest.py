import pytest
import torch

import moeflow
import moeflow.offload.layer


@pytest.fixture
def check_triton_kernels(monkeypatch: pytest.MonkeyPatch):
    """`check(path, (logits, tokens), prompt, new_tokens)`: `path` loaded with --kernels triton (Triton's interpreter
    here, tests/conftest.py) computes its quantized experts inside the fused kernels (they are called), with logits
    within fp32 rounding of the reference's and the same greedy tokens."""
    calls: list[int] = []
    real = moeflow.offload.layer.quant_fused_moe
    monkeypatch.setattr(moeflow.offload.layer, "quant_fused_moe", lambda *a, **k: calls.append(1) or real(*a, **k))

    def check(path, reference: tuple[torch.Tensor, list[int]], prompt: list[int], new_tokens: int) -> None:
        want_logits, want_tokens = reference
        calls.clear()
        with moeflow.load(path, dtype="float32", expert_budget="25%", kernels="triton") as engine:
            with torch.no_grad():
                logits = engine.model(torch.tensor([prompt])).logits
            torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
            assert engine.generate(prompt, max_new_tokens=new_tokens).token_ids == want_tokens
        assert calls

    return check
