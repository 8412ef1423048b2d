"""The reader pool: a few threads that read experts into slots, several reads in flight.

A read spends its time in `os.preadv` and a memory copy, both of which release the GIL, so the
readers overlap each other and the compute thread's forward. Two kinds of work share the threads:

- *urgent* reads: a layer's demand misses. The compute thread queues them together (`start`) and,
  whenever it has nothing to compute, reads any of its own that no reader has started yet (`help`), so
  a miss never waits behind prefetches already in flight and a pool of busy readers cannot stall it;
  `finish` waits for all of them, so no read outlives the slots it writes into;
- *background* reads: prefetches (`submit`), taken only when no urgent read is queued.

The pool knows nothing of slots or keys: it runs callables. `ExpertCache` decides what is read
where, under its own lock.

`ProcessReaderPool` keeps the same protocol with no reader thread at all: the reads go to a process of
its own (`moeflow.offload.mover`, whose note says why), and the compute thread sends them and takes in
the replies itself.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

from moeflow.offload.mover import BusyClock, ReaderProcess, Reply, Request, Run

T = TypeVar("T")


class ReadJob(Generic[T]):
    """One callable, run once: by a reader, or by the thread that waits for it if no reader took it first."""

    __slots__ = ("fn", "started", "done", "result", "error")

    def __init__(self, fn: Callable[[], T]) -> None:
        self.fn = fn
        self.started = False  # claimed by a thread (set under the pool's lock)
        self.done = False
        self.result: T | None = None
        self.error: BaseException | None = None

    def _execute(self) -> None:
        try:
            self.result = self.fn()
        except Exception as e:  # handed to whoever waits for the job
            self.error = e


class ReaderPool:
    """`threads` reader threads. `threads=0` runs every job in the thread that submits or waits for it."""

    def __init__(self, threads: int, *, name: str = "moeflow-reader") -> None:
        if threads < 0:
            raise ValueError(f"reader threads must be >= 0, got {threads}")
        self.threads = threads
        # Two conditions on one lock: readers wait for work, waiters for finished reads. A finished read wakes only
        # its waiters; with one condition it woke every idle reader too, all of which took the GIL to go back to
        # sleep, once per read (many reads per token, and the cost of a read is small for a quantized expert).
        self._lock = threading.Lock()
        self._work_cv = threading.Condition(self._lock)
        self._done_cv = threading.Condition(self._lock)
        self._urgent: deque[ReadJob] = deque()
        self._background: deque[ReadJob] = deque()
        self._closed = False
        self._busy = BusyClock()
        self._workers = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for w in self._workers:
            w.start()

    def submit(self, fn: Callable[[], T]) -> ReadJob[T]:
        """Queue a background read (a prefetch). Without reader threads it runs now, in this thread."""
        job = ReadJob(fn)
        if not self._workers:
            job.started = True
            self._execute(job)
            job.done = True
            return job
        with self._lock:
            if self._closed:
                raise RuntimeError("the reader pool is closed")
            self._background.append(job)
            self._work_cv.notify()
        return job

    def submit_all(self, fns: Sequence[Callable[[], T]]) -> list[ReadJob[T]]:
        """`submit` each of `fns`, in order (`ProcessReaderPool.submit_all`'s protocol)."""
        return [self.submit(fn) for fn in fns]

    def start(self, fns: Sequence[Callable[[], T]]) -> list[ReadJob[T]]:
        """Queue `fns` as urgent reads, ahead of every background read, and return at once. The caller runs
        those no reader has claimed when it is free (`help`) and must `finish` them all, even when interrupted:
        no read may still be writing into a slot its caller is about to give back."""
        jobs = [ReadJob(fn) for fn in fns]
        if jobs and self._workers:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the reader pool is closed")
                self._urgent.extend(jobs)
                self._work_cv.notify(len(jobs))
        return jobs

    def help(self, jobs: Sequence[ReadJob]) -> bool:
        """Run, in this thread, one of `jobs` that no thread has started; False when every one has started."""
        for job in jobs:
            if self._claim(job):
                try:
                    self._execute(job)
                finally:
                    self._finish(job)
                return True
        return False

    def finish(self, jobs: Sequence[ReadJob]) -> None:
        """Wait until every job of `jobs` has finished; those no thread has started are abandoned (their error
        says so): after an interruption, no read of `jobs` is still writing anywhere once this returns."""
        with self._lock:
            for job in jobs:
                if not job.started:
                    job.started = job.done = True
                    if job in self._urgent:
                        self._urgent.remove(job)
                    job.error = RuntimeError("read abandoned")
            self._done_cv.wait_for(lambda: all(j.done for j in jobs))

    def wait(self, jobs: Sequence[ReadJob]) -> None:
        """Block until `jobs` (from `submit`) have finished."""
        with self._lock:
            self._done_cv.wait_for(lambda: all(j.done for j in jobs))

    def reading_s(self) -> float:
        """Seconds so far with at least one read in progress, in any thread."""
        return self._busy.seconds()

    def poll(self) -> None:
        """Nothing to collect: reader threads settle their own reads (`ProcessReaderPool.poll`)."""

    def drain(self) -> None:
        """Nothing to drive: reader threads run what is queued on their own (`ProcessReaderPool.drain`)."""

    def close(self) -> None:
        """Drop queued background reads, let reads in progress finish, stop the threads."""
        with self._lock:
            self._closed = True
            dropped = list(self._background)
            self._background.clear()
            for job in dropped:
                job.started = job.done = True
                job.error = RuntimeError("reader pool closed before the read started")
            self._work_cv.notify_all()
            self._done_cv.notify_all()
        for w in self._workers:
            w.join()

    # ---- internals ------------------------------------------------------------------------------

    def _claim(self, job: ReadJob) -> bool:
        with self._lock:
            if job.started:
                return False
            job.started = True
            if job in self._urgent:
                self._urgent.remove(job)
            return True

    def _execute(self, job: ReadJob) -> None:
        with self._busy:  # reading time (`reading_s`), in whichever thread runs the job
            job._execute()

    def _finish(self, job: ReadJob) -> None:
        with self._lock:
            job.done = True
            self._done_cv.notify_all()

    def _work(self) -> None:
        while True:
            with self._lock:
                self._work_cv.wait_for(lambda: self._urgent or self._background or self._closed)
                if self._urgent:
                    job = self._urgent.popleft()
                elif self._background:
                    job = self._background.popleft()
                else:
                    return
                job.started = True
            self._execute(job)
            self._finish(job)


class MoveTask(Protocol):
    """A read that the reader process can do (`ProcessReaderPool`): worked out and settled in the compute thread,
    its bytes moved by the other process; or, where the compute thread takes it over, done whole by `run`."""

    def run(self) -> None:
        """The whole read, in the calling thread (may raise, once the task has recorded its failure)."""

    def begin(self) -> tuple[list[Run], bool, int] | None:
        """About to be sent: its byte moves, whether to check them for NaN/Inf, and after how many of its runs the
        process replies early (`Request.early`; 0: once, at the end); or None: nothing to read (the task has
        settled itself)."""

    def early(self) -> None:
        """The process has read the first runs (`begin`'s count of them); the rest are still being read."""

    def end(self, reply: Reply) -> None:
        """The reader process has done its moves (or failed: `reply.error()`)."""


class MoveJob:
    """One `MoveTask` in a `ProcessReaderPool`."""

    __slots__ = ("task", "started", "done", "error")

    def __init__(self, task: MoveTask) -> None:
        self.task = task
        self.started = False  # sent, or run in the compute thread
        self.done = False
        self.error: BaseException | None = None


class ProcessReaderPool:
    """`ReaderPool`'s protocol over a `ReaderProcess`, driven by the compute thread alone (no thread of this process
    ever waits on a read, so none takes the GIL from the forward): urgent reads are sent at once, and the process
    serves them before any read ahead, which waits while they run (`moeflow.offload.mover._Schedule`); at most
    `window` reads ahead are in the process at once (more would queue there, where they could not be dropped); the
    replies are collected whenever the compute thread passes by (`poll`, at every MoE layer) or waits (`help`).
    An urgent read that finds the process still starting is read by the compute thread itself (`help`), as with
    reader threads. One thread only: the engine's."""

    def __init__(self, process: ReaderProcess, *, window: int) -> None:
        self.process = process
        self.threads = process.threads  # the reader process's (none in this one)
        self.window = max(1, window)
        self._urgent: deque[MoveJob] = deque()
        self._background: deque[MoveJob] = deque()
        self._in_flight: dict[int, tuple[MoveJob, bool]] = {}  # request id -> (job, urgent)
        self._ahead = 0  # reads ahead in flight (the window's count)
        self._next = 0
        self._closed = False
        self._busy = BusyClock()  # the reads done here (`_run_here`)

    def reading_s(self) -> float:
        """Seconds so far with a read in progress: the reader process's, as of its latest reply, and the reads done
        here (rare: while the process starts, or when its window is full of reads ahead)."""
        return self.process.reading_s + self._busy.seconds()

    def submit(self, task: MoveTask) -> MoveJob:
        """Queue a background read (a prefetch) and send what the window allows."""
        return self.submit_all((task,))[0]

    def submit_all(self, tasks: Sequence[MoveTask]) -> list[MoveJob]:
        """`submit` for several reads ahead at once (one plan's): what the window allows of them goes in one write to
        the process, which wakes it once (a write costs the compute thread ~20 us in a decode, waking the process
        ~50-150 us of the other core: `ReaderProcess.send`)."""
        if self._closed:
            raise RuntimeError("the reader pool is closed")
        jobs = [MoveJob(t) for t in tasks]
        self._background.extend(jobs)
        self._pump()
        return jobs

    def start(self, tasks: Sequence[MoveTask]) -> list[MoveJob]:
        """Queue `tasks` as urgent reads, ahead of every background read, and send what the window allows."""
        if self._closed:
            raise RuntimeError("the reader pool is closed")
        jobs = [MoveJob(t) for t in tasks]
        self._urgent.extend(jobs)
        self._pump()
        return jobs

    def help(self, jobs: Sequence[MoveJob]) -> bool:
        """Read one of `jobs` that is not sent yet here, else wait for the next reply; False when nothing is queued
        or in flight (nothing can change)."""
        for job in jobs:
            if not job.started:
                self._urgent.remove(job)
                self._run_here(job)
                return True
        if not self._in_flight:
            if not (self._urgent or self._background):
                return False
            self.process.wait_ready(block=True)  # what is queued waits for the process to come up
            self._pump()
            return True
        self._collect(block=True)
        return True

    def finish(self, jobs: Sequence[MoveJob]) -> None:
        """Wait until every job of `jobs` has finished; those not sent are abandoned (`ReaderPool.finish`)."""
        for job in jobs:
            if not job.started:
                self._urgent.remove(job)
                job.started = job.done = True
                job.error = RuntimeError("read abandoned")
        while self._in_flight and not all(j.done for j in jobs):
            self._collect(block=True)

    def poll(self) -> None:
        """Collect the replies that have come and send what they leave room for; never waits."""
        if self._in_flight:
            self._collect(block=False)
        else:
            self._pump()

    def drain(self) -> None:
        """Run every queued read to its end."""
        if self._urgent or self._background:
            self.process.wait_ready(block=True)
        self._pump()
        while self._in_flight:
            self._collect(block=True)

    def close(self) -> None:
        """Drop queued background reads, let reads in flight finish, stop the process."""
        if self._closed:
            return
        self._closed = True
        self._background.clear()
        try:
            while self._in_flight:
                self._collect(block=True)
        finally:
            self.process.close()

    def _run_here(self, job: MoveJob) -> None:
        job.started = True
        try:
            with self._busy:
                job.task.run()
        except Exception as e:  # recorded by the task; kept like a reader thread's
            job.error = e
        job.done = True

    def _pump(self) -> None:
        if not self.process.wait_ready(block=False):  # still starting: urgent reads are read here (`help`)
            return
        requests = []
        while self._urgent or (self._ahead < self.window and self._background):
            urgent = bool(self._urgent)
            job = (self._urgent or self._background).popleft()
            job.started = True
            try:
                moves = job.task.begin()
            except BaseException as e:  # the caller sees it; the job is over
                job.error, job.done = e, True
                raise
            if moves is None:
                job.done = True
                continue
            runs, check, early = moves
            self._next += 1
            self._in_flight[self._next] = (job, urgent)
            requests.append(Request(self._next, runs, check, urgent, early))
            self._ahead += not urgent
        if requests:
            self.process.send(requests)

    def _collect(self, *, block: bool) -> None:
        for reply in self.process.replies(block=block):
            if reply.early:  # the first runs are in; the job stays in flight
                job = self._in_flight[reply.job][0]
                try:
                    job.task.early()
                except Exception as e:  # recorded by the task
                    job.error = e
                continue
            job, urgent = self._in_flight.pop(reply.job)
            self._ahead -= not urgent
            try:
                job.task.end(reply)
            except Exception as e:  # recorded by the task
                job.error = e
            job.done = True
        self._pump()
