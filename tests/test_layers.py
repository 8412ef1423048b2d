"""The architecture, checked on the layout users install: one top-level name, and the layer contract.

The wheel is built from this tree and unpacked; import-linter (pyproject's `[tool.importlinter]`)
then checks, on that unpacked `moeflow`, that no module imports from a layer above its own —
imports inside functions included — and that training never reaches into the inference stack.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The folders that become subpackages of `moeflow` (pyproject's package-dir).
PACKAGE_ROOTS = {"moeflow": "moeflow", "kernels": "moeflow.kernels", "predictor": "moeflow.predictor",
                 "serve": "moeflow.serve", "training": "moeflow.training"}  # fmt: skip


@pytest.fixture(scope="module")
def unpacked_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    (wheel,) = out.glob("moeflow-*.whl")
    site = out / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return site


def test_the_wheel_installs_one_top_level_name_and_every_package(unpacked_wheel: Path) -> None:
    top = {p.name for p in unpacked_wheel.iterdir() if not p.name.endswith(".dist-info")}
    assert top == {"moeflow"}
    for folder, package in PACKAGE_ROOTS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            sub = init.parent.relative_to(ROOT / folder).parts
            installed = unpacked_wheel.joinpath(*package.split("."), *sub, "__init__.py")
            assert installed.is_file(), f"{init.parent} is missing from the wheel: list it in pyproject's packages"


def test_the_layer_contract_holds(unpacked_wheel: Path) -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), "--no-cache", str(ROOT / "pyproject.toml")], cwd=unpacked_wheel,
        env={"PYTHONPATH": str(unpacked_wheel), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "BROKEN" not in done.stdout and "Contracts: 2 kept, 0 broken." in done.stdout


def test_the_wheel_ships_the_default_model_and_its_predictors(unpacked_wheel: Path) -> None:
    shipped = ROOT / "moeflow" / "default_model"
    for f in shipped.rglob("*"):
        if f.is_file():
            assert unpacked_wheel.joinpath("moeflow", f.relative_to(ROOT / "moeflow")).is_file(), (
                f"{f} is missing from the wheel: add its extension to pyproject's package-data"
            )
    # Predictors are stored as safetensors + JSON, never as pickles (moeflow.predictor.base).
    assert {p.suffix for p in (shipped / "predictors").iterdir()} == {".json", ".safetensors"}
