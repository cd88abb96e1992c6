"""Distributed training and reliability: 2 processes (torchrun, gloo, FSDP2) == 1 process, resume
across world sizes, SIGKILL at several points then the same command == an uninterrupted run (also
with fresh rollouts per epoch, k=2 mixing and one optimizer across iterations), the NaN guard,
SIGTERM under torchrun, and corrupt checkpoints as one-line errors.

Every run is the tiny config of train_runs.py; the one-process uninterrupted run is shared with
test_train.py. Faults are injected at exact points by tests/train_with_faults.py, which also runs the
2-rank run's rollouts with every full-state-dict gather made to raise."""

import json
import math
import os
import shutil
import signal

import pytest
import torch

from train_runs import (CHECKPOINT_STEPS, HOSTILE, REPO, SPIN_STEPS, STALLED_AFTER, TINY, assert_same_weights,
                        baseline, checkpoint_steps, checkpoint_weights, child_env, copy_up_to, describe, final_weights,
                        metrics, plant, records, rollouts, run_in_process, run_train, run_watched, shared_run,
                        start_train, step_losses, stop, torchrun, wait_for)

# the scripts below import nanospin and tests/train_with_faults.py
SCRIPT_PATH = os.pathsep.join([str(REPO), str(REPO / "tests")])
# 2 ranks x micro-batch 2 x grad_accum 2 = the baseline's global batch of 8 (and FSDP's no-sync micro-batch)
TWO_RANKS = ("--batch_size=2", "--grad_accum=2")



@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return baseline(tmp_path_factory)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    # every rank's rollouts run with every way to a full-state-dict gather made to raise (train_with_faults.py)
    return shared_run(tmp_path_factory, "two-ranks", *TWO_RANKS, nproc=2, fault="no_full_gather_in_rollout")


def assert_exactly_like(out, reference) -> None:
    """The bit-exact end state of an uninterrupted run on the CPU."""
    assert_same_weights(final_weights(out), final_weights(reference), what="final")
    assert_same_weights(checkpoint_weights(out, 22), checkpoint_weights(reference, 22), what="checkpoint 22")
    assert step_losses(out) == step_losses(reference)
    assert records(out) == records(reference)  # metrics.jsonl: one run's records, in order, after every fault
    for t in (0, 1):
        assert rollouts(out, t) == rollouts(reference, t)
    assert not list((out / "checkpoints").glob("tmp-*"))


def assert_close_to(out, reference) -> None:
    """Another world size sums in another order: the exported SPIN model within 1e-5; the last
    checkpoint, 8 continued-SFT steps at a 2x larger learning rate later, within 1e-4."""
    assert_same_weights(final_weights(out), final_weights(reference), atol=1e-5, what="final")
    assert_same_weights(checkpoint_weights(out, 22), checkpoint_weights(reference, 22), atol=1e-4,
                        what="checkpoint 22")


# ----------------------------------------------------------------------------------------------
# 2 ranks == 1 rank


def test_two_ranks_equal_one_rank(run, two_ranks):
    out_dir, _ = run
    out2, proc = two_ranks
    one, two = step_losses(out_dir), step_losses(out2)
    assert sorted(two) == list(range(1, 23))
    assert [two[s] for s in sorted(two)] == pytest.approx([one[s] for s in sorted(two)], abs=1e-5)
    for key in ("rewards/margins", "logps/real", "logps/generated"):  # all-reduced over ranks, not rank 0's half
        a = {r["step"]: r[key] for r in metrics(out_dir) if key in r}
        b = {r["step"]: r[key] for r in metrics(out2) if key in r}
        assert a.keys() == b.keys() and [b[s] for s in a] == pytest.approx([a[s] for s in a], abs=1e-4)
    assert_close_to(out2, out_dir)
    for t in (0, 1):
        r1, r2 = rollouts(out_dir, t), rollouts(out2, t)
        assert [p["generated_ids"] for p in r2] == [p["generated_ids"] for p in r1]
        one_rank, two_ranks = ([p["opponent_generated_logp"] for p in r] for r in (r1, r2))
        assert two_ranks == pytest.approx(one_rank, abs=1e-4)
    # rank 0 alone prints and writes
    assert proc.stdout.count("| after | step |") == 1
    assert proc.stdout.count("saved checkpoint") == len(CHECKPOINT_STEPS)
    assert "world size 2" in proc.stdout
    assert len(metrics(out2)) == len(metrics(out_dir))
    # the rollouts sampled and scored with the sharded model, gathering no full state dict on any rank
    for rank in (0, 1):
        assert f"rank {rank}: 2 rollouts without a full-state-dict gather" in proc.stdout, describe(proc)
    # and the opponent's log-probs took the policy's path: each iteration starts at log 2
    records = {r["step"]: r for r in metrics(out2) if r.get("phase") == "spin" and "loss" in r}
    for first, _ in SPIN_STEPS.values():
        assert abs(records[first]["loss"] - math.log(2)) <= 1e-6
        assert abs(records[first]["rewards/real"]) <= 1e-6 and abs(records[first]["rewards/generated"]) <= 1e-6


