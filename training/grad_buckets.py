"""Gradient averaging of the replicated (non-expert) parameters, overlapped with the backward.

Parameters are packed into buckets of about `bucket_bytes` in reverse registration order (the order
the backward produces their gradients). When the last gradient of a bucket is accumulated, the bucket
is flattened and its all-reduce starts asynchronously; the backward carries on meanwhile. Buckets
are launched strictly in order so every rank issues the same collectives in the same order.
`finish()` waits, writes the averages back into `.grad` and scales the expert gradients.

Semantics: each rank's loss is its own batch's mean; the step optimises the mean over ranks. So
replicated gradients are averaged, and expert gradients (each expert lives on one rank and already
received every rank's contribution through the all-to-all) are divided by the world size.
One backward per step (no gradient accumulation across micro-batches).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True, kw_only=True)
class BucketConfig:
    bucket_bytes: int = 8 * 2**20
    overlap: bool = True  # False: one all-reduce per bucket after the backward (the baseline)


class _Bucket:
    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.pending = len(params)
        self.flat: Tensor | None = None
        self.work: dist.Work | None = None


class GradBucketReducer:
    def __init__(
        self,
        replicated_params: Iterable[nn.Parameter],
        *,
        group: dist.ProcessGroup | None,
        expert_params: Iterable[nn.Parameter] = (),
        config: BucketConfig = BucketConfig(),
    ) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group) if group is not None else 1
        self.config = config
        self.expert_params = [p for p in expert_params if p.requires_grad]
        params = [p for p in replicated_params if p.requires_grad]
        self.buckets: list[_Bucket] = []
        current: list[nn.Parameter] = []
        size = 0
        for param in reversed(params):
            current.append(param)
            size += param.numel() * param.element_size()
            if size >= config.bucket_bytes:
                self.buckets.append(_Bucket(current))
                current, size = [], 0
        if current:
            self.buckets.append(_Bucket(current))
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._next_launch = 0
        self._hooks = []
        if config.overlap and self.world_size > 1:
            self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    @property
    def num_buckets(self) -> int:
        return len(self.buckets)

    @property
    def launched_buckets(self) -> int:
        """Buckets whose all-reduce the backward has already started (reset by `finish()`)."""
        return self._next_launch

    def _on_grad(self, param: nn.Parameter) -> None:
        bucket = self._bucket_of[id(param)]
        bucket.pending -= 1
        while self._next_launch < len(self.buckets) and self.buckets[self._next_launch].pending == 0:
            self._launch(self.buckets[self._next_launch], async_op=True)
            self._next_launch += 1

    def _launch(self, bucket: _Bucket, *, async_op: bool) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
        bucket.flat = torch.cat([g.reshape(-1) for g in grads])
        bucket.work = dist.all_reduce(bucket.flat, group=self.group, async_op=async_op)

    def finish(self) -> None:
        """Call after `backward()` and before `optimizer.step()`."""
        if self.world_size > 1:
            for bucket in self.buckets[self._next_launch :]:  # unused parameters, or overlap off
                self._launch(bucket, async_op=True)
            for bucket in self.buckets:
                assert bucket.flat is not None and bucket.work is not None
                bucket.work.wait()
                offset = 0
                for param in bucket.params:
                    flat = bucket.flat[offset : offset + param.numel()].view_as(param)
                    if param.grad is None:
                        param.grad = flat.div_(self.world_size).clone()
                    else:
                        param.grad.copy_(flat).div_(self.world_size)
                    offset += param.numel()
                bucket.flat, bucket.work, bucket.pending = None, None, len(bucket.params)
            for param in self.expert_params:
                if param.grad is not None:
                    param.grad.div_(self.world_size)
        self._next_launch = 0

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
