"""seeds.py: Student t quantiles and intervals, and the table built from two tiny runs' metrics."""

import json
import math
import statistics
import subprocess
import sys

import pytest

from metrics_log import mean_ci, t_cdf_two_sided, t_quantile
from seeds import parse_seeds, summarize
from train_runs import REPO, TINY, child_env, describe, metrics

# two-sided 95% (p = 0.975) and 90% (p = 0.95) critical values from printed t tables
T_TABLE = {1: (12.706, 6.314), 2: (4.303, 2.920), 3: (3.182, 2.353), 4: (2.776, 2.132), 5: (2.571, 2.015),
           9: (2.262, 1.833), 10: (2.228, 1.812), 20: (2.086, 1.725), 30: (2.042, 1.697), 120: (1.980, 1.658)}


@pytest.mark.parametrize("dof", sorted(T_TABLE))
def test_t_quantile_matches_the_printed_table(dof):
    q975, q95 = T_TABLE[dof]
    assert t_quantile(0.975, dof) == pytest.approx(q975, abs=6e-4)
    assert t_quantile(0.95, dof) == pytest.approx(q95, abs=6e-4)


def test_t_distribution_limits():
    assert t_cdf_two_sided(0.0, 3) == 0.0
    assert t_cdf_two_sided(1.0, 1) == pytest.approx(0.5)  # Cauchy: P(|T| < 1) = 1/2
    assert t_quantile(0.975, 100_000) == pytest.approx(1.95996, abs=1e-4)  # the normal limit
    # the CDF rises with t for both parities of the degrees of freedom
    for dof in (6, 7):
        values = [t_cdf_two_sided(x / 4, dof) for x in range(40)]
        assert values == sorted(values) and values[-1] < 1


def test_interval_of_a_known_sample():
    mean, lower, upper = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4) · sd / √n
    assert mean == 3.0
    assert (lower, upper) == (pytest.approx(3 - half, abs=1e-5), pytest.approx(3 + half, abs=1e-5))
    assert mean_ci([0.25]) == (0.25, None, None)


def test_parse_seeds():
    assert parse_seeds("1,2,3") == [1, 2, 3]
    assert parse_seeds("201-203,7") == [201, 202, 203, 7]