def test_every_rank_reads_out_dir_before_rank_0_writes_to_it(tmp_path):
    """Rank 1 late out of init_process_group (train_with_faults.py: late_out_dir_reader) must not find the
    config.json rank 0 is writing: a half-written one, or one that makes resume=False refuse on rank 1 alone."""
    out = tmp_path / "late"
    proc = run_train(out, *TWO_RANKS, "--stage=sft", "--baseline_sft=False", "--sft_steps=1", nproc=2,
                     fault="late_out_dir_reader")
    assert proc.returncode == 0, describe(proc)
    assert json.loads((out / "config.json").read_text())["global_batch"] == 8  # written whole


SAMPLER_UNDER_FSDP = """
from contextlib import nullcontext
import torch, torch.distributed as dist
from configurator import leave_without_teardown  # no interpreter teardown racing gloo's threads
from torch.distributed.tensor import DTensor
import fsdp
from model import GPT, GPTConfig
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=16))
reference = GPT(model.config)
reference.load_state_dict(model.state_dict())
fsdp.apply_fsdp(model, torch.float32, activation_checkpointing=True, compile=False)
rt = fsdp.Runtime(rank, rank, 2, torch.device("cpu"), torch.float32, True, nullcontext())
idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(rank))
with fsdp.model_for_sampling(model, rt) as sampler, torch.no_grad():
    assert not any(isinstance(p, DTensor) for p in sampler.parameters())
    assert sampler.lm_head.weight is sampler.wte.weight
    assert torch.equal(sampler(idx), reference(idx))
    for _ in range(rank + 1):  # the model scores as often as its rank has batches: no collective may run
        logps = model.token_logprobs(idx, idx)
    assert torch.equal(logps, reference.token_logprobs(idx, idx))
assert all(isinstance(p, DTensor) for p in model.parameters())
model.token_logprobs(idx, idx).sum().backward()
print(f"rank {rank} ok", flush=True)
leave_without_teardown(0)
"""


def test_under_fsdp_the_sampler_is_the_unsharded_model_and_the_model_scores_without_collectives(tmp_path):
    """model_for_sampling under FSDP2 (activation checkpointing on): a plain GPT over the unsharded weights equal
    to the unsharded model; inside, the FSDP model runs any number of forwards per rank; after, it is sharded
    again and trains."""
    script = tmp_path / "sampler_under_fsdp.py"
    script.write_text(SAMPLER_UNDER_FSDP)
    env = {**child_env(), "PYTHONPATH": SCRIPT_PATH}
    proc = run_watched(torchrun(2) + [str(script)], env)
    assert proc.returncode == 0 and "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout, describe(proc)


def test_the_rollout_guard_catches_a_full_state_dict_gather():
    """The guard the 2-rank run's rollouts ran under raises on the gather the rollout once made on every rank."""
    import torch.distributed.checkpoint.state_dict as dcp_state_dict
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    import checkpoint
    from model import GPT, GPTConfig
    from train_with_faults import no_full_gather
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=16))
    full = StateDictOptions(full_state_dict=True)
    with no_full_gather("this test"):
        with pytest.raises(AssertionError, match="full_model_state was called during this test"):
            checkpoint.full_model_state(model)
        with pytest.raises(AssertionError, match="get_model_state_dict was called during this test"):
            dcp_state_dict.get_model_state_dict(model, options=full)
        with pytest.raises(AssertionError, match="_gather_state_dict was called during this test"):
            get_model_state_dict(model, options=full)  # a reference taken before the guard
    assert checkpoint.full_model_state(model).keys() == model.state_dict().keys()  # restored on exit


