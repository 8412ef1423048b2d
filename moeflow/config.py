"""What a user chooses: the engine's and a request's settings, validated, with their choices in one place.

Torch-free on purpose: `moeflow --help` and the gRPC client read these without importing torch.
Every choice is a `Literal`; `choices(...)` turns one into the list the CLI and error messages show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, get_args

from moeflow.errors import MoeflowError, RequestError

Store = Literal["disk", "ram"]
LivePolicy = Literal["lru", "lfu", "predictive"]
ReplayPolicy = Literal["lru", "lfu", "predictive", "belady"]
Dtype = Literal["auto", "float32", "float16", "bfloat16"]
Admission = Literal["fifo", "rebatch"]

DEFAULT_MODEL = Path(__file__).parent / "default_model"  # shipped with the package (its model card: README.md)
DEFAULT_LOOKAHEAD = 1  # MoE layers between a prediction and the layer it is for


def choices(literal: object) -> tuple[str, ...]:
    return get_args(literal)


def check_choice(value: str, literal: object, what: str) -> None:
    if value not in choices(literal):
        raise MoeflowError(f"unknown {what} {value!r}; choose one of: {', '.join(choices(literal))}")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    expert_budget: str = field(
        default="all", metadata={"help": "fast-tier ceiling for expert weights: 25%, 512MiB, 2GB or all"}
    )
    store: Store = field(default="disk", metadata={"help": "backing tier: disk (O_DIRECT reads) or ram"})
    policy: LivePolicy = field(default="lru", metadata={"help": "eviction policy"})
    device: str = field(default="cpu", metadata={"help": "fast tier and compute device: cpu, cuda or cuda:N"})
    dtype: Dtype = field(default="auto", metadata={"help": "compute dtype (auto: the checkpoint's)"})
    direct_io: bool = field(default=True, metadata={"help": "bypass the page cache when reading experts"})
    predictor: str = field(
        default="auto",
        metadata={"help": "routing predictor of --policy predictive: auto (the best trained one, else gate), path, "
                  "token_freq, gate, transition, sklearn, ..."},
    )
    predictor_dir: Path | None = field(
        default=None,
        metadata={"help": "folder of trained predictors, as `moeflow predictor train --out` wrote it "
                  "(default: MODEL/predictors)"},
    )
    lookahead: int = field(
        default=DEFAULT_LOOKAHEAD, metadata={"help": "predictive: prefetch this many MoE layers ahead"}
    )
    prefetch_width: int = field(
        default=0, metadata={"help": "predictive: experts prefetched per token and layer (0: the model's top-k)"}
    )
    threads: int = field(
        default=0,
        metadata={"help": "torch/OpenMP compute threads, process-wide (0: automatic, leaves a core to the readers)"},
    )

    def __post_init__(self) -> None:
        check_choice(self.store, Store, "store")
        if self.policy == "belady":
            raise MoeflowError(
                "cache policy 'belady' needs the future access sequence, so it exists only in offline replay: use "
                f"`moeflow profile --policies belady`; live runs choose one of: {', '.join(choices(LivePolicy))}"
            )
        check_choice(self.policy, LivePolicy, "cache policy")
        check_choice(self.dtype, Dtype, "dtype")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise MoeflowError(f"unknown device {self.device!r}; use cpu or cuda")
        if self.lookahead < 1:
            raise MoeflowError(f"--lookahead must be at least 1 layer, got {self.lookahead}")
        if self.prefetch_width < 0:
            raise MoeflowError(f"--prefetch-width must be >= 0 (0: top-k), got {self.prefetch_width}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise MoeflowError(f"--threads must be an integer >= 0 (0: automatic), got {self.threads!r}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate at most"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy (exact); above 0: sampling"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling: most likely tokens up to this mass"})
    seed: int | None = field(default=None, metadata={"help": "random seed of sampling (default 0)"})

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise RequestError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature):
            raise RequestError(f"temperature must be a finite number, got {self.temperature!r}")
        if not 0 <= self.temperature <= 100:
            raise RequestError(f"temperature must be in [0, 100] (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise RequestError(f"seed must be an integer, got {self.seed!r}")


@dataclass(frozen=True, kw_only=True)
class ProfileConfig:
    """`moeflow profile`: which policies and budgets to replay over which trace (`moeflow.tools.profile`)."""

    budgets: str = field(default="12.5%,25%,50%", metadata={"help": "expert budgets, comma-separated: 12.5%,512MiB"})
    policies: str = field(
        default="lru,lfu,predictive,belady",
        metadata={"help": f"comma-separated, from: {', '.join(choices(ReplayPolicy))}"},
    )
    predictor: str = field(
        default="auto",
        metadata={"help": "predictive: routing predictor(s), comma-separated: auto (the best trained), path, ..."},
    )
    predictor_dir: Path | None = field(
        default=None,
        metadata={"help": "folder of trained predictors, as `moeflow predictor train --out` wrote it "
                  "(default: MODEL/predictors)"},
    )
    lookahead: int = field(
        default=DEFAULT_LOOKAHEAD, metadata={"help": "predictive: predictions made this many MoE layers ahead"}
    )
    prefetch_width: int = field(
        default=0, metadata={"help": "predictive: experts prefetched per token and layer (0: the model's top-k)"}
    )
    max_tokens: int = field(default=20_000, metadata={"help": "trace at most this many tokens of --data"})
    context: int = field(default=256, metadata={"help": "tokens per traced sequence (chunk length)"})
    disk_bandwidth: float = field(
        default=0.0, metadata={"help": "GB/s of this machine's disk for the stall estimate (0: measure it)"}
    )
    live: bool = field(
        default=False, metadata={"help": "also run the real engine token by token per policy and budget (slow)"}
    )
    live_store: Store = field(default="disk", metadata={"help": "--live: backing tier"})

    def __post_init__(self) -> None:
        check_choice(self.live_store, Store, "--live-store")
        if self.max_tokens < 1 or self.context < 1:
            raise MoeflowError("--max-tokens and --context must be at least 1")
        if self.lookahead < 1 or self.prefetch_width < 0 or self.disk_bandwidth < 0:
            raise MoeflowError("--lookahead must be >= 1, --prefetch-width and --disk-bandwidth >= 0")
