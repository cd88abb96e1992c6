"""Seeds: run one config over several seeds and say, with 95% intervals, whether SPIN helped (usage: HELP).

Design choices:
- Each seed is a plain train.py run in `<out_dir>/seed_N`; a finished seed is skipped, an unfinished one resumes
  because train.py does. `--jobs=2` runs two at a time with one torch thread each.
- The table is built only from the phase-end records in each run's metrics.jsonl, so `--summarize` gives the
  same table for runs made any other way.
- Differences are paired within a run (same seed, same held-out prompts): SPIN iter t − SFT start
  and SPIN iter t − continued SFT iter t, with 95% Student t intervals (metrics_log.mean_ci).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from configurator import UserError, run_main
from metrics_log import mean_ci, read_metrics

# (metrics.jsonl key, label, scale): validity and accuracy are shown in points (percent)
METRICS = [("eval/valid_sampled", "valid@T=1 (%)", 100.0), ("eval/valid_greedy", "valid@greedy (%)", 100.0),
           ("eval/nll", "NLL", 1.0), ("eval/reward_margin", "reward margin", 1.0),
           ("eval/reward_accuracy", "reward acc (%)", 100.0)]
# the scores compared between phases (reward metrics exist only after SPIN phases)
DIFFERENCE_METRICS = ["eval/valid_sampled", "eval/valid_greedy", "eval/nll"]


# ------------------------------------------------------------------------------------------------
# reading runs


def phase_label(phase: str, iteration: int) -> str:
    return {"sft": "SFT", "spin": f"SPIN iter {iteration}", "baseline": f"continued SFT iter {iteration}"}[phase]


def phase_ends(out_dir: str) -> dict[tuple[str, int], dict]:
    """{(phase, iteration): the phase-end record} of one run (the last one wins if a phase repeats)."""
    return {(r["phase"], r["iteration"]): r for r in read_metrics(out_dir) if r.get("event") == "phase_end"}


def summarize(out_dirs: list[str]) -> dict:
    """Per phase: each metric's values, mean and sd over runs; paired differences with 95% intervals."""
    runs = {d: phase_ends(d) for d in out_dirs}
    empty = [d for d, ends in runs.items() if not ends]
    if empty:
        raise UserError(f"'{empty[0]}/metrics.jsonl' has no phase-end evaluation yet; let the run finish a phase "
                        f"or leave that directory out")
    order = {"sft": 0, "spin": 1, "baseline": 2}
    keys = sorted({k for ends in runs.values() for k in ends}, key=lambda k: (order[k[0]], k[1]))
    phases = []
    for phase, iteration in keys:
        row = {"phase": phase, "iteration": iteration, "label": phase_label(phase, iteration), "metrics": {}}
        for key, _, _ in METRICS:
            have = [i for i, d in enumerate(out_dirs) if key in runs[d].get((phase, iteration), {})]
            values = [runs[out_dirs[i]][(phase, iteration)][key] for i in have]
            if values:  # "runs": the positions in out_dirs the values come from
                row["metrics"][key] = {"n": len(values), "values": values, "runs": have,
                                       "mean": statistics.fmean(values),
                                       "sd": statistics.stdev(values) if len(values) > 1 else None}
        phases.append(row)

    spin_iterations = sorted(i for p, i in keys if p == "spin")
    comparisons = []  # (label, SPIN phase key, the phase it is compared with)
    for t in spin_iterations:
        comparisons.append((f"SPIN iter {t} − SFT", ("spin", t), ("sft", 0)))
        comparisons.append((f"SPIN iter {t} − continued SFT iter {t}", ("spin", t), ("baseline", t)))
    differences = []
    for label, a, b in comparisons:
        row = {"label": label, "spin_iteration": a[1], "against": b[0], "metrics": {}}
        for key in DIFFERENCE_METRICS:
            both = [d for d in out_dirs if key in runs[d].get(a, {}) and key in runs[d].get(b, {})]
            if not both:
                continue
            values = [runs[d][a][key] - runs[d][b][key] for d in both]
            mean, lower, upper = mean_ci(values)
            row["metrics"][key] = {"n": len(values), "values": values, "mean": mean, "ci95": [lower, upper]}
        if row["metrics"]:
            differences.append(row)
    return {"runs": list(out_dirs), "last_spin_iteration": spin_iterations[-1] if spin_iterations else None,
            "phases": phases, "differences": differences}


# ------------------------------------------------------------------------------------------------
# the table


def _fmt(value: float, scale: float, signed: bool = False) -> str:
    digits = 1 if scale == 100.0 else 3
    return f"{value * scale:+.{digits}f}" if signed else f"{value * scale:.{digits}f}"