OPTIMIZER_SHARDS = """
import errno, os, sys
import torch, torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
import checkpoint, fsdp
from configurator import UserError
from model import GPT, GPTConfig
from configurator import leave_without_teardown  # no interpreter teardown racing gloo's threads
out = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()

def build(seed):
    torch.manual_seed(seed)  # 65 embedding rows: rank 0 holds 33 of them, rank 1 32
    model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=20))
    fsdp.apply_fsdp(model, torch.float32, False, False)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

def full_state(model, optimizer):
    osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {f"{p}/{n}": v for p, entries in osd.get("state", {}).items() for n, v in entries.items()}  # rank 0's

model, optimizer = build(0)
for _ in range(2):
    idx = torch.randint(0, 65, (2, 12), generator=torch.Generator().manual_seed(rank + 10 * _))
    model.token_logprobs(idx, idx).sum().backward()
    optimizer.step()
path = checkpoint.save_checkpoint(out, 2, model, optimizer, {}, model.config, None, None, None, rank)
saved = full_state(model, optimizer)
if rank == 0:
    save_file(saved, os.path.join(out, "expected.safetensors"))
resumed, resumed_optimizer = build(1)
checkpoint.load_checkpoint(path, resumed, resumed_optimizer, resumed.config)
again = full_state(resumed, resumed_optimizer)
if rank == 0:
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)
    print("2 ranks -> 2 ranks: equal", flush=True)

real = checkpoint.save_tensors
def full_disk(tensors, file, metadata=None):  # rank 1's shard finds the disk full
    if rank == 1:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), file)
    real(tensors, file, metadata)
checkpoint.save_tensors = full_disk
try:
    checkpoint.save_checkpoint(out, 3, model, optimizer, {}, model.config, None, None, None, rank)
except UserError as e:
    print(f"rank {rank}: {e}", flush=True)
dist.barrier()
print(f"rank {rank}: {sorted(os.listdir(os.path.join(out, 'checkpoints')))}", flush=True)
leave_without_teardown(0)
"""


def test_optimizer_shards_load_at_any_world_size_and_a_disk_error_on_one_rank_is_an_error_on_all(tmp_path):
    """FSDP2 shards of uneven size (65 rows over 2 ranks) saved as one safetensors file per rank: read back on 2
    ranks and in one process, they are the full optimizer state exactly. A full disk on rank 1 alone: both ranks
    raise the same one-line error (no rank left waiting), and checkpoint 2 stays the only one."""
    script = tmp_path / "optimizer_shards.py"
    script.write_text(OPTIMIZER_SHARDS)
    out = tmp_path / "out"
    # a stall limit, not a time limit (a busy machine can outlast any fixed one); on a hang its ranks are taken down
    proc = run_watched(torchrun(2) + [str(script), str(out)], {**child_env(), "PYTHONPATH": SCRIPT_PATH})
    assert proc.returncode == 0 and "2 ranks -> 2 ranks: equal" in proc.stdout, describe(proc)
    for rank in (0, 1):
        assert (f"rank {rank}: cannot save checkpoint '{out}/checkpoints/step_00000003': "
                f"'{out}/checkpoints/tmp-step_00000003/optimizer/rank_00001.safetensors': No space left on device"
                in proc.stdout), describe(proc)
        assert f"rank {rank}: ['step_00000002']" in proc.stdout, describe(proc)
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    import checkpoint
    from model import GPT, GPTConfig
    one = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=20))
    one_optimizer = torch.optim.AdamW(one.parameters(), lr=1e-2)
    checkpoint.load_checkpoint(str(out / "checkpoints" / "step_00000002"), one, one_optimizer, one.config)
    osd = get_optimizer_state_dict(one, one_optimizer)
    loaded = {f"{p}/{n}": v for p, entries in osd["state"].items() for n, v in entries.items()}
    expected = load_file(str(out / "expected.safetensors"))
    assert loaded.keys() == expected.keys()
    for key in expected:
        assert torch.equal(loaded[key], expected[key]), key


