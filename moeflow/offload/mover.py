"""The reader process: expert reads that never take the compute thread's GIL.

Reader threads share the compute process's GIL. Each `preadv` and each copy of a read releases it and
must take it back, and every such hand-over while the compute thread runs Python (a small model's
forward is mostly Python between small torch ops, each of which releases the GIL too) delays one of
the two. Measured ad hoc on the 2-core AMD EPYC VM (2026-12-04, /tmp script): the shipped model
decoding with every expert resident ran 1.86-2.11 ms a token alone; with a thread of the same process
reading a 0.44 MiB block with O_DIRECT and copying it in three pieces every 0.7 ms, 2.28-3.15 ms; with
that thread only handing each read to another process and waiting for its answer, 2.62-4.68 ms; with
the other process reading on its own, 1.73-2.15 ms. So no thread of the compute process may wait on
reads: this process does them all (`threads` threads of its own, several reads in flight) into the
slot pool, which both processes map (`SharedRegion`: memfd-backed), and the compute thread sends the
requests and collects the answers itself, when it has a moment (`moeflow.offload.readers.ProcessReaderPool`).

A request is one expert's read as byte moves worked out by the store (`DiskStore.moves`): runs of a
file, each either read straight into a slot (on whole blocks) or through this process's own buffer and
then copied piece by piece; its NaN/Inf check, on the first read of an expert, is done here too. The
answer says how many bytes were read, or the error (errno and message), and whether O_DIRECT was
refused (this process then reads buffered, dropping each read from the page cache, as `DiskStore` does).
A request may ask for an early answer too, once its first runs are in (a large expert's gate/up matrices: the
layer waiting for it computes their half while the rest is read, `ExpertCache.early_gate_up`).

Decoding the shipped model at 25% from disk (8 held-out prompts x 64 tokens, 3 interleaved rounds, ms a
token, 2-core AMD EPYC VM, 2026-12-04, ad hoc): LRU 3.16-4.02 against 3.99-4.63 with reader threads; path
prediction (always predicting) 3.68-4.17 against 3.91-4.11. `bench/expertflow.py` runs it beside its
"(reader threads)" contenders (there LRU and auto gained 1.16x, median per-round ratio). It is the engine's
default where the slots are host memory and the store reads from disk as stored (`EngineConfig.read_process`;
`--no-read-process`: reader threads).

This file is also the reader process's program (`python mover.py SPEC`): stdlib and numpy only, so
that it starts in a fraction of a second; it exits when the request pipe closes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import mmap
import os
import select
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

_ALIGN = 4096  # as moeflow.offload.store: O_DIRECT's offset, length and address granularity
_LENGTH = struct.Struct("<I")
_REQUEST = struct.Struct("<QBBHH")  # job id, check NaN/Inf, urgent, runs, runs before an early reply (0: none)
_RUN = struct.Struct("<HQQBH")  # file, start, end, direct, pieces
_PIECE = struct.Struct("<HQQQB")  # region, offset of the piece in it, file offset, bytes, dtype (`DTYPES`)
# job id, bytes read, errno (0: read), not finite, fell back, early (more runs to come), the process's reading seconds
# so far, message length
_REPLY = struct.Struct("<QQiBBBdH")
_READY = (1 << 64) - 1  # the job id of the reply that says the process is up (no request's)
DTYPES = ("", "float32", "float16", "bfloat16", "float64")  # what the NaN/Inf check knows; "" (0): not checked
_BF16_EXPONENT = 0x7F80
# How long the compute thread polls for a reply before it sleeps: it has nothing else to do, and a reply to a process
# that sleeps costs the writer a wake-up (on the 2-core VM ~50-150 us). The reader process does not poll for
# requests: polling there took a core from its own reads (path prediction, shipped model at 25%, 3 interleaved
# rounds: 4.27-4.70 ms a token polling 2 ms after each read, 3.68-4.17 not polling, 3.91-4.11 reader threads).
SPIN_S = 0.002
# A read ahead is read this many bytes at a time, so that an urgent read waits at most for one such piece (`_Schedule`):
# ~1 ms at the 2-core VM's ~2 GiB/s. Reading an 18 MiB expert in pieces of 2 MiB took 12.5 ms against 12.4 whole
# (O_DIRECT, 4 rounds each, ad hoc, 2026-12-04); in pieces of 1 MiB 13.0.
CHUNK = 2 << 20


class SharedRegion(NamedTuple):
    """Memory both processes map: a memfd, and where it is mapped in this process."""

    fd: int
    address: int
    nbytes: int


class Piece(NamedTuple):
    """A stored tensor's bytes [offset, offset + nbytes) of a run's file, copied to `address` of this process."""

    address: int
    offset: int
    nbytes: int
    dtype: str  # one of DTYPES: checked for NaN/Inf when the request asks


class Run(NamedTuple):
    """Bytes [start, end) of `file`, holding `pieces`; `direct`: they lie back to back in the file and in memory,
    on whole blocks, and the read lands in place."""

    file: Path
    start: int
    end: int
    direct: bool
    pieces: tuple[Piece, ...]


READ_LOG_ENV = "MOEFLOW_READ_LOG"


class BusyClock:
    """Seconds during which at least one read was in progress (the union of the reads' intervals: two reads at once
    count once), for any number of threads: each read runs inside `with clock:`.

    A diagnostic: with `log` (by default the file named by the environment's MOEFLOW_READ_LOG, which the reader
    process inherits), each busy interval is appended to it as a line "start end" in `clock`'s seconds
    (`time.perf_counter`, one clock for every process of the machine): bench/link_timeline.py sets it to see where
    the link idles."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter, log: str | None = None) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._reads = 0
        self._since = 0.0
        self._total = 0.0
        self._log = log if log is not None else os.environ.get(READ_LOG_ENV) or None

    def __enter__(self) -> None:
        with self._lock:
            if self._reads == 0:
                self._since = self._clock()
            self._reads += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._reads -= 1
            if self._reads == 0:
                now = self._clock()
                self._total += now - self._since
                if self._log is not None:
                    with open(self._log, "a", encoding="utf-8") as f:
                        f.write(f"{self._since!r} {now!r}\n")

    def seconds(self) -> float:
        with self._lock:
            return self._total + (self._clock() - self._since if self._reads else 0.0)


