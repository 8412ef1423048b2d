"""`moeflow predictor train` writes where it is told (default: a new folder), never silently over saved predictors."""

from __future__ import annotations

import json
import shutil

import pytest

from moeflow.cli import main


@pytest.fixture()
def model_copy(tiny_checkpoints, tmp_path):
    return shutil.copytree(tiny_checkpoints["mixtral"], tmp_path / "mixtral")


@pytest.fixture()
def doc(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("def f(x):\n    return x + 1\n" * 20)
    return path


def _train(model, doc, *extra):
    return main(["predictor", "train", "--model", str(model), "--data", str(doc), "--predictors", "token_freq,gate",
                 "--max-tokens", "400", *extra])


def test_default_out_is_a_new_folder_in_the_working_directory(model_copy, doc, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert _train(model_copy, doc) == 0
    err = capsys.readouterr().err
    assert (work / "mixtral-predictors" / "token_freq.safetensors").is_file()
    assert not (model_copy / "predictors").exists()  # the model folder is not touched
    assert "--predictor-dir mixtral-predictors" in err
    # The engine finds them where it is told to look.
    assert main(["predictor", "eval", "--model", str(model_copy), "--data", str(doc), "--max-tokens", "200",
                 "--predictor-dir", "mixtral-predictors", "--json"]) == 0
    names = [p["name"] for p in json.loads(capsys.readouterr().out)["predictors"]]
    assert "token_freq" in names
    assert main(["generate", "--model", str(model_copy), "--prompt", "def", "--max-new-tokens", "3",
                 "--policy", "predictive", "--predictor", "token_freq", "--predictor-dir", "mixtral-predictors"]) == 0


def test_saved_predictors_are_not_replaced_without_force(model_copy, doc, capsys):
    out = model_copy / "predictors"
    assert _train(model_copy, doc, "--out", str(out)) == 0
    saved = (out / "token_freq.safetensors").read_bytes()
    (out / "token_freq.safetensors").write_bytes(b"a user's own predictor")
    capsys.readouterr()
    assert _train(model_copy, doc, "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "already holds trained predictors" in err and "token_freq.safetensors" in err and "--force" in err
    assert (out / "token_freq.safetensors").read_bytes() == b"a user's own predictor"
    assert _train(model_copy, doc, "--out", str(out), "--force") == 0
    assert (out / "token_freq.safetensors").read_bytes() == saved  # same data, same predictor


def test_shipped_predictors_untouched_by_a_default_train(doc, tmp_path, monkeypatch):
    from moeflow.config import DEFAULT_MODEL

    shipped = {p.name: p.stat().st_mtime_ns for p in (DEFAULT_MODEL / "predictors").iterdir()}
    monkeypatch.chdir(tmp_path)
    assert _train(DEFAULT_MODEL, doc) == 0
    assert (tmp_path / "default_model-predictors" / "token_freq.safetensors").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in (DEFAULT_MODEL / "predictors").iterdir()} == shipped


def test_eval_prints_its_table_on_stdout(model_copy, doc, capsys):
    assert main(["predictor", "eval", "--model", str(model_copy), "--data", str(doc), "--max-tokens", "200",
                 "--predictors", "gate"]) == 0
    captured = capsys.readouterr()
    rows = [ln for ln in captured.out.splitlines() if "recall@k" in ln]
    assert [r.split(":")[0].strip() for r in rows] == ["gate"]
    assert "recall@k" not in captured.err
