"""bench/link_timeline.py's accounting: each decode step cut into phases, the link's idle time found in each."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from link_timeline import merge, phases  # noqa: E402


def test_overlapping_reads_count_once():
    assert merge([(5.0, 6.0), (0.0, 2.0), (1.0, 3.0), (3.0, 4.0)]) == [[0.0, 4.0], [5.0, 6.0]]


def test_each_phase_gets_its_time_and_the_links_idle_time_in_it():
    # Two decode steps of a one-layer model (ms): the first waits 3 ms for a read (the link busy all of it) and
    # computes while another read runs 1 ms of its 3; the second waits 1 ms. A prefill before them and the step
    # after the last (nothing follows it) are not counted.
    ms = 1e-3
    events = [(x * ms, kind, layer) for x, kind, layer in [
        (-5, "P", -1), (-4, "B", 7), (-3, "E", -1),
        (0, "F", -1), (1, "B", 7), (2, "R", 7), (2, "W0", 7), (5, "W1", 7), (8, "E", -1),
        (10, "F", -1), (11, "B", 7), (12, "R", 7), (12, "W0", 7), (13, "W1", 7), (14, "E", -1),
        (20, "F", -1), (21, "B", 7), (22, "E", -1),
    ]]  # fmt: skip
    busy = [(2 * ms, 5 * ms), (6 * ms, 7 * ms), (12 * ms, 13 * ms)]
    got = phases(events, busy, layers=[7])
    assert got["steps"] == 2
    want = {"start": (1, 1), "L0 attn+router": (1, 1), "L0 stall": (2, 0), "L0 compute": (2, 1.5), "end": (4, 4)}
    for name, (time_ms, idle_ms) in want.items():  # per token: the two steps' mean
        assert got["phases"][name]["ms"] == pytest.approx(time_ms), name
        assert got["phases"][name]["idle_ms"] == pytest.approx(idle_ms), name
    assert got["ms_per_token"] == pytest.approx(10.0)
    assert got["idle_ms_per_token"] == pytest.approx(7.5)


def test_a_gate_up_half_computed_during_a_wait_is_compute_not_stall():
    # One step of a one-layer model (ms): a 4 ms wait, 1.5 ms of which computes an expert's gate/up half while its
    # down matrix is read (H0/H1); the link busy through the wait.
    ms = 1e-3
    events = [(x * ms, kind, layer) for x, kind, layer in [
        (0, "F", -1), (1, "B", 7), (2, "R", 7), (2, "W0", 7), (3, "H0", 7), (4.5, "H1", 7), (6, "W1", 7),
        (7, "E", -1), (10, "F", -1), (11, "B", 7), (12, "E", -1),
    ]]  # fmt: skip
    got = phases(events, [(2 * ms, 6 * ms)], layers=[7])
    assert got["steps"] == 1
    assert got["phases"]["L0 stall"]["ms"] == pytest.approx(2.5)
    assert got["phases"]["L0 compute"]["ms"] == pytest.approx(1.5 + 1.0)
    assert got["phases"]["L0 compute"]["idle_ms"] == pytest.approx(1.0)
