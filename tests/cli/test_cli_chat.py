"""`moeflow chat`: one message per stdin line, each reply streamed to stdout, the history kept between turns."""

from __future__ import annotations

import io

import pytest

import moeflow
from moeflow.cli import main
from moeflow.engine.chat import ChatSession, chat_prompt
from moeflow.errors import RequestError

TURNS = ["def f(x):", "and g?"]


def _expected(path, system: str | None) -> list[str]:
    """Each turn's reply, generated from the whole conversation so far."""
    replies: list[str] = []
    messages = [{"role": "system", "content": system}] if system else []
    with moeflow.load(path) as engine:
        for turn in TURNS:
            messages.append({"role": "user", "content": turn})
            prompt = chat_prompt(engine.tokenizer, messages)
            text = engine.generate(prompt.text, max_new_tokens=10, stop=prompt.stop).text
            replies.append(text)
            messages.append({"role": "assistant", "content": text.strip()})
    return replies


def test_chat_reads_lines_keeps_history_and_streams(tiny_checkpoints, monkeypatch, capsys):
    path = tiny_checkpoints["qwen3_moe"]
    want = _expected(path, "Be brief.")
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(TURNS) + "\n\n"))  # a blank line is skipped
    assert main(["chat", "--model", str(path), "--system", "Be brief.", "--max-new-tokens", "10"]) == 0
    out = capsys.readouterr()
    assert out.out == "".join(reply + "\n" for reply in want)
    assert out.err.count("tokens,") == len(TURNS)  # one stats line per turn, on stderr


def test_second_turn_sees_the_first(tiny_checkpoints):
    with moeflow.load(tiny_checkpoints["qwen3_moe"]) as engine:
        session = ChatSession(engine, max_new_tokens=6)
        first = "".join(session.reply(TURNS[0]))
        assert [m["role"] for m in session.messages] == ["user", "assistant"]
        assert session.messages[1]["content"] == first.strip()
        "".join(session.reply(TURNS[1]))
        assert len(session.messages) == 4
        with pytest.raises(RequestError, match="context"):
            "".join(session.reply("x" * 400))  # past the tiny model's 256 positions
        assert len(session.messages) == 4, "a refused turn leaves the history as it was"


def test_transcript_template_and_bad_messages():
    prompt = chat_prompt(object(), [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert prompt.text == "system: S\nuser: U\nassistant:" and prompt.stop == ("\nuser:",)
    assert prompt.template == "transcript"
    for bad, words in [([], "non-empty list"), ([{"role": "x", "content": ""}], "role must be one of"),
                       ([{"role": "user", "content": 3}], "content must be a string")]:  # fmt: skip
        with pytest.raises(RequestError, match=words):
            chat_prompt(object(), bad)


def test_a_models_own_chat_template_is_used(tiny_checkpoints, tmp_path):
    import json
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path / "m"
    shutil.copytree(tiny_checkpoints["qwen3_moe"], path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    prompt = chat_prompt(AutoTokenizer.from_pretrained(path), [{"role": "user", "content": "hi"}])
    assert (prompt.text, prompt.stop, prompt.template) == ("<user>hi<assistant>", (), "model")
