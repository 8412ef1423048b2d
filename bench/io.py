"""Achieved read bandwidth of the engine's expert store against raw O_DIRECT reads of the same bytes.

The I/O-bound model (`moeflow.tools.widen`: the shipped model with every expert widened to ~18 MiB,
built once under /tmp) is read one expert per request with 1..N requests in flight:

- ``raw``: N threads `os.preadv` each expert's byte range (rounded out to 4 KiB) with O_DIRECT into
  page-aligned buffers, and nothing else: what the disk gives this file at that concurrency;
- ``store``: the engine's path, `ExpertCache.read_slot` -> `DiskStore.read_into` (O_DIRECT into the
  thread's bounce buffer, then one memmove per projection into the slot) on a `ReaderPool` of N
  threads, N slots of the engine's `SlotPool`.

Both read the same experts in the same order; the page cache is dropped before every measurement
(root), rounds interleave the contenders, the best round is kept and every round is in the JSON
(with the CPU seconds the process spent, the cost of the copy). Writes ``io.json`` and ``io.png``.

    flock /tmp/moeflow-bench.lock .venv/bin/python bench/io.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import queue
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from harness import drop_caches, machine  # noqa: E402

import moeflow  # noqa: E402
from moeflow.model.checkpoint import open_checkpoint  # noqa: E402
from moeflow.offload.cache import ExpertCache, SlotPool  # noqa: E402
from moeflow.offload.policy import LRUPolicy  # noqa: E402
from moeflow.offload.store import DiskStore  # noqa: E402

ALIGN = 4096
GIB = 1 << 30


def wide_model(path: Path, intermediate_size: int) -> Path:
    if not (path / "config.json").is_file():
        from moeflow.tools.widen import widen_experts

        widen_experts(moeflow.DEFAULT_MODEL, path, intermediate_size)
    return path


def expert_ranges(ckpt) -> list[tuple[object, Path, int, int, int]]:
    """(key, file, aligned start, aligned end, end) of every expert, in file order."""
    rows = []
    for key, loc in ckpt.experts.items():
        files = {s.file for s in loc.spans}
        assert len(files) == 1, "one shard per expert in the widened model"
        start = min(s.offset for s in loc.spans)
        end = max(s.offset + s.nbytes for s in loc.spans)
        rows.append((key, files.pop(), start - start % ALIGN, -(-end // ALIGN) * ALIGN, end))
    return sorted(rows, key=lambda r: (str(r[1]), r[2]))


def run_raw(ranges: list, inflight: int) -> tuple[int, float]:
    """`inflight` threads, each taking the next expert range and reading it with O_DIRECT; (bytes, seconds)."""
    fds = {f: os.open(f, os.O_RDONLY | os.O_DIRECT) for f in {r[1] for r in ranges}}
    size = max(r[3] - r[2] for r in ranges)
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for r in ranges:
        todo.put(r)
    total = [0] * inflight

    def worker(i: int) -> None:
        buf = mmap.mmap(-1, size)
        view = memoryview(buf)
        while True:
            try:
                _, f, start, a_end, end = todo.get_nowait()
            except queue.Empty:
                break
            done = 0
            while start + done < end:  # as DiskStore: aligned requests, until the expert's last byte is in
                n = os.preadv(fds[f], [view[done : a_end - start]], start + done)
                if n == 0:
                    raise OSError(f"{f} ended at byte {start + done}")
                done += n
            total[i] += done
        view.release()
        buf.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(inflight)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    return sum(total), elapsed


def run_store(ckpt, keys: list, inflight: int) -> tuple[int, float]:
    """The engine's read path on a reader pool of `inflight` threads, one slot per read in flight."""
    loc = ckpt.experts[keys[0]]
    pool = SlotPool(capacity=inflight, inter=loc.inter, hidden=loc.hidden, dtype=loc.dtype, device=torch.device("cpu"))
    pool.gate_up_S2ID.fill_(0)  # touch the pages, as a running engine's pool is
    pool.down_SDI.fill_(0)
    store = DiskStore(ckpt, direct_io=True)
    cache = ExpertCache(pool=pool, store=store, policy=LRUPolicy(), layers=sorted({k[0] for k in keys}),
                        budget_bytes=pool.nbytes, readers=inflight)  # fmt: skip
    free: queue.SimpleQueue = queue.SimpleQueue()
    for s in range(inflight):
        free.put(s)

    def read(key) -> int:
        s = free.get()
        try:
            return cache.read_slot(key, s)[0]
        finally:
            free.put(s)

    t0 = time.perf_counter()
    jobs = [cache.readers.submit(lambda key=key: read(key)) for key in keys]
    cache.readers.wait(jobs)
    elapsed = time.perf_counter() - t0
    errors = [j.error for j in jobs if j.error is not None]
    cache.close()
    store.close()
    if errors:
        raise errors[0]
    return sum(j.result for j in jobs), elapsed


