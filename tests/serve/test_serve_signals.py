"""`moeflow serve` as a process: a second SIGTERM (or SIGINT) during the drain stops it now."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from moeflow.serve.client import MoeflowClient


@pytest.mark.slow
@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_during_the_drain_stops_at_once(tiny_checkpoints, second):
    """The first signal drains (here: 16 long requests, two at a time, with a minute of grace); the second used to
    be ignored, so the operator had to wait for the drain or kill -9. Now it cancels what runs and exits (status 1)."""
    server = subprocess.Popen(
        [sys.executable, "-m", "moeflow.cli", "serve", "--model", str(tiny_checkpoints["mixtral"]), "--port", "0",
         "--max-batch-size", "2", "--grace-s", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for line in server.stderr:
            if "serving" in line:
                break
        address = re.search(r" on (\S+) \(", line).group(1)
        with MoeflowClient(address, timeout=120) as c:
            streams = [c.stream("Once upon a time", max_new_tokens=240) for _ in range(16)]
            deadline = time.monotonic() + 30
            while c.stats()["queue_depth"] + c.stats()["running"] < 16 and time.monotonic() < deadline:
                time.sleep(0.05)
            codes: list[grpc.StatusCode] = []

            def read_all() -> None:
                for stream in streams:
                    try:
                        list(stream)
                        codes.append(grpc.StatusCode.OK)
                    except grpc.RpcError as e:
                        codes.append(e.code())

            reader = threading.Thread(target=read_all)
            reader.start()
            server.send_signal(signal.SIGTERM)
            for line in server.stderr:
                if "draining" in line:
                    break
            time.sleep(1.0)
            assert server.poll() is None, "the drain should still be running"
            server.send_signal(second)
            t0 = time.monotonic()
            assert server.wait(timeout=15) == 1
            assert time.monotonic() - t0 < 10
            reader.join(timeout=30)
        rest = server.stderr.read()
        assert "second signal" in rest and "the requests still running were cancelled" in rest
        assert grpc.StatusCode.UNAVAILABLE in codes or grpc.StatusCode.CANCELLED in codes
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
