"""What a user chooses: the engine's and a request's settings, validated, with their choices in one place.

Torch-free on purpose: `moeflow --help` and the gRPC client read these without importing torch.
Every choice is a `Literal`; `choices(...)` turns one into the list the CLI and error messages show.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal, get_args

from moeflow.errors import MoeflowError, RequestError

Store = Literal["disk", "ram"]
LivePolicy = Literal["auto", "lru", "lfu", "lrfu", "predictive"]
ReplayPolicy = Literal["auto", "lru", "lfu", "lrfu", "predictive", "belady"]
Dtype = Literal["auto", "float32", "float16", "bfloat16"]
Admission = Literal["fifo", "rebatch"]
ExpertDtype = Literal["auto", "bf16", "fp16", "int8", "int4"]
Kernels = Literal["torch", "triton", "fast"]
INT4_GROUP_SIZES = (32, 64, 128)  # columns per int4 scale (moeflow.kernels.quant)

DEFAULT_MODEL = Path(__file__).parent / "default_model"  # shipped with the package (its model card: README.md)
DEFAULT_LOOKAHEAD = 1  # MoE layers between a prediction and the layer it is for
MAX_LOGPROBS = 20  # alternatives per token a request may ask for (as OpenAI's top_logprobs)
MAX_STOP = 16  # stop strings per request


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
    policy: LivePolicy = field(
        default="auto",
        metadata={"help": "eviction policy: auto (LRU or LRFU, whichever has missed less lately on this run), lru, "
                  "lfu, lrfu (use counts that fade), predictive (prefetch by a routing predictor)"},
    )
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
    read_ahead: int = field(
        default=0,
        metadata={"help": "predictive, with a predictor that answers for the whole step before the forward (path, "
                  "token_freq, sklearn): read its predictions this many MoE layers ahead (at least --lookahead); 0: "
                  "one layer more than --lookahead while reading an expert takes longer than computing a layer, as "
                  "measured, else --lookahead"},
    )
    prefetch_width: int = field(
        default=0, metadata={"help": "predictive: experts prefetched per token and layer (0: the model's top-k)"}
    )
    next_token_prefetch: bool = field(
        default=True,
        metadata={"help": "predictive: during each decode step's last MoE layer, read ahead the first MoE layer's "
                  "experts for the next token (the model's own next-token distribution there x the token_freq "
                  "table; only where the predictor folder has token_freq, and only while reading an expert costs "
                  "more than a layer's compute, as measured)"},
    )
    prediction_trial: bool = field(
        default=True,
        metadata={"help": "predictive: time decode steps with and without prediction and predict only while it makes "
                  "them faster (--no-prediction-trial: always predict, to study a predictor)"},
    )
    reuse_model: bool = field(
        default=True,
        metadata={"help": "predictive: evict by the trained reuse model in the predictor folder (reuse.safetensors, "
                  "`moeflow predictor train --predictors reuse`) when there is one, and auto: have it among the "
                  "candidates (--no-reuse-model: predictive evicts by the online estimate of next use, auto chooses "
                  "between LRU and LRFU)"},
    )
    threads: int = field(
        default=0,
        metadata={"help": "torch/OpenMP compute threads, process-wide (0: automatic, leaves a core to the readers)"},
    )
    readers: int = field(
        default=0,
        metadata={"help": "reads of experts from the store at once, demand reads before reads ahead (0: automatic, by "
                  "the size of an expert on disk: 1 from 8 MiB, else 2)"},
    )
    read_process: bool = field(
        default=True,
        metadata={"help": "read experts in a process of their own (CPU slots, disk store), so that reads never take "
                  "the compute thread's GIL (--no-read-process: reader threads in this process)"},
    )
    pin_cores: bool = field(
        default=True,
        metadata={"help": "with the reader process, run it on a core of its own and the compute threads on the others "
                  "(Linux, where the compute threads leave a core; --no-pin-cores: wherever the scheduler puts them)"},
    )
    expert_dtype: ExpertDtype = field(
        default="auto",
        metadata={"help": "how experts are held in the budget: auto (as the checkpoint stores them, at the compute "
                  "dtype), bf16, fp16, int8 (per output channel) or int4 (group-wise); a folder written by "
                  "`moeflow quantize` is read quantized from disk, else the experts are quantized as they are read"},
    )
    group_size: int = field(
        default=128, metadata={"help": f"--expert-dtype int4: input columns per scale, one of {INT4_GROUP_SIZES}"}
    )
    kernels: Kernels = field(
        default="torch",
        metadata={"help": "expert compute: torch (transformers' arithmetic for full-precision experts: greedy output "
                  "equal to transformers; int8/int4 slots on a GPU take the Triton kernels) or triton (every slot "
                  "through the fused Triton kernels, kernels.fused_moe / quant_fused_moe: within fp32 rounding, not "
                  "bit for bit; needs a CUDA device, or TRITON_INTERPRET=1 to run them slowly on the CPU) or fast "
                  "(the fastest measured path, within fp32 rounding: the Triton kernels on a GPU; on the CPU the "
                  "formulation of kernels.cpu's plan, numpy's BLAS on one thread per compute thread for decode-sized "
                  "batches)"},
    )
    exact_quantized: bool = field(
        default=False,
        metadata={"help": "int8/int4 experts on the CPU: dequantize each used expert and compute in the compute dtype, "
                  "equal to transformers on the dequantized weights (4-8x slower per expert), instead of torch's "
                  "packed int8/int4 matmuls with bf16 activations (docs/quantization.md)"},
    )

    def __post_init__(self) -> None:
        check_choice(self.store, Store, "store")
        check_choice(self.expert_dtype, ExpertDtype, "expert dtype")
        check_choice(self.kernels, Kernels, "kernels")
        if self.group_size not in INT4_GROUP_SIZES:
            raise MoeflowError(f"--group-size must be one of {INT4_GROUP_SIZES}, got {self.group_size!r}")
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
        if isinstance(self.read_ahead, bool) or not isinstance(self.read_ahead, int) or self.read_ahead < 0:
            raise MoeflowError(f"--read-ahead must be an integer >= 0 (0: chosen from the measured overlap), "
                               f"got {self.read_ahead!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise MoeflowError(f"--threads must be an integer >= 0 (0: automatic), got {self.threads!r}")
        if isinstance(self.readers, bool) or not isinstance(self.readers, int) or self.readers < 0:
            raise MoeflowError(f"--readers must be an integer >= 0 (0: automatic), got {self.readers!r}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """One request's sampling. A field left None takes the model's default (its generation_config.json, read
    as transformers' `generate` reads it: temperature, top_k, top_p and min_p only when it says `do_sample`),
    else the neutral value: greedy, no truncation, no penalty. `Engine.new_sequence` resolves them."""

    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate at most"})
    temperature: float | None = field(
        default=None,
        metadata={"help": "0: greedy (exact); above 0: sampling (default: the model's generation_config.json, else 0)"},
    )
    top_p: float | None = field(
        default=None, metadata={"help": "nucleus sampling: keep the most likely tokens up to this mass (1: off)"}
    )
    top_k: int | None = field(default=None, metadata={"help": "sampling: keep the k most likely tokens (0: off)"})
    min_p: float | None = field(
        default=None,
        metadata={"help": "sampling: drop tokens less likely than min_p x the most likely one's probability (0: off)"},
    )
    repetition_penalty: float | None = field(
        default=None,
        metadata={"help": "divide positive logits (multiply negative ones) of every token already in the prompt or "
                  "output by this (1: off; applies to greedy too, as in transformers)"},
    )
    stop: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "stop when the text contains one of these strings; it is left out of the text"},
    )
    logprobs: int | None = field(
        default=None,
        metadata={"help": f"report each chosen token's log-probability and this many alternatives (0-{MAX_LOGPROBS})"},
    )
    seed: int | None = field(default=None, metadata={"help": "random seed of sampling (default 0)"})

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise RequestError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature is not None:
            if not _is_number(self.temperature):
                raise RequestError(f"temperature must be a finite number, got {self.temperature!r}")
            if not 0 <= self.temperature <= 100:
                raise RequestError(f"temperature must be in [0, 100] (0 = greedy), got {self.temperature}")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise RequestError(f"top_p must be in (0, 1] (1: off), got {self.top_p!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 0):
            raise RequestError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if self.min_p is not None and (not _is_number(self.min_p) or not 0 <= self.min_p <= 1):
            raise RequestError(f"min_p must be in [0, 1] (0: off), got {self.min_p!r}")
        if self.repetition_penalty is not None and (
            not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0
        ):
            raise RequestError(
                f"repetition_penalty must be a number > 0 (1: off, above 1 discourages repeats), "
                f"got {self.repetition_penalty!r}"
            )
        if self.stop is not None:
            if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
                raise RequestError(f"stop must be a list of non-empty strings, got {self.stop!r}")
            if len(self.stop) > MAX_STOP:
                raise RequestError(f"stop holds {len(self.stop)} strings; give at most {MAX_STOP}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise RequestError(
                f"logprobs must be an integer in [0, {MAX_LOGPROBS}] (alternatives per token), got {self.logprobs!r}"
            )
        if self.seed is not None and not _is_int(self.seed):
            raise RequestError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return not self.temperature

    def resolve(self, model_defaults: Mapping[str, float]) -> SamplingParams:
        """Every None filled: from `model_defaults` (`moeflow.model.loading.generation_defaults`), else neutral."""
        filled = {
            name: model_defaults.get(name, neutral) if getattr(self, name) is None else getattr(self, name)
            for name, neutral in _NEUTRAL.items()
        }
        return replace(self, **filled, stop=tuple(self.stop or ()))


# The value of each optional sampling field that changes nothing (transformers' neutral settings).
_NEUTRAL: dict[str, float] = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class ProfileConfig:
    """`moeflow profile`: which policies and budgets to replay over which trace (`moeflow.tools.profile`)."""

    budgets: str = field(default="12.5%,25%,50%", metadata={"help": "expert budgets, comma-separated: 12.5%,512MiB"})
    policies: str = field(
        default="auto,lru,lfu,lrfu,predictive,belady",
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
    reuse_model: bool = field(
        default=True,
        metadata={"help": "predictive and auto: evict by the reuse model in the predictor folder when there is one, "
                  "as the engine does (--no-reuse-model: without it)"},
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
