"""The default model's corpus: the Python standard library sources of the running interpreter.

Every machine of this kind has them on disk (no download), and the PSF License Agreement that covers
them permits use and redistribution of derivative works. The corpus is the stdlib's ``*.py`` files
minus the trees that are test fixtures or generated data rather than library code (see ``EXCLUDED``).

The held-out split is made of whole files chosen by a hash of their relative path, so it is the same
on every machine and never depends on file order or on the training run. The recipe writes both
splits into the model folder (``write_split_lists``); the runtime reads them from there with
``moeflow.model.corpus.model_corpus``, never from this module.

    from recipes.default_model.corpus import corpus_files, read_text
    texts = [read_text(p) for p in corpus_files("heldout")]
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from moeflow.model.corpus import SPLITS, corpus_root, split_list_path

Split = Literal["train", "heldout", "all"]

# Path parts (directories, or a top-level file stem prefix) left out of the corpus, with the reason.
EXCLUDED: dict[str, str] = {
    "site-packages": "third-party packages, not the standard library",
    "test": "the regression test suite: fixtures, deliberately malformed and non-UTF-8 files, 60% of the bytes",
    "tests": "test suites of single packages (lib2to3/tests and the like)",
    "idle_test": "IDLE's test suite",
    "idlelib": "the IDLE GUI application, not library code",
    "encodings": "mostly machine-generated codec charmap tables (gencodec.py output)",
    "pydoc_data": "one generated 750 kB dump of the reference manual as string literals",
    "__pycache__": "bytecode caches",
}
# Top-level modules generated at build time; their content differs between builds.
EXCLUDED_PREFIXES: tuple[str, ...] = ("_sysconfigdata", "config-")

HELDOUT_PERCENT = 8


def _included(rel: Path) -> bool:
    if any(part in EXCLUDED for part in rel.parts):
        return False
    return not rel.parts[0].startswith(EXCLUDED_PREFIXES)


def is_heldout(rel_path: str) -> bool:
    """Whether a file (POSIX path relative to the stdlib root) belongs to the held-out split."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


def corpus_files(split: Split = "train", root: Path | None = None) -> list[Path]:
    """Absolute paths of the corpus files of one split, sorted by relative path.

    ``split`` is ``"train"``, ``"heldout"`` (whole files, never trained on) or ``"all"``.
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', not {split!r}")
    root = corpus_root() if root is None else root
    rels = sorted(p.relative_to(root) for p in root.rglob("*.py") if _included(p.relative_to(root)))
    if split != "all":
        want_heldout = split == "heldout"
        rels = [r for r in rels if is_heldout(r.as_posix()) == want_heldout]
    return [root / r for r in rels]


def relative_name(path: Path, root: Path | None = None) -> str:
    """The POSIX path of a corpus file relative to the stdlib root (how split lists name files)."""
    return path.relative_to(corpus_root() if root is None else root).as_posix()


def read_text(path: Path) -> str:
    """A corpus file's text: UTF-8 (every included file is), universal newlines."""
    return path.read_text(encoding="utf-8")


def corpus_fingerprint(split: Split = "all", root: Path | None = None) -> str:
    """SHA-256 over the relative paths and bytes of a split: equal fingerprints mean equal corpora."""
    root = corpus_root() if root is None else root
    h = hashlib.sha256()
    for path in corpus_files(split, root):
        h.update(relative_name(path, root).encode("utf-8") + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def write_split_lists(model_dir: Path, root: Path | None = None) -> dict[str, int]:
    """Write ``train_files.txt`` and ``heldout_files.txt`` into a model folder; returns the file count per split."""
    counts = {}
    for split in SPLITS:
        names = [relative_name(p, root) for p in corpus_files(split, root)]
        split_list_path(model_dir, split).write_text("".join(name + "\n" for name in names))
        counts[split] = len(names)
    return counts
