"""train.py with one fault injected at a chosen point, for the kill/resume/NaN/signal tests.

    NANOSPIN_FAULT=<kind>:<n>[:<m>] python tests/train_with_faults.py <train.py arguments>

It also runs under torchrun; only rank NANOSPIN_FAULT_RANK (default 0) gets the fault. Counts are
per process, from its start, so a point is chosen by arithmetic on the run's config, not by timing:
  kill_after_step:N      SIGKILL itself right after the N-th optimizer step
  kill_in_rollout:T:N    SIGKILL after N batches of iteration T's training rollout (mid-rollout)
  kill_in_save:N         SIGKILL in the middle of the N-th checkpoint write (weights written, no state.json)
  kill_after_save:N      SIGKILL right after the N-th checkpoint is complete
  term_after_step:N      SIGTERM itself after the N-th optimizer step (a graceful stop)
  int_after_step:N       SIGINT itself after the N-th optimizer step (Ctrl-C, also a graceful stop)
  hold_after_step:N      right after the N-th optimizer step, create <out_dir>.held and wait there until a
                         SIGTERM or SIGINT has come (then handled by the run as ever): a signal sent once that
                         file exists lands in step N however busy the machine is (a fixed sleep per step once
                         let the run finish before the signal came)
  nan_loss_after_step:N  every SPIN loss after the N-th optimizer step is NaN
and two checks, installed on every rank:
  no_full_gather_in_rollout  a full-state-dict gather during a rollout raises; at exit each rank prints
                             how many rollouts it ran without one
  no_unpickling              every way to unpickle (pickle.load/loads/Unpickler, torch.load) raises; at exit
                             each rank prints how many times something tried
  late_out_dir_reader        rank 1, just out of init_process_group, waits until rank 0 blocks in a barrier or
                             creates out_dir/config.json, which rank 0 then leaves empty for a second: the
                             schedule of a rank descheduled on a busy machine, at its worst moment. A rank that
                             reads out_dir before every rank has (no barrier first) reads the empty file.
"""

import atexit
import builtins
import os
import pickle
import signal
import sys
import time
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
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


def relay_stop_signals() -> dict:
    """Note each SIGTERM/SIGINT in the returned record, then pass it to the handler the run installed."""
    arrived = {"signals": []}
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def relay(signum, frame):
        arrived["signals"].append(signum)
        if callable(handlers[signum]):
            handlers[signum](signum, frame)

    for s in handlers:
        signal.signal(s, relay)
    return arrived


def install(kind: str, args: list[int], held: str) -> None:
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
        if kind == "int_after_step" and steps["done"] == n:
            die(signal.SIGINT)
        if kind == "hold_after_step" and steps["done"] == n:
            arrived = relay_stop_signals()  # before the file tells the test to send one
            open(held, "w").close()
            end = time.time() + 600
            while not arrived["signals"] and time.time() < end:
                time.sleep(0.05)

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


@contextmanager
def no_unpickling():
    """Inside, every way to unpickle raises (and is counted in the yielded dict): a run directory must never
    run code, and unpickling is how a file runs code."""
    tried = {"n": 0}
    patched = [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]
    originals = [getattr(owner, name) for owner, name in patched]

    def forbidden(name):
        def call(*a, **kw):
            tried["n"] += 1
            raise AssertionError(f"{name} was called: something tried to unpickle")
        return call

    class Unpickler(pickle.Unpickler):  # a class still, for modules that subclass it on import (torch._dynamo)
        load = forbidden("pickle.Unpickler.load")

    for owner, name in patched:
        setattr(owner, name, Unpickler if name == "Unpickler" else forbidden(f"{owner.__name__}.{name}"))
    try:
        yield tried
    finally:
        for (owner, name), original in zip(patched, originals):
            setattr(owner, name, original)


def check_no_unpickling() -> None:
    guard = no_unpickling()
    tried = guard.__enter__()  # for the whole run: this process exits after it
    rank = os.environ.get("RANK", "0")
    atexit.register(lambda: print(f"rank {rank}: {tried['n']} attempts to unpickle", flush=True))
def late_out_dir_reader(out_dir: str) -> None:
    """Rank 1 reaches out_dir once rank 0 waits for it or writes there (markers beside out_dir tell); the
    markers hook the torch.distributed API and the file, not train.py's functions, so any layout is checked."""
    config, waits, writes = os.path.join(out_dir, "config.json"), out_dir + ".rank0-waits", out_dir + ".rank0-writes"
    rank = os.environ.get("RANK", "0")
    if rank == "0":
        real_barrier, real_open = dist.barrier, builtins.open

        def barrier(*a, **kw):
            real_open(waits, "w").close()
            return real_barrier(*a, **kw)

        def open_(file, mode="r", *a, **kw):
            f = real_open(file, mode, *a, **kw)
            if isinstance(file, (str, os.PathLike)) and os.fspath(file) == config and "w" in mode:
                real_open(writes, "w").close()
                time.sleep(1.0)  # created, not yet written
            return f

        dist.barrier, builtins.open = barrier, open_
    elif rank == "1":
        real_init = dist.init_process_group

        def init_process_group(*a, **kw):
            real_init(*a, **kw)
            end = time.time() + 600
            while not (os.path.exists(waits) or os.path.exists(writes)):
                if time.time() > end:
                    raise AssertionError("rank 0 neither waited in a barrier nor wrote config.json in 600 s")
                time.sleep(0.01)

        dist.init_process_group = init_process_group


def out_dir_of(argv: list[str]) -> str:
    return next(a.split("=", 1)[1] for a in argv if a.startswith("--out_dir="))


if __name__ == "__main__":
    fault = os.environ.get("NANOSPIN_FAULT", "")
    if fault == "no_full_gather_in_rollout":
        check_no_full_gather_in_rollout()
    elif fault == "no_unpickling":
        check_no_unpickling()
    elif fault == "late_out_dir_reader":
        late_out_dir_reader(out_dir_of(sys.argv[1:]))
    elif fault and os.environ.get("RANK", "0") == os.environ.get("NANOSPIN_FAULT_RANK", "0"):
        kind, *numbers = fault.split(":")
        install(kind, [int(x) for x in numbers], out_dir_of(sys.argv[1:]) + ".held")
    run_main(train.main, sys.argv[1:])  # under torchrun it leaves without interpreter teardown (its docstring)
