"""The reader process (`moeflow.offload.mover`) and the pool that drives it from the compute thread
(`moeflow.offload.readers.ProcessReaderPool`): the process fills slots byte for byte as `DiskStore.read_into` does,
through its buffer or straight into the slot; its failures and findings come back as replies; the pool keeps the
reader threads' protocol (urgent before background, a bounded window of reads ahead, the compute thread reading
for itself while the process starts, unsent reads abandoned); and the engine reads in it by default on the CPU, with
the same tokens.
"""

import errno
import logging
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from moeflow.kernels import experts_rows, weighted_sum

import moeflow
import moeflow.offload.cache as cache_module
from moeflow.model.checkpoint import open_checkpoint
from moeflow.offload.cache import SlotPool
from moeflow.offload.layer import _one_token, _pair_halves
from moeflow.offload.mover import _LENGTH, _REQUEST, BusyClock, ReaderProcess, Reply, Request, _Schedule
from moeflow.offload.readers import ProcessReaderPool
from moeflow.offload.store import DiskStore
from moeflow.testing import save_tiny_checkpoint
from moeflow.tools.widen import widen_experts


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mover")
    src = save_tiny_checkpoint("mixtral", root / "src", intermediate_size=64, hidden_size=32)
    return {"packed": src, "aligned": widen_experts(src, root / "aligned", 128, progress=False),
            "large": widen_experts(src, root / "large", 8192, progress=False)}  # 3 MiB experts


def _setup(path, capacity=3, chunk_bytes=4096):
    ckpt = open_checkpoint(path)
    loc = next(iter(ckpt.experts.values()))
    store = DiskStore(ckpt)
    pool = SlotPool(capacity=capacity, inter=loc.inter, hidden=loc.hidden, dtype=torch.float32,
                    device=torch.device("cpu"))  # fmt: skip
    process = ReaderProcess(store.files, pool.regions, threads=2, direct_io=store.direct_io,
                            buffer_bytes=store.read_buffer_bytes(), chunk_bytes=chunk_bytes)  # fmt: skip
    return ckpt, store, pool, process


def _collect(process, n):
    replies = []
    while len(replies) < n:
        replies += process.replies(block=True)
    return {r.job: r for r in replies}


def _early_then_last(process, gate_up_slot, gate_up):
    """The two replies to the one request in flight that asks for an early reply: the early one, with the slot's
    gate/up matrices equal to `gate_up` when it comes, and the last (the two may come in one batch)."""
    replies = process.replies(block=True)
    assert replies[0].early and torch.equal(gate_up_slot, gate_up)
    while replies[-1].early:
        replies += process.replies(block=True)
    assert [r.early for r in replies] == [True, False]
    return replies


@pytest.mark.parametrize("layout", ["packed", "aligned"])  # through the process's buffer / straight into the slot
def test_the_process_fills_slots_as_read_into_does(folders, layout):
    ckpt, store, pool, process = _setup(folders[layout])
    try:
        keys = list(ckpt.experts)[:6]
        for start in range(0, len(keys), pool.capacity):
            batch = keys[start : start + pool.capacity]
            pool.gate_up_S2ID.fill_(-1.0)
            pool.down_SDI.fill_(-1.0)
            requests = []
            for s, key in enumerate(batch):
                runs, check = store.moves(key, pool.gate_up_S2ID[s], pool.down_SDI[s])
                assert all(r.direct for r in runs) == (layout == "aligned")
                requests.append((s, runs, check, s % 2 == 0))  # urgent and ahead (read in 4 KiB pieces)
            reading = process.reading_s
            process.send(requests)
            replies = _collect(process, len(batch))
            assert process.reading_s > reading  # the process's clock of its reads came with their replies
            for s, key in enumerate(batch):
                gate_up, down = torch.empty_like(pool.gate_up_S2ID[s]), torch.empty_like(pool.down_SDI[s])
                nbytes = store.read_into(key, gate_up, down)
                assert replies[s] == Reply(s, nbytes, 0, False, False, "")
                assert torch.equal(pool.gate_up_S2ID[s], gate_up) and torch.equal(pool.down_SDI[s], down)
    finally:
        process.close()


