"""Server settings: one frozen dataclass; `moeflow serve` generates its options from it. Torch-free."""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

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
    rebatch_pool: int = field(
        default=4,
        metadata={"help": "--admission rebatch: prefilled sequences, in multiples of --max-batch-size; a larger "
                  "pool groups better and spaces each request's tokens further apart (batch jobs default to 8)"},
    )
    grace_s: float = field(default=30.0, metadata={"help": "on SIGTERM, seconds in-flight requests get to finish"})
    idle_timeout_s: float = field(
        default=10.0,
        metadata={"help": "seconds a call may take to send its request message (each, on a stream); then it is cut"},
    )
    tls_cert: Path | None = field(default=None, metadata={"help": "TLS: the server's certificate chain (PEM)"})
    tls_key: Path | None = field(default=None, metadata={"help": "TLS: the server's private key (PEM)"})
    tls_client_ca: Path | None = field(
        default=None, metadata={"help": "mutual TLS: accept only clients with a certificate signed by this CA (PEM)"}
    )
    token_file: Path | None = field(
        default=None,
        metadata={"help": "file holding a bearer token that every call except health checks must send "
                  "(gRPC metadata authorization: Bearer TOKEN; HTTP header Authorization: Bearer TOKEN)"},
    )
    insecure: bool = field(
        default=False, metadata={"help": "allow a non-loopback --host without TLS or a token (anyone may connect)"}
    )

    def __post_init__(self) -> None:
        check_choice(self.admission, Admission, "admission")
        for name in ("max_batch_size", "max_new_tokens_limit", "max_message_bytes", "rebatch_pool"):
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
        if (self.tls_cert is None) != (self.tls_key is None):
            raise MoeflowError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise MoeflowError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key too")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "token_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise MoeflowError(f"--{name.replace('_', '-')} {path}: no such file")
        if not (is_loopback(self.host) or self.tls_cert or self.token_file or self.insecure):
            raise MoeflowError(
                f"--host {self.host} is reachable from other machines, and this server would let anyone there use it "
                "unencrypted: give --tls-cert and --tls-key, and/or --token-file, or --insecure if that is what you "
                "want (or serve on 127.0.0.1)"
            )

    def token(self) -> str | None:
        """The bearer token of --token-file (surrounding whitespace dropped), None without one."""
        if self.token_file is None:
            return None
        token = Path(self.token_file).read_text().strip()
        if not token:
            raise MoeflowError(f"--token-file {self.token_file} is empty; put the token in it")
        return token

    @property
    def capacity(self) -> int:
        """Requests the server holds at once (running + waiting); one more is refused."""
        return self.max_batch_size + self.max_queue


def is_loopback(host: str) -> bool:
    """Only this machine can reach `host` (127.0.0.0/8, ::1, localhost); 0.0.0.0 and :: are every interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name: it may resolve to anything
        return False


def authorized(sent: bytes, token: str) -> bool:
    """`sent` (an authorization header or metadata value) is exactly `Bearer TOKEN`; compared in constant time, so
    the token cannot be guessed byte by byte. gRPC and HTTP check the same way."""
    return hmac.compare_digest(sent, f"Bearer {token}".encode())
