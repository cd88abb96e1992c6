"""What a user sees of train.py: the plan before the run and the time estimates in it, a finished run run again,
a model path that is not there, and the modes of the files a run writes."""

import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest

import checkpoint as ckpt
from configurator import UserError
from train_runs import SPIN_STEPS, TINY, run_in_process

FINISHED_ARGS = (*TINY, "--max_iterations=1")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny run (SFT, one SPIN iteration, one continued-SFT iteration) carried to its end in this process, under
    umask 022, with its output: (out_dir, stdout)."""
    import io
    from contextlib import redirect_stdout
    out_dir = tmp_path_factory.mktemp("cli") / "run"
    old_umask = os.umask(0o022)
    try:
        with redirect_stdout(io.StringIO()) as out:
            assert run_in_process(*FINISHED_ARGS, f"--out_dir={out_dir}") == 0
    finally:
        os.umask(old_umask)
    return out_dir, out.getvalue()


def test_the_first_lines_say_what_will_run(finished_run):
    out_dir, stdout = finished_run
    lines = stdout.splitlines()
    plan = next(i for i, line in enumerate(lines) if line.startswith("plan: "))
    assert plan <= 3 and not any(line.strip() == "{" for line in lines)  # the plan, not the config's JSON
    first, last = SPIN_STEPS[0]
    spin_steps = last - first + 1
    assert lines[plan].startswith(f"plan: {6 + 2 * spin_steps} optimizer steps of 8 examples (SFT) or pairs (SPIN)")
    assert f"  SPIN: 1 iteration, each a rollout of 32 prompts (≤ 12 new tokens) then {spin_steps} steps" in lines
    assert f"  continued SFT (the comparison): 1 × {spin_steps} steps" in lines
    saved = json.loads((out_dir / "config.json").read_text())  # the plan points here for every setting
    from train import TrainConfig
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= set(saved) and saved["sft_steps"] == 6


def test_a_phase_estimates_its_time_left(finished_run):
    _, stdout = finished_run
    estimates = [line for line in stdout.splitlines() if line.startswith("sft: 6 steps, ~")]
    assert len(estimates) == 1 and estimates[0].endswith(" s/step)"), stdout[:3000]


def test_files_follow_the_umask(finished_run):
    """Every file a run writes is 0644 under umask 022: safetensors alone would leave its files 0600."""
    out_dir, _ = finished_run
    files = [p for p in Path(out_dir).rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files) and (out_dir / "final" / "model.safetensors").is_file()
    modes = {str(p.relative_to(out_dir)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert {path: mode for path, mode in modes.items() if mode != "0o644"} == {}


def test_save_tensors_follows_the_umask(tmp_path):
    import torch
    old_umask = os.umask(0o027)
    try:
        ckpt.save_tensors({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o640


def test_running_a_finished_run_again_says_it_is_complete(finished_run, capsys):
    out_dir, first = finished_run
    assert run_in_process(*FINISHED_ARGS, f"--out_dir={out_dir}") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    done = [line for line in lines if line.startswith("nothing to do: ")]
    assert len(done) == 1 and f"the run in '{out_dir}' is complete" in done[0]
    assert f"{out_dir}/final" in done[0] and "--out_dir=" in done[0] and f"delete '{out_dir}'" in done[0]
    table = first[first.index("| after |"):].splitlines()[:5]  # the finished run's summary, as it ended
    assert lines[lines.index(done[0]) + 1:][:5] == table
    assert "resumed from" not in out and "total time" not in out and "model:" not in out  # nothing was loaded


def test_a_model_path_that_is_not_there_names_the_key_to_set(tmp_path, capsys):
    missing = tmp_path / "gpt2"
    assert run_in_process(*TINY, f"--out_dir={tmp_path / 'out'}", f"--init_from={missing}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"init_from='{missing}' does not exist" in err[0]
    assert "--init_from=/path/to/model" in err[0] and "--model" not in err[0]
    with pytest.raises(UserError, match=r"model='nowhere' does not exist; point model at .* \(--model=/path/to/model"):
        ckpt.resolve_model_dir("nowhere")
