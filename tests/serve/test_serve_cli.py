"""`moeflow serve` and `moeflow client` as processes: same tokens as `moeflow generate`; SIGTERM drains."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pytest
from moeflow.serve.client import MoeflowClient

MOEFLOW = [sys.executable, "-m", "moeflow.cli"]


def _moeflow(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*MOEFLOW, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_cli_client_equals_generate_and_sigterm_drains(tiny_checkpoints):
    model = str(tiny_checkpoints["mixtral"])
    requests = [("The quick brown fox jumps", 30), ("Hello, world!", 12)]
    server = _moeflow("serve", "--model", model, "--port", "0", "--expert-budget", "25%", "--max-batch-size", "2")
    try:
        solo = []
        for prompt, n in requests:
            gen = _moeflow("generate", "--model", model, "--prompt", prompt, "--max-new-tokens", str(n), "--json")
            out, err = gen.communicate(timeout=120)
            assert gen.returncode == 0, err
            solo.append(json.loads(out))
        for line in server.stderr:
            if "serving" in line:
                break
        address = re.search(r" on (\S+) \(", line).group(1)
        port = address.rsplit(":", 1)[1]

        clients = [
            _moeflow("client", "--port", port, "--prompt", p, "--max-new-tokens", str(n), "--json") for p, n in requests
        ]
        for want, proc in zip(solo, clients):
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            replies = [json.loads(line) for line in out.splitlines()]
            assert [t for r in replies for t in r["token_ids"]] == want["token_ids"]
            assert "".join(r["text"] for r in replies) == want["text"]
            assert replies[-1]["finish_reason"] == want["finish_reason"]

        with MoeflowClient(address, timeout=120) as c:
            stream = iter(c.stream("Once upon a time", max_new_tokens=240))
            replies = [next(stream)]
            server.send_signal(signal.SIGTERM)
            replies.extend(stream)
        assert replies[-1].finish_reason == "length"
        assert sum(len(r.token_ids) for r in replies) == 240
        assert server.wait(timeout=60) == 0
        rest = server.stderr.read()
        assert "draining" in rest and "stopped" in rest
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


@pytest.mark.slow
def test_cli_client_reports_server_errors():
    """No server on the port: a one-line error with the status code, exit status 1."""
    client = _moeflow("client", "--port", "1", "--prompt", "hi", "--timeout", "5")
    _, err = client.communicate(timeout=120)
    assert client.returncode == 1
    assert "moeflow: error: UNAVAILABLE from 127.0.0.1:1" in err
