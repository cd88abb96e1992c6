"""Plot: one PNG of a run's (or several runs') metrics.jsonl, to see at a glance what SPIN did (usage: HELP).

Design choices:
- matplotlib is optional: imported inside `make_figure`, its absence a one-line error; train.py's end calls
  `write_run_plot`, which without it says how to get the picture.
- Colour is the arm in every panel (SFT grey, SPIN blue, continued SFT orange); several runs are overlaid, one
  marker shape each; line style tells two quantities apart, and each panel's legend says what its styles mean.
- Training curves share the global step axis, dotted where phases end; the continued-SFT baseline is shifted
  back onto the SPIN steps it is compared with. Held-out scores are per iteration, both arms from the SFT point.
- Keys a run did not log leave their panel empty with a note."""

from __future__ import annotations

import importlib.util
import os
import sys

from configurator import UserError, run_main
from metrics_log import read_metrics

HINT = "plot.py needs matplotlib, which nanospin does not install: pip install matplotlib"
USAGE = "python plot.py OUT_DIR [OUT_DIR ...] [--out=FILE.png]"
HELP = f"""usage: {USAGE}

One PNG of the metrics.jsonl of a train.py run, or of several overlaid (e.g. the seed_N of seeds.py):
training losses and SPIN's rewards against the global step, rollout statistics and SPIN's dynamics per
iteration, held-out validity and NLL after SFT and each SPIN iteration, SPIN beside continued SFT.

  OUT_DIR         a train.py out_dir (the folder that holds metrics.jsonl)
  --out=FILE.png  where to write the picture; default OUT_DIR/metrics.png, or for several runs
                  metrics.png in the folder that holds them

Needs matplotlib (pip install matplotlib; train.py draws out_dir/metrics.png itself when it is
installed). More: README.md (The quick demo).
"""


def run_label(out_dirs: list[str], out_dir: str) -> str:
    """The directory's name, with its parent's when two runs share a name (e.g. seed_1 of two configs)."""
    names = [os.path.basename(os.path.normpath(d)) for d in out_dirs]
    name = os.path.basename(os.path.normpath(out_dir))
    if names.count(name) > 1:
        return os.path.join(os.path.basename(os.path.dirname(os.path.normpath(out_dir))), name)
    return name


def split_run(records: list[dict]) -> dict:
    """One run's records by kind: training steps per phase, rollouts, phase ends, and the shift that moves the
    continued-SFT baseline back onto the SPIN steps."""
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
    """(iterations, values) of `key` in `phase`'s records, one per iteration (the last record wins)."""
    values = {}
    for r in run["records"]:
        if key in r and r.get("phase") == phase:
            values[r["iteration"]] = r[key]
    its = sorted(values)
    return its, [values[i] for i in its]


# what each arm is called and drawn in: colour tells SPIN from continued SFT in every panel
ARMS = {"sft": ("SFT", "#555555"), "spin": ("SPIN", "#1f77b4"), "baseline": ("continued SFT", "#ff7f0e")}
RUN_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # several runs: one marker shape each
BOUNDARY = {"color": "0.35", "linestyle": ":", "linewidth": 1.2}
BOUNDARY_LABEL = "end of SFT / of a SPIN iteration"
REFERENCE = {"color": "gray", "linewidth": 0.9, "linestyle": "-."}
SOLID, DASHED = {"color": "gray", "linestyle": "-"}, {"color": "gray", "linestyle": "--"}

# the 4 x 3 grid, row by row: panel name -> (title, x label, the panel's own legend: what its line styles
# and reference lines mean; colours and runs are in the figure's legend)
PANELS = {
    "sft_loss": ("training loss (NLL/token); continued SFT drawn on the SPIN steps it matches", "global step", []),
    "spin_loss": ("SPIN training loss", "global step", [("log 2: policy = opponent", REFERENCE)]),
    "margin": ("reward margin", "global step",
               [("training (logged steps)", {**SOLID, "marker": "."}),
                ("held-out, iteration end", {"color": "gray", "linestyle": "none", "marker": "o",
                                             "markerfacecolor": "none"})]),
    "accuracy": ("reward accuracy", "global step",
                 [("training (logged steps)", {**SOLID, "marker": "."}),
                  ("held-out, iteration end", {"color": "gray", "linestyle": "none", "marker": "o",
                                               "markerfacecolor": "none"}),
                  ("0.5: chance", REFERENCE)]),
    "logps": ("policy log-probs (summed)", "global step", [("real y", SOLID), ("generated y'", DASHED)]),
    "gen_len": ("rollout length (tokens)", "SPIN iteration", [("mean", SOLID), ("p90", DASHED)]),
    "valid_sampled": ("held-out valid@T=1 (%)", "", []),
    "valid_greedy": ("held-out valid@greedy (%)", "", []),
    "nll": ("held-out NLL/token", "", []),
    "eos": ("rollout EOS rate", "SPIN iteration", []),
    "delta_logps": ("Δ log-prob over the iteration", "SPIN iteration",
                    [("real y", SOLID), ("generated y'", DASHED), ("0: unchanged", REFERENCE)]),
    "identical_kl": ("zero-gradient pairs and the policy's drift", "SPIN iteration",
                     [("share with y' = y", SOLID), ("held-out KL(policy‖opponent)/token, right axis", DASHED)]),
}


