"""What the commands print on stderr is what the user asked for: the statistics line and progress, no warnings
the user did not cause (transformers' FutureWarnings, the tokenizer's "indexing errors" on intentionally long text)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # fresh interpreters, as a user runs the command

STATS_LINE = re.compile(r"^\[\d+ tokens, .*tok/s.*\]$")


def _moeflow(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY")}
    return subprocess.run([sys.executable, "-m", "moeflow.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_generate_stderr_holds_only_the_stats_line():
    proc = _moeflow("generate", "--prompt", "def", "--max-new-tokens", "8", "--expert-budget", "25%")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("def")
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and STATS_LINE.match(lines[0]), proc.stderr


def test_trace_over_documents_longer_than_the_tokenizer_limit_is_not_warned_about(tmp_path):
    # The shipped tokenizer's model_max_length is 512; the held-out files are longer, and tracing cuts them into
    # --context chunks on purpose.
    proc = _moeflow("trace", "--max-tokens", "600", "--out", str(tmp_path / "t"))
    assert proc.returncode == 0, proc.stderr
    assert "indexing errors" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    lines = [ln for ln in re.split(r"[\r\n]", proc.stderr) if ln.strip()]
    assert all(ln.startswith("tracing") for ln in lines[:-1]) and lines[-1].startswith("wrote 600 tokens"), lines
