"""`moeflow generate` streams its text to stdout as the tokens arrive: many writes, each flushed, that add up
to exactly the text of the non-streaming run; the stats line goes to stderr."""

from __future__ import annotations

import io
import json

import pytest

from moeflow.cli import main

ARGS = ["generate", "--prompt", "def", "--max-new-tokens", "24", "--expert-budget", "25%"]


class _Recorder(io.StringIO):
    """stdout that remembers each flush: what had been written by then."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue())


@pytest.mark.slow
def test_generate_streams_what_json_reports(monkeypatch, capsys):
    assert main([*ARGS, "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    out = _Recorder()
    monkeypatch.setattr("sys.stdout", out)
    assert main(ARGS) == 0
    assert out.getvalue() == "def" + whole["text"] + "\n"
    snapshots = [s for s in out.flushed if s]
    assert len(set(snapshots)) > 5, "the text must arrive piece by piece, each piece flushed"
    assert snapshots[0] == "def", "the prompt is shown before the first token"
    err = capsys.readouterr().err
    assert err.startswith("[24 tokens") and "cache hit rate" in err


@pytest.mark.slow
def test_generate_json_has_logprobs_when_asked(capsys):
    assert main([*ARGS, "--json", "--logprobs", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [lp["token_id"] for lp in report["logprobs"]] == report["token_ids"]
    assert all(len(lp["top"]) == 2 and lp["logprob"] <= 0 for lp in report["logprobs"])
