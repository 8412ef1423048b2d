"""A failure belongs to the request it happened in: the scheduler fails only the sequences a fault touched."""

import pytest
import torch

import moeflow
from moeflow.scheduler import FifoAdmission, Scheduler


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, 120, (k,), generator=g).tolist() for k in [3, 11, 7, 5, 9][:n]]


@pytest.mark.parametrize("temperature", [1e-40, 5e-324], ids=["1e-40", "smallest-double"])
def test_tiny_temperature_samples_the_argmax(tiny_checkpoints, temperature):
    """Inside the documented range [0, 100]: logits / 1e-40 overflow float32 and the softmax was all nan (sampling
    raised). The limit of the distribution as T -> 0 is the argmax, so the tokens are greedy's."""
    with moeflow.load(tiny_checkpoints["mixtral"]) as engine:
        greedy = engine.generate([5, 6, 7], max_new_tokens=12).token_ids
        tiny = engine.generate([5, 6, 7], max_new_tokens=12, temperature=temperature, seed=4).token_ids
    assert tiny == greedy


def test_a_failed_decode_forward_fails_its_batch_only(tiny_checkpoints, monkeypatch):
    """The shared forward of one decode step raises: the sequences in it fail with that error, the waiting ones
    are prefilled and finish with their solo tokens, and the scheduler goes on."""
    prompts = _prompts(5)
    with moeflow.load(tiny_checkpoints["mixtral"], expert_budget="25%") as engine:
        solo = [engine.generate(p, max_new_tokens=6).token_ids for p in prompts]
        real = engine.driver.forward
        decode_steps = []

        def forward(input_ids_BT, **kw):
            if kw["n_new"] == 1:
                decode_steps.append(input_ids_BT.shape[0])
                if len(decode_steps) == 3:
                    raise OSError("injected: an expert read failed")
            return real(input_ids_BT, **kw)

        monkeypatch.setattr(engine.driver, "forward", forward)
        scheduler = Scheduler(engine, max_batch_size=2, admission=FifoAdmission())
        seqs = [engine.new_sequence(p, max_new_tokens=6) for p in prompts]
        for s in seqs:
            scheduler.submit(s)
        finished = []
        while not scheduler.idle:
            finished.extend(scheduler.step())
        assert sorted(s.seq_id for s in finished) == sorted(s.seq_id for s in seqs)  # each exactly once
        failed = [i for i, s in enumerate(seqs) if s.error is not None]
        assert failed == [0, 1], "the first two decode together; the third step of that pair fails"
        for i in failed:
            assert seqs[i].finish_reason == "error" and isinstance(seqs[i].error, OSError)
            with pytest.raises(OSError, match="an expert read failed"):
                engine.result(seqs[i])
        assert [s.generated for s in seqs[2:]] == solo[2:]
        assert engine.generate(prompts[0], max_new_tokens=6).token_ids == solo[0]


def test_a_failed_prefill_fails_that_sequence_only(tiny_checkpoints, monkeypatch):
    prompts = _prompts(3)
    with moeflow.load(tiny_checkpoints["mixtral"]) as engine:
        solo = [engine.generate(p, max_new_tokens=5).token_ids for p in prompts]
        real = engine.driver.forward

        def forward(input_ids_BT, **kw):  # any prefill holding prompt 1, alone or grouped with the others
            n = len(prompts[1])
            if kw["n_new"] == input_ids_BT.shape[1] and any(row[-n:] == prompts[1] for row in input_ids_BT.tolist()):
                raise MemoryError("injected: no room for this prompt")
            return real(input_ids_BT, **kw)

        monkeypatch.setattr(engine.driver, "forward", forward)
        scheduler = Scheduler(engine, max_batch_size=3, admission=FifoAdmission())
        seqs = [engine.new_sequence(p, max_new_tokens=5) for p in prompts]
        for s in seqs:
            scheduler.submit(s)
        scheduler.run_until_idle()
    assert isinstance(seqs[1].error, MemoryError) and seqs[1].generated == []
    assert [seqs[0].generated, seqs[2].generated] == [solo[0], solo[2]]


def test_cli_generate_with_a_tiny_temperature_prints_greedy_tokens(tiny_checkpoints, capsys):
    """`moeflow generate --temperature 1e-40` printed a traceback (the softmax was nan); now it prints the argmax."""
    import json

    from moeflow.cli import main

    args = ["generate", "--model", str(tiny_checkpoints["mixtral"]), "--prompt", "abc", "--max-new-tokens", "6"]
    assert main([*args, "--json"]) == 0
    greedy = json.loads(capsys.readouterr().out)["token_ids"]
    assert main([*args, "--json", "--temperature", "1e-40", "--seed", "5"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["token_ids"] == greedy and "Traceback" not in out.err
