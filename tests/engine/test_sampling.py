"""Sampling as users of transformers know it: the same logits processors, per-request parameters in a batch,
stop strings, logprobs, the model's generation_config.json defaults, and clear errors for bad parameters."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import moeflow
from moeflow.config import SamplingParams
from moeflow.engine.batch import TokenHistory
from moeflow.engine.sampling import SeenTokens, penalize_repetition, penalize_seen, sample_next, token_logprob, warp
from moeflow.errors import RequestError
from moeflow.scheduler import FifoAdmission, Scheduler

PROMPT = [3, 17, 29, 44, 5, 61, 90, 12, 7, 33, 101, 58]
V = 97


def _logits(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g) * 3  # positive and negative logits


def _seen(seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(0, V, (30,), generator=g).tolist()  # repeats included


# ---- the processors against transformers' own, on the same logits -----------------------------------------


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
@pytest.mark.parametrize("seed", range(3))
def test_repetition_penalty_equals_transformers(penalty, seed):
    logits, seen = _logits(seed), _seen(seed)
    ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([seen]), logits.clone()[None])[0]
    torch.testing.assert_close(penalize_repetition(logits, seen, penalty), ref, rtol=0, atol=0)


def test_repetition_penalty_follows_a_growing_history_as_transformers_does():
    """The mask is brought up to date with each token added in place (a prompt, then decode steps); ids beyond
    the output vocabulary are ignored, as they cannot be generated."""
    prompt, generated = _seen(7)[:12] + [V + 5], []
    seen = SeenTokens(TokenHistory(prompt, generated))
    gen = torch.Generator().manual_seed(3)
    for step in range(25):
        logits = _logits(step)
        ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[t for t in prompt + generated if t < V]]),
                                                    logits.clone()[None])[0]  # fmt: skip
        penalised = penalize_seen(logits, seen.mask(V, logits.device), 1.3)
        torch.testing.assert_close(penalised, ref, rtol=0, atol=0)
        generated.append(int(torch.randint(0, V, (1,), generator=gen)))


def _hf_chain(params: SamplingParams) -> LogitsProcessorList:
    chain = LogitsProcessorList()
    if params.repetition_penalty != 1:
        chain.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    chain.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        chain.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        chain.append(TopPLogitsWarper(params.top_p))
    if params.min_p:
        chain.append(MinPLogitsWarper(params.min_p))
    return chain


@pytest.mark.parametrize(
    "kw",
    [
        {"top_k": 1},  # only the argmax survives
        {"top_k": 10},
        {"top_k": V},  # k = vocabulary: nothing dropped
        {"min_p": 0.05},
        {"min_p": 0.5},
        {"top_p": 0.9},
        {"temperature": 0.5, "top_k": 20, "min_p": 0.1},  # order matters: min-p after temperature and top-k
        {"temperature": 1.7, "top_k": 40, "top_p": 0.8, "min_p": 0.02, "repetition_penalty": 1.3},
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
@pytest.mark.parametrize("seed", range(3))
def test_processing_equals_transformers_chain(kw, seed):
    """Which tokens survive and the distribution sampled from are transformers' (TopK, MinP, TopP,
    Temperature, RepetitionPenalty applied by LogitsProcessorList in generate's order)."""
    params = SamplingParams(**{"temperature": 1.0, **kw}).resolve({})
    logits, seen = _logits(seed), _seen(seed)
    ref = _hf_chain(params)(torch.tensor([seen]), logits.clone()[None])[0]
    ours = logits if params.repetition_penalty == 1 else penalize_repetition(logits, seen, params.repetition_penalty)
    ours = warp(ours, params)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref)), "a different set of tokens survived"
    torch.testing.assert_close(torch.softmax(ours, -1), torch.softmax(ref, -1))  # scores may differ by a shift


def test_top_k_one_and_min_p_one_sample_the_argmax():
    logits = _logits(0)
    gen = torch.Generator().manual_seed(0)
    for kw in ({"top_k": 1}, {"min_p": 1.0}):
        params = SamplingParams(temperature=2.0, **kw).resolve({})
        assert {sample_next(logits, params, gen) for _ in range(20)} == {int(logits.argmax())}


