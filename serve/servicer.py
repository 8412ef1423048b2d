"""The gRPC servicer: protobuf in, dataclasses to the engine worker, protobuf out. Nothing else."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from google.protobuf import unknown_fields
from google.protobuf.message import Message

from moeflow.errors import RequestError

from .errors import CapacityError, DrainingError, EngineDead, EngineFailure
from .handle import Chunk, RequestHandle
from .intake import GenerateRequest
from .proto import moeflow_pb2, moeflow_pb2_grpc
from .stats import ServeStats
from .worker import EngineWorker

_WIRE_TYPES = {0: "varint", 1: "64-bit", 2: "length-delimited", 5: "32-bit"}


class MoeflowServicer(moeflow_pb2_grpc.MoeflowServicer):
    def __init__(self, worker: EngineWorker) -> None:
        self._worker = worker

    def Generate(self, request: Message, context: grpc.ServicerContext) -> Iterator[Message]:
        handle = self._submit(request, context)
        try:
            for chunk in handle.chunks():
                yield response_from_chunk(chunk)
        except (DrainingError, EngineDead) as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except EngineFailure as e:
            context.abort(grpc.StatusCode.INTERNAL, str(e))

    def GenerateUnary(self, request: Message, context: grpc.ServicerContext) -> Message:
        handle = self._submit(request, context)
        try:
            return response_from_chunk(handle.result())
        except (DrainingError, EngineDead) as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except EngineFailure as e:
            context.abort(grpc.StatusCode.INTERNAL, str(e))

    def GetStats(self, request: Message, context: grpc.ServicerContext) -> Message:
        try:
            return stats_response(self._worker.stats())
        except EngineDead as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

    def _submit(self, request: Message, context: grpc.ServicerContext) -> RequestHandle:
        unknown = unknown_fields.UnknownFieldSet(request)
        if len(unknown):
            names = ", ".join(f"#{f.field_number} ({_WIRE_TYPES.get(f.wire_type, f.wire_type)})" for f in unknown)
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"GenerateRequest has field(s) this server does not know: {names}; the fields of moeflow.v1 are "
                "prompt=1, max_new_tokens=2, temperature=3, top_p=4, seed=5 (regenerate the client from moeflow.proto)",
            )
        try:
            handle = self._worker.submit(request_from_proto(request))
        except RequestError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except CapacityError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except (DrainingError, EngineDead) as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        # The callback runs when the RPC ends: done, cancelled or past its deadline. False: it already ended.
        if not context.add_callback(handle.cancel):
            handle.cancel()
        return handle


def request_from_proto(msg: Message) -> GenerateRequest:
    return GenerateRequest(
        prompt=msg.prompt,
        max_new_tokens=msg.max_new_tokens if msg.HasField("max_new_tokens") else None,
        temperature=msg.temperature,
        top_p=msg.top_p if msg.HasField("top_p") else None,
        seed=msg.seed if msg.HasField("seed") else None,
    )


def response_from_chunk(chunk: Chunk) -> Message:
    msg = moeflow_pb2.GenerateResponse(text=chunk.text, token_ids=chunk.token_ids, finish_reason=chunk.finish_reason)
    if chunk.finish_reason:
        msg.usage.prompt_tokens = chunk.prompt_tokens
        msg.usage.completion_tokens = chunk.completion_tokens
        msg.time_to_first_token_s = chunk.time_to_first_token_s
        msg.elapsed_s = chunk.elapsed_s
    return msg


def stats_response(stats: ServeStats) -> Message:
    cache = stats.cache
    return moeflow_pb2.StatsResponse(
        cache_hit_rate=cache.hit_rate,
        layers=[
            moeflow_pb2.LayerCacheStats(
                layer=s.layer,
                hits=s.hits,
                misses=s.misses,
                hit_rate=s.hits / (s.hits + s.misses) if s.hits + s.misses else 0.0,
                prefetch_hits=s.prefetch_hits,
                wasted_prefetches=s.wasted_prefetches,
            )
            for s in cache.per_layer
        ],
        prefetch_accuracy=stats.prefetch_accuracy,
        queue_depth=stats.queue_depth,
        running=stats.running,
        pooled=stats.pooled,
        max_batch_size=stats.max_batch_size,
        max_queue=stats.max_queue,
        mean_batch_size=stats.mean_batch_size,
        batch_size_steps=stats.batch_size_steps,
        mean_distinct_experts=stats.mean_distinct_experts,
        tokens_per_s=stats.tokens_per_s,
        generated_tokens=stats.generated_tokens,
        steps=stats.steps,
        requests_completed=stats.requests_completed,
        requests_cancelled=stats.requests_cancelled,
        requests_failed=stats.requests_failed,
        requests_rejected=stats.requests_rejected,
        uptime_s=stats.uptime_s,
        busy_s=stats.busy_s,
        bytes_read=cache.bytes_read,
        stall_s=cache.stall_s,
        expert_budget_bytes=cache.budget_bytes,
        admission=stats.admission,
        model=stats.model,
        draining=stats.draining,
    )
