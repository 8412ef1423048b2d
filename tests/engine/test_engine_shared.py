"""Threads sharing one engine (the Python API) take turns forward by forward: no deadlock, exact tokens."""

import threading
import time

import pytest

import moeflow

PROMPTS = ["Once upon a time", "The quick brown fox", "Hello, world!", "abc def"]


@pytest.mark.parametrize("budget", ["25%", "50%"])
def test_four_threads_sharing_an_engine_each_get_their_solo_tokens(tiny_checkpoints, budget):
    """Each generate pins its layer's experts while it computes; four at once used to deadlock in
    ExpertCache._take_slot_locked, every thread holding slots another waited for."""
    engine = moeflow.load(tiny_checkpoints["mixtral"], expert_budget=budget)
    solo = [engine.generate(p, max_new_tokens=30).token_ids for p in PROMPTS]
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            results[i] = [engine.generate(PROMPTS[i], max_new_tokens=30).token_ids for _ in range(2)]
        except Exception as e:  # reported below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    for t in threads:
        t.join(timeout=max(deadline - time.monotonic(), 0.01))
    stuck = sum(t.is_alive() for t in threads)
    assert not stuck, f"{stuck} of {len(threads)} threads sharing the engine never finished (deadlock)"
    engine.close()  # only when nobody is stuck in it
    assert [results[i] for i in range(len(PROMPTS))] == [[s, s] for s in solo]
