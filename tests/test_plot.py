"""plot.py: a PNG from a recorded metrics.jsonl (the quick demo at seed 1337), the SPIN dynamics
panels when their keys are present, and one-line errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from train_runs import REPO, child_env

pytest.importorskip("matplotlib")

from plot import ARMS, BOUNDARY_LABEL, make_figure, plot_runs, split_run  # noqa: E402

RECORDED = REPO / "tests" / "fixtures" / "quick_metrics.jsonl"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_dir(tmp_path, name, records=None) -> Path:
    out_dir = tmp_path / name
    out_dir.mkdir()
    if records is None:
        shutil.copyfile(RECORDED, out_dir / "metrics.jsonl")
    else:
        (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out_dir


def test_png_from_a_recorded_run(tmp_path):
    out_dir = _run_dir(tmp_path, "run")
    proc = subprocess.run([sys.executable, "plot.py", str(out_dir)], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    png = (out_dir / "metrics.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 20_000


def test_the_baseline_is_drawn_onto_the_spin_steps():
    run = split_run([json.loads(line) for line in open(RECORDED)])
    # the recorded demo: SFT ends at 500, three SPIN iterations of 16 steps, then the baseline's 48
    assert (run["sft_end"], run["spin_ends"], run["shift"]) == (500, [516, 532, 548], 48)
    assert run["steps"]["baseline"][0]["step"] - run["shift"] == 516


def test_dynamics_panels_draw_when_logged(tmp_path):
    records = [json.loads(line) for line in open(RECORDED)]
    with_dynamics = []
    for r in records:
        r = dict(r)
        if "rollout_seconds" in r:
            r.update({"gen_len_p90": 17.0, "dynamics/identical_frac": 0.02 * r["iteration"]})
        if r.get("event") == "phase_end" and r["phase"] == "spin":
            r.update({"dynamics/delta_logps_real": -0.4 * r["iteration"], "eval/kl_opponent": 0.01,
                      "dynamics/delta_logps_generated": -1.1 * r["iteration"]})
        with_dynamics.append(r)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from plot import draw_per_iteration
    drawn = {}
    for name, run in (("plain", records), ("dynamics", with_dynamics)):
        axes = plt.subplots(1, 4)[1]
        panels = dict(zip(("gen_len", "eos", "delta_logps", "identical_kl"), axes))
        drawn[name] = set()
        draw_per_iteration(panels, drawn[name], split_run(run), "o", None)
    plt.close("all")
    assert drawn["plain"] == {"gen_len", "eos"}  # the recorded run predates the dynamics keys
    assert drawn["dynamics"] == {"gen_len", "eos", "delta_logps", "identical_kl"}
    both = plot_runs([str(_run_dir(tmp_path, "dyn", with_dynamics)), str(_run_dir(tmp_path, "plain"))],
                     str(tmp_path / "both.png"))
    assert Path(both).stat().st_size > 20_000


def _spin_logged_twice(records: list[dict]) -> list[dict]:
    """The recorded run as config/quick.py logs it now (log_interval 8): two training records per SPIN iteration."""
    out = []
    for r in records:
        if r.get("phase") == "spin" and "loss" in r and "event" not in r:
            out.append({**r, "step": r["step"] - 8, "loss": r["loss"] + 0.01})
        out.append(r)
    return out


def _lines(ax) -> list:
    return [line for line in ax.get_lines() if len(line.get_xdata())]


def test_the_picture_explains_itself(tmp_path):
    """The figure's legend names each arm by its colour, the dotted boundaries and (several runs) each run by its
    marker; held-out panels draw SPIN and continued SFT in their two colours; the log 2 line is labelled; SPIN's
    logged steps are one connected line with a marker on each point."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex
    records = _spin_logged_twice([json.loads(line) for line in open(RECORDED)])
    fig, panels = make_figure([str(_run_dir(tmp_path, "run", records))])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["SFT", "SPIN", "continued SFT", BOUNDARY_LABEL]
    for name in ("valid_sampled", "valid_greedy", "nll"):
        colours = {to_hex(line.get_color()) for line in _lines(panels[name]) if len(line.get_xdata()) == 4}
        assert colours == {ARMS["spin"][1], ARMS["baseline"][1]}, name  # SFT, iter 0, 1, 2 for each arm
    assert len({ARMS[k][1] for k in ARMS}) == 3
    assert "log 2: policy = opponent" in [t.get_text() for t in panels["spin_loss"].get_legend().get_texts()]
    log2 = [line for line in panels["spin_loss"].get_lines() if list(line.get_ydata()) == [0.6931, 0.6931]]
    assert len(log2) == 1
    spin = [line for line in _lines(panels["spin_loss"]) if to_hex(line.get_color()) == ARMS["spin"][1]]
    assert len(spin) == 1 and len(spin[0].get_xdata()) == 6 and spin[0].get_marker() not in (None, "", "None")
    assert [t.get_text() for t in panels["logps"].get_legend().get_texts()] == ["real y", "generated y'"]
    plt.close(fig)

    fig, _ = make_figure([str(_run_dir(tmp_path, "seed_1")), str(_run_dir(tmp_path, "seed_2"))])
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[-2:] == ["seed_1", "seed_2"]
    markers = [h.get_marker() for h in legend.legend_handles[-2:]]
    assert markers[0] != markers[1]
    plt.close(fig)


def test_help_is_usage_and_exit_0():
    proc = subprocess.run([sys.executable, "plot.py", "--help"], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python plot.py OUT_DIR") and not proc.stderr


@pytest.mark.parametrize("args, message", [
    (["nowhere"], "run directory 'nowhere' not found"),
    (["tests"], "metrics.jsonl' not found"),
    ([], "usage: python plot.py"),
    (["tests", "--out=x.pdf"], "give a name ending in .png"),
])
def test_errors_are_one_line(args, message):
    proc = subprocess.run([sys.executable, "plot.py", *args], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_missing_matplotlib_is_a_one_line_hint(tmp_path):
    out_dir = _run_dir(tmp_path, "run")
    code = ("import sys; sys.modules['matplotlib'] = None\n"  # as if it were not installed
            "import plot; from configurator import run_main; run_main(plot.main, sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", code, str(out_dir)], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "pip install matplotlib" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (out_dir / "metrics.png").exists()


def test_train_py_draws_metrics_png_at_the_end_of_a_run(tmp_path, capsys, monkeypatch):
    """train.py writes out_dir/metrics.png when matplotlib is importable, and says how to get it when not."""
    import importlib.util

    from train_runs import TINY, run_in_process
    out_dir = tmp_path / "run"
    args = (*TINY, f"--out_dir={out_dir}", "--max_iterations=1", "--save_interval=0", "--plot=True")
    assert run_in_process(*args) == 0
    png = (out_dir / "metrics.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and f"plot: {out_dir / 'metrics.png'}" in capsys.readouterr().out

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else
                        real_find_spec(name, *a))
    out_dir = tmp_path / "without"
    assert run_in_process(*args[:-2], f"--out_dir={out_dir}", "--plot=True") == 0
    assert not (out_dir / "metrics.png").exists()
    assert f"plot: pip install matplotlib, then python plot.py {out_dir}" in capsys.readouterr().out
