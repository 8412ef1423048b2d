"""Server settings: one frozen dataclass; `moeflow serve` generates its options from it. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field

from moeflow.config import Admission, check_choice
from moeflow.errors import MoeflowError


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    port: int = field(default=50051, metadata={"help": "TCP port; 0 picks a free one (printed at start)"})
    http_port: int | None = field(
        default=None,
        metadata={"help": "also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /metrics) "
                  "on this TCP port of --host, from the same engine; 0 picks a free one (default: no HTTP)"},
    )
    max_batch_size: int = field(default=8, metadata={"help": "sequences decoding together at most"})
    max_queue: int = field(
        default=128, metadata={"help": "requests waiting for a place in the batch at most; beyond: RESOURCE_EXHAUSTED"}
    )
    max_prompt_tokens: int = field(
        default=0, metadata={"help": "longest prompt accepted, in tokens; 0: the model's context"}
    )
    max_new_tokens_limit: int = field(default=1024, metadata={"help": "largest max_new_tokens a request may ask"})
    max_message_bytes: int = field(
        default=1 << 20, metadata={"help": "largest request message gRPC accepts, in bytes (huge prompts)"}
    )
    admission: Admission = field(
        default="fifo",
        metadata={"help": "who joins the batch when more wait than fit: fifo, or rebatch (the token re-batcher)"},
    )
    grace_s: float = field(default=30.0, metadata={"help": "on SIGTERM, seconds in-flight requests get to finish"})
    idle_timeout_s: float = field(
        default=10.0,
        metadata={"help": "seconds a call may take to send its request message (each, on a stream); then it is cut"},
    )

    def __post_init__(self) -> None:
        check_choice(self.admission, Admission, "admission")
        for name in ("max_batch_size", "max_new_tokens_limit", "max_message_bytes"):
            if getattr(self, name) < 1:
                raise MoeflowError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.http_port is not None and not 0 <= self.http_port < 65536:
            raise MoeflowError(f"--http-port must be in [0, 65535], got {self.http_port}")
        for name in ("max_queue", "max_prompt_tokens", "port"):
            if getattr(self, name) < 0:
                raise MoeflowError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.grace_s < 0:
            raise MoeflowError(f"--grace-s must be >= 0, got {self.grace_s}")
        if not self.idle_timeout_s > 0:
            raise MoeflowError(f"--idle-timeout-s must be > 0, got {self.idle_timeout_s}")

    @property
    def capacity(self) -> int:
        """Requests the server holds at once (running + waiting); one more is refused."""
        return self.max_batch_size + self.max_queue
