"""Run a function on R local gloo ranks (spawned processes), for tests and CPU experiments.

Each rank: one intra-op thread, gloo over loopback, a file store in a fresh temporary folder
(no port to pick, so no port race). Results come back pickled through `torch.save`; an exception
in any rank, or the timeout, stops every rank and raises here. No process outlives the call.
"""

from __future__ import annotations

import io
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(
    fn: Callable[[int, int, Any], Any], rank: int, world_size: int, store_path: str, args: Any, results: Any
) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # What torchrun sets; DeepSpeed's engine insists on LOCAL_RANK.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
        value = fn(rank, world_size, args)
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
        dist.destroy_process_group()
    except BaseException:  # every failure must reach the parent before the rank exits
        results.put((rank, False, traceback.format_exc()))


def _check_alive(processes: list[Any], values: dict[int, Any], deadline: float, timeout_s: float) -> None:
    missing = [rank for rank in range(len(processes)) if rank not in values]
    if time.monotonic() > deadline:
        raise TimeoutError(f"ranks {missing} did not finish in {timeout_s:.0f} s")
    dead = [rank for rank in missing if processes[rank].exitcode is not None]
    if dead:
        time.sleep(1.0)  # a result put just before exiting may still be in flight
        if all(processes[rank].exitcode is not None for rank in dead):
            codes = {rank: processes[rank].exitcode for rank in dead}
            raise RuntimeError(f"ranks exited without a result (exit codes {codes})")


def run_ranks(
    fn: Callable[[int, int, Any], Any], world_size: int, *, args: Any = None, timeout_s: float = 120.0
) -> list[Any]:
    """fn(rank, world_size, args) on each rank, torch.distributed already initialised; returns
    the per-rank return values in rank order. `fn` must be importable (module level)."""
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory(prefix="moeflow-ranks-") as folder:
        store_path = os.path.join(folder, "store")
        processes = [
            context.Process(target=_rank_main, args=(fn, rank, world_size, store_path, args, results), daemon=True)
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        values: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        try:
            while len(values) < world_size:
                try:
                    rank, ok, payload = results.get(timeout=0.5)
                except queue.Empty:
                    _check_alive(processes, values, deadline, timeout_s)
                    continue
                if not ok:
                    raise RuntimeError(f"rank {rank} failed:\n{payload}")
                values[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        finally:
            for process in processes:
                process.join(timeout=5 if len(values) == world_size else 0.1)
            for process in processes:
                if process.is_alive():
                    process.kill()
                    process.join(timeout=5)
    return [values[rank] for rank in range(world_size)]