class Request(NamedTuple):
    """One expert's read for the reader process: its runs, whether to check them for NaN/Inf, whether it is urgent (a
    demand read), and `early`: the number of leading runs after which the process replies early (`Reply.early`),
    while it reads the rest (0: one reply, at the end)."""

    job: int
    runs: Sequence[Run]
    check: bool
    urgent: bool
    early: int = 0


class Reply(NamedTuple):
    job: int
    nbytes: int
    errno: int  # 0: read
    not_finite: bool
    fell_back: bool  # O_DIRECT was refused: reads are buffered from now on
    message: str
    early: bool = False  # the request's first `Request.early` runs are in, the rest still being read; another follows

    def error(self) -> OSError | None:
        return OSError(self.errno, self.message) if self.errno else None


class ReaderProcess:
    """The parent's end: spawns the process, sends requests, collects replies (never from two threads at once)."""

    def __init__(
        self,
        files: Sequence[Path],
        regions: Sequence[SharedRegion],
        *,
        threads: int,
        direct_io: bool,
        buffer_bytes: int = 0,
        chunk_bytes: int = CHUNK,
        cpus: Sequence[int] | None = None,
    ) -> None:
        """`threads` reads of each kind at once (urgent, ahead: `_Schedule`); `buffer_bytes`: each thread's read
        buffer, mapped and faulted as the process starts (`DiskStore.reserve_buffers`' note; 0: reads land in place,
        or a buffer is mapped when needed); `chunk_bytes`: the pieces a read ahead is read in (`CHUNK`); `cpus`: the
        cores the process runs on (None: the parent's)."""
        if chunk_bytes <= 0 or chunk_bytes % _ALIGN:
            raise ValueError(f"chunk_bytes must be a positive multiple of {_ALIGN}, got {chunk_bytes}")
        self.threads = max(1, threads)
        self.files = list(files)
        self._file_index = {f: i for i, f in enumerate(self.files)}
        self.regions = list(regions)
        req_r, self._req = os.pipe()
        self._rep, rep_w = os.pipe()
        spec = {"requests": req_r, "replies": rep_w, "threads": self.threads, "direct_io": direct_io,
                "buffer": buffer_bytes, "chunk": chunk_bytes, "files": [str(f) for f in self.files],
                "regions": [[r.fd, r.nbytes] for r in self.regions]}  # fmt: skip
        try:
            self._proc = subprocess.Popen(
                [sys.executable, __file__, json.dumps(spec)],
                pass_fds=(req_r, rep_w, *(r.fd for r in self.regions)),
                stdin=subprocess.DEVNULL,
                # numpy's BLAS is never used there: no thread pool of its own to start (half the start's CPU)
                env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
            )
        finally:
            os.close(req_r)
            os.close(rep_w)
        if cpus is not None:  # while the interpreter starts, before it has a thread but this one (they inherit it)
            with contextlib.suppress(OSError):  # a core taken away meanwhile: the process runs where it may
                os.sched_setaffinity(self._proc.pid, cpus)
        os.set_blocking(self._rep, False)
        self._pending = bytearray()
        self.ready = False  # the process has said it is up (`wait_ready`); nothing is sent before
        self.reading_s = 0.0  # the process's seconds with a read in progress, as of its latest reply (`BusyClock`)
        # An engine dropped without `close`: the process still stops, and the pipes close, when this is collected.
        self._stop = weakref.finalize(self, _stop, self._proc, self._req, self._rep)
        _LIVE.add(self)

    def own_peak_bytes(self) -> int:
        """The process's peak resident set less the shared memory it maps (the slot pool, counted where it was
        made): its interpreter, numpy and read buffers. 0 where /proc cannot tell."""
        fields = {}
        try:
            for line in Path(f"/proc/{self._proc.pid}/status").read_text().splitlines():
                name, _, value = line.partition(":")
                if name in ("VmHWM", "RssShmem"):
                    fields[name] = int(value.split()[0]) * 1024
        except (OSError, ValueError):
            return 0
        return max(fields.get("VmHWM", 0) - fields.get("RssShmem", 0), 0)

    def send(self, requests: Sequence[Request | tuple]) -> None:
        """Send requests (`Request`s, or tuples of its fields) in one write: waking the process is most of a send's
        cost (~76 us a write on the 2-core VM, measured with cProfile in a decode). Urgent ones (demand reads) go
        before the others, which wait while one is in progress (`_Schedule`)."""
        out = []
        for request in requests:
            job, runs, check, urgent, early = Request(*request)
            if not 0 <= early < max(len(runs), 1):
                raise ValueError(f"an early reply after {early} of {len(runs)} runs: it must come before the last")
            parts = [_REQUEST.pack(job, check, urgent, len(runs), early)]
            for run in runs:
                parts.append(_RUN.pack(self._file_index[run.file], run.start, run.end, run.direct, len(run.pieces)))
                for p in run.pieces:
                    region, offset = self._locate(p.address, p.nbytes)
                    parts.append(_PIECE.pack(region, offset, p.offset, p.nbytes, DTYPES.index(p.dtype)))
            body = b"".join(parts)
            out += [_LENGTH.pack(len(body)), body]
        _write_all(self._req, b"".join(out))

    def _locate(self, address: int, nbytes: int) -> tuple[int, int]:
        for i, r in enumerate(self.regions):
            if r.address <= address and address + nbytes <= r.address + r.nbytes:
                return i, address - r.address
        raise ValueError(f"{nbytes} bytes at {address:#x} lie outside the shared regions")

    def replies(self, *, block: bool) -> list[Reply]:
        """The replies that have come; with `block`, at least one: polled for up to `SPIN_S` (a reply to a thread
        that is awake wakes no one), then waited for (the GIL released)."""
        out: list[Reply] = []
        spin_until = time.perf_counter() + SPIN_S if block else 0.0
        while True:
            if block and not out and time.perf_counter() > spin_until:
                select.select([self._rep], [], [])
            data = self._read("with reads in flight")
            if data:
                out += self._parse()
            if data is None and (out or not block):
                return out
            if data is None:
                os.sched_yield()

    def wait_ready(self, *, block: bool) -> bool:
        """Whether the process is up (its files opened, the slots mapped, numpy imported): until then a request
        would wait in the pipe for as long as a Python start takes (0.07-0.1 s on the 2-core VM), so the pool reads
        urgent ones itself (`ProcessReaderPool`). With `block`, wait until it is."""
        while not self.ready:
            if block:
                select.select([self._rep], [], [])
            if self._read("as it started") is None and not block:
                return False
            assert not self._parse(), "a reply before the process was up"
        return True

    def _read(self, when: str) -> bytes | None:
        """What the reply pipe holds now, added to what is pending (None: nothing yet); the process's exit is an
        error (`when`: what it left undone)."""
        try:
            data = os.read(self._rep, 1 << 16)
        except BlockingIOError:
            return None
        if data == b"":
            code = self._proc.wait()
            raise RuntimeError(f"the expert reader process exited (code {code}) {when}")
        self._pending += data
        return data

    def _parse(self) -> list[Reply]:
        out = []
        buf = self._pending
        while len(buf) >= _REPLY.size:
            job, nbytes, err, not_finite, fell_back, early, reading_s, n = _REPLY.unpack_from(buf)
            if len(buf) < _REPLY.size + n:
                break
            message = bytes(buf[_REPLY.size : _REPLY.size + n]).decode("utf-8", "replace")
            del buf[: _REPLY.size + n]
            self.reading_s = reading_s
            if job == _READY:
                self.ready = True
                continue
            out.append(Reply(job, nbytes, err, bool(not_finite), bool(fell_back), message, bool(early)))
        return out

    def close(self) -> None:
        """Close the request pipe (the process exits once its reads in flight are done) and wait for it."""
        global _closed_peak
        if self._stop.alive:
            _closed_peak = max(_closed_peak, self.own_peak_bytes())
        self._stop()


