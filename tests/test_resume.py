"""A run directory is safe to resume: no code runs from it (planted pickles never load), every file a resume
reads is checked against the digest its checkpoint recorded, a restart is never silent and metrics.jsonl
always reads as one run's records, disk errors are one line with the previous checkpoint intact, and a
stop by signal exits 128 + its number.

Resumes start from copies of the uninterrupted tiny run shared with test_train.py (train_runs.baseline)
and run main() in this process; kills and signals are subprocesses (tests/train_with_faults.py)."""

import errno
import json
import os
import signal
import types

import pytest
from safetensors import SafetensorError

import checkpoint
import train
from configurator import run_main
from spin import read_rollouts
from train_runs import (HOSTILE, TINY, assert_same_weights, baseline, checkpoint_steps, checkpoint_weights, copy_up_to,
                        describe, metrics, plant, records, rollouts, run_in_process, run_train)
from train_with_faults import no_unpickling


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return baseline(tmp_path_factory)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    assert not any(line.startswith("Traceback") for line in err), err
    return err[-1]


# ----------------------------------------------------------------------------------------------
# no code from a run directory


def test_a_resume_never_unpickles_and_planted_pickles_never_run(run, tmp_path):
    """Pickles that create a file when loaded, planted where other tools keep them, in the checkpoint a
    resume continues from: with every way to unpickle made to raise, the resume finishes bit-exact and the
    file is never created."""
    out_dir, _ = run
    out = copy_up_to(out_dir, tmp_path / "planted", 21)
    marker = tmp_path / "ran"
    for name in HOSTILE:
        plant(out / "checkpoints" / "step_00000021" / name, marker)
    with no_unpickling() as tried:
        assert run_in_process(*TINY, f"--out_dir={out}") == 0
    assert tried["n"] == 0 and not marker.exists()
    assert_same_weights(checkpoint_weights(out, 22), checkpoint_weights(out_dir, 22))
    assert records(out) == records(out_dir)


def test_every_file_a_resume_reads_is_checked_before_it_is_read(run, tmp_path, capsys, monkeypatch):
    """Each file a resume from the mid-iteration checkpoint 12 reads, replaced by a pickle in turn: a one-line
    error naming it, before the data and the model are built, and the pickle never runs."""
    out_dir, _ = run
    out = copy_up_to(out_dir, tmp_path / "out", 12)
    state = json.loads((out / "checkpoints" / "step_00000012" / "state.json").read_text())
    own = [f"checkpoints/step_00000012/{name}" for name in [*state["files"], "state.json"]]
    reads = own + [name for name in state["run_inputs"] if name != "iter_1/rollouts.jsonl"] + ["config.json",
                                                                                               "metrics.jsonl"]
    assert {"iter_1/eval_rollouts.jsonl", "iter_1/opponent_eval.safetensors", "iter_0/rollouts.jsonl",
            "sft/model.safetensors", "checkpoints/step_00000012/optimizer/rank_00000.safetensors"} <= set(reads)
    monkeypatch.setattr(train, "prepare_data", lambda cfg: pytest.fail("the data was built"))
    marker = tmp_path / "ran"
    for name in reads:
        original = (out / name).read_bytes()
        plant(out / name, marker)
        assert run_in_process(*TINY, f"--out_dir={out}") == 2, name
        assert os.path.basename(name) in one_line_error(capsys), name
        assert not marker.exists(), name
        (out / name).write_bytes(original)


def test_the_iterations_rollouts_come_back_from_the_checkpoints_copy(run, tmp_path):
    """iter_1/rollouts.jsonl replaced by a pickle, resumed mid-iteration 1: it is rewritten from the checkpoint's
    own verified copy (never read as it was), and the run ends bit-exact."""
    out_dir, _ = run
    out = copy_up_to(out_dir, tmp_path / "out", 12)
    marker = tmp_path / "ran"
    plant(out / "iter_1" / "rollouts.jsonl", marker)
    assert run_in_process(*TINY, f"--out_dir={out}") == 0
    assert not marker.exists()
    assert rollouts(out, 1) == rollouts(out_dir, 1)
    assert_same_weights(checkpoint_weights(out, 22), checkpoint_weights(out_dir, 22))


# ----------------------------------------------------------------------------------------------
# damaged files


def cut_at_a_line(path):
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[: len(lines) // 2]))


def cut_mid_line(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage_line(path):  # as long as the line it replaces: only the digest can tell
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:3] + [b"{" + b"x" * (len(lines[3]) - 2) + b"\n"] + lines[4:]))


