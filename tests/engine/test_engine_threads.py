"""The engine owns its threads: compute threads (`threads=`), the OpenMP wait policy, and the reader pool."""

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import moeflow
from moeflow.cli import build_parser
from moeflow.config import EngineConfig
from moeflow.engine.engine import compute_threads, core_split, reader_threads

PROMPT = [3, 17, 29, 44, 5, 61, 90, 12, 7, 33, 101, 58]


@pytest.fixture
def restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_threads_is_validated(bad):
    with pytest.raises(moeflow.MoeflowError, match="--threads must be an integer >= 0"):
        EngineConfig(threads=bad)


def test_threads_is_a_cli_option():
    args = build_parser().parse_args(["generate", "--prompt", "x", "--threads", "3", "--readers", "5"])
    assert (args.threads, args.readers) == (3, 5)


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_readers_is_validated(bad):
    with pytest.raises(moeflow.MoeflowError, match="--readers must be an integer >= 0"):
        EngineConfig(readers=bad)


def test_automatic_readers_follow_the_expert_size():
    MiB = 1 << 20
    assert reader_threads(MiB // 2) == 2  # the shipped model's experts: two readers
    assert reader_threads(2 * MiB + 300_000) == 2  # int4 experts of the I/O-bound model
    assert reader_threads(8 * MiB - 1) == 2
    assert reader_threads(18 * MiB) == 1  # its fp32 experts: one large read at a time keeps the disk busy
    assert reader_threads(336 * MiB) == 1  # a Mixtral-8x7B expert in bf16


def test_readers_are_applied(tiny_checkpoints):
    path = tiny_checkpoints["mixtral"]
    with moeflow.load(path, expert_budget="all") as engine:
        ref = engine.generate(PROMPT, max_new_tokens=6).token_ids
    for n, threads in ((0, 2), (1, 1), (3, 3)):  # 0: the automatic rule (tiny experts: 2)
        with moeflow.load(path, expert_budget="25%", store="disk", readers=n) as engine:
            assert engine.cache.readers.threads == threads
            assert engine.generate(PROMPT, max_new_tokens=6).token_ids == ref


def test_threads_is_applied(tiny_checkpoints, restore_torch_threads):
    path = tiny_checkpoints["mixtral"]
    with moeflow.load(path, expert_budget="all") as engine:
        ref = engine.generate(PROMPT, max_new_tokens=6).token_ids
    for n in (1, 2):
        with moeflow.load(path, expert_budget="25%", threads=n) as engine:
            assert engine.threads == n and torch.get_num_threads() == n
            assert engine.generate(PROMPT, max_new_tokens=6).token_ids == ref


def test_automatic_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert compute_threads(3) == 3  # asked for: applied as given
    assert compute_threads(0) == 7  # automatic: one core left to the readers
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert compute_threads(0) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert compute_threads(0) is None  # the user's own setting is left alone
    assert compute_threads(2) == 2


def test_core_split():
    assert core_split(2, {5, 2, 9}) == ([2, 5], [9])  # the last core to the reader process
    assert core_split(1, {5, 2, 9}) == ([2, 5], [9])
    assert core_split(3, {5, 2, 9}) is None  # no core to spare
    assert core_split(1, {0}) is None
    assert core_split(1, None) is None  # no affinity on this system


def _process_cores(engine: moeflow.Engine) -> set[int]:
    pid = engine.cache.readers.process._proc.pid
    cores = [os.sched_getaffinity(int(t)) for t in os.listdir(f"/proc/{pid}/task")]
    assert cores and all(c == cores[0] for c in cores)
    return cores[0]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="one core")
def test_reader_process_and_compute_thread_get_their_own_cores(tiny_checkpoints, restore_torch_threads):
    path = tiny_checkpoints["mixtral"]
    before = os.sched_getaffinity(0)
    cores = sorted(before)
    with moeflow.load(path, expert_budget="all") as engine:
        ref = engine.generate(PROMPT, max_new_tokens=6).token_ids
    with moeflow.load(path, expert_budget="25%", store="disk", threads=1) as engine:
        assert engine.cache.in_process
        assert engine.generate(PROMPT, max_new_tokens=6).token_ids == ref
        assert os.sched_getaffinity(0) == set(cores[:-1])
        assert _process_cores(engine) == {cores[-1]}
    assert os.sched_getaffinity(0) == before  # given back on close
    with moeflow.load(path, expert_budget="25%", store="disk", threads=1, pin_cores=False) as engine:
        assert engine.generate(PROMPT, max_new_tokens=6).token_ids == ref
        assert os.sched_getaffinity(0) == before and _process_cores(engine) == before
    with moeflow.load(path, expert_budget="25%", store="disk", threads=len(cores)) as engine:  # no core to spare
        assert os.sched_getaffinity(0) == before and _process_cores(engine) == before
    # Two engines at once in one thread: the second parts the cores as the first did; given back when both close.
    first = moeflow.load(path, expert_budget="25%", store="disk", threads=1)
    with moeflow.load(path, expert_budget="25%", store="disk", threads=1) as second:
        assert _process_cores(first) == _process_cores(second) == {cores[-1]}
        assert os.sched_getaffinity(0) == set(cores[:-1])
        first.close()
        assert os.sched_getaffinity(0) == set(cores[:-1])  # the second still runs here
        assert second.generate(PROMPT, max_new_tokens=6).token_ids == ref
    assert os.sched_getaffinity(0) == before
    # An engine loaded in another thread while this one's is pinned pins nothing: it would share this engine's cores.
    seen, go = {}, threading.Event()

    def elsewhere() -> None:
        go.wait()
        with moeflow.load(path, expert_budget="25%", store="disk", threads=1) as other:
            seen["thread"], seen["process"] = os.sched_getaffinity(0), _process_cores(other)
            seen["tokens"] = other.generate(PROMPT, max_new_tokens=6).token_ids

    worker = threading.Thread(target=elsewhere)
    worker.start()  # before the pin: it may run anywhere
    with moeflow.load(path, expert_budget="25%", store="disk", threads=1) as engine:
        go.set()
        worker.join()
        assert os.sched_getaffinity(0) == set(cores[:-1]) and _process_cores(engine) == {cores[-1]}
    assert seen == {"thread": before, "process": before, "tokens": ref}
    assert os.sched_getaffinity(0) == before