def test_an_urgent_read_overtakes_a_read_ahead_in_progress(folders):
    ckpt, store, pool, process = _setup(folders["large"], capacity=2)
    try:
        assert process.wait_ready(block=True)
        first, second = list(ckpt.experts)[:2]
        ahead = store.moves(first, pool.gate_up_S2ID[0], pool.down_SDI[0])
        urgent = store.moves(second, pool.gate_up_S2ID[1], pool.down_SDI[1])
        process.send([(1, *ahead, False)])  # 3 MiB in 4 KiB pieces: 768 reads
        process.send([(2, *urgent, True)])
        order = []
        while len(order) < 2:
            order += [r.job for r in process.replies(block=True)]
        assert order == [2, 1]
        for s, key in enumerate((first, second)):
            gate_up, down = torch.empty_like(pool.gate_up_S2ID[s]), torch.empty_like(pool.down_SDI[s])
            store.read_into(key, gate_up, down)
            assert torch.equal(pool.gate_up_S2ID[s], gate_up) and torch.equal(pool.down_SDI[s], down)
    finally:
        process.close()


def test_the_schedule_serves_urgent_reads_first_up_to_reads_at_once_and_nothing_ahead_beside_them():
    def request(job, urgent):
        body = _REQUEST.pack(job, 0, urgent, 0, 0)
        return _LENGTH.pack(len(body)) + body

    r, w = os.pipe()
    schedule = _Schedule(r, reads=2)
    try:
        os.write(w, request(1, False) + request(2, True) + request(3, True) + request(4, True))
        assert schedule.take()[:3] == (2, False, True)  # urgent before ahead, whatever came first
        assert schedule.take()[0] == 3
        assert schedule._next(pop=False) is None  # `reads` urgent at once; and nothing ahead beside them
        schedule.done(True)
        assert schedule.take()[0] == 4
        schedule.done(True)
        assert schedule._next(pop=False) is None  # 4 still runs: the read ahead waits
        schedule.done(True)
        schedule.pause()  # no urgent read queued or running: a read ahead goes on at once
        assert schedule.take()[0] == 1
        schedule.done(False)
        os.close(w)
        w = None
        assert schedule.take() is None
    finally:
        os.close(r)
        if w is not None:
            os.close(w)


def test_the_busy_clock_counts_reads_in_progress_together_once():
    now = [0.0]
    clock = BusyClock(clock=lambda: now[0])
    with clock:  # reads from 0 to 3 and from 1 to 4: busy 4 seconds, not 6
        now[0] = 1.0
        with clock:
            now[0] = 3.0
        assert clock.seconds() == 3.0
        now[0] = 4.0
    now[0] = 10.0  # idle
    with clock:
        now[0] = 11.0
        assert clock.seconds() == 5.0  # the read in progress counts up to now
    assert clock.seconds() == 5.0


def test_the_busy_clock_logs_each_busy_interval_once_when_asked(tmp_path, monkeypatch):
    log = tmp_path / "reads.log"
    now = [0.0]
    clock = BusyClock(clock=lambda: now[0], log=str(log))
    with clock:  # two reads overlapping: one interval, 0 to 4
        now[0] = 1.0
        with clock:
            now[0] = 3.0
        now[0] = 4.0
    now[0] = 10.0
    with clock:
        now[0] = 11.5
    assert log.read_text() == "0.0 4.0\n10.0 11.5\n"
    monkeypatch.setenv("MOEFLOW_READ_LOG", str(tmp_path / "env.log"))
    with BusyClock(clock=lambda: 2.0):  # the environment names the file the reader process inherits
        pass
    assert (tmp_path / "env.log").read_text() == "2.0 2.0\n"
    monkeypatch.delenv("MOEFLOW_READ_LOG")
    with BusyClock():  # no log: nothing written anywhere
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env.log", "reads.log"]


