"""Plot: one PNG of a run's (or several runs') metrics.jsonl, to see at a glance what SPIN did.

    python plot.py OUT_DIR [OUT_DIR ...] [--out=FILE.png]

Design choices:
- matplotlib is optional (never a run-time dependency): it is imported inside `plot_runs`, and its
  absence is a one-line error; train.py's end calls `write_run_plot`, which without it says how to get the picture.
- Training curves share the global step axis, with dotted lines where SPIN iterations end. The
  continued-SFT baseline runs after SPIN in global steps; it is drawn shifted back onto the SPIN
  steps it is compared with, so each iteration of both sits at the same x.
- Held-out scores are drawn per iteration (x = SFT, iter 0, iter 1, ...): SPIN solid, continued SFT
  dashed, both starting from the SFT point. Several runs (e.g. seeds) are overlaid, one colour each.
- Keys a run did not log (e.g. the SPIN dynamics of older runs) leave their panel empty with a note.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from configurator import UserError, run_main
from metrics_log import read_metrics

HINT = "plot.py needs matplotlib, which nanospin does not install: pip install matplotlib"


def run_label(out_dirs: list[str], out_dir: str) -> str:
    """The directory's name, with its parent's when two runs share a name (e.g. seed_1 of two configs)."""
    names = [os.path.basename(os.path.normpath(d)) for d in out_dirs]
    name = os.path.basename(os.path.normpath(out_dir))
    if names.count(name) > 1:
        return os.path.join(os.path.basename(os.path.dirname(os.path.normpath(out_dir))), name)
    return name


def split_run(records: list[dict]) -> dict:
    """One run's records by kind: training steps per phase, rollouts, phase ends, and the step offset
    that moves the continued-SFT baseline back onto the SPIN steps."""
    steps = {"sft": [], "spin": [], "baseline": []}
    rollouts, ends = {}, {}
    for r in records:
        if r.get("event") == "phase_end":
            ends[(r["phase"], r["iteration"])] = r
        elif "rollout_seconds" in r:
            rollouts[r["iteration"]] = r
        elif "loss" in r and r.get("phase") in steps:
            steps[r["phase"]].append(r)
    sft_end = ends.get(("sft", 0), {}).get("step", 0)
    spin_ends = sorted(r["step"] for (phase, _), r in ends.items() if phase == "spin")
    # the baseline's first step follows the last SPIN step; it is compared with SPIN's first
    shift = (spin_ends[-1] - sft_end) if spin_ends else 0
    iterations = sorted({i for (phase, i) in ends if phase in ("spin", "baseline")} | set(rollouts))
    return {"steps": steps, "rollouts": rollouts, "ends": ends, "sft_end": sft_end, "spin_ends": spin_ends,
            "shift": shift, "iterations": iterations, "records": records}


def values_by_iteration(run: dict, key: str, phase: str = "spin") -> tuple[list[int], list[float]]:
    """(iterations, values) of `key` in the records of `phase` that carry it, one value per
    iteration (the last record wins): rollout stats, dynamics, phase-end evaluations."""
    values = {}
    for r in run["records"]:
        if key in r and r.get("phase") == phase:
            values[r["iteration"]] = r[key]
    its = sorted(values)
    return its, [values[i] for i in its]


# the 4 x 3 grid, row by row: panel name -> (title, x label); '─' solid, '- -' dashed
PANELS = {
    "sft_loss": ("training loss (NLL/token): SFT ─, continued SFT - - (shifted onto SPIN's steps)", "global step"),
    "spin_loss": ("SPIN training loss", "global step"),
    "margin": ("reward margin: training ─, held-out at iteration end ○", "global step"),
    "accuracy": ("reward accuracy: training ─, held-out at iteration end ○", "global step"),
    "logps": ("policy log-probs (summed): real ─, generated - -", "global step"),
    "gen_len": ("rollout length: mean ─, p90 - -", "SPIN iteration"),
    "valid_sampled": ("held-out valid@T=1 (%): SPIN ─, continued SFT - -", ""),
    "valid_greedy": ("held-out valid@greedy (%): SPIN ─, continued SFT - -", ""),
    "nll": ("held-out NLL/token: SPIN ─, continued SFT - -", ""),
    "eos": ("rollout EOS rate", "SPIN iteration"),
    "delta_logps": ("Δ log-prob over the iteration: real ─, generated - -", "SPIN iteration"),
    "identical_kl": ("zero-gradient pairs (y' = y) ─, held-out KL(policy‖opponent)/token - - (right)",
                     "SPIN iteration"),
}
BOUNDARY = {"linestyle": ":", "linewidth": 0.8, "alpha": 0.6}


def draw_training(panels: dict, drawn: set, run: dict, color: str) -> None:
    """Curves against the global step: SFT and continued-SFT loss, SPIN loss, rewards, log-probs."""
    steps = run["steps"]
    ax = panels["sft_loss"]
    if steps["sft"]:
        ax.plot([r["step"] for r in steps["sft"]], [r["loss"] for r in steps["sft"]], color=color)
        ax.axvline(run["sft_end"], color=color, **BOUNDARY)
        drawn.add("sft_loss")
    if steps["baseline"]:
        ax.plot([r["step"] - run["shift"] for r in steps["baseline"]], [r["loss"] for r in steps["baseline"]],
                color=color, linestyle="--")
        drawn.add("sft_loss")
    spin = steps["spin"]
    for name, keys in (("spin_loss", ["loss"]), ("margin", ["rewards/margins"]),
                       ("accuracy", ["rewards/accuracies"]), ("logps", ["logps/real", "logps/generated"])):
        for key, style in zip(keys, ("-", "--")):
            for t in sorted({r["iteration"] for r in spin}):  # one line per iteration: no jump drawn between
                points = [(r["step"], r[key]) for r in spin if key in r and r["iteration"] == t]
                if points:
                    xs, ys = zip(*points)
                    panels[name].plot(xs, ys, color=color, linestyle=style, marker="." if len(points) < 30 else None)
                    drawn.add(name)
        if name in drawn:
            for x in run["spin_ends"][:-1]:
                panels[name].axvline(x, color=color, **BOUNDARY)
    # held-out reward margin and accuracy at the end of each SPIN iteration, as open circles
    for name, key in (("margin", "eval/reward_margin"), ("accuracy", "eval/reward_accuracy")):
        points = sorted((r["step"], r[key]) for (phase, _), r in run["ends"].items() if phase == "spin" and key in r)
        if points:
            xs, ys = zip(*points)
            panels[name].plot(xs, ys, color=color, linestyle="none", marker="o", markerfacecolor="none")
            drawn.add(name)


def draw_per_iteration(panels: dict, drawn: set, run: dict, color: str, kl_axis):
    """Rollout statistics and SPIN dynamics, one point per iteration; returns the KL's right-hand axis
    (made the first time a run has the KL)."""
    for name, keys in (("gen_len", ["gen_len_mean", "gen_len_p90"]), ("eos", ["eos_rate"]),
                       ("delta_logps", ["dynamics/delta_logps_real", "dynamics/delta_logps_generated"]),
                       ("identical_kl", ["dynamics/identical_frac"])):
        for key, style in zip(keys, ("-", "--")):
            its, values = values_by_iteration(run, key)
            if its:
                panels[name].plot(its, values, color=color, linestyle=style, marker="o")
                drawn.add(name)
    its, values = values_by_iteration(run, "eval/kl_opponent")
    if its:
        if kl_axis is None:
            kl_axis = panels["identical_kl"].twinx()
            kl_axis.tick_params(labelsize=8)
        kl_axis.plot(its, values, color=color, linestyle="--", marker="s")
        drawn.add("identical_kl")
    return kl_axis


def draw_held_out(panels: dict, drawn: set, run: dict, color: str) -> None:
    """Held-out checker scores and NLL per phase: x = 0 for SFT, t + 1 for iteration t; SPIN and
    continued SFT both start from the SFT point."""
    for name, key, scale in (("valid_sampled", "eval/valid_sampled", 100),
                             ("valid_greedy", "eval/valid_greedy", 100), ("nll", "eval/nll", 1)):
        start = run["ends"].get(("sft", 0), {}).get(key)
        for phase, style, marker in (("spin", "-", "o"), ("baseline", "--", "s")):
            its = sorted(i for (p, i) in run["ends"] if p == phase and key in run["ends"][(p, i)])
            xs = ([0] if start is not None else []) + [i + 1 for i in its]
            ys = ([start] if start is not None else []) + [run["ends"][(phase, i)][key] for i in its]
            if len(xs) > (1 if phase == "baseline" else 0):
                panels[name].plot(xs, [y * scale for y in ys], color=color, linestyle=style, marker=marker)
                drawn.add(name)


def style_panels(panels: dict, drawn: set, n_iterations: int, ticker) -> None:
    for name, ax in panels.items():
        title, xlabel = PANELS[name]
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if xlabel:
            ax.set_xlabel(xlabel, fontsize=8)
        if name in ("valid_sampled", "valid_greedy", "nll"):
            ax.set_xticks(range(n_iterations + 1), ["SFT"] + [f"iter {t}" for t in range(n_iterations)])
        elif xlabel == "SPIN iteration" and n_iterations:
            ax.set_xticks(range(n_iterations))
        if name not in drawn:
            ax.text(0.5, 0.5, "not in these runs' metrics", transform=ax.transAxes, ha="center", va="center",
                    color="gray", fontsize=9)
    if "sft_loss" in drawn:  # the loss falls by 5x: log scale, with plain numbers rather than powers of ten
        panels["sft_loss"].set_yscale("log")
        panels["sft_loss"].yaxis.set_major_formatter(ticker.ScalarFormatter())
        panels["sft_loss"].yaxis.set_minor_formatter(ticker.FormatStrFormatter("%.1f"))
    if "spin_loss" in drawn:
        panels["spin_loss"].axhline(0.6931, color="gray", linewidth=0.8, linestyle="-.")  # log 2: policy = opponent
    if "delta_logps" in drawn:
        panels["delta_logps"].axhline(0, color="gray", linewidth=0.8)


def plot_runs(out_dirs: list[str], path: str) -> str:
    """Write the PNG of the runs in `out_dirs` to `path`; returns `path`."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise UserError(HINT) from None
    records = {d: read_metrics(d) for d in out_dirs}
    for d, rs in records.items():
        if not rs:
            raise UserError(f"'{os.path.join(d, 'metrics.jsonl')}' has no records yet")
    runs = {d: split_run(rs) for d, rs in records.items()}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(4, 3, figsize=(16, 17))
    panels = dict(zip(PANELS, axes.flat))
    drawn: set[str] = set()
    kl_axis = None
    for n, run in enumerate(runs.values()):
        color = colors[n % len(colors)]
        draw_training(panels, drawn, run, color)
        kl_axis = draw_per_iteration(panels, drawn, run, color, kl_axis)
        draw_held_out(panels, drawn, run, color)
    style_panels(panels, drawn, max((len(r["iterations"]) for r in runs.values()), default=0), matplotlib.ticker)
    handles = [plt.Line2D([], [], color=colors[n % len(colors)], label=run_label(out_dirs, d))
               for n, d in enumerate(out_dirs)]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), fontsize=9, frameon=False)
    fig.suptitle("dotted vertical lines: end of SFT and of each SPIN iteration", fontsize=9, y=0.965)
    fig.tight_layout(rect=(0, 0, 1, 0.955))
    tmp = path + ".tmp.png"  # written whole, then renamed: no half-written picture
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_run_plot(out_dir: str) -> None:
    """out_dir/metrics.png at the end of a train.py run, when matplotlib is importable; without it one line says
    how to get the picture. The run is done by then: a plot that fails is reported, not raised."""
    if importlib.util.find_spec("matplotlib") is None:
        print(f"plot: pip install matplotlib, then python plot.py {out_dir}")
        return
    try:
        print(f"plot: {plot_runs([out_dir], os.path.join(out_dir, 'metrics.png'))}")
    except Exception as e:  # noqa: BLE001 - the weights and metrics are written; the picture is a convenience
        print(f"plot: not written ({type(e).__name__}: {e}); try python plot.py {out_dir}")


def main(argv: list[str]) -> None:
    out_dirs = [a for a in argv if not a.startswith("--")]
    path = None
    for arg in argv:
        if arg.startswith("--"):
            if not arg.startswith("--out="):
                raise UserError(f"unknown option '{arg}'; usage: python plot.py OUT_DIR [OUT_DIR ...] [--out=FILE.png]")
            path = arg.removeprefix("--out=")
    if not out_dirs:
        raise UserError("usage: python plot.py OUT_DIR [OUT_DIR ...] [--out=FILE.png]")
    for d in out_dirs:
        if not os.path.isdir(d):
            raise UserError(f"run directory '{d}' not found")
    if path is None:
        # one run: its own metrics.png; several: beside them, in the directory that holds them all
        path = os.path.join(out_dirs[0] if len(out_dirs) == 1 else
                            os.path.commonpath([os.path.dirname(os.path.abspath(d)) for d in out_dirs]), "metrics.png")
    if not path.endswith(".png"):
        raise UserError(f"--out={path}: plot.py writes PNG files; give a name ending in .png")
    print(f"wrote {plot_runs(out_dirs, path)}")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
