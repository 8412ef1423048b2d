import sys
from pathlib import Path

# The recipes are not installed: they import as `recipes.*` from the repository root, as `python -m` runs them.
ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