@pytest.mark.parametrize("damage", [cut_at_a_line, cut_mid_line, garbage_line])
def test_a_damaged_held_out_rollouts_file_is_an_error_not_other_numbers(run, tmp_path, capsys, damage):
    """iter_1/eval_rollouts.jsonl cut short (at a line: valid JSON, fewer pairs) or with a garbage line, then a
    resume mid-iteration 1: one line naming the file and the fix, never held-out metrics from what is left."""
    out_dir, _ = run
    out = copy_up_to(out_dir, tmp_path / "out", 12)
    damage(out / "iter_1" / "eval_rollouts.jsonl")
    assert run_in_process(*TINY, f"--out_dir={out}") == 2
    message = one_line_error(capsys)
    assert "iter_1/eval_rollouts.jsonl' is not the file its checkpoint saved" in message, message
    assert ("cut short" if damage is not garbage_line else "sha256 differs") in message, message
    assert "--resume=restart" in message
    assert checkpoint_steps(out)[-1] == 12


def test_a_garbage_rollouts_line_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    path.write_text('{"source": "a"}\n')
    with pytest.raises(checkpoint.UserError, match=f"{path}:1: not a rollout record"):
        read_rollouts(str(path))
    path.write_text("{not json\n")
    with pytest.raises(checkpoint.UserError, match=f"{path}:1: not a rollout record"):
        read_rollouts(str(path))


# ----------------------------------------------------------------------------------------------
# no silent restart; metrics.jsonl reads as one run


def test_an_incomplete_latest_checkpoint_is_an_error_until_the_user_starts_over(run, tmp_path, capsys):
    """The only checkpoint without its state.json: an error naming it and --resume=restart (never a quiet start
    from step 0 beside the old log); with --resume=restart the run starts over and its log is one run's."""
    out_dir, _ = run
    out = copy_up_to(out_dir, tmp_path / "out", 3)
    (out / "checkpoints" / "step_00000003" / "state.json").unlink()
    assert run_in_process(*TINY, f"--out_dir={out}") == 2
    message = one_line_error(capsys)
    assert "step_00000003' has no state.json" in message and "--resume=restart" in message, message
    (out / "notes.txt").write_text("mine")  # not a file the run wrote: starting over keeps it
    assert run_in_process(*TINY, f"--out_dir={out}", "--resume=restart") == 0
    assert "resume='restart': removed checkpoints, config.json, final, iter_0, iter_1, metrics.jsonl, sft" in \
        capsys.readouterr().out
    assert (out / "notes.txt").read_text() == "mine"
    assert records(out) == records(out_dir)
    assert checkpoint_steps(out) == checkpoint_steps(out_dir)


def test_a_damaged_checkpoint_without_one_before_it_says_how_to_start_over(run, tmp_path, capsys):
    out_dir, _ = run
    out = copy_up_to(out_dir, tmp_path / "out", 3)
    (out / "checkpoints" / "step_00000003" / "state.json").write_text('{"phase": 0}')
    assert run_in_process(*TINY, f"--out_dir={out}") == 2
    message = one_line_error(capsys)
    assert "step_00000003/state.json' records no file digests" in message and "--resume=restart" in message


def test_a_run_killed_before_its_first_checkpoint_starts_over_and_logs_once(run, tmp_path, capsys):
    """save_interval=0 and a kill at step 4 of SFT (no checkpoint yet): the same command says it starts at step 0
    and metrics.jsonl holds each step once, in order, as an uninterrupted run's."""
    out_dir, _ = run
    out = tmp_path / "out"
    killed = run_train(out, "--save_interval=0", fault="kill_after_step:4")
    assert killed.returncode == -9, describe(killed)
    assert [r["step"] for r in metrics(out)] == [1, 2, 3] and not (out / "checkpoints").exists()  # killed in step 4
    assert run_in_process(*TINY, f"--out_dir={out}", "--save_interval=0") == 0
    assert "holds no checkpoint (the run there stopped before its first): starting at step 0" in \
        capsys.readouterr().out
    assert records(out) == records(out_dir)


def test_a_kill_after_a_rollout_logs_that_rollout_once(run, tmp_path):
    """Killed at step 11, after iteration 1's rollout record and before checkpoint 12: the resume from the
    boundary checkpoint 10 redoes the rollout, and metrics.jsonl has one rollout record per iteration and
    every record an uninterrupted run has, in its order."""
    out_dir, _ = run
    out = tmp_path / "out"
    killed = run_train(out, fault="kill_after_step:11")
    assert killed.returncode == -9, describe(killed)
    assert checkpoint_steps(out)[-1] == 10
    assert run_in_process(*TINY, f"--out_dir={out}") == 0
    assert [r["iteration"] for r in metrics(out) if "rollout_seconds" in r] == [0, 1]
    assert records(out) == records(out_dir)
    assert_same_weights(checkpoint_weights(out, 22), checkpoint_weights(out_dir, 22))


# ----------------------------------------------------------------------------------------------
# disk errors: one line, exit 2, the previous checkpoint intact


def no_data(monkeypatch):
    """Fail the test if the run gets as far as building its data (the checks must come first)."""
    monkeypatch.setattr(train, "prepare_data", lambda cfg: pytest.fail("the data was built"))


