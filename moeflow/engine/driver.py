"""The step driver: the one place the model runs a forward.

Every path that runs the model — generation of one or many sequences, the server, trace recording
and live profiling — calls `StepDriver.forward`. Before the forward it tells its listeners what is
about to be computed (each row's tokens so far: the predictive prefetcher starts its step, context
predictors predict); during the forward it records every MoE layer's routing; it returns the last
position's logits with that record. Threads sharing an engine take turns, one forward at a time.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn
from transformers import Cache, DynamicCache

from moeflow.events import Listeners
from moeflow.offload.layer import OffloadRuntime
from moeflow.offload.plans import RoutingEvent


@dataclass(frozen=True, kw_only=True, slots=True)
class ForwardStart:
    """What a forward is about to compute: each row's tokens so far, the last `n_new` of which are new."""

    histories: Sequence[Sequence[int]]
    n_new: int


@dataclass(frozen=True, kw_only=True)
class ForwardResult:
    logits_BV: torch.Tensor  # float32 logits of each row's last position
    routing: tuple[RoutingEvent, ...]  # every MoE layer's routing, in the order the layers ran
    cache: Cache | None = None  # the cache the forward extended (or the one the model made itself)


F = TypeVar("F", bound=Callable[..., object])


def _one_at_a_time(method: F) -> F:
    """Hold the driver's lock for the whole call: threads sharing an engine take turns, forward by forward."""

    @functools.wraps(method)
    def serialized(self: StepDriver, *args: object, **kwargs: object) -> object:
        with self._lock:
            return method(self, *args, **kwargs)

    return serialized  # type: ignore[return-value]


class StepDriver:
    def __init__(self, model: nn.Module, runtime: OffloadRuntime, device: torch.device) -> None:
        # Forwards are serialized: the expert cache pins a layer's experts while it computes, and two forwards
        # pinning at once could each hold slots the other waits for (four threads deadlocked in
        # ExpertCache._take_slot_locked); the routing record and the prefetcher's step are one forward's too.
        self._lock = threading.RLock()
        self.model = model
        self.device = device
        self.before_forward: Listeners[ForwardStart] = Listeners()
        self.after_forward: Listeners[ForwardStart] = Listeners()  # the same event, once the forward returned
        self._routing: list[RoutingEvent] | None = None
        self._subscription = runtime.routing.subscribe(self._record)

    def _record(self, event: RoutingEvent) -> None:
        if self._routing is not None:
            self._routing.append(event)

    def new_cache(self) -> Cache | None:
        """An empty cache as transformers' `generate` makes one: a DynamicCache of the model's layer types
        (linear-attention and SSM layers included), or None where the model makes its own (MiniMax)."""
        if not self.model._supports_default_dynamic_cache():
            return None
        return DynamicCache(config=self.model.config.get_text_config(decoder=True))

    @_one_at_a_time
    @torch.inference_mode()
    def forward(
        self,
        input_ids_BT: torch.Tensor,
        *,
        histories: Sequence[Sequence[int]],
        n_new: int,
        kv: Cache | None = None,
        use_cache: bool | None = None,
        attention_mask_BQ: torch.Tensor | None = None,
        position_ids_BT: torch.Tensor | None = None,
    ) -> ForwardResult:
        """Run the model on `input_ids_BT` (with `kv`, the cache it extends; `use_cache` defaults to whether
        `kv` is given, and with no `kv` the model makes its own, returned in the result)."""
        start = ForwardStart(histories=histories, n_new=n_new)
        self.before_forward.publish(start)
        self._routing = []
        try:
            out = self.model(
                input_ids=input_ids_BT.to(self.device),
                cache=kv,
                use_cache=kv is not None if use_cache is None else use_cache,
                attention_mask=attention_mask_BQ,
                position_ids=position_ids_BT,
                logits_to_keep=1,
            )
            routing = tuple(self._routing)
        finally:
            self._routing = None
        self.after_forward.publish(start)
        cache = getattr(out, "cache", None)
        return ForwardResult(logits_BV=out.logits[:, -1, :].float(), routing=routing, cache=cache)

    def close(self) -> None:
        self._subscription.close()