def verdicts(summary: dict) -> list[str]:
    """One sentence per comparison of the last SPIN iteration on valid@T=1."""
    last, lines = summary["last_spin_iteration"], []
    for row in summary["differences"]:
        cell = row["metrics"].get("eval/valid_sampled")
        if row["spin_iteration"] != last or cell is None:
            continue
        lower, upper = cell["ci95"]
        if lower is None:
            lines.append(f"{row['label']}, valid@T=1: {_fmt(cell['mean'], 100, True)} points (one run: no interval)")
            continue
        reading = ("above zero" if lower > 0 else "below zero" if upper < 0 else
                   "the interval includes zero: no measurable effect")
        lines.append(f"{row['label']}, valid@T=1: {_fmt(cell['mean'], 100, True)} points, 95% CI "
                     f"[{_fmt(lower, 100, True)}, {_fmt(upper, 100, True)}] over {cell['n']} runs: {reading}")
    return lines


def markdown(summary: dict) -> str:
    n_runs = len(summary["runs"])
    cols = [(k, label, s) for k, label, s in METRICS if any(k in p["metrics"] for p in summary["phases"])]
    lines = [f"Held-out scores after each phase over {n_runs} runs (mean ± standard deviation):", "",
             "| after | " + " | ".join(label for _, label, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    for p in summary["phases"]:
        cells = []
        for key, _, scale in cols:
            m = p["metrics"].get(key)
            cells.append("" if m is None else _fmt(m["mean"], scale) +
                         ("" if m["sd"] is None else f" ± {_fmt(m['sd'], scale)}"))
        lines.append(f"| {p['label']} | " + " | ".join(cells) + " |")
    if summary["differences"]:
        scale = {k: s for k, _, s in METRICS}
        labels = {k: label.replace("(%)", "(points)") for k, label, _ in METRICS}
        lines += ["", "Paired differences within each run: mean [95% confidence interval, Student t]:", "",
                  "| difference | " + " | ".join(labels[k] for k in DIFFERENCE_METRICS) + " |",
                  "|---|" + "---|" * len(DIFFERENCE_METRICS)]
        for row in summary["differences"]:
            cells = []
            for key in DIFFERENCE_METRICS:
                m = row["metrics"].get(key)
                if m is None:
                    cells.append("")
                    continue
                lower, upper = m["ci95"]
                interval = "" if lower is None else \
                    f" [{_fmt(lower, scale[key], True)}, {_fmt(upper, scale[key], True)}]"
                cells.append(_fmt(m["mean"], scale[key], True) + interval)
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
        lines += [""] + verdicts(summary)
    lines += ["", "Per run, valid@T=1 / valid@greedy (%):", "",
              "| run | " + " | ".join(p["label"] for p in summary["phases"]) + " |",
              "|---|" + "---|" * len(summary["phases"])]
    for i, run in enumerate(summary["runs"]):
        cells = []
        for p in summary["phases"]:
            pair = [p["metrics"].get(k) for k in ("eval/valid_sampled", "eval/valid_greedy")]
            # a phase some run lacks has fewer values: find this run's by position among the runs that have it
            cells.append(" / ".join(_fmt(m["values"][m["runs"].index(i)], 100.0) if m and i in m["runs"] else "–"
                                    for m in pair))
        lines.append(f"| {os.path.basename(run.rstrip('/'))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(summary: dict, prefix: str) -> tuple[str, str]:
    """`prefix.json` and `prefix.md`, each written whole (temporary file, then rename)."""
    paths = (prefix + ".json", prefix + ".md")
    for path, text in zip(paths, (json.dumps(summary, indent=2) + "\n", markdown(summary))):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return paths


# ------------------------------------------------------------------------------------------------
# running the seeds


def parse_seeds(text: str) -> list[int]:
    """'1,2,3' or '201-205' (or a mix) -> the seeds, in order."""
    seeds = []
    try:
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            seeds += list(range(int(a), int(b) + 1)) if b else [int(a)]
    except ValueError:
        raise UserError(f"--seeds={text}: give integers such as --seeds=1,2,3 or --seeds=1-5") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds={text}: give each seed once, e.g. --seeds=1,2,3")
    return seeds


def finished(out_dir: str, expected: list[tuple[str, int]]) -> bool:
    if not os.path.isfile(os.path.join(out_dir, "metrics.jsonl")):
        return False
    return set(expected) <= set(phase_ends(out_dir))


def run_seeds(config: str, overrides: list[str], seeds: list[int], jobs: int) -> tuple[list[str], str]:
    """Run train.py once per seed (at most `jobs` at a time); returns the seeds' out_dirs and their root."""
    from train_config import load_train_config, phases_of
    cfg = load_train_config([config, *overrides])  # a typo fails here once, not once per seed
    root = cfg.out_dir
    os.makedirs(root, exist_ok=True)
    env = dict(os.environ)
    if jobs > 1:  # two processes with several threads each crawl on a small CPU
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    out_dirs = [os.path.join(root, f"seed_{seed}") for seed in seeds]

    def run(seed: int, out_dir: str) -> tuple[int, str] | None:
        """One seed's train.py run; (seed, its log) if it failed."""
        if finished(out_dir, phases_of(cfg)):
            print(f"seed {seed}: {out_dir} has finished every phase; skipped")
            return None
        log_path, t0 = out_dir + ".log", time.time()
        print(f"seed {seed}: running in {out_dir} (output in {log_path})", flush=True)
        with open(log_path, "a") as log:
            cmd = [sys.executable, script, config, *overrides, f"--seed={seed}", f"--out_dir={out_dir}"]
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if code == 0:
            print(f"seed {seed}: done in {time.time() - t0:.0f}s", flush=True)
            return None
        print(f"seed {seed}: failed with exit code {code}; see {log_path}", flush=True)
        return seed, log_path

    with ThreadPoolExecutor(jobs) as pool:
        failed = [f for f in pool.map(run, seeds, out_dirs) if f]
    if failed:
        raise UserError(f"{len(failed)} of {len(seeds)} runs failed (seed {failed[0][0]}: see {failed[0][1]}); "
                        f"fix the cause and run the same command again to resume them")
    return out_dirs, root


HELP = """usage: python seeds.py CONFIG --seeds=1,2,3 [--jobs=2] [--key=value ...]
       python seeds.py --summarize OUT_DIR [OUT_DIR ...] [--out=PREFIX]

Runs train.py with CONFIG once per seed, in <out_dir>/seed_N (output in <out_dir>/seed_N.log), then
prints per-phase mean ± sd over the seeds and the paired differences SPIN − SFT start and SPIN −
continued SFT with 95% intervals, as markdown and JSON (<out_dir>/seeds_summary.md, .json). A finished
seed is skipped, an unfinished one resumes: run the same command again after a failure.

  --seeds=1,2,3    the seeds, one train.py run each
  --jobs=2         runs at a time (each with one torch thread)
  --key=value      passed to every train.py run (python train.py --help lists the keys)
  --summarize      only the table, from runs made any way (train.py out_dirs); --out=PREFIX names the files

More: README.md (The quick demo: how its 5-seed table was made).
"""


def main(argv: list[str]) -> None:
    usage = " | ".join(line.strip() for line in HELP.splitlines()[:2])
    if "-h" in argv or "--help" in argv:
        print(HELP, end="")
        return
    if not argv:
        raise UserError(f"{usage} (--help says more)")
    if argv[0] == "--summarize":
        out_dirs = [a for a in argv[1:] if not a.startswith("--")]
        options = [a for a in argv[1:] if a.startswith("--")]
        prefix = None
        for option in options:
            if not option.startswith("--out="):
                raise UserError(f"--summarize takes run directories and --out=PREFIX, not '{option}'")
            prefix = option.removeprefix("--out=")
        if not out_dirs:
            raise UserError("--summarize needs at least one run directory (a train.py out_dir)")
        if len(set(map(os.path.abspath, out_dirs))) != len(out_dirs):
            raise UserError("--summarize: a run directory is named twice; pass each run once")
        missing = [d for d in out_dirs if not os.path.isdir(d)]
        if missing:
            raise UserError(f"run directory '{missing[0]}' not found")
        if prefix is None:
            prefix = os.path.join(os.path.commonpath([os.path.dirname(os.path.abspath(d)) for d in out_dirs]),
                                  "seeds_summary")
    else:
        config, rest = argv[0], argv[1:]
        if config.startswith("--"):
            raise UserError(f"the config file comes first ({usage})")
        seeds, jobs, overrides = None, 1, []
        for arg in rest:
            if arg.startswith("--seeds="):
                seeds = parse_seeds(arg.removeprefix("--seeds="))
            elif arg.startswith("--jobs="):
                try:
                    jobs = int(arg.removeprefix("--jobs="))
                except ValueError:
                    jobs = 0
                if jobs < 1:
                    raise UserError(f"{arg}: give a positive number of runs at a time, e.g. --jobs=2")
            elif arg.startswith("--seed="):
                raise UserError(f"{arg}: seeds.py sets each run's seed; give them all as --seeds=1,2,3")
            else:
                overrides.append(arg)
        if seeds is None:
            raise UserError(f"--seeds is missing ({usage})")
        out_dirs, root = run_seeds(config, overrides, seeds, jobs)
        prefix = os.path.join(root, "seeds_summary")
    summary = summarize(out_dirs)
    json_path, md_path = write_summary(summary, prefix)
    print(markdown(summary), end="")
    print(f"wrote {md_path} and {json_path}")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
