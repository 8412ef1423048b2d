"""The engine: a transformers MoE model whose experts live in a budgeted cache, and its generate loop."""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from moeflow.config import EngineConfig, SamplingParams
from moeflow.engine.batch import DecodeBatch, Sequence
from moeflow.errors import CheckpointError, MoeflowError, RequestError
from moeflow.model.checkpoint import Checkpoint, open_checkpoint
from moeflow.offload.budget import resolve_budget
from moeflow.offload.cache import ExpertCache, SlotPool
from moeflow.offload.layer import OffloadRuntime, apply_offload, experts_modules
from moeflow.offload.policy import make_policy
from moeflow.offload.prefetch import PredictivePrefetcher
from moeflow.offload.stats import CacheStats
from moeflow.offload.store import DiskStore, ExpertStore, RamStore
from moeflow.offload.transfer import TransferEngine
from moeflow.scheduler import AdmissionPolicy, FifoAdmission, Scheduler

log = logging.getLogger(__name__)

DEFAULT_MODEL = Path(__file__).parent / "default_model"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class GenerationResult:
    text: str | None  # None when the model folder has no tokenizer
    token_ids: list[int]  # generated tokens only
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (end-of-sequence token) or "length"
    prefill_s: float
    elapsed_s: float

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True, kw_only=True)
class BatchRun:
    results: list[GenerationResult]  # in prompt order
    elapsed_s: float
    batch_sizes: list[int]  # sequences decoded in each step
    distinct_experts: list[float]  # each decode step's distinct experts, mean over MoE layers


