"""Helpers for the tests that run train.py end to end (test_train.py, test_distributed.py, test_resume.py).

- One tiny configuration (config/quick.py shrunk to seconds) that every such test starts from:
  SFT 6 steps, 2 SPIN iterations of 4 steps, 2 continued-SFT iterations, a checkpoint every 3 steps
  and at each phase end (steps 3 6 9 10 12 14 15 18 21 22), all kept.
- Runs are subprocesses (one CPU thread each, so two runs of the same command are bit-identical),
  torchrun with 2 processes on gloo, or main() in the test's process (`run_in_process`, no start-up
  cost; on one thread it is bit-identical to a subprocess); `shared_run` runs a command once per
  pytest process and hands the same out_dir to every test that compares against it.
- A run directory as it stood at an earlier checkpoint (`copy_up_to`), and pickles that create a file
  when loaded (`plant`), to prove a resume never runs code from it.
- A subprocess run has no time limit, only a stall limit (`run_watched`): on a 2-core machine shared with
  other jobs a run may take many times its idle time, but a run that writes nothing for STALLED_AFTER
  seconds is hung. It is stopped with SIGTERM first: torchrun starts each rank in a session of its own, so
  only torchrun can take them down; killing torchrun outright leaves the ranks running as orphans. Every
  torchrun is started by `torchrun` (a free port of its own, and the stall limit as its shutdown grace).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FAULTS = str(REPO / "tests" / "train_with_faults.py")

TINY = [str(REPO / "config" / "quick.py"), "--n_layer=2", "--n_head=2", "--n_kv_head=1", "--n_embd=32",
        "--synthetic_train=32", "--synthetic_val=8", "--sft_steps=6", "--max_iterations=2", "--prompts_per_iteration=0",
        "--rollout_batch_size=8", "--max_new_tokens=12", "--eval_samples=8", "--log_interval=1",
        "--save_interval=3", "--keep_checkpoints=100", "--lr=1e-3", "--batch_size=8",
        # pinned, so retuning config/quick.py cannot change these tests' numerics (beta 1 makes the 1e-5
        # comparisons across batch splits fail: Adam magnifies summation-order differences)
        "--beta=0.1", "--baseline_lr=0", "--sft_lr=2e-3",
        "--plot=False"]  # one test draws metrics.png (test_plot.py); the others need not pay for matplotlib
# global steps of the tiny run: sft 1-6, spin 0 7-10, spin 1 11-14, baseline 0 15-18, baseline 1 19-22
SPIN_STEPS = {0: (7, 10), 1: (11, 14)}
CHECKPOINT_STEPS = [3, 6, 9, 10, 12, 14, 15, 18, 21, 22]
# a tiny run writes a metrics line or output every few seconds idle (every ~minute at a load of 10): this long
# without either is a hang, which gloo would otherwise sit out for its 30-minute timeout
STALLED_AFTER = 600


def child_env(fault: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "NANOSPIN_FAULT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                        "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if fault:
        env["NANOSPIN_FAULT"] = fault
    return env


def torchrun(nproc: int) -> list[str]:
    """torchrun on this machine: --standalone binds its rendezvous store to a free port itself (no port is picked
    here and released before it is bound). A signal or a failed rank makes torchrun SIGTERM the ranks and, by
    default, SIGKILL them 30 s later: too soon on a busy machine for ranks finishing a step and saving their
    checkpoint, so they get the stall limit instead."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--shutdown-timeout={STALLED_AFTER}"]


def train_command(out_dir, *overrides: str, nproc: int = 1, fault: str | None = None) -> list[str]:
    script = FAULTS if fault else "train.py"
    launcher = torchrun(nproc) if nproc > 1 else [sys.executable]
    return launcher + [script, *TINY, f"--out_dir={out_dir}", *overrides]


def stop(proc: subprocess.Popen, grace: float = 60) -> None:
    """SIGTERM (torchrun passes it to its ranks and waits for them), then SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_watched(command: list[str], env: dict, watched: Path | None = None,
                stalled_after: float = STALLED_AFTER) -> subprocess.CompletedProcess:
    """Run `command` to its end with its output in files, so its progress shows: new output or a grown
    `watched` file. One that makes none for `stalled_after` seconds is stopped and fails the test with its output."""
    with tempfile.TemporaryDirectory() as logs:
        paths = [Path(logs) / "stdout", Path(logs) / "stderr"]
        with open(paths[0], "w") as out, open(paths[1], "w") as err:
            proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err, text=True)
            seen, since = None, time.time()
            while proc.poll() is None:
                sizes = [p.stat().st_size if p.exists() else -1 for p in paths + ([watched] if watched else [])]
                if sizes != seen:
                    seen, since = sizes, time.time()
                elif time.time() - since > stalled_after:
                    stop(proc)
                    hung = subprocess.CompletedProcess(command, proc.returncode, paths[0].read_text(),
                                                       paths[1].read_text())
                    raise AssertionError(f"no progress for {stalled_after:.0f}s: stopped {' '.join(command)}\n"
                                         f"{describe(hung)}")
                time.sleep(0.5)
        return subprocess.CompletedProcess(command, proc.returncode, paths[0].read_text(), paths[1].read_text())


def run_train(out_dir, *overrides: str, nproc: int = 1, fault: str | None = None) -> subprocess.CompletedProcess:
    return run_watched(train_command(out_dir, *overrides, nproc=nproc, fault=fault), child_env(fault),
                       watched=Path(out_dir) / "metrics.jsonl")


def start_train(out_dir, *overrides: str, nproc: int = 1, fault: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(train_command(out_dir, *overrides, nproc=nproc, fault=fault), cwd=REPO,
                            env=child_env(fault), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def describe(proc) -> str:
    """The tail of a finished run's output, for assertion messages."""
    return f"exit code {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"