def measure(kind: str, ckpt, ranges: list, inflight: int) -> dict:
    cold = drop_caches()
    cpu0 = time.process_time()
    if kind == "raw":
        nbytes, elapsed = run_raw(ranges, inflight)
    else:
        nbytes, elapsed = run_store(ckpt, [r[0] for r in ranges], inflight)
    cpu_s = time.process_time() - cpu0
    return {"kind": kind, "inflight": inflight, "bytes": nbytes, "elapsed_s": elapsed,
            "gib_per_s": nbytes / elapsed / GIB, "cpu_s": cpu_s, "page_cache_dropped": cold}  # fmt: skip


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for kind, style in (("raw", "o--"), ("store", "s-")):
        rows = [r for r in result["best"] if r["kind"] == kind]
        ax.plot([r["inflight"] for r in rows], [r["gib_per_s"] for r in rows], style,
                label="raw O_DIRECT preadv" if kind == "raw" else "engine store (DiskStore + reader pool)")  # fmt: skip
    for r in result["best"]:
        if r["kind"] == "store":
            ax.annotate(f"{r['vs_raw']:.2f}x", (r["inflight"], r["gib_per_s"]), textcoords="offset points",
                        xytext=(0, -14), ha="center", fontsize=8)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"reads in flight (1 expert of {result['expert_bytes'] / (1 << 20):.1f} MiB per read)")
    ax.set_ylabel(f"GiB/s, page cache dropped (best of {result['rounds']} rounds)")
    ax.set_title(f"Expert reads: engine store vs raw O_DIRECT\n{result['machine']['cpu']}, "
                 f"{result['machine']['cores']} cores, {result['machine']['date']}", fontsize=10)  # fmt: skip
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("/tmp/moeflow-wide8192"), help="built here if missing")
    parser.add_argument("--intermediate-size", type=int, default=8192)
    parser.add_argument("--inflight", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    ckpt = open_checkpoint(wide_model(args.model, args.intermediate_size))
    ranges = expert_ranges(ckpt)
    rows = []
    for rnd in range(args.rounds):
        for inflight in args.inflight:
            for kind in ("raw", "store") if rnd % 2 == 0 else ("store", "raw"):
                row = measure(kind, ckpt, ranges, inflight) | {"round": rnd}
                rows.append(row)
                print(f"[round {rnd}] {kind:>5} x{inflight:<2}: {row['gib_per_s']:5.2f} GiB/s  "
                      f"cpu {row['cpu_s']:.2f} s", file=sys.stderr)  # fmt: skip
    best = []
    for inflight in args.inflight:
        pair = {}
        for kind in ("raw", "store"):
            mine = [r for r in rows if r["kind"] == kind and r["inflight"] == inflight]
            pair[kind] = max(mine, key=lambda r: r["gib_per_s"])
        pair["store"] = dict(pair["store"], vs_raw=pair["store"]["gib_per_s"] / pair["raw"]["gib_per_s"])
        best += [pair["raw"], pair["store"]]
    result = {
        "machine": machine(),
        "model": str(args.model),
        "experts": len(ranges),
        "expert_bytes": ranges[0][3] - ranges[0][2],
        "bytes_per_measurement": sum(r[3] - r[2] for r in ranges),
        "rounds": args.rounds,
        "best": best,
        "rounds_all": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "io.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "io.png")
    for r in best:
        extra = f"  {r['vs_raw']:.2f}x raw" if r["kind"] == "store" else ""
        print(f"{r['kind']:>5} x{r['inflight']:<2} {r['gib_per_s']:5.2f} GiB/s{extra}")


if __name__ == "__main__":
    main()