def test_greedy_with_penalty_is_the_argmax_of_the_penalised_logits():
    logits = torch.zeros(V)
    logits[5], logits[6] = 2.0, 1.9
    greedy = SamplingParams().resolve({})
    assert sample_next(logits, greedy, None, SeenTokens([5])) == 5  # no penalty: the model's argmax
    penalised = SamplingParams(repetition_penalty=1.2).resolve({})
    assert sample_next(logits, penalised, None, SeenTokens([5])) == 6  # 2.0 / 1.2 < 1.9


def test_token_logprob_is_the_models_log_softmax():
    logits = _logits(1)
    ref = torch.log_softmax(logits, -1)
    lp = token_logprob(logits, 4, top=3)
    assert lp.token_id == 4 and lp.logprob == pytest.approx(float(ref[4]))
    assert [t for t, _ in lp.top] == ref.topk(3).indices.tolist()
    assert [v for _, v in lp.top] == pytest.approx(ref.topk(3).values.tolist())
    assert token_logprob(logits, 4, top=0).top == ()


# ---- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"top_k": 2.5}, "top_k must be an integer"),
        ({"min_p": 1.5}, "min_p must be in [0, 1]"),
        ({"min_p": -0.1}, "min_p must be in [0, 1]"),
        ({"repetition_penalty": 0}, "repetition_penalty must be a number > 0"),
        ({"repetition_penalty": -1.2}, "repetition_penalty must be a number > 0"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty must be a number > 0"),
        ({"top_p": 0}, "top_p must be in (0, 1]"),
        ({"temperature": -1}, "temperature must be in [0, 100]"),
        ({"stop": "\n"}, "stop must be a list of non-empty strings"),
        ({"stop": ("",)}, "stop must be a list of non-empty strings"),
        ({"stop": tuple("abcdefghijklmnopq")}, "give at most 16"),
        ({"logprobs": 21}, "logprobs must be an integer in [0, 20]"),
        ({"logprobs": -1}, "logprobs must be an integer in [0, 20]"),
    ],
)
def test_bad_parameters_say_what_is_wrong(kw, words):
    with pytest.raises(RequestError) as e:
        SamplingParams(**kw)
    assert words in str(e.value)


# ---- through the engine ---------------------------------------------------------------------------------------


def _hf_generate(path, prompt: list[int], new_tokens: int, **kw) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens, **kw)
    return out[0, len(prompt) :].tolist()


def test_greedy_with_repetition_penalty_equals_transformers_generate(tiny_checkpoints):
    path = tiny_checkpoints["mixtral"]
    ref = _hf_generate(path, PROMPT, 16, repetition_penalty=1.5)
    with moeflow.load(path, expert_budget="25%") as engine:
        plain = engine.generate(PROMPT, max_new_tokens=16).token_ids
        penalised = engine.generate(PROMPT, max_new_tokens=16, repetition_penalty=1.5).token_ids
    assert penalised == ref
    assert penalised != plain, "the penalty must change this output, or the test shows nothing"


