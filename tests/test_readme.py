"""Every command in README.md runs as written on a fresh clone.

What the test does with each part of the README:

- Fenced code blocks say what they are in their info string, and an unknown or missing one fails the test:
  ``sh`` blocks run in bash (every line, backslash continuations joined), ``python`` blocks run in Python,
  ``text`` blocks are output and are not run. A ``sh`` or ``python`` block tagged ``needs-server`` or
  ``needs-gpu`` (```` ```sh needs-server ````) is only checked as below for inline commands, since this test
  starts no server and has no GPU.
- The two install commands, ``bash scripts/setup.sh`` and ``bash scripts/test.sh``, are not run: CI runs exactly
  them (``.ci/run``). A command chained after the first (``bash scripts/setup.sh && .venv/bin/moeflow ...``) is.
- Inline ``moeflow ...`` commands in the section "Using it" (the command table) run in order, except those that
  need a running server (``serve``, ``client``); every other inline ``moeflow ...`` command in the README (the
  results' provenance, minutes to hours of benchmarking) is parsed by moeflow's own parser, so a renamed or
  removed option fails here, and every ``python X.py`` / ``python -m X`` it names must exist.

Commands run in a scratch folder that links every top-level entry of the repository (so ``examples/...`` and
``.venv/bin/moeflow`` resolve and what a command writes stays out of the repository), with the test's own
interpreter's ``bin`` first on the PATH (where ``moeflow`` is installed).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from moeflow.cli import build_parser

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
INSTALL = ("bash scripts/setup.sh", "bash scripts/test.sh")
NEEDS_SERVER = {"serve", "client"}
SKIP_TAGS = {"needs-server", "needs-gpu"}
TIMEOUT_S = 600

_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
_INLINE = re.compile(r"`(moeflow [^`]+)`")
_PYTHON = re.compile(r"\bpython(?:3)? (?:-m ([\w.]+)|([\w./-]+\.py))")


def _text() -> str:
    return README.read_text(encoding="utf-8")


def fenced_blocks(text: str) -> list[tuple[str, set[str], str]]:
    """(language, tags, code) of every fenced block."""
    blocks = []
    for m in _FENCE.finditer(text):
        words = m[1].split()
        blocks.append((words[0] if words else "", set(words[1:]), m[2]))
    return blocks


def shell_commands(code: str) -> list[str]:
    """The commands of a sh block: continuations joined, comments and blank lines dropped, install commands
    left out (and stripped from the front of a chain)."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for install in INSTALL:
            if line == install:
                line = ""
            elif line.startswith(install + " && "):
                line = line[len(install) + 4 :]
        if line:
            commands.append(line)
    return commands


def section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"README.md has no section '## {title}'"
    return m[1]


def _subcommand(command: str) -> str:
    return shlex.split(command)[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A fresh-clone stand-in: the repository's top-level entries linked into a scratch folder."""
    root = tmp_path_factory.mktemp("readme")
    for entry in REPO.iterdir():
        if entry.name not in (".git", "runs"):
            (root / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return root


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
                          stdin=subprocess.DEVNULL)


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode == 0, f"README command failed ({proc.returncode}): {what}\n{proc.stderr[-3000:]}"


def test_every_fence_says_what_it_is():
    for language, tags, code in fenced_blocks(_text()):
        assert language in ("sh", "python", "text"), f"README fence without a known language: {code[:80]!r}"
        assert tags <= SKIP_TAGS, f"README fence with unknown tags {tags - SKIP_TAGS}: {code[:80]!r}"


def test_fenced_blocks_run(workdir):
    ran = 0
    for language, tags, code in fenced_blocks(_text()):
        if tags & SKIP_TAGS or language == "text":
            continue
        if language == "python":
            _check(_run([sys.executable, "-c", code], workdir), code)
            ran += 1
            continue
        commands = shell_commands(code)
        if commands:  # one bash per block, so `source .venv/bin/activate` holds for the block's later lines
            _check(_run(["bash", "-euo", "pipefail", "-c", "\n".join(commands)], workdir), "\n".join(commands))
            ran += 1
    assert ran >= 3  # the demo, the usage example, the Python snippet


def test_command_table_runs(workdir):
    commands = [c for c in _INLINE.findall(section(_text(), "Using it")) if _subcommand(c) not in NEEDS_SERVER]
    assert len(commands) >= 6, commands
    for command in commands:
        _check(_run(["bash", "-c", command], workdir), command)


def test_every_other_command_parses_and_every_script_exists():
    text = _text()
    parser = build_parser()
    for command in _INLINE.findall(text):
        argv = shlex.split(command)[1:]
        if len(argv) < 2 or argv[0] not in parser._subparsers._group_actions[0].choices:
            continue  # `moeflow generate` in a sentence names the command; it is not one to run
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README command does not parse: {command}")
    for module, script in _PYTHON.findall(text):
        if script:
            assert (REPO / script).is_file(), f"README names {script}, which does not exist"
        else:
            in_repo = (REPO / (module.replace(".", "/") + ".py")).is_file()
            exists = in_repo or importlib.util.find_spec(module) is not None
            assert exists, f"README runs python -m {module}, which does not exist"
