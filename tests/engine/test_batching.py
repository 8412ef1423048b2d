"""Continuous batching: every sequence's tokens equal its solo generation, whatever joins or leaves."""

import pytest
import torch

import moeflow
from moeflow.config import SamplingParams
from moeflow.engine.batch import SequenceState
from moeflow.scheduler import FifoAdmission, Scheduler, prefill_groups, run_batch


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


# ---- prompts admitted together are prefilled together --------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_grouped_prefill_equals_solo_prefill(tiny_checkpoints, family):
    prompts = _prompts(5, seed=7)  # lengths 3, 11, 7, 19, 2: four of five rows padded
    with moeflow.load(tiny_checkpoints[family], expert_budget="25%") as engine:
        solo = [engine.generate(p, max_new_tokens=6).token_ids for p in prompts]
        batch = engine.new_batch()
        seqs = [engine.new_sequence(p, max_new_tokens=6) for p in prompts]
        batch.prefill_many(seqs)
        assert [s.kv[0][0].shape[-2] for s in seqs] == [len(p) for p in prompts]  # each cache its own, unpadded
        for s in seqs:
            batch.add(s)
        while batch.members:
            batch.step()
            batch.evict_finished()
    assert [s.generated for s in seqs] == solo


def test_grouped_prefill_reads_each_expert_once_for_the_group(tiny_checkpoints):
    prompts = _prompts(6, seed=2)
    with moeflow.load(tiny_checkpoints["mixtral"], expert_budget="25%", policy="lru") as engine:
        engine.cache.reset_stats()
        for p in prompts:
            engine.new_batch().prefill(engine.new_sequence(p, max_new_tokens=1))
        alone = engine.stats().misses
        engine.cache.reset_stats()
        engine.new_batch().prefill_many([engine.new_sequence(p, max_new_tokens=1) for p in prompts])
        grouped = engine.stats().misses
    assert grouped <= len(engine.checkpoint.experts) < alone  # at most every expert once, against re-reads


def test_prefill_groups_fit_the_token_limit():
    seqs = [SequenceState(prompt_ids=[1] * n, params=SamplingParams()) for n in (4, 4, 8, 2, 30, 3)]
    groups = prefill_groups(seqs, 16)
    assert [[len(s.prompt_ids) for s in g] for g in groups] == [[4, 4], [8, 2], [30], [3]]  # 2 x 8 <= 16 < 3 x 8
    assert [s for g in groups for s in g] == seqs  # admission order kept
    assert prefill_groups(seqs, 10**6) == [seqs]


# ---- re-padding only the rows that change ------------------------------------------------------------

SCHEDULES = {
    # step by step: which sequences (indices into the prompts) decode together
    "leave_and_join_in_one_step": [[0, 1], [0, 1], [1, 2], [2, 0], [0, 1, 2]],
    "joiner_longer_than_everyone": [[0, 2], [0, 2, 3], [3], [0, 3], [0, 2, 3]],
    "all_leave_then_return": [[0, 1, 2], [], [1], [0, 1, 2]],
    "one_left": [[0, 1, 2, 3], [3], [3], [1, 3], [1]],
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_membership_changes_keep_each_sequence_its_solo_tokens(tiny_checkpoints, schedule):
    """Rows leave and join between steps (the re-batcher's pattern): the batched cache keeps the rows
    that stay, leavers take their own copy away, joiners are padded in; tokens stay solo-exact."""
    prompts = [[5, 9, 3], [7, 1, 4, 4, 8, 2, 6], [11, 12], [3] * 17 + [8, 9, 10, 2]]  # 3: the longest by far
    with moeflow.load(tiny_checkpoints["qwen2_moe"], expert_budget="50%") as engine:
        batch = engine.new_batch()
        seqs = [engine.new_sequence(p, max_new_tokens=64) for p in prompts]
        for s in seqs:
            batch.prefill(s)
        for members in SCHEDULES[schedule]:
            for s in [s for s in batch.members if seqs.index(s) not in members]:
                batch.remove(s)
            for i in members:
                if seqs[i] not in batch.members:
                    batch.add(seqs[i])
            assert (batch.step() is None) == (not members)
            assert batch.members == [s for s in batch.members if seqs.index(s) in members]
            assert sorted(seqs.index(s) for s in batch.members) == sorted(members)
            if members:  # no column is padding in every row
                assert bool(batch._mask_BQ[:, 0].any())
            for s in seqs:
                if s not in batch.members:  # a leaver holds its own unpadded cache, not a view of the batch
                    keys = s.kv[0][0]
                    assert keys.shape[0] == 1 and keys.shape[-2] == s.length - 1
                    if batch._cache is not None:
                        batched = batch._cache.layers[0].keys.untyped_storage().data_ptr()
                        assert keys.untyped_storage().data_ptr() != batched
        generated = [list(s.generated) for s in seqs]
        solo = [engine.generate(p, max_new_tokens=len(g)).token_ids for p, g in zip(prompts, generated)]
    assert generated == solo


def test_rebatched_pool_with_varied_lengths_equals_solo(tiny_checkpoints):
    """The re-batcher's pool: most steps someone leaves and someone joins, finishing at different times."""
    from moeflow.predictor.rebatch import RebatchAdmission

    prompts = _prompts(9, seed=7)
    budgets = [5, 14, 3, 9, 12, 1, 7, 10, 4]

    def predict(seqs: list[SequenceState]):
        import numpy as np

        out = np.zeros((len(seqs), 2, 8), dtype=bool)  # a predictor that moves everyone around
        for b, s in enumerate(seqs):
            out[b, :, (s.length * 3 + b) % 8] = True
        return out

    with moeflow.load(tiny_checkpoints["mixtral"], expert_budget="50%") as engine:
        solo = [engine.generate(p, max_new_tokens=n).token_ids for p, n in zip(prompts, budgets)]
        scheduler = Scheduler(engine, max_batch_size=3, admission=RebatchAdmission(predict, pool_factor=2))
        seqs = [engine.new_sequence(p, max_new_tokens=n) for p, n in zip(prompts, budgets)]
        for s in seqs:
            scheduler.submit(s)
        scheduler.run_until_idle()
        assert scheduler.batch._cache is None  # nothing held once everyone finished
    assert [s.generated for s in seqs] == solo


def test_token_history_reads_like_the_joined_list():
    from moeflow.engine.batch import TokenHistory

    prompt, generated = [1, 2, 3, 4], [5, 6, 7]
    h, joined = TokenHistory(prompt, generated), prompt + generated
    assert len(h) == 7 and list(h) == joined and h[-1] == 7 and h[2] == 3
    for sl in [slice(-3, None), slice(2, 6), slice(0, 2), slice(5, None), slice(-100, None), slice(None, None, 2)]:
        assert h[sl] == joined[sl]
    generated.append(8)  # a view: it sees new tokens
    assert h[-2:] == [7, 8]
    with pytest.raises(IndexError):
        h[8]