def test_logprobs_are_the_models_own(tiny_checkpoints):
    path = tiny_checkpoints["qwen3_moe"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = model.generate(
        torch.tensor([PROMPT]), do_sample=False, max_new_tokens=6, output_logits=True, return_dict_in_generate=True
    )
    with moeflow.load(path) as engine:
        result = engine.generate(PROMPT, max_new_tokens=6, logprobs=2)
    assert [lp.token_id for lp in result.logprobs] == result.token_ids
    for lp, logits in zip(result.logprobs, out.logits):
        ref = torch.log_softmax(logits[0].float(), -1)
        assert lp.logprob == pytest.approx(float(ref[lp.token_id]), abs=1e-5)
        assert lp.top[0][0] == lp.token_id  # greedy: the chosen token is the most likely
        assert len(lp.top) == 2
    with moeflow.load(path) as engine:
        assert engine.generate(PROMPT, max_new_tokens=2).logprobs is None


def test_each_row_of_a_batch_keeps_its_own_parameters(tiny_checkpoints):
    """Four requests with different settings decode together; each gets what it gets alone."""
    path = tiny_checkpoints["olmoe"]
    settings = [
        {},
        {"repetition_penalty": 1.8},
        {"temperature": 0.9, "top_k": 5, "seed": 3},
        {"temperature": 1.3, "min_p": 0.1, "top_p": 0.9, "seed": 4, "repetition_penalty": 1.2},
    ]
    with moeflow.load(path) as engine:
        alone = [engine.generate(PROMPT, max_new_tokens=10, **kw).token_ids for kw in settings]
        seqs = [engine.new_sequence(PROMPT, max_new_tokens=10, **kw) for kw in settings]
        scheduler = Scheduler(engine, max_batch_size=4, admission=FifoAdmission())
        for seq in seqs:
            scheduler.submit(seq)
        scheduler.run_until_idle()
    assert max(scheduler.batch_sizes) == 4
    assert [s.generated for s in seqs] == alone
    assert len({tuple(t) for t in alone}) == len(alone), "the settings must differ in effect"


def test_stop_string_ends_the_text_before_it(tiny_checkpoints):
    path = tiny_checkpoints["qwen3_moe"]
    with moeflow.load(path) as engine:
        full = engine.generate("def f(x):", max_new_tokens=24)
        assert len(full.text) > 8
        stop = full.text[4:6]  # two characters from the middle of the output
        cut = full.text[: full.text.find(stop)]
        stopped = engine.generate("def f(x):", max_new_tokens=24, stop=("zzz-never", stop))
        streamed = "".join(engine.stream("def f(x):", max_new_tokens=24, stop=(stop,)))
    assert stopped.text == cut and streamed == cut
    assert stopped.finish_reason == "stop"
    assert len(stopped.token_ids) < len(full.token_ids)
    assert stopped.token_ids == full.token_ids[: len(stopped.token_ids)]


def test_stop_strings_need_a_tokenizer(tmp_path):
    from moeflow.testing import save_tiny_checkpoint

    path = save_tiny_checkpoint("mixtral", tmp_path / "m")
    with moeflow.load(path) as engine, pytest.raises(RequestError, match="no tokenizer"):
        engine.new_sequence(PROMPT, stop=("x",))


def test_generation_config_gives_the_defaults(tiny_checkpoints, tmp_path):
    """What the model's generation_config.json sets applies where the request sets nothing, as in
    transformers: repetition_penalty always, the sampling knobs only with do_sample."""
    path = tmp_path / "m"
    shutil.copytree(tiny_checkpoints["mixtral"], path)
    file = path / "generation_config.json"
    config = json.loads(file.read_text()) if file.exists() else {}
    (path / "generation_config.json").write_text(json.dumps({**config, "repetition_penalty": 1.5, "top_k": 7}))
    with moeflow.load(path) as engine:
        assert engine.generation_defaults == {"repetition_penalty": 1.5}
        seq = engine.new_sequence(PROMPT, max_new_tokens=16)
        assert (seq.params.repetition_penalty, seq.params.temperature, seq.params.top_k) == (1.5, 0.0, 0)
        assert engine.new_sequence(PROMPT, repetition_penalty=1.0).params.repetition_penalty == 1.0  # asked
        by_default = engine.generate(PROMPT, max_new_tokens=16).token_ids
    assert by_default == _hf_generate(path, PROMPT, 16)  # transformers reads the same file
    (path / "generation_config.json").write_text(
        json.dumps({**config, "do_sample": True, "temperature": 0.7, "top_k": 7, "top_p": 0.9})
    )
    with moeflow.load(path) as engine:
        params = engine.new_sequence(PROMPT).params
        assert (params.temperature, params.top_k, params.top_p, params.min_p) == (0.7, 7, 0.9, 0.0)
        assert engine.new_sequence(PROMPT, temperature=0).params.greedy
