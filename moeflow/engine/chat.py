"""Chat messages to one prompt: the tokenizer's own chat template, or a plain transcript when it has none.

A model trained for chat ships its template (tokenizer_config.json's `chat_template`); it is used as
transformers' `apply_chat_template(..., add_generation_prompt=True)` uses it. A model without one, such as the
shipped default model (a small Python code model, not trained to chat), gets a deliberate plain transcript:

    system: You are terse.
    user: Hello
    assistant:

one `role: content` line per message and an open `assistant:` line, stopped at the next `\\nuser:` (so the model
does not write the user's next turn). The choice is reported (`ChatPrompt.template`) so a server can say which
one it used. `ChatSession` keeps a conversation's history (`moeflow chat`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moeflow.config import MAX_STOP
from moeflow.errors import RequestError

if TYPE_CHECKING:
    from moeflow.engine.engine import Engine, GenerationResult

ROLES = ("system", "user", "assistant")
TRANSCRIPT_STOP = ("\nuser:",)


@dataclass(frozen=True, kw_only=True)
class ChatPrompt:
    text: str
    stop: tuple[str, ...]  # stop strings the template needs (the transcript's next user turn), else ()
    template: str  # "model" (the tokenizer's chat_template) or "transcript"


def check_messages(messages: object) -> list[dict[str, str]]:
    """`messages` as a list of {"role", "content"} with text content; RequestError says what is wrong."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise RequestError("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise RequestError(f"messages[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, list):  # OpenAI's content parts: only text ones are supported
            if not all(isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):  # fmt: skip
                raise RequestError(f"messages[{i}].content: only text parts ({{'type': 'text', ...}}) are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def chat_prompt(tokenizer: object | None, messages: object) -> ChatPrompt:
    """The prompt for the assistant's next turn after `messages`."""
    checked = check_messages(messages)
    if tokenizer is None:
        raise RequestError("this model has no tokenizer, so it cannot take chat messages; send token ids instead")
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(checked, tokenize=False, add_generation_prompt=True)
        return ChatPrompt(text=text, stop=(), template="model")
    lines = [f"{m['role']}: {m['content']}" for m in checked]
    return ChatPrompt(text="\n".join([*lines, "assistant:"]), stop=TRANSCRIPT_STOP, template="transcript")


class ChatSession:
    """A conversation with one engine: `reply(text)` adds the user's turn, streams the assistant's answer (text
    increments, as `Engine.stream`) and keeps it in the history for the next turn."""

    def __init__(self, engine: Engine, *, system: str | None = None, **sampling: object) -> None:
        self.engine = engine
        self.sampling = sampling
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.last: GenerationResult | None = None  # the last turn's result, once its stream has ended

    def reply(self, text: str) -> Iterator[str]:
        """The assistant's answer to `text`; the turn enters the history when the stream ends. A request the engine
        refuses (RequestError: the conversation no longer fits the context...) leaves the history as it was."""
        messages = [*self.messages, {"role": "user", "content": text}]
        prompt = chat_prompt(self.engine.tokenizer, messages)
        stop = (*prompt.stop, *(self.sampling.get("stop") or ()))[:MAX_STOP]  # type: ignore[misc]
        stream = self.engine.stream(prompt.text, **{**self.sampling, "stop": stop or None})
        yield from stream
        self.last = stream.result
        self.messages = [*messages, {"role": "assistant", "content": (stream.result.text or "").strip()}]
