"""What the benchmarks share: the machine's description, cold caches, equal memory ceilings, child processes.

A disk-backed contender is only honest when the page cache cannot quietly turn its disk into RAM:
each one runs as a fresh process inside a cgroup-v1 memory group (page cache is charged to it) with
the same limit as its rivals, after the page cache is dropped (root on Linux; where either is not
possible the result says so). Measured on this machine: a cgroup-v1 memory group charges the page cache
to its processes, so contenders given equal limits hold equal memory, page cache included.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
REPO = Path(__file__).resolve().parents[1]
WIDE_INTERMEDIATE = 8192  # the I/O-bound model: 192 x 8192 x 3 x fp32 = 18 MiB per expert


def machine() -> dict:
    """The hardware and software a result was measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}  # fmt: skip


def drop_caches() -> bool:
    """Empty the page cache (root only); False where that is not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def round_order(items: list, rnd: int) -> list:
    """`items` rotated by round `rnd`: over as many rounds as there are items, each one runs in every position once.

    Order matters on this VM: its disk reads faster after a few minutes idle (4 O_DIRECT readers: 0.9 GiB/s after
    200 s idle, 0.6 GiB/s under sustained reads, 2026-12-01) and engine runs right after an idle pause had half the
    stall per miss of the runs that followed, whatever their settings. A fixed order hands that to the first
    contender of every round."""
    k = rnd % len(items) if items else 0
    return items[k:] + items[:k]


def disk_bandwidth(path: Path, nbytes: int = 1 << 30, block: int = 4 << 20) -> float:
    """Cold sequential O_DIRECT read of `path` in `block`-sized requests: bytes per second."""
    drop_caches()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, block)
    done = 0
    t0 = time.perf_counter()
    try:
        while done < nbytes:
            n = os.preadv(fd, [buf], done)
            if n <= 0:
                break
            done += n
    finally:
        os.close(fd)
    return done / (time.perf_counter() - t0)


def storage_read_bytes() -> int:
    """Bytes this process caused to be read from storage (page-cache misses and O_DIRECT)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def run_child(cmd: list[str], *, limit_bytes: int | None, timeout_s: float) -> dict:
    """Run `cmd` (it prints one JSON object as its last stdout line), inside a memory cgroup of
    `limit_bytes` when given and available; returns that object, or {"error": ...}."""
    group = None
    if limit_bytes is not None and CGROUP_ROOT.is_dir():
        group = CGROUP_ROOT / f"moeflow-bench-{os.getpid()}"
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        cmd = ["sh", "-c", f'echo $$ > {group}/cgroup.procs; exec "$@"', "sh", *cmd]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s"}
    finally:
        if group is not None:
            for _ in range(50):
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:]}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["memory_limit_bytes"] = limit_bytes if group is not None else None
    return row


