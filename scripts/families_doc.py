"""Write docs/families.md: every MoE model type of the installed transformers and moeflow's status for it,
from the same data `moeflow families` prints (moeflow.model.catalog)."""

from pathlib import Path

from moeflow.model.catalog import catalog, render_markdown

OUT = Path(__file__).resolve().parent.parent / "docs" / "families.md"

if __name__ == "__main__":
    OUT.write_text(render_markdown(catalog()))
    print(f"wrote {OUT}")
