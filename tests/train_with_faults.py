"""train.py with one fault injected at a chosen point, for the kill/resume/NaN/signal tests.

    NANOSPIN_FAULT=<kind>:<n>[:<m>] python tests/train_with_faults.py <train.py arguments>

It also runs under torchrun; only rank NANOSPIN_FAULT_RANK (default 0) gets the fault. Counts are
per process, from its start, so a point is chosen by arithmetic on the run's config, not by timing:
  kill_after_step:N      SIGKILL itself right after the N-th optimizer step
  kill_in_rollout:T:N    SIGKILL after N batches of iteration T's training rollout (mid-rollout)
  kill_in_save:N         SIGKILL in the middle of the N-th checkpoint write (weights written, no state.json)
  kill_after_save:N      SIGKILL right after the N-th checkpoint is complete
  term_after_step:N      SIGTERM itself after the N-th optimizer step (a graceful stop)
  slow_after_step:N      sleep 0.3 s after every optimizer step from the N-th on (room for an outside signal)
  nan_loss_after_step:N  every SPIN loss after the N-th optimizer step is NaN
and one check, installed on every rank:
  no_full_gather_in_rollout  a full-state-dict gather during a rollout raises; at exit each rank prints
                             how many rollouts it ran without one
"""

import atexit
import os
import signal
import sys
import time
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed._state_dict_utils as state_dict_utils  # noqa: E402
import torch.distributed.checkpoint.state_dict as dcp_state_dict  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

import checkpoint  # noqa: E402
import spin  # noqa: E402
import train  # noqa: E402
from configurator import run_main  # noqa: E402


def die(sig: int = signal.SIGKILL) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), sig)
    if sig == signal.SIGKILL:
        time.sleep(60)  # never reached: the kill is immediate


def install(kind: str, args: list[int]) -> None:
    steps = {"done": 0}

    def after_step(optimizer, a, kw):
        if all(float(group["lr"]) == 0.0 for group in optimizer.param_groups):
            return  # torch.distributed.checkpoint's zero-lr step that creates an empty optimizer's state
        steps["done"] += 1
        n = args[0]
        if kind == "kill_after_step" and steps["done"] == n:
            die()
        if kind == "term_after_step" and steps["done"] == n:
            die(signal.SIGTERM)
        if kind == "slow_after_step" and steps["done"] >= n:
            time.sleep(0.3)

    register_optimizer_step_post_hook(after_step)

    if kind == "nan_loss_after_step":
        real_terms = spin.spin_terms

        def nan_terms(*a, **kw):
            losses, metrics = real_terms(*a, **kw)
            if steps["done"] >= args[0]:
                losses = losses * float("nan")
                metrics = {**metrics, "loss": metrics["loss"] * float("nan")}
            return losses, metrics

        spin.spin_terms = nan_terms

    if kind == "kill_in_rollout":
        real_rollout = spin.rollout  # the name spin.build_iteration calls
        target_iteration, n_batches = args

        def rollout(model, examples, settings, iteration, progress=None, should_stop=None, scorer=None):
            if iteration != target_iteration or progress is None:  # only the training rollout reports progress
                return real_rollout(model, examples, settings, iteration, progress, should_stop, scorer)
            seen = {"batches": 0}

            def counting(n):
                progress(n)
                seen["batches"] += 1
                if seen["batches"] == n_batches:
                    die()

            return real_rollout(model, examples, settings, iteration, counting, should_stop, scorer)

        spin.rollout = rollout

    if kind == "kill_in_save":
        real_save_model_dir = checkpoint.save_model_dir
        saves = {"n": 0}

        def save_model_dir(path, *a, **kw):
            real_save_model_dir(path, *a, **kw)
            if f"{os.sep}tmp-step_" in path:
                saves["n"] += 1
                if saves["n"] == args[0]:
                    die()

        checkpoint.save_model_dir = save_model_dir

    if kind == "kill_after_save":
        real_save_checkpoint = checkpoint.save_checkpoint
        saves = {"n": 0}

        def save_checkpoint(*a, **kw):
            path = real_save_checkpoint(*a, **kw)
            saves["n"] += 1
            if saves["n"] == args[0]:
                die()
            return path

        checkpoint.save_checkpoint = save_checkpoint


@contextmanager
def no_full_gather(what: str):
    """Inside, every way to a full (unsharded) state dict raises: torch.distributed.checkpoint's
    get_model_state_dict (also as checkpoint.py imported it), its gather of sharded tensors, DTensor.full_tensor
    and checkpoint.full_model_state."""
    patched = [(dcp_state_dict, "get_model_state_dict"), (checkpoint, "get_model_state_dict"),
               (dcp_state_dict, "_gather_state_dict"), (state_dict_utils, "_gather_state_dict"),
               (DTensor, "full_tensor"), (checkpoint, "full_model_state")]
    originals = [getattr(owner, name) for owner, name in patched]

    def forbidden(name):
        def call(*a, **kw):
            raise AssertionError(f"{name} was called during {what}: a full-state-dict gather")
        return call

    for owner, name in patched:
        setattr(owner, name, forbidden(name))
    try:
        yield
    finally:
        for (owner, name), original in zip(patched, originals):
            setattr(owner, name, original)


def check_no_full_gather_in_rollout() -> None:
    real_rollout_iteration = train.rollout_iteration
    rollouts = {"n": 0}

    def rollout_iteration(*a, **kw):
        with no_full_gather("a rollout"):
            made = real_rollout_iteration(*a, **kw)
        rollouts["n"] += 1
        return made

    train.rollout_iteration = rollout_iteration
    rank = os.environ.get("RANK", "0")
    atexit.register(lambda: print(f"rank {rank}: {rollouts['n']} rollouts without a full-state-dict gather",
                                  flush=True))


if __name__ == "__main__":
    fault = os.environ.get("NANOSPIN_FAULT", "")
    if fault == "no_full_gather_in_rollout":
        check_no_full_gather_in_rollout()
    elif fault and os.environ.get("RANK", "0") == os.environ.get("NANOSPIN_FAULT_RANK", "0"):
        kind, *numbers = fault.split(":")
        install(kind, [int(x) for x in numbers])
    run_main(train.main, sys.argv[1:])
