"""`moeflow.load` on a folder that is not there: the error speaks to whoever called it, in Python or on the CLI."""

from __future__ import annotations

import pytest

import moeflow
from moeflow.cli import main


def test_missing_model_folder_from_python(tmp_path):
    with pytest.raises(moeflow.CheckpointError) as err:
        moeflow.load(tmp_path / "Mixtral-like")
    message = str(err.value)
    assert "Mixtral-like" in message and "does not exist" in message
    assert "moeflow.load(PATH)" in message and "leave it out for the shipped default model" in message


def test_missing_model_folder_from_the_cli(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "--model PATH" in capsys.readouterr().err
