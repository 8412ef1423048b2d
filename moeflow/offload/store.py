"""Backing tiers: where experts live when they are not in the fast tier's slot pool.

`DiskStore` reads each expert from the safetensors shards with O_DIRECT, so the page cache cannot
quietly turn a disk-backed run into a RAM-backed one. `RamStore` keeps one host copy of every
expert (pinned when the fast tier is a GPU).

Both are called from several threads at once (the reader pool, `moeflow.offload.readers`, and the
compute thread). Every step of a read releases the GIL: `os.preadv`, and the copy into the slot. Where
every piece of an expert is a plain byte copy into a CPU slot (the same dtype, not transposed) the read
makes no torch call at all: a plan of its requests and of each piece's place in the slot is worked out
once per expert (`DiskStore._byte_plan`), then a read is `preadv` and one `memmove` per piece. A piece that also
lies on whole blocks of its file and of its slot (a checkpoint written by `moeflow.tools.widen` or `moeflow quantize`,
slots from `aligned_empty`) lands in the slot itself: no buffer, no copy. Measured on the I/O-bound benchmark
model (18 MiB experts, 25%, disk; `bench/direct_reads.py`): 1.19x LRU's tokens/s and 1.11x path's, medians of
3 interleaved rounds, against the same weights laid out as safetensors' own writer puts them.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import math
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol, TypeVar

import numpy as np
import torch

from moeflow.kernels.quant import GATE_UP_PIECES, ExpertFormat, quantize
from moeflow.model.checkpoint import Checkpoint, ExpertKey, TensorSpan
from moeflow.model.quantized import ScalePiece
from moeflow.offload.mover import Piece, Reply, Run, SharedRegion

log = logging.getLogger(__name__)

_ALIGN = 4096  # O_DIRECT wants file offset, length and buffer address aligned to the logical block size
# Read two spans of one expert in one request when at most 1 MiB apart and no farther apart than the second is long:
# the bytes between them are read for nothing (a small scale after other experts' weights is read by itself).
_COALESCE_GAP = 1 << 20
# A demand read of an expert of 2 to 8 MiB goes as parts of about 1 MiB, read and copied by several threads at
# once (`DiskStore.read_parts`): more requests in flight where the kernel would send one or two (it splits a
# request into max_sectors_kb pieces itself, 4 MiB on the measuring VM). Measured on the I/O-bound benchmark
# model, 25%, disk, page cache dropped before each run, alternating runs (2-core AMD EPYC VM, 2026-12-01):
# int8 experts (4.6 MiB) +9 / +15 / +9% tokens/s in three pairs (+6% in three with 2 MiB parts); int4 (2.3 MiB)
# -12% to +19% in seven pairs, five faster, median +5%; fp32 (18 MiB) -5 to -34% with 2 or 4 MiB parts, hence
# the ceiling.
READ_PART_BYTES = 1 << 20
READ_PARTED_MAX_BYTES = 8 << 20
_UNPLANNED = object()  # `DiskStore.moves`: no runs kept for the expert and destinations
_RUNS_KEPT = 1 << 13  # runs `DiskStore.moves` keeps at most (experts x slots; ~1 KiB each: 8 MiB at most)


def _copy(dest: torch.Tensor, src: torch.Tensor) -> None:
    """`dest.copy_(src)`, as one GIL-free memmove where it is a plain byte copy on the CPU.

    torch's copy would split a large copy over OpenMP threads, and OpenMP gives every thread that
    starts a parallel region its own team: each reader thread would bring one more team of compute
    threads (spinning, under OpenMP's default wait policy) onto cores the forward is using.
    """
    if dest.device.type == "cpu" and src.dtype == dest.dtype and dest.is_contiguous() and src.is_contiguous():
        assert dest.nbytes == src.nbytes
        ctypes.memmove(dest.data_ptr(), src.data_ptr(), dest.nbytes)  # ctypes releases the GIL during the call
    else:
        dest.copy_(src)


_DESTS = ("gate_up", "down", "gate_up_scale", "down_scale")  # what `_Target.dest` and `_Piece.dest` index


def _destinations(gate_up_2ID: torch.Tensor, down_DI: torch.Tensor, scales: Scales | None) -> tuple[torch.Tensor, ...]:
    """A read's destination tensors, in `_DESTS` order."""
    return (gate_up_2ID, down_DI, scales["gate_up"], scales["down"]) if scales else (gate_up_2ID, down_DI)


class _Target(NamedTuple):
    """One stored span of an expert and the rows [row, row + rows) of destination `dest` it fills."""

    span: TensorSpan
    dest: int
    row: int
    rows: int
    transposed: bool


class _Piece(NamedTuple):
    """One stored span of a byte-copy read (`DiskStore._byte_plan`): its bytes go `offset` bytes past the first
    byte of destination `dest`."""

    span: TensorSpan
    dest: int
    offset: int


class _Request(NamedTuple):
    """Bytes [start, end) of one file, read with one request, and the pieces they hold. `direct`: the pieces lie
    back to back in the file and in the slot, all on whole blocks, so the read lands in the slot itself."""

    file: Path
    start: int
    end: int
    pieces: tuple[_Piece, ...]
    direct: bool = False


D = TypeVar("D")  # what `_coalesce` carries beside each span
Scales = dict[str, torch.Tensor]  # a quantized slot's scales: "gate_up" [2I, G], "down" [D, G]


class ExpertStore(Protocol):
    direct_io: bool

    def read_into(
        self, key: ExpertKey, gate_up_2ID: torch.Tensor, down_DI: torch.Tensor, scales: Scales | None = None
    ) -> int:
        """Copy expert `key` into the given slot views (any device, any float dtype; for a quantized slot,
        the quantized weights and `scales`, the slot's scales by parameter: `SlotPool.scale_views`).
        Returns bytes read. Safe to call from several threads at once, for different slots."""
        ...

    def close(self) -> None: ...


class DiskStore:
    """Reads experts on demand from the checkpoint's shards, bypassing the page cache where allowed."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        direct_io: bool = True,
        scales: dict[ExpertKey, tuple[ScalePiece, ...]] | None = None,
        part_bytes: int | None = None,
        parted_max_bytes: int | None = None,
    ) -> None:
        self._ckpt = checkpoint
        self.part_bytes = part_bytes or READ_PART_BYTES  # `read_parts`; a multiple of _ALIGN
        self.parted_max_bytes = parted_max_bytes or READ_PARTED_MAX_BYTES
        self._scales = scales or {}  # a quantized checkpoint's scale spans (`moeflow.model.quantized`)
        self._fds: dict[Path, int] = {}
        self._retired: list[int] = []  # descriptors replaced by a fall-back; a concurrent read may still use one
        self._lock = threading.Lock()
        self._local = threading.local()
        self._reserved: list[mmap.mmap] = []  # `reserve_buffers`: faulted, not yet taken by a thread
        self.direct_io = direct_io and hasattr(os, "O_DIRECT")
        self._checked: set[ExpertKey] = set()  # experts whose weights were checked for NaN/Inf (on first read)
        self._warned: set[ExpertKey] = set()  # ...and found holding some
        self._read_total: dict[tuple[ExpertKey, bool], int] = {}  # `_read_bytes`
        self._plans: dict[tuple, tuple[_Request, ...] | None] = {}  # `_byte_plan`
        self._runs: dict[tuple, list[Run] | None] = {}  # `moves`, per expert and destination addresses
        files = {s.file for loc in checkpoint.experts.values() for s in loc.spans}
        # every expert on whole blocks of its file: read straight into the (page-aligned) slots, no buffer needed
        spans = [s for loc in checkpoint.experts.values() for s in loc.spans]
        self._all_on_blocks = not self._scales and all(s.offset % _ALIGN == 0 and s.nbytes % _ALIGN == 0 for s in spans)
        files |= {p.span.file for pieces in self._scales.values() for p in pieces}
        for path in sorted(files):
            self._fds[path] = self._open(path)

    def _open(self, path: Path) -> int:
        if self.direct_io:
            try:
                return os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._fall_back(f"O_DIRECT refused when opening {path.name}")
        return os.open(path, os.O_RDONLY)

    def _fall_back(self, why: str) -> None:
        """Buffered reads from here on; each read is then dropped from the page cache (POSIX_FADV_DONTNEED)."""
        if self.direct_io:
            log.warning("%s; falling back to buffered reads with page-cache eviction after each read", why)
        self.direct_io = False

    def reserve_buffers(self, count: int) -> None:
        """Map and fault `count` read buffers now, each as large as this store's largest read; the threads that
        read later take these before mapping their own.

        Where a buffer's pages come from decides how fast an O_DIRECT read into it is. Measured on this
        project's 2-core AMD EPYC VM (/tmp script, 16 expert-sized 18 MiB reads, page cache dropped, modes
        alternating): 8.8-9.8 ms a read into a fresh buffer, 30-36 ms into one faulted after the process had
        freed 268 MiB, 11-12 ms into one faulted before that free. The likely cause: a read is split into
        requests of at most `max_segments` physically contiguous runs (254 on this virtio disk, requests of
        up to 4 MiB), and pages handed out right after a large free come back from the per-CPU lists in reverse
        order, one run each, so a read needs ~4x the requests. In the engine the path predictor's table (built
        after the store opened, its temporaries freed) had made every later read of the I/O-bound model ~2.5x
        slower and LRU decoding 1.6-1.9x slower. The engine reserves a buffer per reader and one for the compute
        thread as it opens the store, before anything else runs. None where every expert lies on whole blocks of
        its file: those reads land in the slots themselves (`aligned_empty` faults the slot pool's pages the same
        way)."""
        if count <= 0 or not self._ckpt.experts or self._all_on_blocks:
            return
        size = self.read_buffer_bytes()
        with self._lock:
            for _ in range(count):
                self._reserved.append(_map_buffer(size, populate=True))

    def read_buffer_bytes(self) -> int:
        """The buffer a read through one needs at most (its largest request on whole blocks); 0 where every expert
        lies on whole blocks of its file (reads land in the slots)."""
        if not self._ckpt.experts or self._all_on_blocks:
            return 0
        return max(self._read_bytes(key, key in self._scales) for key in self._ckpt.experts) + 2 * _ALIGN

    @property
    def files(self) -> list[Path]:
        return list(self._fds)

    def movable(self, gate_up_2ID: torch.Tensor, down_DI: torch.Tensor, scales: Scales | None = None) -> bool:
        """Whether reads into slots laid out as these are plain byte copies (`moves`), judged on the first expert."""
        if not self._ckpt.experts:
            return False
        key = next(iter(self._ckpt.experts))
        return self._byte_plan(key, _destinations(gate_up_2ID, down_DI, scales)) is not None

    def _buffer(self, nbytes: int) -> mmap.mmap:
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < nbytes:
            with self._lock:
                fits = next((b for b in self._reserved if len(b) >= nbytes), None)
                if fits is not None:
                    self._reserved.remove(fits)
            if buf is not None:
                buf.close()
            buf = fits if fits is not None else _map_buffer(max(nbytes, 1 << 20))
            self._local.buf = buf
        return buf

    def _read_range(self, path: Path, start: int, end: int) -> tuple[mmap.mmap, int, int]:
        """Read [start, end) of `path`; returns (buffer, offset of `start` in it, bytes transferred)."""
        a_start = start - start % _ALIGN
        a_end = -(-end // _ALIGN) * _ALIGN
        buf = self._buffer(a_end - a_start)
        view = memoryview(buf)[: a_end - a_start]
        done = self._pread(path, view, a_start, end)
        del view
        return buf, start - a_start, done

    def _pread(self, path: Path, view: memoryview, start: int, end: int) -> int:
        """Fill `view` from byte `start` of `path` until at least byte `end` is in; returns the bytes transferred.
        With O_DIRECT, `start`, the view's address and its length are on whole blocks."""
        fd = self._fds[path]
        done = 0
        while start + done < end:
            try:
                n = os.preadv(fd, [view[done:]], start + done)
            except OSError as e:
                if e.errno != errno.EINVAL or not self.direct_io:
                    raise
                # The filesystem accepted O_DIRECT at open but refuses it on read: reopen buffered.
                with self._lock:
                    if self.direct_io:
                        self._fall_back(f"O_DIRECT read refused on {path.name}")
                        for p, old in list(self._fds.items()):
                            self._fds[p] = os.open(p, os.O_RDONLY)
                            self._retired.append(old)
                fd = self._fds[path]
                continue
            if n == 0:
                raise OSError(errno.EIO, f"{path} ended at byte {start + done}; the shard is truncated")
            done += n
        if not self.direct_io:
            os.posix_fadvise(fd, start, len(view), os.POSIX_FADV_DONTNEED)
        return done

    def _targets(self, key: ExpertKey, with_scales: bool) -> list[_Target]:
        """Each stored span of `key` and the rows of the slot it fills (a transposed family's piece is copied
        through its transpose; a quantized slot's scales fill the same rows as their weight piece)."""
        targets = [_Target(p.span, _DESTS.index(p.param), p.row, p.rows, p.transposed)
                   for p in self._ckpt.experts[key].pieces]  # fmt: skip
        if with_scales:
            targets += [_Target(p.span, _DESTS.index(f"{p.param}_scale"), p.row, p.span.shape[0], False)
                        for p in self._scales[key]]  # fmt: skip
        return targets

    def _byte_plan(
        self, key: ExpertKey, dests: tuple[torch.Tensor, ...], addresses: list[int] | None = None, *,
        gate_up_first: bool = False,
    ) -> tuple[_Request, ...] | None:
        """`key`'s read as plain byte copies into `dests` (`_destinations`, at `addresses`: their `data_ptr`), one
        `_Request` per coalesced run of the file, or None where a piece is more than a byte copy (another dtype, a
        transpose, a GPU slot). Pieces on whole blocks in their file and their slot (`_on_blocks`) are read
        straight into the slot (direct requests); the others through a buffer, then one `memmove` each.
        Remembered per expert and destination layout (every slot of a pool has the same), so that a read makes
        no torch call, only `preadv` and the copies, each releasing the GIL. A torch call (a view, a slice,
        `frombuffer`) releases and takes back the GIL too, ~25 of them a read: on a reader thread each hand-over
        waits while the compute thread runs Python (it computes the experts that have arrived while the others
        are read). Measured ad hoc (shipped model, 25%, disk, greedy, 4 held-out prompts x 64 tokens, both paths
        in one process, 6 alternating passes, 2-core AMD EPYC VM): stall 4.41 -> 3.75 ms a token with LRU, 3.25 -> 2.94
        with the auto policy, unchanged with path prediction (1.37 -> 1.40); tokens/s within the noise.
        A 0.44 MiB read still costs its reader ~300-400 us of CPU either way, mostly the kernel's O_DIRECT
        `preadv` (170-200 us under load) and the copies (~75 us).

        `gate_up_first`: the requests that fill the gate/up matrices (and their scales) come first and fill nothing
        else, the rest after them, whatever the order in the file (a Hub Mixtral stores w1, w2, w3: gate, down, up),
        so that the reader process can answer once they are in (`ExpertCache.early_gate_up`). The same bytes, in
        more requests where gate/up and down lie interleaved."""
        addresses = addresses or [t.data_ptr() for t in dests]
        memo = (key, gate_up_first,
                *((t.shape, t.stride(), t.dtype, t.device.type, a % _ALIGN) for t, a in zip(dests, addresses)))
        if memo in self._plans:
            return self._plans[memo]
        pieces = []
        for t in self._targets(key, len(dests) > 2):
            dest = dests[t.dest]
            rows = dest[t.row : t.row + t.rows]
            if dest.device.type != "cpu" or t.transposed or rows.dtype != t.span.dtype or not rows.is_contiguous():
                self._plans[memo] = None
                return None
            pieces.append(_Piece(t.span, t.dest, rows.data_ptr() - addresses[t.dest]))
        # Pieces on whole blocks in their file and their slot land in the slot itself (a request per run of them back
        # to back); the others go through a buffer, in runs that span no direct piece (its bytes would be read twice).
        direct = [p for p in pieces if _on_blocks(p, addresses)]
        rest = [p for p in pieces if p not in direct]
        kinds = [rest]
        if gate_up_first:  # each kind's runs leave the other's pieces out
            kinds = [[p for p in rest if _fills_gate_up(p)], [p for p in rest if not _fills_gate_up(p)]]
        plan = _direct_requests(direct) + tuple(
            _Request(group[0][0].file, group[0][0].offset, max(s.offset + s.nbytes for s, _ in group),
                     tuple(_Piece(span, dest, offset) for span, (dest, offset) in group))
            for kind in kinds
            for group in _coalesce([(p.span, (p.dest, p.offset)) for p in kind],
                                   [p.span for p in pieces if p not in kind])
        )  # fmt: skip
        if gate_up_first:  # stable: each kind's requests keep their order
            plan = tuple(sorted(plan, key=lambda r: not all(_fills_gate_up(p) for p in r.pieces)))
        self._plans[memo] = plan
        return plan

    def read_parts(
        self, key: ExpertKey, gate_up_2ID: torch.Tensor, down_DI: torch.Tensor, scales: Scales | None = None
    ) -> list[Callable[[], int]] | None:
        """`read_into` as independent parts of about `part_bytes` each, for several threads to run at once
        (each returns the bytes it read; together they fill the slot as `read_into` does): more requests in
        flight, and a part's copy into the slot overlaps the other parts' reads. None where the expert is under
        two parts or over `parted_max_bytes` (READ_PART_BYTES' note), or where a piece is more than a byte copy
        (`_byte_plan`) or does not start on a whole value."""
        if not 2 * self.part_bytes <= self._read_bytes(key, bool(scales)) <= self.parted_max_bytes:
            return None  # decided from the spans alone: most experts are read whole, at no cost here
        dests = _destinations(gate_up_2ID, down_DI, scales)
        addresses = [t.data_ptr() for t in dests]
        plan = self._byte_plan(key, dests, addresses)
        if plan is None or any(p.span.offset % p.span.dtype.itemsize for request in plan for p in request.pieces):
            return None
        check = key not in self._checked
        self._checked.add(key)
        parts: list[Callable[[], int]] = []
        for request in plan:
            start, end = request.start, request.end
            n = -(-(end - start) // self.part_bytes)
            step = max(-(-(end - start) // n // _ALIGN) * _ALIGN, _ALIGN)
            for lo in range(start - start % _ALIGN, end, step):  # part boundaries on whole blocks of the file
                a, b = max(lo, start), min(lo + step, end)
                parts.append(lambda request=request, a=a, b=b: self._read_request(key, request, a, b, addresses, check))
        return parts

    def moves(
        self, key: ExpertKey, gate_up_2ID: torch.Tensor, down_DI: torch.Tensor, scales: Scales | None = None, *,
        gate_up_first: bool = False,
    ) -> tuple[list[Run], bool] | None:
        """`read_into` as byte moves for the reader process (`moeflow.offload.mover`): its runs of the files, and
        whether this first read of `key` checks it for NaN/Inf (`moved` reports what was found); None where a piece
        is more than a byte copy (`_byte_plan`; `gate_up_first` as there). The runs are kept per expert and
        destination (at most `_RUNS_KEPT`, then they start again from none): a slot's next read of the same expert
        builds nothing (`ExpertCache.moves`, shipped model, 2-core AMD EPYC VM, warm: 5.4 -> 2.8 us a read, ~5 reads
        a token with path prediction)."""
        dests = _destinations(gate_up_2ID, down_DI, scales)
        addresses = [t.data_ptr() for t in dests]
        # `_byte_plan` keeps the rest of what the runs depend on
        memo = (key, gate_up_first, *addresses, *(t.shape for t in dests), *(t.dtype for t in dests))
        runs = self._runs.get(memo, _UNPLANNED)
        if runs is _UNPLANNED:
            plan = self._byte_plan(key, dests, addresses, gate_up_first=gate_up_first)
            runs = None if plan is None else [
                Run(r.file, r.start, r.end, r.direct,
                    tuple(Piece(addresses[p.dest] + p.offset, p.span.offset, p.span.nbytes,
                                _CHECKED_DTYPES.get(p.span.dtype, "")) for p in r.pieces))
                for r in plan]  # fmt: skip
            if len(self._runs) >= _RUNS_KEPT:
                self._runs.clear()
            self._runs[memo] = runs
        if runs is None:
            return None
        check = key not in self._checked
        self._checked.add(key)
        return runs, check

    def moved(self, key: ExpertKey, reply: Reply) -> None:
        """What the reader process found doing `moves(key)`, handled as `read_into` would have."""
        if reply.fell_back:
            self._fall_back("O_DIRECT read refused in the reader process")
        if reply.not_finite:
            self._warn_not_finite(key)

    def _read_bytes(self, key: ExpertKey, with_scales: bool) -> int:
        """The bytes `read_into` requests for `key` (its coalesced spans; with its scales' where the slot has
        them), remembered per expert."""
        memo = (key, with_scales)
        total = self._read_total.get(memo)
        if total is None:
            spans = [*self._ckpt.experts[key].spans, *(p.span for p in self._scales.get(key, ()) if with_scales)]
            groups = _coalesce([(span, None) for span in spans])
            total = sum(max(s.offset + s.nbytes for s, _ in g) - g[0][0].offset for g in groups)
            self._read_total[memo] = total
        return total

    def _read_request(
        self, key: ExpertKey, request: _Request, a: int, b: int, addresses: list[int], check: bool
    ) -> int:
        """Bytes [a, b) of `request` into the destinations at `addresses` (plain byte copies); returns the bytes
        transferred."""
        if request.direct:  # straight into the slot: [a, b) on whole blocks, the pieces back to back
            first = request.pieces[0]
            at = addresses[first.dest] + first.offset - first.span.offset  # the address of file byte x is at + x
            into = (ctypes.c_char * (b - a)).from_address(at + a)
            n = self._pread(request.file, memoryview(into).cast("B"), a, b)
            for span, _, _ in request.pieces if check else ():
                lo, hi = max(a, span.offset), min(b, span.offset + span.nbytes)
                if lo < hi and not _all_finite(into, lo - a, span, hi - lo):
                    self._warn_not_finite(key)
                    break
            return n
        buf, base, n = self._read_range(request.file, a, b)
        view = ctypes.c_char.from_buffer(buf)  # the buffer's address (an export of the mapping, dropped below)
        at = ctypes.addressof(view) + base - a  # the address of file byte x is at + x
        del view
        finite = True
        for span, dest, offset in request.pieces:
            lo, hi = max(a, span.offset), min(b, span.offset + span.nbytes)
            if lo >= hi:
                continue
            if check and finite:
                finite = _all_finite(buf, base + lo - a, span, hi - lo)
            ctypes.memmove(addresses[dest] + offset + lo - span.offset, at + lo, hi - lo)  # releases the GIL
        if not finite:
            self._warn_not_finite(key)
        return n

    def _warn_not_finite(self, key: ExpertKey) -> None:
        with self._lock:  # once per expert, however many of its parts found it
            if key in self._warned:
                return
            self._warned.add(key)
        loc = self._ckpt.experts[key]
        log.warning(
            "expert %d of layer %d in %s holds NaN or Inf weights: whatever it computes is not a number. "
            "The checkpoint is corrupt; download or convert it again", key[1], key[0], loc.spans[0].file.name
        )

    def read_into(
        self, key: ExpertKey, gate_up_2ID: torch.Tensor, down_DI: torch.Tensor, scales: Scales | None = None
    ) -> int:
        check = key not in self._checked
        dests = _destinations(gate_up_2ID, down_DI, scales)
        addresses = [t.data_ptr() for t in dests]
        plan = self._byte_plan(key, dests, addresses)
        if plan is not None:
            total = sum(self._read_request(key, request, request.start, request.end, addresses, check)
                        for request in plan)  # fmt: skip
            self._checked.add(key)
            return total
        targets = self._targets(key, bool(scales))
        pairs = [(t.span, (dests[t.dest][t.row : t.row + t.rows], t.transposed)) for t in targets]
        total = 0
        finite = True
        for group in _coalesce(pairs):
            start = group[0][0].offset
            end = max(s.offset + s.nbytes for s, _ in group)
            buf, base, n = self._read_range(group[0][0].file, start, end)
            total += n
            for span, (dest, transposed) in group:
                src = torch.frombuffer(buf, dtype=torch.uint8, count=span.nbytes, offset=base + span.offset - start)
                if check and finite:
                    finite = _all_finite(buf, base + span.offset - start, span)
                src = src.view(span.dtype).view(span.shape)
                _copy(dest, src.t() if transposed else src)
        if check:
            self._checked.add(key)
            if not finite:
                self._warn_not_finite(key)
        return total

    def close(self) -> None:
        for fd in [*self._fds.values(), *self._retired]:
            os.close(fd)
        self._fds.clear()
        self._retired.clear()
        for buf in self._reserved:
            buf.close()
        self._reserved.clear()


def _on_blocks(piece: _Piece, addresses: list[int]) -> bool:
    """Whether `piece` starts and ends on whole blocks both in its file and in its slot (its destination at
    `addresses[piece.dest]`): then an O_DIRECT read can land in the slot with no bounce buffer and no copy."""
    span = piece.span
    address = addresses[piece.dest] + piece.offset
    return span.offset % _ALIGN == 0 and span.nbytes % _ALIGN == 0 and address % _ALIGN == 0


def _fills_gate_up(piece: _Piece) -> bool:
    """Whether `piece` fills the gate/up matrices or their scales."""
    return _DESTS[piece.dest].startswith("gate_up")


def _direct_requests(pieces: list[_Piece]) -> tuple[_Request, ...]:
    """Pieces on whole blocks (`_on_blocks`) as direct requests: runs of pieces back to back in their file and in
    their destination (a gate piece and its up piece written one after the other: one read for both)."""
    requests: list[_Request] = []
    for p in sorted(pieces, key=lambda p: (str(p.span.file), p.span.offset)):
        last = requests[-1] if requests else None
        if last is not None:
            q = last.pieces[-1]
            if (q.span.file == p.span.file and q.dest == p.dest and p.span.offset == last.end
                    and p.offset == q.offset + q.span.nbytes):  # fmt: skip
                requests[-1] = last._replace(end=p.span.offset + p.span.nbytes, pieces=(*last.pieces, p))
                continue
        requests.append(_Request(p.span.file, p.span.offset, p.span.offset + p.span.nbytes, (p,), direct=True))
    return tuple(requests)


def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, SharedRegion | None]:
    """A CPU tensor on its own shared mapping, every page faulted now, in order: on whole pages, so O_DIRECT reads
    land in it directly (`DiskStore`'s direct requests), and, faulted before the run frees anything, on pages that
    an O_DIRECT read needs few requests to fill (`DiskStore.reserve_buffers`' note). Where the platform has memfds,
    the mapping is one, and its region (the descriptor: the caller closes it) lets the reader process
    (`moeflow.offload.mover`) map the same memory; else None."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype), None
    if not hasattr(os, "memfd_create"):
        return torch.frombuffer(_map_buffer(nbytes, populate=True), dtype=dtype).view(shape), None
    fd = os.memfd_create("moeflow-slots", getattr(os, "MFD_CLOEXEC", 0))
    try:
        os.ftruncate(fd, nbytes)
        buf = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    except BaseException:
        os.close(fd)
        raise
    tensor = torch.frombuffer(buf, dtype=dtype).view(shape)
    return tensor, SharedRegion(fd, tensor.data_ptr(), nbytes)


def _map_buffer(nbytes: int, *, populate: bool = False) -> mmap.mmap:
    """An anonymous mapping: page-aligned, as O_DIRECT requires of the destination address; `populate` faults
    every page now (MAP_POPULATE where the platform has it)."""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_ANONYMOUS", 0) | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
    return mmap.mmap(-1, nbytes, flags=flags) if hasattr(mmap, "MAP_SHARED") else mmap.mmap(-1, nbytes)


# The exponent bits of each float dtype: all ones is NaN or Inf. bfloat16 has no numpy dtype, so it is
# checked on these bits; the others with numpy's own isfinite.
_BF16_EXPONENT = 0x7F80
_NUMPY_FLOATS = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}
_CHECKED_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                   torch.float64: "float64"}  # fmt: skip


def _all_finite(buf: object, offset: int, span: TensorSpan, nbytes: int | None = None) -> bool:
    """Whether the float tensor `span`, read into `buf` at `offset`, holds no NaN or Inf (other dtypes: True);
    `nbytes`: only that many of its bytes are there (a part of it, starting on a whole value).

    numpy, not torch: this runs on reader threads, and numpy's loop stays on the calling thread and releases
    the GIL, where torch would start an OpenMP team per thread (`_copy`). About 5.7 GB/s on the 2-core EPYC
    (3.2 ms for an 18 MiB fp32 expert, against ~10 ms to read it from disk), once per expert per process.
    """
    nbytes = span.nbytes if nbytes is None else nbytes
    if span.dtype == torch.bfloat16:
        bits = np.frombuffer(buf, dtype=np.uint16, count=nbytes // 2, offset=offset)
        return not bool(((bits & _BF16_EXPONENT) == _BF16_EXPONENT).any())
    np_dtype = _NUMPY_FLOATS.get(span.dtype)
    if np_dtype is None:
        return True
    values = np.frombuffer(buf, dtype=np_dtype, count=nbytes // span.dtype.itemsize, offset=offset)
    return bool(np.isfinite(values).all())


def _coalesce(pairs: list[tuple[TensorSpan, D]], apart: Sequence[TensorSpan] = ()) -> list[list[tuple[TensorSpan, D]]]:
    """`pairs` in runs of their file to read with one request each: spans close enough (`_COALESCE_GAP`), and no span
    of `apart` between them (read by another request: its bytes are not to be read twice)."""
    pairs = sorted(pairs, key=lambda p: (str(p[0].file), p[0].offset))
    groups: list[list[tuple[TensorSpan, D]]] = []
    for span, dest in pairs:
        if groups:
            last = groups[-1][-1][0]
            end = last.offset + last.nbytes
            if (last.file == span.file and 0 <= span.offset - end <= min(_COALESCE_GAP, span.nbytes)
                    and not any(a.file == span.file and end <= a.offset < span.offset for a in apart)):  # fmt: skip
                groups[-1].append((span, dest))
                continue
        groups.append([(span, dest)])
    return groups


class QuantizingStore:
    """Quantizes a full-precision checkpoint's experts as they are read (`--expert-dtype int8|int4` on a
    checkpoint that `moeflow quantize` has not written): the slots hold quantized bytes, so the budget holds
    more experts, but every miss still reads the full-precision bytes from disk; `moeflow quantize` writes
    a folder whose reads are small too. Each reader thread keeps one full-precision expert to quantize from."""

    def __init__(self, inner: ExpertStore, fmt: ExpertFormat, *, inter: int, hidden: int, dtype: torch.dtype) -> None:
        self._inner, self._fmt = inner, fmt
        self._shapes = ((2 * inter, hidden), (hidden, inter))
        self._dtype = dtype
        self._local = threading.local()
        self.direct_io = inner.direct_io

    def read_into(
        self, key: ExpertKey, gate_up_2ID: torch.Tensor, down_DI: torch.Tensor, scales: Scales | None = None
    ) -> int:
        staging = getattr(self._local, "staging", None)
        if staging is None:
            staging = self._local.staging = tuple(torch.empty(s, dtype=self._dtype) for s in self._shapes)
        nbytes = self._inner.read_into(key, *staging)
        gu_q, gu_s = quantize(staging[0], self._fmt, pieces=GATE_UP_PIECES)
        d_q, d_s = quantize(staging[1], self._fmt)
        gate_up_2ID.copy_(gu_q)
        down_DI.copy_(d_q)
        if scales:
            scales["gate_up"].copy_(gu_s)
            scales["down"].copy_(d_s)
        return nbytes

    def close(self) -> None:
        self._inner.close()


class RamStore:
    """One host copy of every expert, laid out as one slot of `pool` (so quantized experts stay quantized in
    RAM); filled once from a disk store."""

    direct_io = False

    def __init__(self, checkpoint: Checkpoint, source: ExpertStore, *, pool: SlotPoolLayout, pin: bool) -> None:
        self._copies: dict[ExpertKey, tuple[torch.Tensor, ...]] = {}
        for key in checkpoint.experts:
            gate_up = torch.empty_like(pool.gate_up_S2ID[0], device="cpu", pin_memory=pin)
            down = torch.empty_like(pool.down_SDI[0], device="cpu", pin_memory=pin)
            scales = {p: torch.empty_like(s, device="cpu", pin_memory=pin) for p, s in pool.scale_views(0).items()}
            source.read_into(key, gate_up, down, **({"scales": scales} if scales else {}))
            self._copies[key] = (gate_up, down, *scales.values())
        self.nbytes = sum(t.nbytes for copy in self._copies.values() for t in copy)

    def read_into(
        self, key: ExpertKey, gate_up_2ID: torch.Tensor, down_DI: torch.Tensor, scales: Scales | None = None
    ) -> int:
        copy = self._copies[key]
        dests = (gate_up_2ID, down_DI, *(scales or {}).values())
        for dest, src in zip(dests, copy, strict=True):
            if dest.device.type == "cuda":  # pinned source: async H2D on the current stream
                dest.copy_(src, non_blocking=True)
            else:
                _copy(dest, src)
        return sum(t.nbytes for t in copy)

    def close(self) -> None:
        self._copies.clear()


class SlotPoolLayout(Protocol):
    """What `RamStore` needs of a slot pool: one slot's tensors (`moeflow.offload.cache.SlotPool`)."""

    gate_up_S2ID: torch.Tensor
    down_SDI: torch.Tensor

    def scale_views(self, s: int) -> Scales: ...