def test_no_code_runs_from_a_run_directory_on_two_ranks(two_ranks, tmp_path):
    """Pickles planted where torch.distributed.checkpoint and others keep them, in the 2-rank checkpoint a 2-rank
    run resumes from: with every way to unpickle made to raise on both ranks, the resume ends where the
    uninterrupted run did and no pickle runs."""
    out2, _ = two_ranks
    out = copy_up_to(out2, tmp_path / "planted", 21)
    marker = tmp_path / "ran"
    for name in HOSTILE:
        plant(out / "checkpoints" / "step_00000021" / name, marker)
    proc = run_train(out, *TWO_RANKS, nproc=2, fault="no_unpickling")
    assert proc.returncode == 0 and "step_00000021" in proc.stdout, describe(proc)
    for rank in (0, 1):
        assert f"rank {rank}: 0 attempts to unpickle" in proc.stdout, describe(proc)
    assert not marker.exists()
    assert_same_weights(checkpoint_weights(out, 22), checkpoint_weights(out2, 22))


def test_resume_across_world_sizes_after_a_kill_in_a_checkpoint_write_and_sigterms(run, tmp_path):
    """One out_dir through four runs, alternating world sizes at the same global batch of 8:
    1. 2 ranks; rank 0 is SIGKILLed while writing checkpoint 10 (weights written, no state.json):
       torchrun takes rank 1 down too; the mid-iteration checkpoint 9 stays the latest;
    2. 1 process (a config change: batch_size) resumes the 2-rank checkpoint, rewrites 10 over the
       leftover, and stops on SIGTERM with checkpoint 12;
    3. 2 ranks resume the 1-process checkpoint (FSDP re-shards it); SIGTERM to torchrun, which
       forwards it: the workers finish the step (16), save a checkpoint together and exit;
    4. 1 process finishes: where the uninterrupted one-process run ends."""
    out_dir, _ = run
    out = tmp_path / "two-one-two-one"
    killed = run_train(out, *TWO_RANKS, nproc=2, fault="kill_in_save:4")
    assert killed.returncode != 0, describe(killed)
    assert checkpoint_steps(out) == [3, 6, 9]
    assert (out / "checkpoints" / "tmp-step_00000010" / "model" / "model.safetensors").exists()

    one = run_train(out, "--allow_config_change=True", fault="term_after_step:3")
    assert one.returncode == 128 + signal.SIGTERM, describe(one)
    assert "step_00000009" in one.stdout and "reusing the iteration's 32 rollouts" in one.stdout
    assert "stopped by SIGTERM at spin 1, step 2; checkpoint saved" in one.stdout, describe(one)
    assert checkpoint_steps(out)[-3:] == [9, 10, 12] and not list((out / "checkpoints").glob("tmp-*"))

    # rank 0 waits after global step 16 (its 4th) until the signal comes
    proc = start_train(out, *TWO_RANKS, nproc=2, fault="hold_after_step:4")
    held = out.parent / f"{out.name}.held"
    wait_for(held.exists, proc)
    proc.send_signal(signal.SIGTERM)
    try:
        stdout, stderr = proc.communicate(timeout=STALLED_AFTER)
    finally:
        stop(proc)
    assert "stopped by SIGTERM" in stdout and "Traceback" not in stdout, f"{stdout[-2000:]}\n{stderr[-3000:]}"
    assert proc.returncode != 0  # a stopped run is not a finished one
    assert "world size 2" in stdout and "step_00000012" in stdout
    assert checkpoint_steps(out)[-1] == 16, checkpoint_steps(out)  # the step under way when the signal arrived
    assert "step_00000016" in stdout

    assert run_in_process(*TINY, f"--out_dir={out}", "--allow_config_change=True") == 0
    assert_close_to(out, out_dir)
    assert [p["generated_ids"] for p in rollouts(out, 1)] == [p["generated_ids"] for p in rollouts(out_dir, 1)]
    assert not list((out / "checkpoints").glob("tmp-*"))


# ----------------------------------------------------------------------------------------------
# one process: faults at four points, each run resuming the last, bit-exact at the end


def last_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in proc.stderr, describe(proc)
    return lines[-1]


