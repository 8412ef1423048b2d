"""Continuous batching: every sequence's tokens equal its solo generation, whatever joins or leaves."""

import pytest
import torch

import moeflow
from moeflow.config import SamplingParams
from moeflow.engine.batch import SequenceState
from moeflow.scheduler import FifoAdmission, Scheduler, run_batch


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 11, 7, 19, 2, 14, 5, 9, 16][:n]
    return [torch.randint(1, 120, (k,), generator=g).tolist() for k in lengths]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_batched_greedy_equals_solo(tiny_checkpoints, family):
    prompts = _prompts(7)
    with moeflow.load(tiny_checkpoints[family], expert_budget="25%") as engine:
        solo = [engine.generate(p, max_new_tokens=10).token_ids for p in prompts]
        batched = run_batch(engine, prompts, batch_size=3, max_new_tokens=10).results
    assert [r.token_ids for r in batched] == solo
    assert [r.prompt_token_ids for r in batched] == prompts


def test_varied_lengths_join_and_leave(tiny_checkpoints):
    """Sequences with different max_new_tokens leave at different steps; newcomers join mid-flight."""
    prompts = _prompts(6, seed=3)
    budgets = [2, 9, 4, 12, 1, 6]
    with moeflow.load(tiny_checkpoints["olmoe"], expert_budget="50%") as engine:
        solo = [engine.generate(p, max_new_tokens=n).token_ids for p, n in zip(prompts, budgets)]
        scheduler = Scheduler(engine, max_batch_size=2, admission=FifoAdmission())
        seqs = [engine.new_sequence(p, max_new_tokens=n) for p, n in zip(prompts, budgets)]
        for s in seqs:
            scheduler.submit(s)
        finished = []
        while not scheduler.idle:
            finished.extend(scheduler.step())
    assert sorted(s.seq_id for s in finished) == sorted(s.seq_id for s in seqs)  # each exactly once
    assert [s.generated for s in seqs] == solo
    assert max(scheduler.batch_sizes) == 2


def test_seeded_sampling_in_a_batch_equals_solo(tiny_checkpoints):
    prompts = _prompts(4, seed=5)
    kw = dict(max_new_tokens=8, temperature=0.8, top_p=0.95, seed=11)
    with moeflow.load(tiny_checkpoints["mixtral"], expert_budget="all") as engine:
        solo = [engine.generate(p, **kw).token_ids for p in prompts]
        batched = [r.token_ids for r in run_batch(engine, prompts, batch_size=4, **kw).results]
    assert batched == solo


def test_cancel_frees_the_place(tiny_checkpoints):
    with moeflow.load(tiny_checkpoints["mixtral"], expert_budget="all") as engine:
        scheduler = Scheduler(engine, max_batch_size=1, admission=FifoAdmission())
        a = engine.new_sequence([1, 2, 3], max_new_tokens=50)
        b = engine.new_sequence([4, 5, 6], max_new_tokens=3)
        scheduler.submit(a)
        scheduler.submit(b)
        scheduler.step()
        assert scheduler.batch.members == [a]
        scheduler.cancel(a)
        assert a.finish_reason == "cancelled" and scheduler.batch.members == []
        scheduler.run_until_idle()
    assert b.finish_reason == "length" and len(b.generated) == 3
    assert len(a.generated) < 50


def test_sequence_finishing_on_first_token_never_joins(tiny_checkpoints):
    with moeflow.load(tiny_checkpoints["mixtral"], expert_budget="all") as engine:
        scheduler = Scheduler(engine, max_batch_size=4, admission=FifoAdmission())
        seq = SequenceState(prompt_ids=[1, 2], params=SamplingParams(max_new_tokens=1))
        scheduler.submit(seq)
        assert scheduler.step() == [seq]
        assert scheduler.idle and scheduler.steps == 0
