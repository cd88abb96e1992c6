"""The metrics log: a run's out_dir/metrics.jsonl, and the Student t intervals of the tables made from it.

Design choices:
- One JSON object per line, flushed as it is written, so a killed run leaves every finished line; a line
  cut short by a kill is skipped when read. Only rank 0 writes.
- A resumed run replays the steps after its checkpoint: checkpoint.open_metrics cuts the log to what it
  held when that checkpoint was saved, so each step is logged once.
- train.py writes it; seeds.py and plot.py read it; train.py's verdict and seeds.py's table share the
  interval math. This module imports nothing of nanospin's but the UserError, so none of them imports
  another for it.
- The 95% interval is mean ± t(0.975, n−1)·sd/√n, with the Student t quantile computed here from the exact
  finite-sum CDF for integer degrees of freedom, so nothing beyond the standard library is needed.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import TextIO

from configurator import UserError

METRICS_FILE = "metrics.jsonl"


# ------------------------------------------------------------------------------------------------
# the file


def write_metrics(metrics_file: TextIO | None, record: dict) -> None:
    """One JSON line in metrics.jsonl, flushed (rank 0; a no-op elsewhere)."""
    if metrics_file is not None:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()


def read_metrics(out_dir: str) -> list[dict]:
    """One run's metrics.jsonl records (a line cut short by a kill is skipped)."""
    path = os.path.join(out_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise UserError(f"'{path}' not found: '{out_dir}' is not a train.py out_dir (pass the directories that hold "
                        f"a metrics.jsonl, e.g. seed_N)")
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
    return records


# ------------------------------------------------------------------------------------------------
# Student t intervals


def t_cdf_two_sided(t: float, dof: int) -> float:
    """P(|T| < t) for Student's t with an integer number of degrees of freedom: the closed
    finite sums in θ = atan(t/√dof) (Abramowitz & Stegun 26.7.3-4)."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    theta = math.atan(abs(t) / math.sqrt(dof))
    c2 = math.cos(theta) ** 2
    if dof % 2 == 1:
        series, term = 0.0, math.cos(theta)
        for k in range(1, (dof - 1) // 2 + 1):  # terms cos^(2k-1)θ · (2·4···(2k−2)) / (1·3···(2k−1))
            series += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + math.sin(theta) * series)
    series, term = 0.0, 1.0
    for k in range(1, dof // 2 + 1):  # terms cos^(2k-2)θ · (1·3···(2k−3)) / (2·4···(2k−2))
        series += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return math.sin(theta) * series


def t_quantile(p: float, dof: int) -> float:
    """The p-quantile (p > 0.5) of Student's t: the t with P(T < t) = p, by bisection on the CDF."""
    if not 0.5 < p < 1:
        raise ValueError(f"p must be in (0.5, 1), got {p}")
    coverage = 2 * p - 1  # P(|T| < t)
    lo, hi = 0.0, 1.0
    while t_cdf_two_sided(hi, dof) < coverage:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf_two_sided(mid, dof) < coverage else (lo, mid)
        if hi - lo < 1e-12 * hi:
            break
    return (lo + hi) / 2


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float | None, float | None]:
    """(mean, lower, upper) of a Student t interval for the mean; no interval for one value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None
    half = t_quantile(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def paired_interval(a: list[float], b: list[float]) -> tuple[float, float | None]:
    """The mean of the paired differences a_i − b_i and the half-width of its 95% Student t interval
    (None for a single pair)."""
    mean, lower, _ = mean_ci([x - y for x, y in zip(a, b, strict=True)])
    return mean, None if lower is None else mean - lower
