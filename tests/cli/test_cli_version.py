"""`moeflow --version`."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from moeflow.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"moeflow {version('moeflow')} (torch {version('torch')}, transformers ")
