"""The text a model was trained on and held out from, as its own folder lists it (torch-free).

The recipe that trained a model leaves one list per split in the model folder, ``train_files.txt``
and ``heldout_files.txt``: one file per line, a POSIX path relative to the running interpreter's
standard library (``sysconfig.get_paths()["stdlib"]``), where the shipped default model's corpus
lives (``recipes/default_model`` writes them). Measurements (``moeflow profile``, ``trace``,
``predictor train``, the benches) read text through here, never through the recipe.

    from moeflow.model.corpus import model_corpus
    files = model_corpus("moeflow/default_model", "heldout")
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Literal

from moeflow.errors import MoeflowError

Split = Literal["train", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "heldout")


def corpus_root() -> Path:
    """The directory the lists are relative to: the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_list_path(model_dir: str | Path, split: Split) -> Path:
    """Where a model folder lists the files of one split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    return Path(model_dir) / f"{split}_files.txt"


def model_corpus(model_dir: str | Path, split: Split = "heldout") -> list[Path]:
    """Absolute paths of the files the model folder lists for ``split``, in the listed order.

    Raises MoeflowError when the folder has no list for the split, or names files this interpreter
    does not have: pass text files explicitly (``--data``) for such a model.
    """
    listing = split_list_path(model_dir, split)
    if not listing.is_file():
        raise MoeflowError(
            f"{Path(model_dir)} has no {listing.name}, so it does not say which text it was "
            f"{'trained on' if split == 'train' else 'held out from'}; pass text files with --data"
        )
    root = corpus_root()
    paths = [root / line for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise MoeflowError(
            f"{len(missing)} of the {len(paths)} files in {listing} are not under {root} (first: {missing[0]}): "
            "this Python's standard library is not the one the model was trained on; pass text files with --data"
        )
    return paths