def test_kill_mid_rollout_at_boundary_in_checkpoint_write_nan_and_sigterm_then_bit_exact(run, tmp_path):
    """The same command again after each fault resumes from the last complete checkpoint:
    A. SIGKILL mid-rollout (2 of SPIN 0's 4 rollout batches)          -> resume from 6 regenerates it
    B. SIGKILL right after checkpoint 10 (end of SPIN 0) is complete  -> resume at the boundary rolls
       out SPIN 1 with the NEW opponent (the model at step 10)
    C. NaN loss from global step 13 on                                -> exit 2, names the step, keeps 12
    C2. SIGKILL while writing checkpoint 14 (weights written, no state.json) -> 12 stays the latest
    D. SIGTERM after global step 16                                   -> checkpoint 16, exit 143
    E. (this process) resumes mid continued-SFT and finishes: identical to the uninterrupted run."""
    import checkpoint as ckpt
    out_dir, _ = run
    out = tmp_path / "faults"

    a = run_train(out, fault="kill_in_rollout:0:2")
    assert a.returncode == -9, describe(a)
    assert checkpoint_steps(out) == [3, 6] and not (out / "iter_0").exists()

    b = run_train(out, fault="kill_after_save:2")
    assert b.returncode == -9, describe(b)
    assert "step_00000006" in b.stdout and checkpoint_steps(out)[-1] == 10
    assert rollouts(out, 0) == rollouts(out_dir, 0)
    assert not (out / "iter_1").exists()

    c = run_train(out, fault="nan_loss_after_step:2")
    assert c.returncode == 2, describe(c)
    error = last_error_line(c)
    assert "spin 1, step 3 of 4 (global step 13)" in error and "NaN" in error and "step_00000012" in error, error
    assert rollouts(out, 1) == rollouts(out_dir, 1)  # the boundary resume's opponent: the model at step 10
    assert checkpoint_steps(out)[-1] == 12 and not list((out / "checkpoints").glob("tmp-*"))
    last_good = out / "checkpoints" / "step_00000012"
    assert json.loads((last_good / "state.json").read_text())["step"] == 2
    assert all(torch.isfinite(p).all() for p in ckpt.load_pretrained(str(last_good / "model")).parameters())
    assert 13 not in step_losses(out)

    c2 = run_train(out, fault="kill_in_save:1")
    assert c2.returncode == -9, describe(c2)
    assert checkpoint_steps(out)[-1] == 12
    assert (out / "checkpoints" / "tmp-step_00000014" / "model" / "model.safetensors").exists()

    d = run_train(out, fault="term_after_step:4")
    assert d.returncode == 143, describe(d)  # 128 + SIGTERM: a stopped run is not a finished one
    assert "step_00000012" in d.stdout and "reusing the iteration's 32 rollouts" in d.stdout
    assert "stopped by SIGTERM at baseline 0, step 2; checkpoint saved" in d.stdout, describe(d)
    assert checkpoint_steps(out)[-1] == 16

    assert run_in_process(*TINY, f"--out_dir={out}") == 0
    assert_exactly_like(out, out_dir)


# every option that changes what an iteration trains on, or what it keeps across iterations: 16 prompts per
# iteration, 2 epochs of fresh rollouts, k=2 mixing (16, 32, 48 pairs an epoch), one optimizer and schedule
OPTIONS = ("--max_iterations=3", "--prompts_per_iteration=16", "--max_epochs=2", "--regenerate_per_epoch=True",
           "--mix_previous_rollouts=2", "--optimizer_per_iteration=False", "--nll_weight=0.5", "--baseline_sft=False")
# global steps: sft 1-6, spin 0 7-10, spin 1 11-18, spin 2 19-30 (epoch 0 19-24, epoch 1 25-30)


