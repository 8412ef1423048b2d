"""The engine: a transformers MoE model whose experts live in a budgeted cache, and its generate loop.

Build one with `moeflow.load` (the composition root, `moeflow.build`)."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

import torch
from transformers import AutoConfig

from moeflow.config import DEFAULT_MODEL, EngineConfig, SamplingParams
from moeflow.engine.batch import DecodeBatch, SequenceState
from moeflow.engine.detok import LockedTokenizer, TextStream, cut_text
from moeflow.engine.driver import StepDriver
from moeflow.engine.sampling import TokenLogprob
from moeflow.errors import MoeflowError, RequestError
from moeflow.kernels import backend
from moeflow.kernels.cpu import limit_blas_threads
from moeflow.model.checkpoint import Checkpoint, open_checkpoint
from moeflow.model.loading import (
    build_skeleton,
    eos_token_ids,
    expert_geometry,
    experts_modules,
    generation_defaults,
    load_dense_weights,
    load_tokenizer,
    resolve_dtype,
)
from moeflow.model.quantized import expert_quantization, expert_slot_bytes, resolve_expert_format
from moeflow.offload.admission import PredictionTrial
from moeflow.offload.budget import resolve_budget
from moeflow.offload.cache import ExpertCache, SlotPool
from moeflow.offload.layer import OffloadRuntime, apply_offload
from moeflow.offload.mover import readers_peak_bytes
from moeflow.offload.policy import KeepAllPolicy, make_policy
from moeflow.offload.prefetch import PredictivePrefetcher
from moeflow.offload.stats import CacheStats
from moeflow.offload.store import DiskStore, ExpertStore, QuantizingStore, RamStore
from moeflow.offload.transfer import TransferEngine

log = logging.getLogger(__name__)

# Reads at once (of each kind, urgent and ahead, in the reader process: `moeflow.offload.mover._Schedule`; reader
# threads where there is none): 2 for experts under LARGE_READ_BYTES on disk, 1 from there on. A large read keeps
# this VM's disk busy by itself, and reads at once share it: the I/O-bound benchmark model's 18 MiB experts at 25%
# from disk on the 2-core AMD EPYC VM (2026-12-04, ad hoc): raw O_DIRECT 1.85 / 1.68 / 1.55 / 1.54 GiB/s with
# 1 / 2 / 4 / 8 reads at once; in a decode, a demand read alone took 7.9 ms, beside one other read 15.0, beside two
# 22.2, and one at a time the first of a layer's misses is in (and computed) after one read. Decode, 6 held-out
# prompts x 64 tokens, page cache dropped, interleaved fresh processes (/tmp script, tok/s): LRU with 1 / 2 / 8 reads
# at once 25.65 / 24.44 / 24.87 (medians of 2-3 rounds), path prediction 30.66 / 30.33 / 29.65; with 8 where two
# waiting were still read one after the other, path 33.5-35.1 against 34.6-37.7 with 1 (4 rounds). FIFO batches of
# 8 (32 prompts x 32 tokens): 1 / 2 / 4 / 8 at once 28.0 / 29.2 / 29.4 / 30.2 tok/s in one run, 33.4 against 33.9
# (1 against 8 read one after the other when two wait) in another: batches are not this rule's measure. Small
# experts keep 2: a batch-1 step misses at most top-k a layer, each read in well under a millisecond, and the
# shipped model (0.4 MiB) decoded alike with 2 or 8 readers (85 / 111 / 107 against 96 / 100 / 93 tok/s, an earlier
# session); int4-g128 (2.3 MiB) and int8 (4.5 MiB) experts of the I/O-bound model decoded faster with 2 than with 8
# (31.4-41.7 against 30.4-34.0; 31.9-32.9 against 29.3-31.6).
LARGE_READ_BYTES = 8 << 20


def reader_threads(expert_bytes: int) -> int:
    """The automatic count of reads at once for experts of `expert_bytes` on disk (EngineConfig.readers = 0)."""
    return 1 if expert_bytes >= LARGE_READ_BYTES else 2


# The automatic rule: one compute thread fewer than the cores this process may use, and idle OpenMP workers
# that sleep (OMP_WAIT_POLICY=PASSIVE, set by `import moeflow` when it can: moeflow/__init__.py). Measured by
# bench/threads.py on the 2-core AMD EPYC (shared), 25% budget, disk store (the reader process), fresh processes,
# 5 interleaved rounds, medians (bench/results/threads.json, 2026-12-04): README demo / batch of 32 prompts at B=8
# fifo, tokens/s:
#   auto (= threads=1, passive) 233 / 430; threads=1 active 236 / 396, passive 228 / 401, default 239 / 400;
#   threads=2 active 209 / 373, passive 191 / 278, default 204 / 357  ->  auto = 0.975x / 1.00x the best.
# (With reader threads, 2026-12-01, 7 rounds: auto 223 / 324, the best 240 / 350: 0.93x both. With numpy's BLAS on
# one thread and the reader process on a core of its own, 2026-12-05, 3 rounds, bench/results/threads_cores.json:
# auto 321 / 778, the best 321 (auto) / 821 (threads=1 active): 1.00x / 0.947x; threads=2 at most 283 / 701.)
# On a quiet machine the settings are within noise of each other (two identical settings differ by up to 25% in
# one round). Under load they are not: with other work on the two cores (load ~4.5; bench/results/
# threads_loaded.json) threads=2 with spinning workers fell to 44 / 14 (active) and 57 / 289 (default) against
# auto's 183 / 317, because a parallel region waits for a worker the scheduler has put aside, while every
# one-thread setting held 183-202 / 302-403. One thread has no OpenMP workers at all, so the rule holds even
# where the wait policy could not be set (torch imported before moeflow). Machines with more cores were not
# measured: cores - 1 keeps the same shape (one core for the readers and Python).
def compute_threads(requested: int) -> int | None:
    """The torch/OpenMP compute threads for `EngineConfig.threads` (0: automatic); None leaves torch's choice
    alone (the user set OMP_NUM_THREADS and asked for nothing else)."""
    if requested:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)


# numpy's BLAS (OpenBLAS in numpy's wheels) runs on one thread unless it computes the experts (`--kernels fast`):
# outside that, numpy does only the bookkeeping's one-row products (the path predictor, the next-token lens, the
# trained reuse model), which no thread pool speeds up, and an OpenBLAS worker spins on a core for a while after
# each call it shares, the core left to the readers (ad hoc: the lens' 1 x 192 by 192 x 4096 product every 3 ms for
# 2 s, the process used 2.03 s of CPU with two BLAS threads, 0.14 s with one). On the shipped model at 25% (2-core
# AMD EPYC, disk store, ad hoc, 6 prompts x 64 tokens, 3 passes in one process each): predictive/path always
# predicting 327 / 316 / 314 tok/s with numpy's own threads, each pipe write to the reader process 62-75 us (LRU's:
# 19); with one BLAS thread 401 / 406 / 402 tok/s, 16 us a write.
def configure_threads(requested: int, *, blas: bool = False) -> int:
    """Apply the compute-thread choice to torch (process-wide, as torch's setting is) and hold numpy's BLAS to
    one thread, or with `blas` (`--kernels fast` computes experts with it) to torch's count; returns that count."""
    n = compute_threads(requested)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    limit_blas_threads(torch.get_num_threads() if blas else 1)
    return torch.get_num_threads()


# With the reader process, each core to one side (`EngineConfig.pin_cores`): the process on the last core the engine
# may use, the thread that loads the engine (and runs its forwards, and every thread it starts later) on the others.
# Left to the scheduler, a reader woken by a request can land on the compute thread's core and take it from the
# forward. Measured on the shipped model at 25% (2-core AMD EPYC, disk store, numpy's BLAS on one thread, ad hoc: 3
# rounds of fresh processes, 3 passes of 6 prompts x 64 tokens each, medians of tok/s): LRU 389.6 unpinned, 415.0
# with the process alone pinned, 419.8 with both; auto 372.9 / 411.2 (unpinned / both); predictive path 393.0 /
# 396.8 / 413.4.
def core_split(compute: int, cores: Iterable[int] | None) -> tuple[list[int], list[int]] | None:
    """(the compute thread's cores, the reader process's core) of `cores` for `compute` compute threads, or None
    where there is no core to spare (or no affinity to set: `cores` None)."""
    cores = sorted(cores) if cores is not None else []
    if len(cores) < 2 or compute > len(cores) - 1:
        return None
    return cores[:-1], cores[-1:]


# Threads pinned by live engines: native id -> (its cores before the first of them pinned it, how many pin it). A
# second engine loaded in a pinned thread parts the same cores the same way, and the thread gets its cores back when
# the last of them closes. An engine loaded in another thread meanwhile pins nothing (`cores_to_part`): its forwards
# would share the first one's compute cores, and its reader process the first one's core, while a core stays idle.
_pinned: dict[int, tuple[set[int], int]] = {}
_pinned_lock = threading.Lock()


def cores_to_part() -> set[int] | None:
    """What an engine loaded in the calling thread may part between its forwards and its reader process (`core_split`):
    the cores the thread may run on, as before any live engine pinned it; None (nothing to part) where there is no
    affinity, or while a live engine has pinned another thread."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    me = threading.get_native_id()
    with _pinned_lock:
        if any(thread_id != me for thread_id in _pinned):
            return None
        pinned = _pinned.get(me)
    return set(pinned[0]) if pinned is not None else os.sched_getaffinity(0)


def _pin_thread(cores: Sequence[int]) -> int | None:
    """Run the calling thread (and the threads it starts from now on) on `cores`; its native id, or None if the
    system refused (a core taken away meanwhile: the thread stays where it may run) or a live engine pinned another
    thread meanwhile."""
    thread_id = threading.get_native_id()
    with _pinned_lock:
        if any(other != thread_id for other in _pinned):
            return None
        before, count = _pinned.get(thread_id, (None, 0))
        try:
            if before is None:
                before = os.sched_getaffinity(0)
            os.sched_setaffinity(0, cores)
        except OSError:
            return None
        _pinned[thread_id] = (before, count + 1)
    return thread_id


def _unpin_thread(thread_id: int) -> None:
    with _pinned_lock:
        before, count = _pinned.pop(thread_id)
        if count > 1:
            _pinned[thread_id] = (before, count - 1)
            return
        with contextlib.suppress(OSError):  # the thread has ended
            os.sched_setaffinity(thread_id, before)


@dataclass(frozen=True, kw_only=True)
class GenerationResult:
    text: str | None  # None when the model folder has no tokenizer
    token_ids: list[int]  # generated tokens only
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (end-of-sequence token or stop string) or "length"
    prefill_s: float
    elapsed_s: float
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when asked for

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.elapsed_s if self.elapsed_s > 0 else 0.0


def peak_rss_bytes() -> int:
    """This process's peak resident set, and what its expert reader processes held of their own at their peak
    (`moeflow.offload.mover.readers_peak_bytes`: the slot pool they share is counted once, here). VmHWM, unlike
    ru_maxrss, is not inherited across fork + exec."""
    return _own_peak_rss_bytes() + readers_peak_bytes()


def _own_peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class Engine:
    """A loaded model with offloaded experts. Use `moeflow.load(...)` to build one (it also applies the
    routing predictor when the policy is predictive).

    The engine owns the model, the cache and its transfer engine, and the step driver. With the
    predictive policy it also owns the prefetcher (an offload-layer object): the prefetcher starts a
    step before every forward and corrects itself on every layer's real routing, and whatever predicts
    routing offers it predictions (`moeflow.predictor.apply_prediction`). The engine knows nothing of
    predictors or schedulers.
    """

    def __init__(self, path: str | Path | None = None, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.threads = configure_threads(self.config.threads, blas=self.config.kernels == "fast")
        self.checkpoint: Checkpoint = open_checkpoint(DEFAULT_MODEL if path is None else path)
        if self.config.device.startswith("cuda") and not torch.cuda.is_available():
            raise MoeflowError("--device cuda was asked for but no CUDA device is available; use --device cpu")
        self.device = torch.device(self.config.device)
        if self.config.kernels == "triton" and self.device.type != "cuda" and not backend.INTERPRETING:
            raise MoeflowError(
                f"--kernels triton runs the Triton kernels, which need a CUDA device; this engine computes on "
                f"{self.device}: use --device cuda, or --kernels torch (TRITON_INTERPRET=1 runs them on the CPU, "
                "slowly, for testing)"
            )
        quant = expert_quantization(self.checkpoint)  # a `moeflow quantize` folder: experts stored quantized
        if quant is not None and self.config.dtype == "auto":
            self.dtype = quant.source_dtype  # the experts' dtype before they were quantized
        else:
            self.dtype = resolve_dtype(self.config.dtype, self.device, self.checkpoint)
        hf_config = AutoConfig.from_pretrained(self.checkpoint.path)
        self.model = build_skeleton(hf_config, self.dtype)
        self.top_k = self.checkpoint.family.top_k
        # A vision-language config (qwen3_5_moe) keeps the language model's fields in its text config.
        self.max_context = int(getattr(hf_config.get_text_config(decoder=True), "max_position_embeddings", 0) or 0)
        modules = experts_modules(self.model)
        inter, hidden = expert_geometry(self.checkpoint, modules)
        # What the slots hold (None: the compute dtype); the budget counts its bytes (moeflow.model.quantized).
        self.expert_format = resolve_expert_format(
            self.config.expert_dtype, self.config.group_size, stored=quant and quant.fmt, compute=self.dtype
        )
        # int4 slots computed by torch's CPU matmul also keep their scales in its layout (counted in the budget)
        packed_scales = self.device.type == "cpu" and not self.config.exact_quantized
        try:
            slot_bytes = expert_slot_bytes(inter, hidden, self.expert_format, self.dtype, packed_scales=packed_scales)
        except ValueError as e:  # a format that cannot hold these experts' sizes (int4: odd ones)
            raise MoeflowError(
                f"--expert-dtype {self.config.expert_dtype} cannot hold this model's experts (intermediate {inter}, "
                f"hidden {hidden}): {e}. Use --expert-dtype int8, or the compute dtype"
            ) from None
        budget = resolve_budget(
            self.config.expert_budget,
            slot_bytes=slot_bytes,
            total_experts=len(self.checkpoint.experts),
            top_k=self.top_k,
        )
        readers = self.config.readers or reader_threads(
            self.checkpoint.expert_bytes_on_disk // len(self.checkpoint.experts)
        )
        disk = DiskStore(
            self.checkpoint, direct_io=self.config.direct_io, scales=None if quant is None else quant.scales
        )
        store: ExpertStore = disk
        quantizing = quant is None and self.expert_format is not None and self.expert_format.scale_dtype is not None
        # The reader process (`moeflow.offload.mover`) where the slots are host memory and the experts are read from
        # disk as stored (a quantizing store converts them on the way).
        read_process = (self.config.read_process and self.config.store == "disk" and self.device.type == "cpu"
                        and not quantizing)  # fmt: skip
        if self.config.store == "disk":
            # Before anything else runs: for the readers and the compute thread, or (reader process) the compute thread
            # alone, which reads a demand miss itself when the process is busy with reads ahead.
            disk.reserve_buffers(1 if read_process else readers + 1)
        if quantizing:
            store = QuantizingStore(store, self.expert_format, inter=inter, hidden=hidden, dtype=torch.float32)
        pool = SlotPool(
            capacity=budget.slots, inter=inter, hidden=hidden, dtype=self.dtype, device=self.device,
            fmt=self.expert_format, packed_scales=packed_scales,
        )  # fmt: skip
        if self.config.store == "ram":
            source = store
            store = RamStore(self.checkpoint, source, pool=pool, pin=self.device.type == "cuda")
            source.close()
        keep_all = budget.slots >= len(self.checkpoint.experts) and self.config.policy != "predictive"
        split = core_split(self.threads, cores_to_part()) if read_process and self.config.pin_cores else None
        self.cache = ExpertCache(
            pool=pool,
            store=store,
            policy=KeepAllPolicy() if keep_all else make_policy(self.config.policy),  # nothing is ever evicted
            layers=sorted(modules),
            budget_bytes=budget.budget_bytes,
            readers=readers,
            read_process=read_process,
            reader_cpus=None if split is None else split[1],
        )
        self._unpin = None  # gives the loading thread its cores back (`close`, or when the engine is collected)
        if split is not None and self.cache.in_process and (pinned := _pin_thread(split[0])) is not None:
            self._unpin = weakref.finalize(self, _unpin_thread, pinned)
        self.runtime: OffloadRuntime = apply_offload(
            self.model, self.cache, packed=not self.config.exact_quantized,
            triton=self.config.kernels == "triton" or (self.config.kernels == "fast" and self.device.type == "cuda"),
            exact=self.config.kernels != "fast",
        )
        load_dense_weights(self.model, self.checkpoint, hf_config)
        self.model.to(self.device).eval()
        self.transfer = TransferEngine(self.cache)
        self.tokenizer = load_tokenizer(self.checkpoint.path)
        self.eos_token_ids = eos_token_ids(self.checkpoint.path, hf_config, self.tokenizer)
        self.generation_defaults = generation_defaults(self.checkpoint.path)
        # Every thread that encodes or decodes with the tokenizer holds this lock (the server's handler threads
        # and the engine thread, which decodes to find stop strings).
        self.tokenizer_lock = threading.Lock()
        self.locked_tokenizer = (
            LockedTokenizer(self.tokenizer, self.tokenizer_lock) if self.tokenizer is not None else None
        )
        self.driver = StepDriver(self.model, self.runtime, self.device)
        self._closers: list[Callable[[], None]] = [self.driver.close]
        self.prefetcher: PredictivePrefetcher | None = None
        if self.config.policy == "predictive":
            self.prefetcher = PredictivePrefetcher(
                self.cache,
                self.transfer.prefetch,
                layers=self.checkpoint.moe_layers,
                lookahead=self.config.lookahead,
                width=self.config.prefetch_width or self.top_k,
                trial=PredictionTrial() if self.config.prediction_trial else None,
            )
            prefetcher = self.prefetcher
            # Subscribed first, so each step begins before any predictor offers, and every layer's
            # correction happens before the layer acquires its experts.
            self._closers.append(self.driver.before_forward.subscribe(
                lambda start: prefetcher.begin_step(len(start.histories) if start.n_new == 1 else 0)).close)
            self._closers.append(self.driver.after_forward.subscribe(lambda _: prefetcher.end_forward()).close)
            self._closers.append(
                self.runtime.routing.subscribe(lambda e: prefetcher.on_routing(e.plan.layer, e.plan.expert_ids)).close
            )

    def on_close(self, closer: Callable[[], None]) -> None:
        """Run `closer` when the engine closes (a pass applied to it that holds hooks or threads)."""
        self._closers.append(closer)

    def settle(self) -> None:
        """Let background reads finish and end the prefetcher's step (its counters are then final)."""
        self.transfer.drain()
        if self.prefetcher is not None:
            self.prefetcher.end_step()

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

    def new_sequence(self, prompt: str | list[int], **sampling: object) -> SequenceState:
        """Validate a request and turn it into a sequence ready for `DecodeBatch.prefill`.

        `sampling`: the fields of `SamplingParams`; those not given (or None) take the model's
        generation_config.json defaults, else the neutral values (greedy, no truncation, no penalty).
        """
        params = SamplingParams(**sampling).resolve(self.generation_defaults)  # type: ignore[arg-type]
        if params.stop and self.tokenizer is None:
            raise RequestError(
                f"stop strings need text, but {self.checkpoint.path} has no tokenizer; add tokenizer files or drop stop"
            )
        prompt_ids = self.encode(prompt)
        self._check_length(len(prompt_ids), params.max_new_tokens)
        return SequenceState(prompt_ids=prompt_ids, params=params)

    def new_batch(self) -> DecodeBatch:
        return DecodeBatch(self.driver, self.eos_token_ids, self.locked_tokenizer)

    @overload
    def generate(
        self, prompt: str | list[int], *, stream: Literal[False] = False, **sampling: object
    ) -> GenerationResult: ...

    @overload
    def generate(self, prompt: str | list[int], *, stream: Literal[True], **sampling: object) -> Stream: ...

    def generate(
        self, prompt: str | list[int], *, stream: bool = False, **sampling: object
    ) -> GenerationResult | Stream:
        """Generate for one prompt. `sampling`: the fields of `SamplingParams` (max_new_tokens, temperature
        (0 = greedy), top_p, top_k, min_p, repetition_penalty, stop, logprobs, seed). With `stream=True`, the
        same as `stream(prompt, **sampling)`."""
        if stream:
            return self.stream(prompt, **sampling)
        for _ in (run := self.stream(prompt, **sampling)):
            pass
        return run.result

    def stream(self, prompt: str | list[int], **sampling: object) -> Stream:
        """Generate for one prompt, giving out the text as it grows: iterate for the text increments (they add
        up to `result.text`); `result` is the whole `GenerationResult` once the iteration ends."""
        return Stream(self, self.new_sequence(prompt, **sampling))

    def result(self, seq: SequenceState) -> GenerationResult:
        """`seq`'s output; raises what made it fail, if it failed (`SequenceState.fail`)."""
        if seq.error is not None:
            raise seq.error
        text = None
        if self.locked_tokenizer is not None:
            text = cut_text(self.locked_tokenizer.decode(seq.generated, skip_special_tokens=True), seq.params.stop)
        assert seq.t_first_token is not None and seq.t_done is not None
        return GenerationResult(
            text=text,
            token_ids=list(seq.generated),
            prompt_token_ids=seq.prompt_ids,
            finish_reason=seq.finish_reason or "length",
            prefill_s=seq.t_first_token - seq.t_submit,
            elapsed_s=seq.t_done - seq.t_submit,
            logprobs=None if seq.logprobs is None else list(seq.logprobs),
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
        for closer in reversed(self._closers):
            closer()
        self._closers.clear()
        self.transfer.close()
        self.cache.close()
        self.cache.store.close()
        if self._unpin is not None:
            self._unpin()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Stream:
    """One prompt's generation, run as it is iterated: each item is the text that the newest tokens completed
    (an empty increment is skipped; stop strings never appear). After the last item `result` holds the whole
    `GenerationResult`, whose text is the increments joined. Without a tokenizer there is no text: the
    iteration yields nothing and `result.token_ids` has the tokens."""

    def __init__(self, engine: Engine, seq: SequenceState) -> None:
        self._engine = engine
        self.seq = seq
        self._result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        assert self._result is None and self.seq.t_first_token is None, "a Stream runs once"
        seq = self.seq
        text = TextStream(self._engine.locked_tokenizer, seq.params.stop)
        batch = self._engine.new_batch()
        with torch.inference_mode():
            batch.prefill(seq)
        sent = 0
        while True:
            delta = text.push(seq.generated[sent:])
            sent = len(seq.generated)
            if delta:
                yield delta
            if seq.done:
                break
            with torch.inference_mode():
                if not batch.members:
                    batch.add(seq)
                batch.step()
        if tail := text.flush():
            yield tail
        self._result = self._engine.result(seq)

    @property
    def result(self) -> GenerationResult:
        if self._result is None:
            raise RuntimeError("the stream has not finished: iterate it to the end first")
        return self._result
