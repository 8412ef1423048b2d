"""The server over the token re-batcher: a prefilled pool larger than the batch, every reply still exact."""

from __future__ import annotations

import threading

import numpy as np
from moeflow.predictor.rebatch import RebatchAdmission
from moeflow.serve.client import MoeflowClient
from moeflow.serve.config import ServerConfig
from moeflow.serve.server import start

import moeflow
from moeflow.engine.batch import SequenceState

REQUESTS = [
    ("Once upon a time", 20),
    ("The quick brown fox jumps", 9),
    ("Hello, world!", 14),
    ("abc", 25),
    ("MoE layers route tokens", 3),
    ("1 2 3 4 5", 17),
    ("zzz", 11),
    ("a", 20),  # stops on EOS after 2 tokens
    ("Q", 6),
]


def _last_token_experts(seqs: list[SequenceState]) -> np.ndarray:
    """A stand-in routing prediction (bool [S, L, E]): two experts per layer chosen by the last token."""
    out = np.zeros((len(seqs), 2, 8), dtype=bool)
    for i, s in enumerate(seqs):
        last = (s.prompt_ids + s.generated)[-1]
        out[i, :, [last % 8, (3 * last + 1) % 8]] = True
    return out


def test_rebatched_server_replies_equal_solo(tiny_checkpoints):
    path = tiny_checkpoints["mixtral"]
    with moeflow.load(path) as engine:
        solo = [engine.generate(p, max_new_tokens=n) for p, n in REQUESTS]
    engine = moeflow.load(path, expert_budget="25%")
    admission = RebatchAdmission(_last_token_experts, pool_factor=3, max_skips=2)
    running = start(engine, ServerConfig(port=0, max_batch_size=2, max_queue=16), admission=admission)
    try:
        barrier = threading.Barrier(len(REQUESTS))
        replies: dict[int, tuple[str, list[int], str]] = {}

        def one(i: int, prompt: str, n: int) -> None:
            with MoeflowClient(running.address, timeout=120) as c:
                barrier.wait()
                chunks = list(c.stream(prompt, max_new_tokens=n))
                replies[i] = (
                    "".join(r.text for r in chunks),
                    [t for r in chunks for t in r.token_ids],
                    chunks[-1].finish_reason,
                )

        threads = [threading.Thread(target=one, args=(i, p, n)) for i, (p, n) in enumerate(REQUESTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        with MoeflowClient(running.address) as c:
            stats = c.stats()
    finally:
        running.shutdown(grace_s=5.0)
        engine.close()
    for i, want in enumerate(solo):
        assert replies[i] == (want.text, want.token_ids, want.finish_reason), f"request {i} differs from solo"
    assert stats["admission"] == "rebatch"
    assert set(stats["batch_size_steps"]) <= {1, 2} and stats["batch_size_steps"].get(2, 0) > 0
    assert stats["requests_completed"] == len(REQUESTS)
    assert 1 <= stats["mean_distinct_experts"] <= 4, "top-2 experts of at most 2 sequences per step"


def test_server_sizes_the_rebatch_pool_from_its_config():
    from moeflow.config import DEFAULT_MODEL  # ships trained context predictors

    with moeflow.load(DEFAULT_MODEL, expert_budget="50%") as engine:
        config = ServerConfig(port=0, max_batch_size=3, admission="rebatch", rebatch_pool=2)
        running = start(engine, config)
        try:
            admission = running.worker._admission
            assert isinstance(admission, RebatchAdmission) and admission.pool_size(3) == 6
            assert admission.max_skips == 6
        finally:
            running.shutdown(grace_s=1.0)