def test_kill_at_a_boundary_and_mid_epoch_with_every_option_then_bit_exact(tmp_path):
    """With regenerate_per_epoch, k=2 mixing, one optimizer across iterations and the nll anchor:
    A. SIGKILL right after checkpoint 18 (end of SPIN 1)  -> the resume rolls out SPIN 2 with the
       model at step 18, mixing in SPIN 1's and SPIN 0's first rollouts, and keeps the optimizer;
    B. SIGKILL after step 28 (checkpoint 27: SPIN 2's second epoch, on its second rollout)
    C. (this process) resumes from 27 with the saved pairs: identical to the uninterrupted run."""
    reference = tmp_path / "uninterrupted"
    proc = run_train(reference, *OPTIONS)
    assert proc.returncode == 0, describe(proc)
    out = tmp_path / "killed"
    a = run_train(out, *OPTIONS, fault="kill_after_save:7")
    assert a.returncode == -9, describe(a)
    assert checkpoint_steps(out)[-1] == 18 and not (out / "iter_2").exists()
    b = run_train(out, *OPTIONS, fault="kill_after_step:10")
    assert b.returncode == -9, describe(b)
    assert "step_00000018" in b.stdout and checkpoint_steps(out)[-1] == 27
    assert run_in_process(*TINY, f"--out_dir={out}", *OPTIONS) == 0
    assert [len(rollouts(reference, t)) for t in range(3)] == [32, 48, 64]  # 2 rollouts of 16, then 16, 32 mixed
    for t in range(3):
        assert rollouts(out, t) == rollouts(reference, t)
    assert_same_weights(final_weights(out), final_weights(reference), what="final")
    assert_same_weights(checkpoint_weights(out, 27), checkpoint_weights(reference, 27), what="checkpoint 27")
    assert step_losses(out) == step_losses(reference)
    ends = [[r for r in metrics(d) if r.get("event") == "phase_end"] for d in (out, reference)]
    assert ends[0] == ends[1] and all("eval/kl_opponent" in r for r in ends[0] if r["phase"] == "spin")


def test_nan_from_a_huge_learning_rate_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "lr"
    assert run_in_process(*TINY, f"--out_dir={out}", "--stage=sft", "--baseline_sft=False", "--sft_lr=1e30",
                          "--save_interval=0") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: sft, step ") and "NaN/Inf" in err[-1], err[-1]
    assert "last good checkpoint is none" in err[-1]


# ----------------------------------------------------------------------------------------------
# missing and corrupt checkpoints


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def remove(path):
    shutil.rmtree(path) if path.is_dir() else path.unlink()


CORRUPTIONS = {  # name: (damage to checkpoint 9, the file the error must name, extra overrides)
    "truncated weights": (lambda c: truncate(c / "model" / "model.safetensors"), "model/model.safetensors", ()),
    "garbage state.json": (lambda c: (c / "state.json").write_text("{not json"), "state.json", ()),
    "missing weights": (lambda c: remove(c / "model"), "step_00000009/model/config.json' is missing", ()),
    "missing optimizer": (lambda c: remove(c / "optimizer"), "step_00000009", ()),
    "truncated optimizer": (lambda c: [truncate(p) for p in (c / "optimizer").glob("*.safetensors")],
                            "optimizer/rank_00000.safetensors", ()),
    "edited rollouts": (lambda c: (c / "rollouts.jsonl").write_text(""), "step_00000009", ()),
    "shapes unlike the config": (lambda c: None, "step_00000009/model' holds a model with n_embd=32",
                                 ("--n_embd=64", "--allow_config_change=True")),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_checkpoint_is_a_one_line_error_naming_the_file(run, tmp_path, capsys, corruption):
    damage, names, overrides = CORRUPTIONS[corruption]
    out_dir, _ = run
    out = tmp_path / "corrupt"
    (out / "checkpoints").mkdir(parents=True)
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(out_dir / name, out / name)
    shutil.copytree(out_dir / "checkpoints" / "step_00000009", out / "checkpoints" / "step_00000009")
    for name in ("iter_0", "sft"):  # what checkpoint 9 reads besides itself, intact
        shutil.copytree(out_dir / name, out / name)
    damage(out / "checkpoints" / "step_00000009")
    assert run_in_process(*TINY, f"--out_dir={out}", *overrides) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and not any("Traceback" in line for line in err), err
    assert names in err[-1], err[-1]
    assert checkpoint_steps(out) == [9]  # nothing written over it


def test_resume_true_without_a_checkpoint_is_an_error(tmp_path, capsys):
    assert run_in_process(*TINY, f"--out_dir={tmp_path / 'empty'}", "--resume=True") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "no checkpoint" in err[-1]
