"""Typed profile and predictor-eval reports: the committed JSON reads back and writes out unchanged, a
report built by replay survives its own JSON, and a damaged file is a clear error."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moeflow.errors import MoeflowError
from moeflow.tools.predictor_eval import EvalReport, LayerScore, PredictorScore, TrainRecord
from moeflow.tools.profile.plot import compare_lines, summary_lines, text_table
from moeflow.tools.profile.report import FORMAT, LayerRecord, ProfileReport, RunRecord, read_report
from moeflow.tools.profile.run import run_profile
from moeflow.tools.profile.setting import BudgetPoint, Geometry, policy_runs
from moeflow.tools.trace import FORMAT as TRACE_FORMAT
from moeflow.tools.trace import Trace

ROOT = Path(__file__).resolve().parents[2]
COMMITTED_PROFILES = sorted((ROOT / "docs" / "profile").glob("*.json"))


def small_report() -> ProfileReport:
    rng = np.random.default_rng(0)
    experts_NLK = np.stack([[rng.choice(6, 2, replace=False) for _ in range(3)] for _ in range(40)])
    zeros = np.zeros(40, dtype=np.int32)
    trace = Trace(meta={"format": TRACE_FORMAT, "layers": [0, 1, 2], "num_experts": 6, "top_k": 2, "model": "m/x"},
                  token_ids=zeros, positions=np.arange(40, dtype=np.int32), seq_ids=zeros, doc_ids=zeros,
                  experts=experts_NLK.astype(np.int16), weights=np.ones(experts_NLK.shape, dtype=np.float16))
    geometry = Geometry(layers=(0, 1, 2), num_experts=6, top_k=2, inter=4, hidden=4, expert_bytes=1000)
    budgets = [BudgetPoint(spec="4 slots", fraction=0.25, slots=4), BudgetPoint(spec="9 slots", fraction=0.5, slots=9)]
    return run_profile(trace, geometry, budgets=budgets, policies=["lru", "belady"], links={"a": 1e9, "b": 2e9})


def test_committed_reports_exist():
    # The round trip below must have something to read: the docs' three profiles.
    assert {p.name for p in COMMITTED_PROFILES} >= {"profile.json", "predictors.json", "width4.json"}


@pytest.mark.parametrize("path", COMMITTED_PROFILES, ids=lambda p: p.name)
def test_committed_profiles_round_trip(path):
    report = read_report(path)
    assert json.dumps(report.to_json(), indent=1) == path.read_text()  # same keys, order and values
    assert ProfileReport.from_json(report.to_json()) == report
    assert isinstance(report.results[0], RunRecord) and isinstance(report.results[0].per_layer[0], LayerRecord)


def test_committed_predictor_eval_round_trips():
    path = ROOT / "bench" / "results" / "predictor_eval.json"
    report = EvalReport.from_json(json.loads(path.read_text()))
    assert json.dumps(report.to_json(), indent=1) == path.read_text()
    assert [p.name for p in report.predictors][:2] == ["path", "gate"]
    assert isinstance(report.predictors[0].per_layer[0], LayerScore)


def test_a_replayed_report_survives_its_json(tmp_path):
    report = small_report()
    assert [(r.policy, r.budget_spec) for r in report.results] == [
        ("lru", "4 slots"), ("lru", "9 slots"), ("belady", "4 slots"), ("belady", "9 slots")
    ]
    written = report.write(tmp_path / "out" / "profile.json")
    again = read_report(written)
    assert again == report
    raw = json.loads(written.read_text())
    assert raw["format"] == FORMAT and raw["model"] == "m/x" and "data" not in raw
    # Optional fields stay out of the JSON while unset (a replay has no live measurements), the predictor
    # is written even when it is null.
    assert "prefetch" not in raw["results"][0] and "tokens_per_s" not in raw["results"][0]
    assert raw["results"][0]["predictor"] is None
    assert again.label("p.json") == "x, 40 tokens (p.json)"


def test_tables_read_the_records():
    report = small_report()
    lines = summary_lines(report)
    assert lines[1].split()[:4] == ["policy", "budget", "slots", "hit"] and lines[6] == ""
    belady_4 = next(r for r in report.results if r.policy == "belady" and r.slots == 4)
    assert f"{100 * belady_4.hit_rate:.1f}%" in lines[4]
    cost = lines[lines.index("") + 1 :]
    lru, belady = report.results[0], report.results[2]  # at 25%, the budget nearest a quarter
    assert cost[-2:] == ["", f"At 25% of experts resident, lru hits {100 * lru.hit_rate:.1f}% (Belady "
                         f"{100 * belady.hit_rate:.1f}%), reading {lru.bytes_per_token / 2**20:.2f} MiB/token."]
    cmp = compare_lines(report, report, "A", "B")
    assert cmp[:2] == ["A: A", "B: B"] and all("+0.0 pt" in line for line in cmp[3:]) and len(cmp) == 3 + 4
    assert text_table(["a", "bbb"], [["xx", "y"]]) == [" a  bbb", "xx    y"]
    assert text_table(["a", "MiB\nread"], [["xx", "1.5"]]) == ["     MiB", " a  read", "xx   1.5"]


@pytest.mark.parametrize("path", COMMITTED_PROFILES, ids=lambda p: p.name)
def test_profile_text_fits_100_columns(path):
    lines = summary_lines(read_report(path))
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    assert any(line.startswith("At 25% of experts resident, predictive") for line in lines)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: d.pop("analysis"), "does not hold one"),
        (lambda d: d["results"][0].pop("hit_rate"), "does not hold one"),
        (lambda d: d["results"][0].update(surprise=1), "does not hold one"),
        (lambda d: d.update(format="moeflow-profile/0"), "is not a moeflow profile"),
    ],
)
def test_a_damaged_profile_is_a_clear_error(tmp_path, damage, message):
    raw = small_report().to_json()
    damage(raw)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(MoeflowError, match=message):
        read_report(path)


def test_policy_runs_pair_predictive_with_each_predictor():
    assert policy_runs(["lru", "predictive", "belady"], ["gate", "path"]) == [
        ("lru", None), ("predictive", "gate"), ("predictive", "path"), ("belady", None)
    ]
    with pytest.raises(MoeflowError, match="--predictor NAME"):
        policy_runs(["predictive"], [])


def test_eval_and_train_records_round_trip():
    score = PredictorScore(name="gate", recall_at_k=0.5, recall_at_2k=0.75, path_accuracy=0.1, us_per_token=3.0,
                           lookahead=None, per_layer=(LayerScore(layer=0, recall_at_k=0.5, recall_at_2k=0.75,
                                                                 exact=0.2),))
    report = EvalReport(tokens=10, top_k=2, num_experts=8, predictors=(score,))
    assert EvalReport.from_json(json.loads(json.dumps(report.to_json()))) == report
    assert report.to_json()["predictors"][0]["lookahead"] is None  # always written, as before
    free = TrainRecord(trained=False, why="training-free")
    assert free.to_json() == {"trained": False, "why": "training-free"}
    trained = TrainRecord(trained=True, path="p.pt", train_tokens=5, train_seconds=1.5, epochs=2, losses=(0.5, 0.25),
                          lookahead=1, trace_files=3)
    assert list(trained.to_json()) == ["trained", "path", "train_tokens", "train_seconds", "epochs", "losses",
                                       "lookahead", "trace_files"]
    assert TrainRecord.from_json(json.loads(json.dumps(trained.to_json()))) == trained


def test_reading_and_tabling_a_report_imports_no_torch():
    code = ("import sys; from moeflow.tools.profile.report import read_report; "
            "from moeflow.tools.profile.plot import compare_lines, summary_lines; "
            f"r = read_report({str(COMMITTED_PROFILES[0])!r}); summary_lines(r); compare_lines(r, r, 'a', 'b'); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "False"


def test_predictor_eval_plot_ticks_whole_layers_and_states_the_best(monkeypatch, tmp_path):
    from moeflow.tools import predictor_eval

    figures = []
    monkeypatch.setattr(predictor_eval, "save_png", lambda fig, path, **kw: figures.append(fig) or Path(path))
    report = EvalReport.from_json(json.loads((ROOT / "bench" / "results" / "predictor_eval.json").read_text()))
    predictor_eval.plot_eval(report, tmp_path / "e.png")
    (fig,) = figures
    per_layer = fig.axes[1]
    assert list(per_layer.get_xticks()) == [r.layer for r in report.predictors[0].per_layer]
    assert fig._suptitle.get_text().startswith("path predicts 81% of each token's top-2 experts")
