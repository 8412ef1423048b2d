"""The OpenAI API's JSON <-> the engine worker's dataclasses: requests of /v1/completions and /v1/chat/completions
become `GenerateRequest`s, `Chunk`s become OpenAI's response and stream objects. No I/O here (`http.py` serves).

What is taken: model (any value; the one model is served), prompt (one string) or messages, max_tokens
(max_completion_tokens), temperature, top_p, seed, stop, logprobs / top_logprobs, stream, stream_options, n = 1,
and vLLM's extra sampling fields top_k, min_p, repetition_penalty (the `openai` client sends them with
`extra_body`). Sampling fields left out take the model's generation_config.json defaults, else greedy: unlike
OpenAI's service, whose default temperature is 1. Fields that would change the output but are not supported
(n > 1, best_of, echo, suffix, logit_bias, non-zero presence or frequency penalty, tools) are refused with a
400 that says so, never ignored; other unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moeflow.config import MAX_STOP
from moeflow.engine.chat import chat_prompt
from moeflow.errors import RequestError

from .intake import GenerateRequest

if TYPE_CHECKING:
    from moeflow.engine.sampling import TokenLogprob

    from .handle import Chunk

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions' logprobs

# Accepted only at the value that changes nothing (None: absent or empty), with what to do instead.
_ONE = "send one request per output"
_PENALTY = "use repetition_penalty instead"
_NEUTRAL_ONLY: dict[str, tuple[object, str]] = {
    "n": (1, _ONE), "best_of": (1, _ONE), "echo": (False, "prepend the prompt yourself"),
    "suffix": (None, "this server does not fill in the middle"), "logit_bias": (None, "this server has no logit bias"),
    "presence_penalty": (0, _PENALTY), "frequency_penalty": (0, _PENALTY), "tools": (None, "this server has no tools"),
    "tool_choice": (None, "this server has no tools"), "functions": (None, "this server has no tools"),
}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class ApiRequest:
    """One parsed request: what the worker generates and how to answer."""

    kind: str  # "completion" | "chat"
    generate: GenerateRequest
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    logprobs: int | None  # alternatives per token to report; None: no logprobs


def _field(body: Mapping, name: str, types: type | tuple[type, ...], default: object = None) -> object:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise RequestError(f"{name} must be {_type_names(types)}, got {value!r}")
    if not isinstance(value, types):
        raise RequestError(f"{name} must be {_type_names(types)}, got {value!r}")
    return value


def _type_names(types: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
             dict: "an object"}  # fmt: skip
    return " or ".join(names.get(t, t.__name__) for t in (types if isinstance(types, tuple) else (types,)))


def _stop(body: Mapping) -> tuple[str, ...] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise RequestError(f"stop must be a string or a list of strings, got {stop!r}")


def _refuse_unsupported(body: Mapping) -> None:
    for name, (neutral, instead) in _NEUTRAL_ONLY.items():
        value = body.get(name)
        if value is not None and value != neutral and not (neutral is None and value in ("", [], {})):
            raise RequestError(f"{name}={value!r} is not supported by this server (leave it out; {instead})")


def _sampling(body: Mapping, *, max_tokens: object, logprobs: int | None) -> dict[str, object]:
    number = (int, float)
    return {
        "max_new_tokens": max_tokens,
        "temperature": _field(body, "temperature", number),
        "top_p": _field(body, "top_p", number),
        "seed": _field(body, "seed", int),
        "top_k": _field(body, "top_k", int),
        "min_p": _field(body, "min_p", number),
        "repetition_penalty": _field(body, "repetition_penalty", number),
        "stop": _stop(body),
        "logprobs": logprobs,
    }


def _stream_options(body: Mapping, stream: bool) -> bool:
    options = _field(body, "stream_options", dict, {})
    if options and not stream:
        raise RequestError("stream_options is only allowed with stream: true")
    return bool(_field(options, "include_usage", bool, False))


def parse_completion(body: object) -> ApiRequest:
    """A /v1/completions request body."""
    body = _object(body)
    _refuse_unsupported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("prompt must be one string (or a list holding one string); send one request per prompt")
    logprobs = _field(body, "logprobs", int)
    if logprobs is not None and not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
        raise RequestError(f"logprobs must be an integer in [0, {MAX_COMPLETION_LOGPROBS}], got {logprobs}")
    stream = bool(_field(body, "stream", bool, False))
    return ApiRequest(
        kind="completion",
        generate=GenerateRequest(prompt=prompt, **_sampling(body, max_tokens=_field(body, "max_tokens", int),
                                                            logprobs=logprobs)),  # fmt: skip
        stream=stream,
        include_usage=_stream_options(body, stream),
        logprobs=logprobs,
    )


def parse_chat(body: object, tokenizer: object | None) -> ApiRequest:
    """A /v1/chat/completions request body; the messages become one prompt (`moeflow.engine.chat`)."""
    body = _object(body)
    _refuse_unsupported(body)
    prompt = chat_prompt(tokenizer, body.get("messages"))
    logprobs = None
    if _field(body, "logprobs", bool, False):
        logprobs = _field(body, "top_logprobs", int, 0)
    elif body.get("top_logprobs") is not None:
        raise RequestError("top_logprobs needs logprobs: true")
    max_tokens = _field(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", int)
    sampling = _sampling(body, max_tokens=max_tokens, logprobs=logprobs)
    if prompt.stop:  # the template's own stop strings come first; the request's follow, within the limit
        sampling["stop"] = (*prompt.stop, *(sampling["stop"] or ()))[:MAX_STOP]
    stream = bool(_field(body, "stream", bool, False))
    return ApiRequest(
        kind="chat",
        generate=GenerateRequest(prompt=prompt.text, **sampling),
        stream=stream,
        include_usage=_stream_options(body, stream),
        logprobs=logprobs,
    )


def _object(body: object) -> Mapping:
    if not isinstance(body, Mapping):
        raise RequestError("the request body must be a JSON object")
    return body


# ---- responses -------------------------------------------------------------------------------------------------


class Reply:
    """The response objects of one request: ids, creation time and model name shared by all its chunks."""

    def __init__(self, request: ApiRequest, model: str, decode: object) -> None:
        self.request = request
        self.model = model
        self._decode = decode  # token id -> its text (for logprobs)
        self.id = ("chatcmpl-" if request.kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self._offset = 0  # characters of text given out so far (completions' text_offset)

    # ---- whole responses

    def complete(self, chunk: Chunk, logprobs: list[TokenLogprob] | None) -> dict:
        choice: dict[str, object] = {"index": 0, "finish_reason": _finish(chunk.finish_reason)}
        if self.request.kind == "chat":
            choice["message"] = {"role": "assistant", "content": chunk.text}
        else:
            choice["text"] = chunk.text
        choice["logprobs"] = self._logprobs(logprobs, chunk.text)
        return {**self._head(), "choices": [choice], "usage": usage(chunk)}

    # ---- stream chunks

    def opening(self) -> dict | None:
        """Chat streams open with the assistant's role (OpenAI's first chunk); completions have none."""
        if self.request.kind != "chat":
            return None
        return {**self._head(chunk=True), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                       "logprobs": None, "finish_reason": None}]}  # fmt: skip

    def delta(self, chunk: Chunk, logprobs: list[TokenLogprob] | None) -> dict | None:
        """The stream chunk for `chunk`'s new text; None when it carries nothing to send."""
        last = bool(chunk.finish_reason)
        if not chunk.text and not last and not logprobs:
            return None
        choice: dict[str, object] = {"index": 0}
        if self.request.kind == "chat":
            choice["delta"] = {"content": chunk.text} if chunk.text or not last else {}
        else:
            choice["text"] = chunk.text
        choice["logprobs"] = self._logprobs(logprobs, chunk.text)
        choice["finish_reason"] = _finish(chunk.finish_reason) if last else None
        out = {**self._head(chunk=True), "choices": [choice]}
        if self.request.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, chunk: Chunk) -> dict:
        """stream_options.include_usage: the last chunk, no choices, the usage."""
        return {**self._head(chunk=True), "choices": [], "usage": usage(chunk)}

    # ---- parts

    def _head(self, *, chunk: bool = False) -> dict:
        obj = "text_completion"
        if self.request.kind == "chat":
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, logprobs: list[TokenLogprob] | None, text: str) -> dict | None:
        if self.request.logprobs is None or logprobs is None:
            return None
        if self.request.kind == "chat":
            return {"content": [self._chat_logprob(lp) for lp in logprobs]}
        tokens = [self._decode(lp.token_id) for lp in logprobs]
        offsets = []
        for token in tokens:
            offsets.append(self._offset)
            self._offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{self._decode(t): v for t, v in lp.top} for lp in logprobs]
            if self.request.logprobs
            else None,
            "text_offset": offsets,
        }

    def _chat_logprob(self, lp: TokenLogprob) -> dict:
        token = self._decode(lp.token_id)
        return {
            "token": token,
            "logprob": lp.logprob,
            "bytes": list(token.encode("utf-8")),
            "top_logprobs": [
                {"token": (t := self._decode(i)), "logprob": v, "bytes": list(t.encode("utf-8"))} for i, v in lp.top
            ],
        }


def usage(chunk: Chunk) -> dict:
    return {
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
    }


def _finish(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def error_body(message: str, kind: str, code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
