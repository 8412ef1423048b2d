"""The client side never pays for the engine: `moeflow.serve.client` and `moeflow client` import no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "numpy", "safetensors")


def _imported_after(code: str) -> set[str]:
    """Top-level packages of `HEAVY` in `sys.modules` after running `code` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(out.stdout.splitlines()[-1])) & set(HEAVY)


@pytest.mark.parametrize(
    "code",
    [
        "import moeflow.serve.client",
        "from moeflow.serve.client import MoeflowClient; MoeflowClient('127.0.0.1:1').close()",
        "from moeflow.cli import build_parser; build_parser().parse_args(['client', '--prompt', 'hi'])",
        "from moeflow.cli import build_parser; build_parser().format_help()",
    ],
    ids=["import-client", "make-client", "parse-client-command", "moeflow-help"],
)
def test_no_engine_imports(code):
    assert _imported_after(code) == set()


def test_the_probe_sees_heavy_imports():
    """The check above can fail: the server side does import torch."""
    assert "torch" in _imported_after("import moeflow.serve.worker")
