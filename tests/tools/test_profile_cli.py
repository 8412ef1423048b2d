"""`moeflow profile` end to end on a tiny checkpoint: JSON shape, files, trace reuse, --live, --compare, errors."""

import json

import pytest

from moeflow.cli import main

PROSE = "The cache keeps the experts that the router picks most often, and reads the rest from disk.\n" * 3
CODE = "def area(w, h):\n    return w * h\n\nfor i in range(10):\n    print(area(i, i + 1))\n" * 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "notes.txt").write_text(PROSE)
    (root / "prog.py").write_text(CODE)
    return [root / "notes.txt", root / "prog.py"]


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["profile", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def first_run(tiny_checkpoints, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    rc = main(["profile", "--model", str(tiny_checkpoints["mixtral"]), "--data", *map(str, data),
               "--max-tokens", "160", "--context", "60", "--budgets", "25%,50%", "--json", "--out", str(out)])
    return rc, out


def test_json_shape_and_files(first_run, capsys):
    rc, out = first_run
    assert rc == 0
    report = json.loads((out / "profile.json").read_text())
    results = report["results"]
    assert [(r["policy"], r["budget"]) for r in results] == [
        (p, b) for p in ("auto", "lru", "lfu", "lrfu", "predictive", "belady") for b in (0.25, 0.5)
    ]
    for r in results:
        assert {"policy", "budget", "hit_rate", "bytes_per_token", "per_layer"} <= set(r)
        assert 0 <= r["hit_rate"] <= 1 and r["bytes_per_token"] > 0
        assert [pl["layer"] for pl in r["per_layer"]] == report["layers"] == [0, 1]
        assert set(r["stall_s_per_token"]) == {"PCIe 4 x16", "NVMe", "this machine's disk"}
    by = {(r["policy"], r["budget"]): r for r in results}
    for b in (0.25, 0.5):
        assert by[("belady", b)]["hit_rate"] >= max(by[(p, b)]["hit_rate"] for p in ("auto", "lru", "lfu", "lrfu"))
        assert by[("predictive", b)]["predictor"] == "gate"
    assert report["links"]["this machine's disk"] > 0
    assert report["tokens"] == 160
    assert (out / "profile.png").stat().st_size > 10_000
    assert (out / "trace" / "meta.json").is_file()


def test_replaying_the_saved_trace_gives_the_same_numbers_and_compare(first_run, capsys, tmp_path):
    _, out = first_run
    rc, stdout, _ = run(capsys, "--trace", out / "trace", "--budgets", "25%,50%", "--disk-bandwidth", "2",
                        "--json", "--out", tmp_path / "again")
    assert rc == 0
    again = json.loads(stdout)
    before = json.loads((out / "profile.json").read_text())
    assert [(r["policy"], r["hit_rate"], r["per_layer"]) for r in again["results"]] == [
        (r["policy"], r["hit_rate"], r["per_layer"]) for r in before["results"]
    ]
    assert again["links"]["this machine's disk"] == 2e9

    rc, stdout, err = run(capsys, "--compare", out / "profile.json", tmp_path / "again" / "profile.json",
                          "--out", tmp_path)
    assert rc == 0, err
    lines = stdout.splitlines()
    assert lines[0].startswith("A: ") and lines[1].startswith("B: ") and "hit A" in lines[2]
    assert len(lines) == 3 + 12 and all("+0.0 pt" in line for line in lines[3:])  # 6 policies x 2 budgets
    assert (tmp_path / "profile_compare.png").stat().st_size > 10_000


def test_live_counts_what_replay_counts(first_run, tiny_checkpoints, capsys):
    _, out = first_run
    rc, stdout, _ = run(capsys, "--model", tiny_checkpoints["mixtral"], "--trace", out / "trace", "--budgets", "50%",
                        "--policies", "lru,belady", "--live", "--live-store", "ram", "--disk-bandwidth", "1", "--json")
    assert rc == 0
    results = json.loads(stdout)["results"]
    assert [(r["policy"], r["mode"]) for r in results] == [("lru", "replay"), ("belady", "replay"), ("lru", "live")]
    replayed, live = results[0], results[2]
    assert live["routing_agreement"] == 1.0
    assert live["per_layer"] == replayed["per_layer"] and live["tokens_per_s"] > 0
    assert live["measured_read_gib_s"] > 0 and "measured_read_gib_s" not in replayed

    rc, stdout, _ = run(capsys, "--model", tiny_checkpoints["mixtral"], "--trace", out / "trace", "--budgets", "50%",
                        "--policies", "lru", "--live", "--live-store", "ram", "--disk-bandwidth", "1")
    assert rc == 0
    lines = stdout.splitlines()
    at = lines.index("measured in the live engine (--live):")
    assert "tok/s" in lines[at + 1] + lines[at + 2] and lines[at + 3].split()[:3] == ["lru", "(live)", "50%"]


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["profile", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("--budgets", "--policies", "--predictor", "--compare", "--live", "--disk-bandwidth", "12.5%,25%",
                   "--live-store {disk,ram}"):
        assert option in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--trace", "{tmp}/nowhere"], "is not a moeflow trace"),
        (["--trace", "{trace}", "--data", "{tmp}/binary.txt"], "not both"),
        (["--data", "{tmp}/missing.txt"], "does not exist; pass text files to --data"),
        (["--data", "{tmp}/binary.txt"], "is not UTF-8 text"),
        (["--budgets", "25%,lots"], "cannot read expert budget 'lots'"),
        (["--budgets", "1%"], "--budgets: expert budget '1%'"),
        (["--budgets", ","], "names no budget"),
        (["--policies", "lru,mru"], "unknown cache policy 'mru' in --policies; choose from"),
        (["--compare", "{tmp}/binary.txt", "{tmp}/binary.txt"], "cannot read profile"),
        (["--compare", "{tmp}/other.json", "{tmp}/other.json"], "is not a moeflow profile"),
        (["--trace", "{trace}", "--policies", "predictive", "--predictor", "path"], "has none of predictor 'path'"),
    ],
)
def test_bad_input_is_a_clear_error(first_run, tiny_checkpoints, capsys, tmp_path, argv, message):
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00binary")
    (tmp_path / "other.json").write_text('{"results": []}')
    argv = [a.format(tmp=tmp_path, trace=first_run[1] / "trace") for a in argv]
    rc, _, err = run(capsys, "--model", tiny_checkpoints["mixtral"], "--disk-bandwidth", "1", *argv)
    assert rc == 2
    assert err.startswith("moeflow: error: ") and message in err, err