_shared: dict = {}


def shared_run(tmp_path_factory, name: str, *overrides: str, nproc: int = 1,
               fault: str | None = None) -> tuple[Path, subprocess.CompletedProcess]:
    """Run the tiny config once per pytest process (every test module that asks gets the same run)."""
    key = (name, overrides, nproc, fault)
    if key not in _shared:
        out_dir = tmp_path_factory.getbasetemp() / f"shared-{name}"
        shutil.rmtree(out_dir, ignore_errors=True)
        proc = run_train(out_dir, *overrides, nproc=nproc, fault=fault)
        assert proc.returncode == 0, describe(proc)
        _shared[key] = (out_dir, proc)
    return _shared[key]


def baseline(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The uninterrupted one-process run every resume test is compared with."""
    return shared_run(tmp_path_factory, "baseline")


# ------------------------------------------------------------------------------------------------
# reading a run's outputs


def weights(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(Path(model_dir) / "model.safetensors"))


def final_weights(out_dir) -> dict[str, torch.Tensor]:
    return weights(Path(out_dir) / "final")


def checkpoint_weights(out_dir, step: int) -> dict[str, torch.Tensor]:
    return weights(Path(out_dir) / "checkpoints" / f"step_{step:08d}" / "model")


def assert_same_weights(a: dict, b: dict, atol: float = 0.0, what: str = "") -> None:
    """Equal tensors (atol 0: bit-identical)."""
    assert a.keys() == b.keys()
    for name in a:
        diff = (a[name] - b[name]).abs().max().item()
        if atol == 0.0:
            assert torch.equal(a[name], b[name]), f"{what} {name}: max diff {diff}"
        else:
            assert diff <= atol, f"{what} {name}: max diff {diff} > {atol}"


def metrics(out_dir) -> list[dict]:
    with open(Path(out_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


TIMING = {"tokens_per_sec", "rollout_seconds", "mfu"}  # the only fields two identical runs may log differently


def records(out_dir) -> list[dict]:
    """metrics.jsonl without its timings: two runs of the same steps log the same records, in the same order."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in metrics(out_dir)]


def step_losses(out_dir) -> dict[int, float]:
    """{global step: training loss}; a resumed run logs the replayed steps again, the last one wins."""
    return {r["step"]: r["loss"] for r in metrics(out_dir) if "loss" in r and "event" not in r}


def rollouts(out_dir, iteration: int, name: str = "rollouts.jsonl") -> list[dict]:
    with open(Path(out_dir) / f"iter_{iteration}" / name) as f:
        return [json.loads(line) for line in f]


def checkpoint_steps(out_dir) -> list[int]:
    root = Path(out_dir) / "checkpoints"
    return sorted(int(p.name.removeprefix("step_")) for p in root.glob("step_*"))


def run_in_process(*argv: str) -> int:
    """train.py's main in this process (no start-up cost): its exit code, 2 for a UserError."""
    import train
    from configurator import run_main
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        run_main(train.main, list(argv))
        return 0
    except SystemExit as e:
        return e.code
    finally:  # main() installs its own handlers; pytest's must come back
        for s, handler in handlers.items():
            signal.signal(s, handler)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = STALLED_AFTER) -> None:
    """Poll until predicate() holds; fail if the run ends first (or stop it after `timeout` seconds)."""
    end = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended (exit code {proc.returncode}) before the expected point\n"
                                 f"{out[-2000:]}\n{err[-2000:]}")
        if time.time() > end:
            stop(proc)
            raise AssertionError("timed out waiting for the run to reach the expected point")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------
# run directories to resume, and hostile files in them


def copy_up_to(out_dir, dst, step: int):
    """The run as it stood when checkpoint `step` was its latest (later checkpoints removed)."""
    shutil.copytree(out_dir, dst)
    for path in (dst / "checkpoints").glob("step_*"):
        if int(path.name.removeprefix("step_")) > step:
            shutil.rmtree(path)
    return dst


class Plant:
    """Unpickling this creates `marker`: the proof that a file ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path, marker) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(Plant(marker)))


# where torch.distributed.checkpoint, torch.load and transformers' Trainer would look for pickles
HOSTILE = ("optimizer/.metadata", "optimizer/__0_0.distcp", "model/pytorch_model.bin", "model/training_args.bin",
           "rng_state.pth", "optimizer.pt")