def peak_rss_bytes() -> int:
    """This process's peak resident set. VmHWM, unlike ru_maxrss, is not inherited across fork + exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class Engine:
    """A loaded model with offloaded experts. Use `moeflow.load(...)` to build one."""

    def __init__(self, path: str | Path | None = None, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.checkpoint: Checkpoint = open_checkpoint(DEFAULT_MODEL if path is None else path)
        if self.config.device.startswith("cuda") and not torch.cuda.is_available():
            raise MoeflowError("--device cuda was asked for but no CUDA device is available; use --device cpu")
        self.device = torch.device(self.config.device)
        self.dtype = _resolve_dtype(self.config.dtype, self.device, self.checkpoint)
        hf_config = AutoConfig.from_pretrained(self.checkpoint.path)
        self.model = _build_skeleton(hf_config, self.dtype)
        self.top_k = int(hf_config.num_experts_per_tok)
        self.max_context = int(getattr(hf_config, "max_position_embeddings", 0) or 0)
        modules = experts_modules(self.model)
        inter, hidden = _check_expert_geometry(self.checkpoint, modules)
        slot_bytes = (3 * inter * hidden) * torch.empty((), dtype=self.dtype).element_size()
        budget = resolve_budget(
            self.config.expert_budget,
            slot_bytes=slot_bytes,
            total_experts=len(self.checkpoint.experts),
            top_k=self.top_k,
        )
        disk = DiskStore(self.checkpoint, direct_io=self.config.direct_io)
        store: ExpertStore = disk
        if self.config.store == "ram":
            store = RamStore(self.checkpoint, disk, dtype=self.dtype, pin=self.device.type == "cuda")
            disk.close()
        pool = SlotPool(capacity=budget.slots, inter=inter, hidden=hidden, dtype=self.dtype, device=self.device)
        self.cache = ExpertCache(
            pool=pool,
            store=store,
            policy=make_policy(self.config.policy),
            layers=sorted(modules),
            budget_bytes=budget.budget_bytes,
        )
        self.runtime: OffloadRuntime = apply_offload(self.model, self.cache)
        _load_dense_weights(self.model, self.checkpoint, hf_config)
        self.model.to(self.device).eval()
        self.transfer = TransferEngine(self.cache)
        self.tokenizer = _load_tokenizer(self.checkpoint.path)
        self.eos_token_ids = _eos_ids(self.checkpoint.path, hf_config, self.tokenizer)
        self.prefetcher: PredictivePrefetcher | None = None
        self._predictor_hooks = None
        if self.config.policy == "predictive":
            self._start_prediction()

    def _start_prediction(self) -> None:
        """--policy predictive: the predictor runs inside the forward and feeds the prefetcher."""
        from moeflow.predictor.runtime import PredictorHooks, build_predictor

        predictor = build_predictor(self, self.config.predictor, lookahead=self.config.lookahead)
        width = self.config.prefetch_width or self.top_k
        self.prefetcher = PredictivePrefetcher(
            self.cache,
            self.transfer.prefetch,
            layers=self.checkpoint.moe_layers,
            lookahead=self.config.lookahead,
            width=width,
        )
        layers = self.checkpoint.moe_layers
        prefetcher = self.prefetcher

        def offer(_: object, target: int, scores_TE: torch.Tensor) -> None:
            k = min(width, scores_TE.shape[-1])
            prefetcher.offer(layers[target], torch.topk(scores_TE.float(), k, dim=-1).indices.tolist())

        self._predictor_hooks = PredictorHooks(self, [predictor], offer)
        self.runtime.prefetcher = prefetcher

    def before_forward(self, histories: list[list[int]], n_new: int) -> None:
        """Called before every forward with each row's tokens so far (the last `n_new` are computed now):
        with --policy predictive, starts the prefetcher's step and runs the context predictors."""
        if self.prefetcher is not None:
            self.prefetcher.begin_step()
            self._predictor_hooks.begin(histories, n_new)

    # ---- generation -----------------------------------------------------------------------------

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt is empty; give at least one character")
            if self.tokenizer is None:
                raise RequestError(
                    f"{self.checkpoint.path} has no tokenizer; pass token ids instead of text, or add tokenizer files"
                )
            return list(self.tokenizer(prompt)["input_ids"])
        ids = list(prompt)
        vocab = self.model.config.vocab_size
        if not ids:
            raise RequestError("prompt is empty; give at least one token")
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
        return ids

    def new_sequence(
        self,
        prompt: str | list[int],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Sequence:
        """Validate a request and turn it into a sequence ready for `DecodeBatch.prefill`."""
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        prompt_ids = self.encode(prompt)
        self._check_length(len(prompt_ids), params.max_new_tokens)
        return Sequence(prompt_ids=prompt_ids, params=params)

    def new_batch(self) -> DecodeBatch:
        return DecodeBatch(self.model, self.device, self.eos_token_ids, before_forward=self.before_forward)

    @torch.inference_mode()
    def generate(self, prompt: str | list[int], **sampling: object) -> GenerationResult:
        """Generate for one prompt. `sampling`: max_new_tokens, temperature (0 = greedy), top_p, seed."""
        seq = self.new_sequence(prompt, **sampling)
        batch = self.new_batch()
        batch.prefill(seq)
        if not seq.done:
            batch.add(seq)
            while not seq.done:
                batch.step()
        return self.result(seq)

    @torch.inference_mode()
    def generate_batch(
        self,
        prompts: list[str | list[int]],
        *,
        batch_size: int = 8,
        admission: AdmissionPolicy | None = None,
        **sampling: object,
    ) -> list[GenerationResult]:
        """Continuous batching over `prompts` (results in input order), at most `batch_size` at a time."""
        return self.run_batch(prompts, batch_size=batch_size, admission=admission, **sampling).results

    @torch.inference_mode()
    def run_batch(
        self,
        prompts: list[str | list[int]],
        *,
        batch_size: int = 8,
        admission: AdmissionPolicy | None = None,
        **sampling: object,
    ) -> BatchRun:
        """`generate_batch` that also reports the run's wall time, batch sizes and distinct experts per step."""
        seqs = [self.new_sequence(p, **sampling) for p in prompts]
        scheduler = Scheduler(self, max_batch_size=batch_size, admission=admission or FifoAdmission())
        t0 = time.perf_counter()
        for seq in seqs:
            scheduler.submit(seq)
        scheduler.run_until_idle()
        return BatchRun(
            results=[self.result(s) for s in seqs],
            elapsed_s=time.perf_counter() - t0,
            batch_sizes=scheduler.batch_sizes,
            distinct_experts=scheduler.distinct_experts,
        )

    def result(self, seq: Sequence) -> GenerationResult:
        text = self.tokenizer.decode(seq.generated, skip_special_tokens=True) if self.tokenizer is not None else None
        assert seq.t_first_token is not None and seq.t_done is not None
        return GenerationResult(
            text=text,
            token_ids=list(seq.generated),
            prompt_token_ids=seq.prompt_ids,
            finish_reason=seq.finish_reason or "length",
            prefill_s=seq.t_first_token - seq.t_submit,
            elapsed_s=seq.t_done - seq.t_submit,
        )

    def _check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        if self.max_context and prompt_len + max_new_tokens > self.max_context:
            raise RequestError(
                f"prompt is {prompt_len} tokens and max_new_tokens is {max_new_tokens}, but the model's context is "
                f"{self.max_context} tokens; shorten the prompt or lower max_new_tokens "
                f"(at most {max(self.max_context - prompt_len, 0)} for this prompt)"
            )

    # ---- observation ----------------------------------------------------------------------------

    def stats(self) -> CacheStats:
        return self.cache.stats()

    def close(self) -> None:
        if self._predictor_hooks is not None:
            self._predictor_hooks.close()
        self.transfer.close()
        self.cache.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(path: str | Path | None = None, **options: object) -> Engine:
    """Load a Hugging Face MoE checkpoint with its experts offloaded. Options are `EngineConfig` fields."""
    unknown = set(options) - set(EngineConfig.field_names())
    if unknown:
        raise MoeflowError(f"unknown option(s) {sorted(unknown)}; valid: {EngineConfig.field_names()}")
    return Engine(path, EngineConfig(**options))


# ---- loading helpers ------------------------------------------------------------------------------


def _resolve_dtype(name: str, device: torch.device, ckpt: Checkpoint) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # exactness is defined in fp32 on the CPU; bf16 matmul is also slow there
    return next(iter(ckpt.experts.values())).gate.dtype


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside put their parameters on the meta device; buffers (rotary tables) stay real."""
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _build_skeleton(hf_config: object, dtype: torch.dtype) -> nn.Module:
    """The model with every parameter on the meta device; no weight memory is allocated yet."""
    with _parameters_on_meta():
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)


def _check_expert_geometry(ckpt: Checkpoint, modules: dict[int, nn.Module]) -> tuple[int, int]:
    if sorted(modules) != ckpt.moe_layers:
        raise CheckpointError(
            f"the config defines MoE layers {sorted(modules)} but the checkpoint has experts for layers "
            f"{ckpt.moe_layers}; config.json and the weights do not belong together"
        )
    shapes = set()
    for layer, module in modules.items():
        if ckpt.num_experts[layer] != module.num_experts:
            raise CheckpointError(
                f"layer {layer}: config says {module.num_experts} experts, checkpoint has {ckpt.num_experts[layer]}"
            )
        inter, hidden = module.intermediate_dim, module.hidden_dim
        for e in range(module.num_experts):
            loc = ckpt.experts[(layer, e)]
            if (loc.gate.shape, loc.up.shape, loc.down.shape) != ((inter, hidden), (inter, hidden), (hidden, inter)):
                raise CheckpointError(
                    f"expert {e} of layer {layer} has shapes gate {loc.gate.shape}, up {loc.up.shape}, down "
                    f"{loc.down.shape}; the config expects ({inter}, {hidden}) and ({hidden}, {inter})"
                )
        shapes.add((inter, hidden))
    if len(shapes) != 1:
        raise CheckpointError(f"experts of different sizes across layers ({sorted(shapes)}) are not supported")
    return shapes.pop()


def _load_dense_weights(model: nn.Module, ckpt: Checkpoint, hf_config: object) -> None:
    """Read every non-expert tensor from the checkpoint into the skeleton, one tensor at a time."""
    targets = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    loaded = set()
    for disk_name in ckpt.tensors:
        name = ckpt.family.memory_name(disk_name)
        current = targets.get(name, buffers.get(name))
        if current is None:
            log.debug("ignoring checkpoint tensor %s (not used by the model)", disk_name)
            continue
        tensor = ckpt.read_tensor(disk_name)
        if tuple(tensor.shape) != tuple(current.shape):
            raise CheckpointError(
                f"checkpoint tensor {disk_name} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(current.shape)}; config.json and the weights do not belong together"
            )
        _set_tensor(model, name, tensor.to(current.dtype), is_param=name in targets)
        loaded.add(name)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
        loaded |= {n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type != "meta"}
    missing = sorted(n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta")
    if missing:
        raise CheckpointError(
            f"the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:5]}; "
            "it is incomplete or belongs to another config"
        )


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor, *, is_param: bool) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if is_param:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def _load_tokenizer(path: Path) -> object | None:
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    return AutoTokenizer.from_pretrained(path)


def _eos_ids(path: Path, hf_config: object, tokenizer: object | None) -> set[int]:
    """The tokens that end generation, from the same place transformers' `generate` reads them."""
    try:
        gen_config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json
        gen_config = GenerationConfig.from_model_config(hf_config)
    eos = gen_config.eos_token_id
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}
