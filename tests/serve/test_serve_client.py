"""The client's streamed messages carry the request's figures so far, not zeros (`moeflow client --json`)."""

from __future__ import annotations

import json
import time

from moeflow.serve.client import Stream
from moeflow.serve.proto import moeflow_pb2


class FakeCall:
    """A `Generate` call's messages as the server sends them: usage and timings on the last one only."""

    def __init__(self, messages):
        self.messages = messages

    def __iter__(self):
        for msg in self.messages:
            time.sleep(0.01)
            yield msg

    def cancel(self):
        pass


def _messages():
    last = moeflow_pb2.GenerateResponse(text="c", token_ids=[7], finish_reason="length", elapsed_s=0.5,
                                        time_to_first_token_s=0.1)
    last.usage.prompt_tokens = 4
    last.usage.completion_tokens = 4
    return [moeflow_pb2.GenerateResponse(text="a", token_ids=[5, 6]), moeflow_pb2.GenerateResponse(text="b"),
            moeflow_pb2.GenerateResponse(text="", token_ids=[9]), last]


def test_every_streamed_message_has_the_figures_so_far():
    replies = list(Stream(FakeCall(_messages()), time.perf_counter()))
    assert [r.completion_tokens for r in replies] == [2, 2, 3, 4]
    assert [r.finish_reason for r in replies] == ["", "", "", "length"]
    assert [r.prompt_tokens for r in replies] == [None, None, None, 4]
    early = replies[:-1]
    assert all(r.elapsed_s > 0 for r in early)
    assert [r.elapsed_s for r in early] == sorted(r.elapsed_s for r in early)
    assert all(r.time_to_first_token_s == early[0].elapsed_s for r in early)
    assert (replies[-1].elapsed_s, replies[-1].time_to_first_token_s) == (0.5, 0.1)  # the server's own


def test_json_lines_say_null_for_what_is_not_known_yet():
    first, *_, last = (json.loads(json.dumps(r.to_json())) for r in Stream(FakeCall(_messages()), time.perf_counter()))
    assert first["finish_reason"] is None and first["prompt_tokens"] is None
    assert first["completion_tokens"] == 2 and first["elapsed_s"] > 0 and first["token_ids"] == [5, 6]
    assert last["finish_reason"] == "length" and last["prompt_tokens"] == 4 and last["completion_tokens"] == 4