def _seeds(*args, cwd=REPO):
    return subprocess.run([sys.executable, "seeds.py", *args], cwd=cwd, env=child_env(), capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds") / "runs"
    proc = _seeds(*TINY, f"--out_dir={root}", "--seeds=1,2", "--jobs=2")
    assert proc.returncode == 0, describe(proc)
    return root, proc


def _phase_end(out_dir, phase, iteration):
    return next(r for r in metrics(out_dir) if r.get("event") == "phase_end" and r["phase"] == phase
                and r["iteration"] == iteration)


def test_table_from_two_runs(two_runs):
    root, proc = two_runs
    summary = json.loads((root / "seeds_summary.json").read_text())
    runs = [root / "seed_1", root / "seed_2"]
    assert summary["runs"] == [str(r) for r in runs]
    labels = [p["label"] for p in summary["phases"]]
    assert labels == ["SFT", "SPIN iter 0", "SPIN iter 1", "continued SFT iter 0", "continued SFT iter 1"]

    # per phase: the mean and standard deviation of the runs' own phase-end numbers
    sft = [_phase_end(r, "sft", 0)["eval/nll"] for r in runs]
    cell = summary["phases"][0]["metrics"]["eval/nll"]
    assert cell["values"] == sft
    assert cell["mean"] == pytest.approx(sum(sft) / 2)
    assert cell["sd"] == pytest.approx(abs(sft[0] - sft[1]) / math.sqrt(2))
    assert "eval/reward_accuracy" not in summary["phases"][0]["metrics"]  # SFT has no SPIN pairs
    assert "eval/reward_accuracy" in summary["phases"][2]["metrics"]

    # paired differences: SPIN last iteration − continued SFT, interval from t(0.975, 1) = 12.706
    row = next(d for d in summary["differences"] if d["label"] == "SPIN iter 1 − continued SFT iter 1")
    diffs = [_phase_end(r, "spin", 1)["eval/nll"] - _phase_end(r, "baseline", 1)["eval/nll"] for r in runs]
    cell = row["metrics"]["eval/nll"]
    assert cell["values"] == pytest.approx(diffs)
    half = 12.7062 * statistics.stdev(diffs) / math.sqrt(2)
    assert cell["ci95"] == [pytest.approx(statistics.fmean(diffs) - half, rel=1e-4, abs=1e-9),
                            pytest.approx(statistics.fmean(diffs) + half, rel=1e-4, abs=1e-9)]
    assert [d["label"] for d in summary["differences"]] == [
        "SPIN iter 0 − SFT", "SPIN iter 0 − continued SFT iter 0", "SPIN iter 1 − SFT",
        "SPIN iter 1 − continued SFT iter 1"]

    md = (root / "seeds_summary.md").read_text()
    assert "| SPIN iter 1 − continued SFT iter 1 |" in md and "over 2 runs" in md
    assert md in proc.stdout  # the printed table is the file


def test_rerun_skips_finished_seeds_and_summarize_agrees(two_runs, tmp_path):
    root, _ = two_runs
    before = (root / "seed_1" / "metrics.jsonl").read_text()
    proc = _seeds(*TINY, f"--out_dir={root}", "--seeds=1,2")
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.count("skipped") == 2
    assert (root / "seed_1" / "metrics.jsonl").read_text() == before

    proc = _seeds("--summarize", str(root / "seed_1"), str(root / "seed_2"), f"--out={tmp_path / 'again'}")
    assert proc.returncode == 0, describe(proc)
    again = json.loads((tmp_path / "again.json").read_text())
    assert again == json.loads((root / "seeds_summary.json").read_text())


def test_summarize_of_runs_with_unequal_phases(tmp_path):
    # a run that stopped after SPIN iteration 0 still counts where it has numbers
    for name, phases in (("a", ["sft", "spin0", "baseline0"]), ("b", ["sft", "spin0"])):
        (tmp_path / name).mkdir()
        records = [{"phase": p.rstrip("0"), "iteration": 0, "step": 1, "event": "phase_end",
                    "eval/valid_sampled": 0.5 + 0.1 * i + (name == "b") * 0.05} for i, p in enumerate(phases)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = summarize([str(tmp_path / "a"), str(tmp_path / "b")])
    spin_vs_sft = summary["differences"][0]["metrics"]["eval/valid_sampled"]
    assert spin_vs_sft["n"] == 2 and spin_vs_sft["mean"] == pytest.approx(0.1)
    assert spin_vs_sft["ci95"] == [pytest.approx(0.1), pytest.approx(0.1)]  # equal differences: no spread
    assert summary["differences"][1]["metrics"]["eval/valid_sampled"]["n"] == 1


@pytest.mark.parametrize("args, message", [
    (["--summarize", "nowhere"], "run directory 'nowhere' not found"),
    (["--summarize", "tests"], "is not a train.py out_dir"),
    (["--summarize", "tests", "tests/"], "named twice"),
    (["config/quick.py", "--seeds=1,1"], "give each seed once"),
    (["config/quick.py", "--seeds=1", "--jobs=0"], "positive number of runs"),
    (["config/quick.py", "--seeds=1", "--seed=3"], "give them all as --seeds"),
    (["config/quick.py", "--seeds=1", "--bta=0.1"],
     "unknown config key 'bta' on the command line (did you mean 'beta'?)"),
    (["config/quick.py"], "--seeds is missing"),
])
def test_errors_are_one_line(args, message):
    proc = _seeds(*args)
    assert proc.returncode == 2, describe(proc)
    assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