def runtime_baseline_bytes() -> int:
    """Peak RSS of a process that imports everything a contender imports but loads no weights."""
    code = (
        "import torch, transformers, accelerate, moeflow.build, moeflow.engine; "
        "from moeflow.engine import peak_rss_bytes; print(peak_rss_bytes())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


def dense_bytes(ckpt: Path) -> int:
    """Bytes of a checkpoint's non-expert tensors (what every contender holds besides its experts)."""
    from moeflow.model.checkpoint import open_checkpoint

    return sum(s.nbytes for s in open_checkpoint(ckpt).tensors.values())


def prepare_model(name: str, workdir: Path) -> Path:
    """A benchmark model, built on demand under `workdir`: "default" (shipped), "iobound" (the shipped
    model with zero-widened experts, same tokens: `moeflow.tools.widen`), "iobound-packed" (the same weights as
    safetensors' own writer lays them out, as a Hub checkpoint is: `packed_copy`), "iobound-packed-aligned" (that
    copy rewritten by `moeflow align`: `aligned_copy`), "iobound-int8" / "iobound-int4"
    (written by `moeflow quantize`, int4 in groups of 128: `quantized_folder`), "random" (Mixtral-shaped, random
    weights: bench/offload_decode.py's)."""
    from moeflow.config import DEFAULT_MODEL

    if name == "default":
        return DEFAULT_MODEL
    if name == "iobound-packed":
        return packed_copy(prepare_model("iobound", workdir), workdir / f"iobound-{WIDE_INTERMEDIATE}-packed")
    if name == "iobound-packed-aligned":
        packed = prepare_model("iobound-packed", workdir)
        return aligned_copy(packed, workdir / f"iobound-{WIDE_INTERMEDIATE}-realigned")
    if name in ("iobound-int8", "iobound-int4"):
        return quantized_folder(prepare_model("iobound", workdir), name.removeprefix("iobound-"), 128, workdir)
    if name == "iobound":
        # "-aligned": widen's layout since it writes every expert on whole pages, read straight into its slot; a
        # model built before that stays where it is (bench/results name the folder they measured)
        out = workdir / f"iobound-{WIDE_INTERMEDIATE}-aligned"
        if not (out / "config.json").is_file():
            from moeflow.tools.widen import widen_experts

            widen_experts(DEFAULT_MODEL, out, WIDE_INTERMEDIATE)
        else:  # built earlier: its predictors and generation defaults are the shipped ones as they are now
            shutil.rmtree(out / "predictors", ignore_errors=True)
            shutil.copytree(DEFAULT_MODEL / "predictors", out / "predictors")
            shutil.copy2(DEFAULT_MODEL / "generation_config.json", out / "generation_config.json")
        return out
    if name == "random":
        out = workdir / "mixtral-random"
        if not (out / "config.json").is_file():
            from offload_decode import Shape, build_checkpoint

            build_checkpoint(out, Shape())
        return out
    raise ValueError(f"unknown benchmark model {name!r}; one of default, iobound, iobound-packed, "
                     "iobound-packed-aligned, iobound-int8, iobound-int4, random")


def aligned_copy(src: Path, out: Path) -> Path:
    """`src` rewritten by `moeflow align` (built once); its predictors, configs and corpus lists copied as they are
    now."""
    if not (out / "config.json").is_file():
        from moeflow.tools.align import align_checkpoint

        shutil.rmtree(out, ignore_errors=True)  # a copy cut short
        align_checkpoint(src, out, progress=False)
    for entry in src.iterdir():
        if entry.is_dir():
            shutil.rmtree(out / entry.name, ignore_errors=True)
            shutil.copytree(entry, out / entry.name)
        elif entry.suffix != ".safetensors":
            shutil.copy2(entry, out / entry.name)
    return out


def quantized_folder(model: Path, kind: str | None, group_size: int, workdir: Path) -> Path:
    """`model` written by `moeflow quantize` (built once under `workdir`), or `model` itself for None/bf16."""
    if kind in (None, "bf16"):
        return model
    from moeflow.model.quantized import CONFIG_KEY, FORMAT_VERSION

    out = workdir / f"{model.name}-{kind}{f'-g{group_size}' if kind == 'int4' else ''}"
    config = out / "config.json"
    if config.is_file() and (json.loads(config.read_text())[CONFIG_KEY]["version"] != FORMAT_VERSION
                             or not _paged(out)):  # fmt: skip
        shutil.rmtree(out)  # written by an earlier moeflow in another layout: write it again
    if not config.is_file():
        from moeflow.tools.quantize import quantize_checkpoint

        quantize_checkpoint(model, out, kind, group_size=group_size or 128, progress=False)
    return out


def _paged(folder: Path) -> bool:
    """Whether every expert tensor of whole pages lies on whole pages of its shard (`moeflow quantize`'s layout since
    it writes them first; a folder written before reads partly through the buffer)."""
    from moeflow.model.checkpoint import open_checkpoint

    spans = [s for loc in open_checkpoint(folder).experts.values() for s in loc.spans]
    return all(s.offset % 4096 == 0 for s in spans if s.nbytes % 4096 == 0)


def packed_copy(src: Path, out: Path) -> Path:
    """`src` rewritten shard by shard with safetensors' own writer (its tensor order: a Mixtral expert's w1, w2, w3
    back to back; its offsets, off whole pages); what is not a shard (predictors, tokenizer, configs) copied as it
    is now."""
    from safetensors.torch import load_file, save_file

    built = (out / "config.json").is_file()
    out.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        if entry.suffix == ".safetensors":
            if not built:
                save_file(load_file(entry), out / entry.name, metadata={"format": "pt"})
        elif entry.is_dir():
            shutil.rmtree(out / entry.name, ignore_errors=True)
            shutil.copytree(entry, out / entry.name)
        elif entry.name != "config.json":
            shutil.copy2(entry, out / entry.name)
    shutil.copy2(src / "config.json", out / "config.json")  # last: a copy cut short is built again
    return out


@contextmanager
def checkout(commit: str) -> Iterator[Path]:
    """`commit`'s tree in a temporary git worktree, importable as the installed package is: pyproject's
    package-dir makes a top-level package folder (serve/) `moeflow.serve`, so it is linked where a plain
    import looks."""
    root = Path(tempfile.mkdtemp(prefix="moeflow-tree-")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(root), commit], cwd=REPO, check=True)
    try:
        for folder in root.iterdir():
            if folder.name != "moeflow" and (folder / "__init__.py").is_file():
                (root / "moeflow" / folder.name).symlink_to(folder, target_is_directory=True)
        yield root
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(root)], cwd=REPO, check=True)


def add_tree_arguments(ap: argparse.ArgumentParser) -> None:
    """--baseline and --candidate: the commits a before/after bench measures (`tree_commits` checks them)."""
    ap.add_argument("--baseline", help="commit measured as 'before' (required)")
    ap.add_argument("--candidate", default="HEAD", help="commit measured as 'after'")


def tree_commits(ap: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """{"baseline": commit, "candidate": commit}; a usage error without --baseline (a child run needs none)."""
    if not args.baseline:
        ap.error("--baseline COMMIT is required (the tree measured as 'before')")
    check_commit(ap, "--baseline", args.baseline)
    check_commit(ap, "--candidate", args.candidate)
    return {"baseline": args.baseline, "candidate": args.candidate}


def check_commit(ap: argparse.ArgumentParser, flag: str, commit: str) -> None:
    """A usage error unless `commit` names a commit of this repository."""
    found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"], cwd=REPO,
                           capture_output=True).returncode == 0  # fmt: skip
    if not found:
        ap.error(f"{flag} {commit}: no such commit in this repository (`git log --oneline` lists them)")


def describe_commits(commits: dict[str, str]) -> dict[str, str]:
    """Each commit as `git log` names it: short hash and subject (100 characters at most)."""
    return {t: subprocess.run(["git", "log", "-1", "--format=%h %s", c], capture_output=True, text=True, check=True,
                              cwd=REPO).stdout.strip()[:100] for t, c in commits.items()}  # fmt: skip


def run_in_tree(script: str, tree: Path, spec: dict, timeout_s: float) -> dict:
    """Run `script --child SPEC` with `tree` first on the import path; its last stdout line is the JSON result."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, script, "--child", json.dumps(spec)], env=env, capture_output=True,
                          text=True, timeout=timeout_s, cwd=tree.parent)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"child in {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
