"""`moeflow.load()` with no path runs the model shipped inside the package."""

from __future__ import annotations

import moeflow


def test_load_without_a_path_runs_the_shipped_model():
    assert (moeflow.DEFAULT_MODEL / "config.json").is_file()
    with moeflow.load(expert_budget="25%") as engine:
        assert engine.checkpoint.path.resolve() == moeflow.DEFAULT_MODEL.resolve()
        assert len(engine.generate("def", max_new_tokens=4).token_ids) == 4