def test_a_shard_cut_short_after_opening_is_an_error_naming_it(folders, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(folders["packed"], path)
    ckpt, store, pool, process = _setup(path)
    try:
        last = max(ckpt.experts, key=lambda k: ckpt.experts[k].spans[0].offset)
        shard = ckpt.experts[last].spans[0].file
        with open(shard, "r+b") as f:
            f.truncate(ckpt.experts[last].spans[0].offset + 16)
        runs, check = store.moves(last, pool.gate_up_S2ID[0], pool.down_SDI[0])
        process.send([(7, runs, check, False)])
        (reply,) = _collect(process, 1).values()
        assert reply.job == 7 and reply.errno == errno.EIO
        error = reply.error()
        assert isinstance(error, OSError) and "truncated" in str(error) and shard.name in str(error)
    finally:
        process.close()


def test_an_early_reply_comes_once_the_first_runs_are_in_and_the_last_one_at_the_end(folders):
    """`Request.early`: the aligned layout reads an expert in two runs (gate/up into their slot, then down): a reply
    after the first says how many bytes are in, and the gate/up matrices are there when it comes; the last reply
    carries the whole read, as a request without an early reply does."""
    ckpt, store, pool, process = _setup(folders["large"])
    try:
        key = list(ckpt.experts)[1]
        gate_up, down = torch.empty_like(pool.gate_up_S2ID[0]), torch.empty_like(pool.down_SDI[0])
        nbytes = store.read_into(key, gate_up, down)
        for urgent in (True, False):  # whole, and in chunks with pauses between them
            pool.gate_up_S2ID.fill_(-1.0)
            pool.down_SDI.fill_(-1.0)
            runs, check = store.moves(key, pool.gate_up_S2ID[0], pool.down_SDI[0])
            assert len(runs) == 2 and all(r.direct for r in runs)
            process.send([Request(5, runs, check, urgent, early=1)])
            first, last = _early_then_last(process, pool.gate_up_S2ID[0], gate_up)
            assert first == Reply(5, runs[0].end - runs[0].start, 0, False, False, "", early=True)
            assert last == Reply(5, nbytes, 0, False, False, "")
            assert torch.equal(pool.down_SDI[0], down)
        with pytest.raises(ValueError, match="before the last"):
            process.send([Request(6, runs, check, True, early=2)])
    finally:
        process.close()


@pytest.mark.parametrize("layout", ["packed", "large"])
def test_gate_up_first_moves_the_same_pieces_with_the_gate_up_runs_alone_first(folders, layout):
    """`DiskStore.moves(gate_up_first=True)`: the runs that fill the gate/up matrices come first and fill nothing
    else, whatever the file's order (packed: gate, down, up back to back in one run otherwise); the same pieces, and
    the process fills the slot as `read_into` does, its early reply coming with gate/up in place."""
    ckpt, store, pool, process = _setup(folders[layout])
    try:
        gate_up_slot = pool.gate_up_S2ID[0]
        lo, hi = gate_up_slot.data_ptr(), gate_up_slot.data_ptr() + gate_up_slot.nbytes
        for key in list(ckpt.experts)[:3]:
            whole, _ = store.moves(key, pool.gate_up_S2ID[0], pool.down_SDI[0])
            runs, check = store.moves(key, pool.gate_up_S2ID[0], pool.down_SDI[0], gate_up_first=True)
            assert len(whole) == (1 if layout == "packed" else 2) and len(runs) == (3 if layout == "packed" else 2)
            assert sorted(p for r in runs for p in r.pieces) == sorted(p for r in whole for p in r.pieces)
            inside = [all(lo <= p.address < hi for p in r.pieces) for r in runs]
            assert inside == [True] * (len(runs) - 1) + [False]  # gate/up alone first, then down
            assert not any(lo <= p.address < hi for p in runs[-1].pieces)
            gate_up, down = torch.empty_like(pool.gate_up_S2ID[0]), torch.empty_like(pool.down_SDI[0])
            store.read_into(key, gate_up, down)
            pool.gate_up_S2ID.fill_(-1.0)
            pool.down_SDI.fill_(-1.0)
            process.send([Request(7, runs, check, True, early=len(runs) - 1)])
            first, last = _early_then_last(process, pool.gate_up_S2ID[0], gate_up)
            assert first.errno == 0 and last.errno == 0 and last.nbytes >= sum(r.end - r.start for r in runs)
            assert torch.equal(pool.down_SDI[0], down)
    finally:
        process.close()


def test_a_read_that_fails_after_its_early_reply_ends_with_the_error(folders, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(folders["large"], path)
    ckpt, store, pool, process = _setup(path)
    try:
        last = max(ckpt.experts, key=lambda k: max(s.offset for s in ckpt.experts[k].spans))
        down = max(ckpt.experts[last].spans, key=lambda s: s.offset)  # the down matrix: the second run
        with open(down.file, "r+b") as f:  # cut short after opening
            f.truncate(down.offset + 16)
        runs, check = store.moves(last, pool.gate_up_S2ID[0], pool.down_SDI[0])
        process.send([Request(3, runs, check, True, early=1)])
        replies = []
        while not replies or replies[-1].early:
            replies += process.replies(block=True)
        assert [r.early for r in replies] == [True, False]
        assert replies[0].errno == 0 and replies[1].errno == errno.EIO and "truncated" in replies[1].message
    finally:
        process.close()


def test_not_finite_weights_come_back_as_the_store_s_warning(folders, tmp_path, caplog):
    path = tmp_path / "m"
    shutil.copytree(folders["packed"], path)
    ckpt = open_checkpoint(path)
    key = list(ckpt.experts)[3]
    span = ckpt.experts[key].spans[0]
    with open(span.file, "r+b") as f:  # one float32 NaN in the expert's first piece
        f.seek(span.offset + 8)
        f.write(b"\x00\x00\xc0\x7f")
    ckpt, store, pool, process = _setup(path)
    try:
        runs, check = store.moves(key, pool.gate_up_S2ID[0], pool.down_SDI[0])
        assert check  # the first read of an expert is checked...
        assert not store.moves(key, pool.gate_up_S2ID[1], pool.down_SDI[1])[1]  # ...only the first
        process.send([(1, runs, check, False)])
        (reply,) = _collect(process, 1).values()
        assert reply.not_finite and reply.errno == 0
        with caplog.at_level(logging.WARNING, logger="moeflow.offload.store"):
            store.moved(key, reply)
        assert "NaN or Inf" in caplog.text
    finally:
        process.close()


def test_a_read_s_runs_are_planned_once_per_expert_and_slot(folders, monkeypatch):
    ckpt, store, pool, process = _setup(folders["aligned"])
    process.close()
    first, second = list(ckpt.experts)[:2]
    slot = (pool.gate_up_S2ID[0], pool.down_SDI[0])
    runs, check = store.moves(first, *slot)
    again, check_again = store.moves(first, pool.gate_up_S2ID[0], pool.down_SDI[0])  # new views of the same slot
    assert check and not check_again and again is runs  # kept, not rebuilt; checked for NaN/Inf only the first time
    other, _ = store.moves(first, pool.gate_up_S2ID[1], pool.down_SDI[1])  # the same expert into another slot
    gate_up = pool.gate_up_S2ID[0].data_ptr()
    shift = {True: pool.gate_up_S2ID.stride(0) * 4, False: pool.down_SDI.stride(0) * 4}  # float32: 4 bytes
    assert [p.address for r in other for p in r.pieces] == [
        p.address + shift[gate_up <= p.address < gate_up + pool.gate_up_S2ID[0].nbytes] for r in runs for p in r.pieces]
    assert store.moves(second, *slot)[0] != runs  # another expert into the same slot: its own runs
    monkeypatch.setattr("moeflow.offload.store._RUNS_KEPT", 3)  # full: the next new runs start the kept ones again
    store.moves(second, pool.gate_up_S2ID[1], pool.down_SDI[1])
    rebuilt, _ = store.moves(first, *slot)
    assert rebuilt == runs and rebuilt is not runs


# ---- ProcessReaderPool's protocol, on a process that answers when told ------------------------------------------


class FakeProcess:
    threads = 1

    def __init__(self, *, ready=True):
        self.sent: list[int] = []
        self.writes = 0  # `send` calls: one write to the pipe each
        self.waiting: list[int] = []
        self.closed = False
        self.ready = ready
        self.waited_for_ready = False

    def wait_ready(self, *, block):
        if block and not self.ready:
            self.ready = self.waited_for_ready = True
        return self.ready

    def send(self, requests):
        self.writes += 1
        for job, runs, *_ in requests:
            self.sent.append(runs[0])
            self.waiting.append(job)

    def replies(self, *, block):
        if not self.waiting:
            assert not block, "would wait forever"
            return []
        out = [Reply(job, 1, 0, False, False, "") for job in self.waiting]
        self.waiting = []
        return out

    def close(self):
        self.closed = True


class Task:
    def __init__(self, name, log, *, skip=False):
        self.name, self.log, self.skip = name, log, skip

    def run(self):
        self.log.append(("run", self.name))

    def begin(self):
        self.log.append(("begin", self.name))
        return None if self.skip else ([self.name], False, 0)

    def end(self, reply):
        self.log.append(("end", self.name))


def test_urgent_reads_are_sent_at_once_and_the_window_bounds_the_reads_ahead_in_the_process():
    log, process = [], FakeProcess()
    pool = ProcessReaderPool(process, window=2)
    for name in ("a", "b", "c"):
        pool.submit(Task(name, log))
    assert process.sent == ["a", "b"]  # the window is full: c waits here, where it can still be dropped
    jobs = pool.start([Task("x", log), Task("y", log)])
    assert process.sent == ["a", "b", "x", "y"]  # urgent: past the window (the process serves them first)
    assert pool.help(jobs)  # nothing to read here: waits for replies
    pool.poll()
    assert process.sent == ["a", "b", "x", "y", "c"]
    pool.finish(jobs)
    assert all(j.done for j in jobs)
    pool.drain()
    assert [e for e in log if e[0] == "end"] == [("end", n) for n in ("a", "b", "x", "y", "c")]
    assert ("run", "x") not in log
    pool.close()
    assert process.closed


def test_one_plan_s_reads_ahead_go_to_the_process_in_one_write():
    log, process = [], FakeProcess()
    pool = ProcessReaderPool(process, window=3)
    jobs = pool.submit_all([Task(name, log) for name in ("a", "b", "c", "d")])
    assert process.sent == ["a", "b", "c"] and process.writes == 1  # what the window allows, in one write
    pool.drain()
    assert process.sent == ["a", "b", "c", "d"] and all(j.done for j in jobs)
    pool.close()


class EarlyProcess(FakeProcess):
    """Replies early first to the requests that ask for it, then, at the next call, to all."""

    def send(self, requests):
        super().send(requests)
        self.early = [*getattr(self, "early", []), *(r.job for r in requests if r.early)]

    def replies(self, *, block):
        if self.early:
            out, self.early = [Reply(job, 1, 0, False, False, "", early=True) for job in self.early], []
            return out
        return super().replies(block=block)


class EarlyTask(Task):
    def begin(self):
        self.log.append(("begin", self.name))
        return [self.name], False, 1

    def early(self):
        self.log.append(("early", self.name))


def test_an_early_reply_reaches_its_task_and_the_read_stays_in_flight():
    log, process = [], EarlyProcess()
    pool = ProcessReaderPool(process, window=1)
    ahead = pool.submit(EarlyTask("a", log))
    pool.submit(Task("b", log))
    jobs = pool.start([EarlyTask("x", log)])
    assert process.sent == ["a", "x"]
    pool.poll()  # the early replies: a and x are still in flight, b still waits for room in the window
    assert ("early", "a") in log and ("early", "x") in log and not any(e[0] == "end" for e in log)
    assert not ahead.done and not jobs[0].done and process.sent == ["a", "x"]
    pool.finish(jobs)
    assert jobs[0].done and ahead.done and process.sent == ["a", "x", "b"]
    assert log.index(("early", "x")) < log.index(("end", "x"))
    pool.drain()
    pool.close()


def test_unsent_urgent_reads_are_abandoned_and_skipped_tasks_take_no_room():
    log, process = [], FakeProcess(ready=False)
    pool = ProcessReaderPool(process, window=1)
    pool.submit(Task("a", log))
    jobs = pool.start([Task("x", log)])
    pool.finish(jobs)  # x was never sent nor run: abandoned, as reader threads abandon an unstarted read
    assert jobs[0].done and "abandoned" in str(jobs[0].error) and ("begin", "x") not in log
    process.ready = True
    pool.drain()
    skipped = pool.submit(Task("s", log, skip=True))  # a cancelled prefetch: begun, nothing to read
    assert skipped.done and process.sent == ["a"]
    assert not pool.help([])  # nothing queued or in flight


def test_while_the_process_starts_urgent_reads_are_read_here_and_nothing_is_sent():
    log, process = [], FakeProcess(ready=False)
    pool = ProcessReaderPool(process, window=2)
    ahead = pool.submit(Task("a", log))
    jobs = pool.start([Task("x", log)])
    pool.poll()
    assert process.sent == [] and not process.waited_for_ready  # a request would wait for the process to start
    assert pool.help(jobs)  # so the compute thread reads x itself at once
    assert log == [("run", "x")] and jobs[0].done
    assert pool.help([])  # a read ahead is queued: waiting for it waits for the process, then sends it
    assert process.waited_for_ready and process.sent == ["a"]
    pool.drain()
    assert ahead.done and log[-1] == ("end", "a")


def test_the_process_says_when_it_is_up(folders):
    _, _, _, process = _setup(folders["packed"])
    try:
        assert process.wait_ready(block=True) and process.ready
        assert process.replies(block=False) == []  # the ready reply is not a read's
    finally:
        process.close()


# ---- the engine -------------------------------------------------------------------------------------------------


def test_peak_rss_counts_the_reader_process_s_own_memory_once(tiny_checkpoints):
    from moeflow.engine import peak_rss_bytes
    from moeflow.offload.mover import readers_peak_bytes

    with moeflow.load(tiny_checkpoints["mixtral"], expert_budget="25%") as engine:
        process = engine.cache.readers.process
        assert process.wait_ready(block=True)
        engine.generate([1, 5, 9, 13], max_new_tokens=4)
        own = process.own_peak_bytes()
        assert 5 << 20 < own < 200 << 20  # an interpreter with numpy, not the slot pool it shares
        assert readers_peak_bytes() >= own
    assert readers_peak_bytes() >= own  # still counted once the engine is closed (as `moeflow generate` reports it)
    assert peak_rss_bytes() >= own + (50 << 20)  # the engine's own process (torch) comes on top


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("policy", ["lru", "predictive"])
def test_the_engine_reading_in_a_process_decodes_the_same_tokens(tiny_checkpoints, family, policy):
    options = {"policy": policy} | ({"predictor": "gate", "prediction_trial": False} if policy == "predictive" else {})
    results = {}
    for name, extra in {"process": {}, "threads": {"read_process": False}, "ram": {"store": "ram"}
                        }.items():  # fmt: skip
        with moeflow.load(tiny_checkpoints[family], expert_budget="25%", **options, **extra) as engine:
            assert engine.cache.in_process == (name == "process")  # a RAM store reads in threads
            r = engine.generate([1, 5, 9, 13, 2, 7], max_new_tokens=16, temperature=0)
            engine.settle()
            results[name] = (r.token_ids, engine.stats())
    (tokens, stats), (tokens_threads, stats_threads) = results["process"], results["threads"]
    assert tokens == tokens_threads == results["ram"][0]
    assert stats.misses > 0 and stats.resident_peak_bytes <= stats.budget_bytes
    if policy == "lru":  # the same reads, byte for byte
        assert (stats.misses, stats.bytes_read) == (stats_threads.misses, stats_threads.bytes_read)


def _decode_with_early_replies(path, monkeypatch):
    """Greedy tokens through the disk store with every read in the process replying early (the size cut lowered to
    every expert: `ExpertCache.early_gate_up`) and through the RAM store (no early replies); the slots whose gate/up
    matrices landed early; and, for the first expert, its runs, the runs before its early reply and the slots' format
    kind (None: full precision)."""
    monkeypatch.setattr(cache_module, "EARLY_GATE_UP_BYTES", 0)
    landed = []
    landing = cache_module.ExpertCache._gate_up_landed
    monkeypatch.setattr(cache_module.ExpertCache, "_gate_up_landed",
                        lambda self, s: landed.append(s) or landing(self, s))  # fmt: skip
    tokens, first = {}, None
    for store in ("disk", "ram"):
        with moeflow.load(path, expert_budget="25%", store=store, policy="lru") as engine:
            cache = engine.cache
            assert cache.early_gate_up == (store == "disk")
            if store == "disk":
                runs, _, early = cache.moves(next(iter(engine.checkpoint.experts)), 0)
                first = (len(runs), early, cache.pool.fmt and cache.pool.fmt.kind)
                cache.readers.process.wait_ready(block=True)  # else the first reads are the compute thread's own
            tokens[store] = engine.generate([1, 5, 9, 13, 2, 7], max_new_tokens=12, temperature=0).token_ids
            assert engine.stats().misses > 0
    return tokens, landed, first


@pytest.mark.parametrize("layout", ["packed", "aligned", "large"])
def test_early_replies_keep_the_engine_s_tokens_in_every_layout(folders, layout, monkeypatch):
    """Large experts read in the process reply early once the runs that fill the gate/up matrices are in: one in the
    aligned layouts, two where the checkpoint stores gate, down, up (packed: w1, w2, w3); greedy tokens equal the RAM
    store's."""
    tokens, landed, (_, early, _) = _decode_with_early_replies(folders[layout], monkeypatch)
    assert early == (2 if layout == "packed" else 1)
    assert tokens["disk"] == tokens["ram"] and landed


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_experts_reply_early_and_keep_the_engine_s_tokens(folders, kind, monkeypatch, tmp_path):
    """A checkpoint that `moeflow quantize` wrote: the runs that fill the gate/up weights and their scales come first,
    the process replies once they are in, the layer computes their half (`kernels.quant.slot_halves`); greedy tokens
    equal the RAM store's, where nothing replies early."""
    from moeflow.tools.quantize import quantize_checkpoint

    path = quantize_checkpoint(folders["large"], tmp_path / kind, kind, progress=False)
    tokens, landed, (runs, early, fmt) = _decode_with_early_replies(path, monkeypatch)
    assert fmt == kind and 1 <= early < runs
    assert tokens["disk"] == tokens["ram"] and landed


def test_a_layer_s_rows_from_gate_up_halves_are_its_rows_bit_for_bit():
    """`moeflow.offload.layer._one_token`: one token's experts, one of them with its gate/up half computed early, the
    other landing whole, and one of another wave: the output is the exact path's (`experts_rows`, then the weighted
    sum) to the last bit."""
    torch.manual_seed(0)
    S, D, I = 4, 32, 48
    pool = SimpleNamespace(fmt=None, gate_up_S2ID=torch.randn(S, 2 * I, D), down_SDI=torch.randn(S, D, I))
    x_1D, weights_1K = torch.randn(1, D), torch.softmax(torch.randn(1, 3), -1)
    token_experts = [7, 2, 5]  # expert 7 in slot 1 (early half), 2 in slot 3 (whole), 5 in another wave
    compute, on_gate_up = _one_token(x_1D, token_experts, weights_1K, *_pair_halves(pool, x_1D, None, None))
    on_gate_up(7, 1)
    got = compute(iter([{2: 3}, {7: 1}]))
    slot_ids_1K = torch.tensor([[1, 3, -1]])
    want = weighted_sum(experts_rows(x_1D, pool.gate_up_S2ID, pool.down_SDI, slot_ids_1K), weights_1K, x_1D.dtype)
    assert torch.equal(got, want)
