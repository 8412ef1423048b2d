"""moeflow.model.corpus: the runtime reads a model's corpus from the lists in its folder, torch-free,
and says what to pass instead when a model has none."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moeflow.errors import MoeflowError
from moeflow.model.corpus import corpus_root, model_corpus, split_list_path


def test_reads_the_listed_files_in_order(tmp_path: Path):
    names = ["string.py", "json/__init__.py", "abc.py"]  # not sorted: the list's order is kept
    split_list_path(tmp_path, "train").write_text("\n".join(names) + "\n\n")
    assert model_corpus(tmp_path, "train") == [corpus_root() / n for n in names]


@pytest.mark.parametrize(("split", "words"), [("heldout", "held out from"), ("train", "trained on")])
def test_a_model_without_a_list_names_what_to_pass(tmp_path: Path, split: str, words: str):
    split_list_path(tmp_path, "train" if split == "heldout" else "heldout").write_text("abc.py\n")
    with pytest.raises(MoeflowError, match=f"no {split}_files.txt.*{words}.*--data"):
        model_corpus(tmp_path, split)


def test_files_missing_on_this_interpreter_are_refused(tmp_path: Path):
    split_list_path(tmp_path, "heldout").write_text("abc.py\nno_such_module_here.py\n")
    with pytest.raises(MoeflowError, match=r"1 of the 2 files .*no_such_module_here.py.*--data"):
        model_corpus(tmp_path, "heldout")


def test_unknown_split_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="split must be one of"):
        model_corpus(tmp_path, "all")  # type: ignore[arg-type]


def test_import_is_torch_free():
    code = "import sys, moeflow.model.corpus; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