_LIVE: weakref.WeakSet[ReaderProcess] = weakref.WeakSet()
_closed_peak = 0  # the largest `own_peak_bytes` of a reader process closed so far


def readers_peak_bytes() -> int:
    """What reader processes of this one have held of their own at most (`ReaderProcess.own_peak_bytes`): the
    live ones' together, or the most a closed one held, whichever is more (an upper bound where peaks differ in
    time)."""
    return max(sum(p.own_peak_bytes() for p in list(_LIVE) if p._stop.alive), _closed_peak)


def _stop(proc: subprocess.Popen, requests: int, replies: int) -> None:
    os.close(requests)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    os.close(replies)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# ---- the reader process -------------------------------------------------------------------------------------------


class _Reader:
    def __init__(self, spec: dict) -> None:
        self.direct = bool(spec["direct_io"]) and hasattr(os, "O_DIRECT")
        self.paths = spec["files"]
        self.fds = [self._open(p) for p in self.paths]
        # Faulted in now (MAP_POPULATE), while the engine is still loading, not on each slot's first read.
        shared = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        self.maps = [mmap.mmap(fd, nbytes, flags=shared) for fd, nbytes in spec["regions"]]
        self.bases = [ctypes.addressof(ctypes.c_char.from_buffer(m)) for m in self.maps]
        self.replies = spec["replies"]
        self.lock = threading.Lock()  # fall-back and replies
        self.fell_back = False
        self.busy = BusyClock()
        self.chunk = spec["chunk"]

    def _open(self, path: str) -> int:
        if self.direct:
            try:
                return os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._fall_back()
        return os.open(path, os.O_RDONLY)

    def _fall_back(self) -> None:
        with self.lock:
            if self.direct:
                self.direct = False
                self.fell_back = True
                old, self.fds = self.fds, [os.open(p, os.O_RDONLY) for p in self.paths]
                self._retired = old  # a read in another thread may still use one

    def pread(
        self, file: int, address: int, start: int, end: int, length: int, pause: Callable[[], None] | None = None
    ) -> int:
        """Fill `length` bytes at `address` from byte `start` of `file` until byte `end` at least is in; with `pause`
        (a read ahead), `chunk` bytes at a time, calling it before each."""
        done = 0
        view = memoryview((ctypes.c_char * length).from_address(address)).cast("B")
        while start + done < end:
            if pause is not None:
                pause()
            try:
                with self.busy:
                    n = os.preadv(
                        self.fds[file], [view[done : done + self.chunk] if pause else view[done:]], start + done
                    )
            except OSError as e:
                if e.errno != errno.EINVAL or not self.direct:
                    raise
                self._fall_back()
                continue
            if n == 0:
                raise OSError(errno.EIO, f"{self.paths[file]} ended at byte {start + done}; the shard is truncated")
            done += n
        if not self.direct:
            os.posix_fadvise(self.fds[file], start, length, os.POSIX_FADV_DONTNEED)
        return done

    def serve(
        self, job: int, check: bool, runs: list, early: int, buffer: list, pause: Callable[[], None] | None
    ) -> None:
        def reply(total: int, finite: bool, err: int, message: str, *, more: bool) -> None:
            encoded = message.encode()[:2000]
            with self.lock:
                fell_back, self.fell_back = (False, self.fell_back) if more else (self.fell_back, False)
                head = _REPLY.pack(job, total, err, not finite, fell_back, more, self.busy.seconds(), len(encoded))
                _write_all(self.replies, head + encoded)

        if early:
            total, finite, err, message = self._serve(check, runs[:early], buffer, pause)
            if err:
                reply(total, finite, err, message, more=False)
                return
            reply(total, finite, 0, "", more=True)
            rest = self._serve(check, runs[early:], buffer, pause)
            reply(total + rest[0], finite and rest[1], *rest[2:], more=False)
            return
        reply(*self._serve(check, runs, buffer, pause), more=False)

    def _serve(
        self, check: bool, runs: list, buffer: list, pause: Callable[[], None] | None
    ) -> tuple[int, bool, int, str]:
        """Do runs of a request: (bytes read, all finite, errno or 0, message)."""
        total, finite, err, message = 0, True, 0, ""
        try:
            for file, start, end, direct, pieces in runs:
                if direct:
                    region, offset, file_offset, _, _ = pieces[0]
                    at = self.bases[region] + offset - file_offset  # the address of file byte x is at + x
                    total += self.pread(file, at + start, start, end, end - start, pause)
                    if check:
                        with self.busy:
                            finite = finite and all(_finite(self.maps[r], o, n, d) for r, o, _, n, d in pieces)
                    continue
                a_start, a_end = start - start % _ALIGN, -(-end // _ALIGN) * _ALIGN
                if not buffer or len(buffer[0]) < a_end - a_start:
                    buffer[:] = [mmap.mmap(-1, max(a_end - a_start, 1 << 20))]
                buf = buffer[0]
                address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
                total += self.pread(file, address, a_start, end, a_end - a_start, pause)
                with self.busy:
                    for region, offset, file_offset, nbytes, dtype in pieces:
                        if check and finite:
                            finite = _finite(buf, file_offset - a_start, nbytes, dtype)
                        ctypes.memmove(self.bases[region] + offset, address + file_offset - a_start, nbytes)
        except OSError as e:
            err, message = e.errno or errno.EIO, e.strerror or str(e)
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
            err, message = errno.EIO, f"{type(e).__name__}: {e}"
        return total, finite, err, message


def _finite(buf: object, offset: int, nbytes: int, dtype: int) -> bool:
    import numpy as np

    name = DTYPES[dtype]
    if not name:
        return True
    if name == "bfloat16":
        bits = np.frombuffer(buf, dtype=np.uint16, count=nbytes // 2, offset=offset)
        return not bool(((bits & _BF16_EXPONENT) == _BF16_EXPONENT).any())
    values = np.frombuffer(buf, dtype=np.dtype(name), count=nbytes // np.dtype(name).itemsize, offset=offset)
    return bool(np.isfinite(values).all())


def _parse_request(body: bytes) -> tuple[int, bool, bool, list, int]:
    job, check, urgent, nruns, early = _REQUEST.unpack_from(body)
    at = _REQUEST.size
    runs = []
    for _ in range(nruns):
        file, start, end, direct, npieces = _RUN.unpack_from(body, at)
        at += _RUN.size
        pieces = []
        for _ in range(npieces):
            pieces.append(_PIECE.unpack_from(body, at))
            at += _PIECE.size
        runs.append((file, start, end, bool(direct), pieces))
    return job, bool(check), bool(urgent), runs, early


class _Schedule:
    """The requests off the pipe, urgent ones first: at most `reads` of each kind at once, and no read ahead while an
    urgent read is queued or in progress (a read ahead in progress waits between its chunks, `pause`). A demand read
    that shared the disk with reads ahead waited for them as long as for itself: reads of large experts do not add up
    (the I/O-bound benchmark model's 18 MiB experts on the 2-core VM, 2026-12-04, ad hoc timeline of a decode: a
    demand read alone 7.9 ms, beside one other read 15.0, beside two 22.2). The process runs `reads` + 1 threads:
    reads ahead hold at most `reads`, so one is always free to take an urgent request off the pipe. Each thread that
    finds nothing to do reads the pipe itself in turn (one wake-up a request, not two)."""

    def __init__(self, fd: int, reads: int) -> None:
        self.fd = fd
        self.reads = reads
        # Threads that wait for work wait on `cv`, reads ahead paused for urgent ones on `calm`; each event wakes one
        # thread (who takes work passes the rest on): on the 2-core VM a needless wake-up takes the core that the
        # compute thread or the reads need (~50-150 us each).
        lock = threading.Lock()
        self.cv = threading.Condition(lock)
        self.calm = threading.Condition(lock)
        self.queued: dict[bool, deque[tuple[int, bool, bool, list, int]]] = {True: deque(), False: deque()}
        self.running = {True: 0, False: 0}  # urgent? -> requests being served
        self.piping = False  # a thread is reading the pipe
        self.closed = False
        self.pending = bytearray()

    def take(self) -> tuple[int, bool, bool, list, int] | None:
        """The next request to serve (job, check, urgent, runs, early); None once the pipe is closed and all are
        taken."""
        with self.cv:
            while True:
                request = self._next(pop=True)
                if request is not None:
                    self.running[request[2]] += 1
                    if not self.piping or self._next(pop=False) is not None:
                        self.cv.notify()  # the next request, or the unattended pipe, to another thread
                    return request
                if self.closed and not (self.queued[True] or self.queued[False]):
                    self.cv.notify()  # the end, to the next thread
                    return None
                if self.piping or self.closed:
                    self.cv.wait()
                    continue
                self.piping = True
                self.cv.release()
                try:
                    bodies = self._read()
                finally:
                    self.cv.acquire()
                    self.piping = False
                if bodies is None:
                    self.closed = True
                for body in bodies or ():
                    request = _parse_request(body)
                    self.queued[request[2]].append(request)

    def _next(self, *, pop: bool) -> tuple[int, bool, bool, list, int] | None:
        """The request that may start now, if any (taken off its queue with `pop`)."""
        urgent, background, running = self.queued[True], self.queued[False], self.running
        if urgent and running[True] < self.reads:
            return urgent.popleft() if pop else urgent[0]
        if background and not urgent and not running[True] and running[False] < self.reads:
            return background.popleft() if pop else background[0]
        return None

    def done(self, urgent: bool) -> None:
        with self.cv:
            self.running[urgent] -= 1
            self.cv.notify()
            if urgent and not self.running[True] and not self.queued[True]:
                self.calm.notify_all()

    def pause(self) -> None:
        """A read ahead, between two chunks: wait while an urgent read is queued or in progress."""
        if self.queued[True] or self.running[True]:
            with self.calm:
                while self.queued[True] or self.running[True]:
                    self.calm.wait()

    def _read(self) -> list[bytes] | None:
        """The requests the pipe holds, at least one (waiting for it); None once it is closed."""
        buf = self.pending
        while True:
            bodies = []
            while len(buf) >= _LENGTH.size:
                (n,) = _LENGTH.unpack_from(buf)
                if len(buf) < _LENGTH.size + n:
                    break
                bodies.append(bytes(buf[_LENGTH.size : _LENGTH.size + n]))
                del buf[: _LENGTH.size + n]
            if bodies:
                return bodies
            data = os.read(self.fd, 1 << 16)
            if not data:
                return None
            buf += data


def _child_main(spec: dict) -> None:
    import numpy  # noqa: F401 - for the NaN/Inf check: imported while the engine loads, not at the first read

    reader = _Reader(spec)
    schedule = _Schedule(spec["requests"], spec["threads"])
    _write_all(spec["replies"], _REPLY.pack(_READY, 0, 0, 0, 0, 0, 0.0, 0))

    def work(populated: bool) -> None:
        populate = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        buffer = [mmap.mmap(-1, spec["buffer"], flags=populate)] if spec["buffer"] and populated else []
        while (request := schedule.take()) is not None:
            job, check, urgent, runs, early = request
            try:
                reader.serve(job, check, runs, early, buffer, None if urgent else schedule.pause)
            finally:
                schedule.done(urgent)

    # One thread more than `threads` (`_Schedule`): its buffer (for reads that do not land in place) is mapped when it
    # first needs one.
    workers = [threading.Thread(target=work, args=(i < spec["threads"],)) for i in range(spec["threads"] + 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


if __name__ == "__main__":
    _child_main(json.loads(sys.argv[1]))
