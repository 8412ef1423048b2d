"""The default model's recipe (recipes/default_model): the corpus split and the lists it writes into the
model folder, the balance loss, the evaluation windows, and the shipped card against a fresh evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from recipes.default_model.card import render_readme  # noqa: E402
from recipes.default_model.corpus import corpus_files, is_heldout, relative_name, write_split_lists  # noqa: E402
from recipes.default_model.eval import EvalReport, window_spans  # noqa: E402
from recipes.default_model.train import router_balance_loss  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "moeflow" / "default_model"


def test_split_is_disjoint_and_follows_the_hash_rule():
    train = [relative_name(p) for p in corpus_files("train")]
    heldout = [relative_name(p) for p in corpus_files("heldout")]
    assert heldout and train and set(train).isdisjoint(heldout)
    assert all(is_heldout(name) for name in heldout) and not any(is_heldout(name) for name in train)
    assert sorted(train + heldout) == [relative_name(p) for p in corpus_files("all")]


def test_shipped_lists_are_what_the_recipe_writes(tmp_path: Path):
    counts = write_split_lists(tmp_path)
    for split in ("train", "heldout"):
        written = (tmp_path / f"{split}_files.txt").read_text()
        assert written == (MODEL_DIR / f"{split}_files.txt").read_text(), split
        assert len(written.split()) == counts[split]


def test_card_numbers_come_from_metrics_json():
    metrics = json.loads((MODEL_DIR / "metrics.json").read_text())
    report = EvalReport.from_dict(metrics["eval"])
    readme = (MODEL_DIR / "README.md").read_text()
    assert f"{report.perplexity:.2f}" in readme and f"{report.unigram_perplexity:.2f}" in readme
    assert report.perplexity < report.unigram_perplexity
    assert (MODEL_DIR / "loss_curve.png").stat().st_size > 0
    for row in report.load_summary():  # balanced routing: no expert starved on held-out text
        assert row["min_vs_uniform"] >= 0.25, row


def test_card_renders_the_shipped_readme():
    """The shipped README is what the recipe renders from metrics.json (commands, paths and numbers)."""
    metrics = json.loads((MODEL_DIR / "metrics.json").read_text())
    rendered = render_readme(MODEL_DIR, metrics["training"], EvalReport.from_dict(metrics["eval"]))
    assert rendered == (MODEL_DIR / "README.md").read_text()


@pytest.mark.parametrize(("n", "context", "stride"), [(2, 8, 4), (9, 8, 4), (100, 8, 4), (513, 512, 256), (50, 8, 8)])
def test_eval_windows_score_every_target_once(n, context, stride):
    scored = []
    for begin, end, first in window_spans(n, context, stride):
        assert end - begin <= context and begin < first <= end + 1
        scored += range(first, end + 1)
    assert scored == list(range(1, n))


def test_balance_loss_is_one_when_uniform_and_grows_when_skewed():
    uniform = (torch.eye(16).repeat(8, 1) * 5.0,)  # every expert first choice equally often
    skewed = (torch.zeros(128, 16).index_fill_(1, torch.tensor([0, 1]), 5.0),)
    assert router_balance_loss(uniform, 1).item() == pytest.approx(1.0, abs=0.05)
    assert router_balance_loss(skewed, 2).item() > 4.0


@pytest.mark.slow
def test_eval_command_reproduces_the_card():
    from recipes.default_model.eval import evaluate

    shipped = EvalReport.from_dict(json.loads((MODEL_DIR / "metrics.json").read_text())["eval"])
    fresh = evaluate(MODEL_DIR)
    assert fresh.heldout_tokens == shipped.heldout_tokens
    assert fresh.perplexity == pytest.approx(shipped.perplexity, rel=1e-4)
    assert fresh.unigram_perplexity == pytest.approx(shipped.unigram_perplexity, rel=1e-9)
    assert fresh.samples == shipped.samples
    for fresh_row, shipped_row in zip(fresh.expert_load, shipped.expert_load):
        assert fresh_row == pytest.approx(shipped_row, abs=1e-4)


@pytest.mark.slow
def test_recipe_runs_from_the_repository_root_and_leaves_a_model_the_runtime_reads(tmp_path: Path):
    """A two-step run of the whole recipe (tokenizer, training, save, lists, evaluation, card) as documented."""
    out = tmp_path / "model"
    tiny = ["--vocab-size", "300", "--hidden-size", "16", "--intermediate-size", "16", "--num-layers", "1",
            "--num-heads", "2", "--num-kv-heads", "1", "--num-experts", "4", "--seq-len", "64", "--batch-size", "2",
            "--eval-windows", "2"]
    subprocess.run(
        [sys.executable, "-m", "recipes.default_model.train", "--out", str(out), "--minutes", "0", "--max-steps", "2",
         *tiny],
        cwd=ROOT, check=True, capture_output=True,
    )
    from moeflow.model.corpus import model_corpus

    assert model_corpus(out, "heldout") == corpus_files("heldout")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["steps"] == 2
    assert metrics["training"]["command"].startswith("python -m recipes.default_model.train --out")
    assert "python -m recipes.default_model.eval" in (out / "README.md").read_text()
