"""`moeflow families` and docs/families.md come from the same computed catalog."""

from pathlib import Path

import pytest

from moeflow.cli import main
from moeflow.model.catalog import catalog, render_markdown
from moeflow.testing import TESTED_FAMILIES

DOC = Path(__file__).resolve().parents[2] / "docs" / "families.md"


@pytest.mark.slow
def test_families_lists_every_tested_family_and_the_doc_is_current(capsys):
    assert main(["families"]) == 0
    out = capsys.readouterr()
    rows = {line.split()[0]: line.split()[1] for line in out.out.splitlines()}
    assert set(TESTED_FAMILIES) <= set(rows)
    assert all(rows[f] == "tested" for f in TESTED_FAMILIES)
    assert rows["nemotron_h"] == "refused"
    assert "transformers 5.24.0" in out.err
    assert sum(status == "tested" for status in rows.values()) >= 20
    assert DOC.read_text() == render_markdown(catalog()), "run `python scripts/families_doc.py`"