def test_numpy_blas_runs_on_one_thread(tiny_checkpoints):
    """numpy does only the bookkeeping's one-row products (predictors, the lens, the reuse model): its BLAS pool is
    held to one thread, whose spinning workers would take the readers' core; `--kernels fast` (experts computed by
    that BLAS) gives it the compute threads instead. Checked in a fresh process: the setting is process-wide."""
    code = (
        "import sys, moeflow; from threadpoolctl import threadpool_info, threadpool_limits\n"
        "threadpool_limits(limits=2, user_api='blas')\n"
        "def blas(): return sorted({lib['num_threads'] for lib in threadpool_info() if lib['user_api'] == 'blas'})\n"
        "with moeflow.load(sys.argv[1], expert_budget='25%', threads=2) as engine: print(blas())\n"
        "with moeflow.load(sys.argv[1], expert_budget='25%', threads=2, kernels='fast') as engine: print(blas())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tiny_checkpoints["mixtral"])], capture_output=True,
                         text=True, check=True).stdout.split("\n")  # fmt: skip
    assert out[:2] == ["[1]", "[2]"]


@pytest.mark.parametrize(
    "env, code, expected",
    [
        ({}, "import moeflow", "PASSIVE"),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "import moeflow", "ACTIVE"),  # the user's choice stands
        ({"GOMP_SPINCOUNT": "1000"}, "import moeflow", None),  # so does a spin count
        ({}, "import torch, moeflow", None),  # too late: libgomp has read its environment
    ],
)
def test_openmp_wait_policy_default(env, code, expected):
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run(
        [sys.executable, "-c", f"{code}; import os; print(os.environ.get('OMP_WAIT_POLICY'))"],
        env={**clean, **env}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.split()[-1] == str(expected)


class _ConcurrentStore:
    """Wraps the engine's store: each read lasts a few ms (so the reads of one layer overlap) and checks that it
    writes inside the pool and that the experts resident or on their way never exceed the pool."""

    def __init__(self, engine: moeflow.Engine) -> None:
        self.inner = engine.cache.store
        self.direct_io = self.inner.direct_io
        self.cache = engine.cache
        pool = engine.cache.pool
        self.ranges = [(t.data_ptr(), t.data_ptr() + t.nbytes) for t in (pool.gate_up_S2ID, pool.down_SDI)]
        self.lock = threading.Lock()
        self.in_flight = self.peak_in_flight = self.reads = 0
        self.threads: set[str] = set()

    def read_into(self, key, gate_up, down) -> int:
        for dest in (gate_up, down):
            assert any(lo <= dest.data_ptr() and dest.data_ptr() + dest.nbytes <= hi for lo, hi in self.ranges)
        with self.lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            self.reads += 1
            self.threads.add(threading.current_thread().name)
        assert len(self.cache.resident()) <= self.cache.pool.capacity
        time.sleep(0.005)
        try:
            return self.inner.read_into(key, gate_up, down)
        finally:
            with self.lock:
                self.in_flight -= 1

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("policy", ["lru", "predictive"])
def test_budget_is_a_ceiling_with_reads_in_flight(tiny_checkpoints, policy):
    path = tiny_checkpoints["mixtral"]
    with moeflow.load(path, expert_budget="all") as engine:
        ref = engine.generate(PROMPT, max_new_tokens=12).token_ids
    with moeflow.load(path, expert_budget="25%", policy=policy, read_process=False) as engine:  # reader threads
        probe = engine.cache.store = _ConcurrentStore(engine)
        out = engine.generate(PROMPT, max_new_tokens=12).token_ids
        engine.settle()
        stats = engine.stats()
    assert out == ref
    if policy == "lru":  # no prefetch: every read is a demand miss
        assert probe.reads == stats.misses
    assert probe.peak_in_flight > 1  # the prefill's misses of one layer are read together
    assert any(name.startswith("moeflow-reader") for name in probe.threads)
    assert stats.resident_peak_bytes <= stats.budget_bytes
    assert engine.cache.pool.nbytes <= stats.budget_bytes