def draw_training(panels: dict, drawn: set, run: dict, marker: str) -> None:
    """Curves against the global step: losses, SPIN's rewards and log-probs, with the held-out margin and accuracy
    at each iteration's end as open markers."""
    steps = run["steps"]
    ax = panels["sft_loss"]
    for kind, shift in (("sft", 0), ("baseline", run["shift"])):
        if steps[kind]:
            ax.plot([r["step"] - shift for r in steps[kind]], [r["loss"] for r in steps[kind]], color=ARMS[kind][1],
                    marker=marker, markersize=3, markevery=max(1, len(steps[kind]) // 12))
            drawn.add("sft_loss")
    if steps["sft"]:
        ax.axvline(run["sft_end"], **BOUNDARY)
    spin = sorted(steps["spin"], key=lambda r: r["step"])
    for name, keys in (("spin_loss", ["loss"]), ("margin", ["rewards/margins"]),
                       ("accuracy", ["rewards/accuracies"]), ("logps", ["logps/real", "logps/generated"])):
        for key, style in zip(keys, ("-", "--")):
            points = [(r["step"], r[key]) for r in spin if key in r]
            if points:
                xs, ys = zip(*points)
                panels[name].plot(xs, ys, color=ARMS["spin"][1], linestyle=style, marker=marker, markersize=4)
                drawn.add(name)
        if name in drawn:
            for x in run["spin_ends"][:-1]:
                panels[name].axvline(x, **BOUNDARY)
    for name, key in (("margin", "eval/reward_margin"), ("accuracy", "eval/reward_accuracy")):
        points = sorted((r["step"], r[key]) for (phase, _), r in run["ends"].items() if phase == "spin" and key in r)
        if points:
            xs, ys = zip(*points)
            panels[name].plot(xs, ys, color=ARMS["spin"][1], linestyle="none", marker=marker, markerfacecolor="none",
                              markersize=7)
            drawn.add(name)


def draw_per_iteration(panels: dict, drawn: set, run: dict, marker: str, kl_axis):
    """Rollout statistics and SPIN dynamics per iteration; returns the KL's right-hand axis (made when first needed)."""
    color = ARMS["spin"][1]
    for name, keys in (("gen_len", ["gen_len_mean", "gen_len_p90"]), ("eos", ["eos_rate"]),
                       ("delta_logps", ["dynamics/delta_logps_real", "dynamics/delta_logps_generated"]),
                       ("identical_kl", ["dynamics/identical_frac"])):
        for key, style in zip(keys, ("-", "--")):
            its, values = values_by_iteration(run, key)
            if its:
                panels[name].plot(its, values, color=color, linestyle=style, marker=marker)
                drawn.add(name)
    its, values = values_by_iteration(run, "eval/kl_opponent")
    if its:
        if kl_axis is None:
            kl_axis = panels["identical_kl"].twinx()
            kl_axis.tick_params(labelsize=8)
        kl_axis.plot(its, values, color=color, linestyle="--", marker=marker)
        drawn.add("identical_kl")
    return kl_axis


def draw_held_out(panels: dict, drawn: set, run: dict, marker: str) -> None:
    """Held-out scores and NLL per phase: x = 0 for SFT, t + 1 for iteration t."""
    for name, key, scale in (("valid_sampled", "eval/valid_sampled", 100),
                             ("valid_greedy", "eval/valid_greedy", 100), ("nll", "eval/nll", 1)):
        start = run["ends"].get(("sft", 0), {}).get(key)
        for phase in ("spin", "baseline"):
            its = sorted(i for (p, i) in run["ends"] if p == phase and key in run["ends"][(p, i)])
            xs = ([0] if start is not None else []) + [i + 1 for i in its]
            ys = ([start] if start is not None else []) + [run["ends"][(phase, i)][key] for i in its]
            if len(xs) > (1 if phase == "baseline" else 0):
                panels[name].plot(xs, [y * scale for y in ys], color=ARMS[phase][1], marker=marker)
                drawn.add(name)
        if start is not None:
            panels[name].plot([0], [start * scale], color=ARMS["sft"][1], marker=marker, linestyle="none", zorder=3)
            drawn.add(name)


def style_panels(panels: dict, drawn: set, n_iterations: int, ticker, plt, kl_axis) -> None:
    for name, ax in panels.items():
        title, xlabel, legend = PANELS[name]
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
            continue
        for label, style in legend:
            if style is REFERENCE:  # a reference line is drawn where it belongs, labelled in the legend
                ax.axhline({"spin_loss": 0.6931, "accuracy": 0.5, "delta_logps": 0.0}[name], label=label, **style)
        if legend:  # on the right-hand axis where there is one, else its curves would hide the legend
            handles = [plt.Line2D([], [], label=label, **style) for label, style in legend]
            (kl_axis if name == "identical_kl" and kl_axis else ax).legend(handles=handles, fontsize=7, loc="best",
                                                                           framealpha=0.8)
    if "sft_loss" in drawn:  # the loss falls by 5x: log scale, with plain numbers rather than powers of ten
        panels["sft_loss"].set_yscale("log")
        panels["sft_loss"].yaxis.set_major_formatter(ticker.ScalarFormatter())
        panels["sft_loss"].yaxis.set_minor_formatter(ticker.FormatStrFormatter("%.1f"))


def arms_in(runs: list[dict]) -> list[str]:
    return [kind for kind in ARMS if any(run["steps"][kind] or any(p == kind for p, _ in run["ends"])
                                          for run in runs)]


def make_figure(out_dirs: list[str]):
    """(the figure, its panels by name) for the runs in `out_dirs`; the figure's legend names the arms, the
    boundaries and, for several runs, each run's marker."""
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
    runs = [split_run(rs) for rs in records.values()]
    fig, axes = plt.subplots(4, 3, figsize=(16, 17))
    panels = dict(zip(PANELS, axes.flat))
    drawn: set[str] = set()
    kl_axis = None
    for n, run in enumerate(runs):
        marker = RUN_MARKERS[n % len(RUN_MARKERS)]
        draw_training(panels, drawn, run, marker)
        kl_axis = draw_per_iteration(panels, drawn, run, marker, kl_axis)
        draw_held_out(panels, drawn, run, marker)
    style_panels(panels, drawn, max((len(r["iterations"]) for r in runs), default=0), matplotlib.ticker, plt,
                 kl_axis)
    handles = [plt.Line2D([], [], color=ARMS[kind][1], linewidth=2, label=ARMS[kind][0]) for kind in arms_in(runs)]
    handles.append(plt.Line2D([], [], label=BOUNDARY_LABEL, **BOUNDARY))
    if len(out_dirs) > 1:
        handles += [plt.Line2D([], [], color="black", linestyle="none", marker=RUN_MARKERS[n % len(RUN_MARKERS)],
                               label=run_label(out_dirs, d)) for n, d in enumerate(out_dirs)]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), fontsize=10, frameon=False,
               bbox_to_anchor=(0.5, 0.985))
    fig.suptitle(f"{len(out_dirs)} runs overlaid" if len(out_dirs) > 1 else f"run {run_label(out_dirs, out_dirs[0])}",
                 fontsize=11, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.955))
    return fig, panels