def test_an_out_dir_that_is_a_file_is_one_line_before_the_data(tmp_path, capsys, monkeypatch):
    no_data(monkeypatch)
    file = tmp_path / "a-file"
    file.write_text("")
    assert run_in_process(*TINY, f"--out_dir={file}") == 2
    assert f"out_dir '{file}' is a file" in one_line_error(capsys)
    assert run_in_process(*TINY, f"--out_dir={file / 'run'}") == 2
    assert f"'{file}' is a file" in one_line_error(capsys)


@pytest.mark.parametrize("number", [errno.EROFS, errno.ENOSPC, errno.EACCES])
def test_an_out_dir_the_disk_refuses_is_one_line_before_the_data(tmp_path, capsys, monkeypatch, number):
    """The write probe: a read-only disk, a full one, no permission (faked at os.write, the probe's write)."""
    no_data(monkeypatch)
    real_write = os.write

    def refuse(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path)):
            raise OSError(number, os.strerror(number))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", refuse)
    out = tmp_path / "out"
    assert run_in_process(*TINY, f"--out_dir={out}") == 2
    message = one_line_error(capsys)
    assert f"out_dir '{out}' cannot be written" in message and os.strerror(number) in message, message
    assert not out.exists() and not list(tmp_path.iterdir())  # the probe is gone


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to a read-only directory (the faked test covers it)")
def test_a_read_only_out_dir_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir(mode=0o500)
    try:
        assert run_in_process(*TINY, f"--out_dir={out}") == 2
    finally:
        out.chmod(0o700)
    assert "Permission denied" in one_line_error(capsys)


def full_disk_by_statvfs(monkeypatch, at: str):
    """os.statvfs reports 40 KiB free for the checkpoint `at` (the check before its first byte)."""
    real = os.statvfs

    def statvfs(path):
        if at in str(path):
            return types.SimpleNamespace(f_bavail=10, f_frsize=4096)
        return real(path)

    monkeypatch.setattr(os, "statvfs", statvfs)


def full_disk_mid_write(monkeypatch, at: str):
    """The safetensors writer fills the disk half-way through the model file of checkpoint `at`, and fails as it
    does on a full tmpfs."""
    real = checkpoint.save_file

    def save_file(tensors, path, metadata=None):
        if at in str(path) and path.endswith("model.safetensors"):
            with open(path, "wb") as f:
                f.write(b"\0" * 1000)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_file)


@pytest.mark.parametrize("fill", [full_disk_by_statvfs, full_disk_mid_write])
def test_a_full_disk_at_a_save_is_one_line_and_the_run_resumes_from_the_checkpoint_before(run, tmp_path, capsys,
                                                                                          monkeypatch, fill):
    """The disk is full when checkpoint 6 is written: one line (the path, "No space left on device", what to
    do), exit 2, its partial directory removed, checkpoint 3 intact; freed, the same command resumes from 3
    and ends bit-exact."""
    out_dir, _ = run
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        fill(patch, "tmp-step_00000006")
        assert run_in_process(*TINY, f"--out_dir={out}") == 2
    message = one_line_error(capsys)
    assert f"cannot save checkpoint '{out}/checkpoints/step_00000006'" in message, message
    assert "No space left on device" in message and "free space" in message, message
    assert "step_00000003" in message  # where the same command resumes
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000003"]
    checkpoint.verify_checkpoint(str(out / "checkpoints" / "step_00000003"))
    assert run_in_process(*TINY, f"--out_dir={out}") == 0
    assert_same_weights(checkpoint_weights(out, 22), checkpoint_weights(out_dir, 22))
    assert records(out) == records(out_dir)


def test_a_disk_error_anywhere_is_one_line(tmp_path, capsys):
    """Any write (metrics, rollouts, exports) that the disk refuses: run_main's one line and exit 2."""
    path = str(tmp_path / "metrics.jsonl")

    def write():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    with pytest.raises(SystemExit) as exit_info:
        run_main(write)
    assert exit_info.value.code == 2
    assert one_line_error(capsys) == f"error: '{path}': No space left on device; free space on that disk or use " \
                                     f"another directory"


# ----------------------------------------------------------------------------------------------
# exit codes


@pytest.mark.parametrize("kind, number", [("term", signal.SIGTERM), ("int", signal.SIGINT)])
def test_a_stop_by_signal_saves_and_exits_128_plus_its_number(tmp_path, kind, number):
    out = tmp_path / "out"
    proc = run_train(out, fault=f"{kind}_after_step:2")
    assert proc.returncode == 128 + number, describe(proc)  # 143, 130: `train.py && next` does not go on
    assert f"stopped by {signal.Signals(number).name} at sft, step 2; checkpoint saved" in proc.stdout
    assert checkpoint_steps(out) == [2]