def plot_runs(out_dirs: list[str], path: str) -> str:
    """Write the PNG of the runs in `out_dirs` to `path` (whole, then renamed); returns `path`."""
    fig, _ = make_figure(out_dirs)
    import matplotlib.pyplot as plt  # make_figure has imported it, or said how to install it

    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_run_plot(out_dir: str) -> None:
    """out_dir/metrics.png at the end of a run when matplotlib is importable (else a line saying how); a failure is
    reported, not raised: the run is done by then."""
    if importlib.util.find_spec("matplotlib") is None:
        print(f"plot: pip install matplotlib, then python plot.py {out_dir}")
        return
    try:
        print(f"plot: {plot_runs([out_dir], os.path.join(out_dir, 'metrics.png'))}")
    except Exception as e:  # noqa: BLE001 - the weights and metrics are written; the picture is a convenience
        print(f"plot: not written ({type(e).__name__}: {e}); try python plot.py {out_dir}")


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        print(HELP, end="")
        return
    out_dirs = [a for a in argv if not a.startswith("--")]
    path = None
    for arg in argv:
        if arg.startswith("--"):
            if not arg.startswith("--out="):
                raise UserError(f"unknown option '{arg}'; usage: {USAGE}")
            path = arg.removeprefix("--out=")
    if not out_dirs:
        raise UserError(f"usage: {USAGE} (--help says more)")
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
