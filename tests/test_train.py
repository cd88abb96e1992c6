"""train.py end to end on a tiny config/quick.py: outputs, exports, log 2 at each iteration's start,
grad accumulation, save/load, kill-and-resume exactness, the opponent of each iteration, and the
errors a user meets (resume=False, a changed config, a bad data file).

The uninterrupted run is shared with test_distributed.py (train_runs.baseline); runs that must be
bit-identical to it are subprocesses on one thread, the rest call main() in this process."""

import io
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train_runs import (CHECKPOINT_STEPS, REPO, SPIN_STEPS, TINY, assert_same_weights, baseline, checkpoint_steps,
                        checkpoint_weights, child_env, describe, final_weights, metrics, rollouts, run_in_process,
                        run_train, step_losses)

SPIN_KEYS = {"iteration", "epoch", "step", "loss", "rewards/real", "rewards/generated", "rewards/margins",
             "rewards/accuracies", "logps/real", "logps/generated", "lr", "grad_norm", "tokens_per_sec",
             "gen_len_mean", "eos_rate"}
# bf16 round-off at the first step of an iteration: measured 2e-9 (the fp32 rounding of log 2) and rewards 0;
# scoring with the bf16 sampling copy instead misses log 2 by 6e-5 to 2e-4, its rewards by 1e-4 to 5e-4
BF16_LOG2_TOLERANCE = 1e-5
BF16_REWARD_TOLERANCE = 1e-5
ROLLOUT_KEYS = {"prompt", "real", "generated", "prompt_tokens", "real_tokens", "generated_tokens", "eos",
                "opponent_real_logp", "opponent_generated_logp"}



@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return baseline(tmp_path_factory)


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------------
# pure pieces


def test_lr_schedules():
    from train import TrainConfig, get_lr
    cfg = TrainConfig(warmup_frac=0.2, min_lr_frac=0.1, lr_schedule="linear")
    lrs = [get_lr(s, 10, 1.0, cfg) for s in range(10)]
    assert lrs[:2] == pytest.approx([1 / 3, 2 / 3])  # 2 warmup steps climbing towards the peak
    assert lrs[2] == 1.0 and lrs[-1] > 0.1 and lrs == sorted(lrs[:2]) + sorted(lrs[2:], reverse=True)
    assert get_lr(10, 10, 1.0, cfg) == pytest.approx(0.1)  # reaches min_lr at the end
    cosine = TrainConfig(warmup_frac=0.0, min_lr_frac=0.0, lr_schedule="cosine")
    assert get_lr(0, 10, 2.0, cosine) == 2.0 and get_lr(5, 10, 2.0, cosine) == pytest.approx(1.0)
    constant = TrainConfig(warmup_frac=0.0, lr_schedule="constant")
    assert {get_lr(s, 10, 3.0, constant) for s in range(10)} == {3.0}


def test_save_load_gives_identical_next_step(tmp_path):
    import checkpoint as ckpt
    from data import render_prompt, render_response
    from model import GPT, GPTConfig
    from spin import sequence_logps
    from tokenizer import load_tokenizer
    from train import TrainConfig, make_optimizer

    tok = load_tokenizer("bytes")
    cfg = GPTConfig(model_type="llama", vocab_size=tok.n_vocab, block_size=96, n_layer=2, n_head=2, n_kv_head=1,
                    n_embd=32)
    prompts = [render_prompt(tok, [{"role": "user", "content": f"{k} distinct 2-digit numbers, digits 147"}], "chatml")
               for k in (3, 4)]
    real = [render_response(tok, answer, "chatml") for answer in ("47 14 71", "11 74 17 41")]
    cpu = torch.device("cpu")

    def train_step(model, optimizer) -> float:
        loss = -sequence_logps(model, prompts, real, tok.eos_id, cpu).sum() / sum(map(len, real))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    torch.manual_seed(0)
    model = GPT(cfg)
    optimizer = make_optimizer(model, TrainConfig(), 1e-2)
    train_step(model, optimizer)  # the optimizer now holds moments that must survive the round trip
    path = ckpt.save_checkpoint(str(tmp_path), 1, model, optimizer, {"phase": 0, "step": 1}, cfg, tok, "chatml",
                                None, rank=0)
    assert ckpt.list_checkpoints(str(tmp_path)) == [path]

    torch.manual_seed(1)
    restored = GPT(cfg)
    restored_optimizer = make_optimizer(restored, TrainConfig(), 1e-2)
    state = ckpt.load_checkpoint(path, restored, restored_optimizer, cfg)
    assert state["phase"] == 0 and state["step"] == 1
    assert train_step(model, optimizer) == train_step(restored, restored_optimizer)
    assert train_step(model, optimizer) == train_step(restored, restored_optimizer)
    for (name, a), b in zip(model.named_parameters(), restored.parameters()):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------------------------
# the uninterrupted run: outputs, exports, the opponent


def test_spin_steps_log_every_metric(run):
    out_dir, _ = run
    spin_steps = [r for r in metrics(out_dir) if r.get("phase") == "spin" and "loss" in r and "event" not in r]
    assert [r["step"] for r in spin_steps] == list(range(7, 15))
    for r in spin_steps:
        assert SPIN_KEYS <= r.keys(), SPIN_KEYS - r.keys()
        assert all(math.isfinite(r[k]) for k in SPIN_KEYS)


def test_every_phase_ends_with_an_evaluation(run):
    out_dir, _ = run
    evals = [r for r in metrics(out_dir) if r.get("event") == "phase_end"]
    assert [(r["phase"], r["iteration"]) for r in evals] == [("sft", 0), ("spin", 0), ("spin", 1), ("baseline", 0),
                                                            ("baseline", 1)]
    for r in evals:
        assert any("valid" in k for k in r) and any("exact" in k for k in r), r.keys()
        assert "eval/nll" in r
    assert all("eval/reward_accuracy" in r for r in evals if r["phase"] == "spin")


def test_each_iteration_writes_its_rollouts(run):
    out_dir, _ = run
    for t in (0, 1):
        pairs = rollouts(out_dir, t)
        assert len(pairs) == 32
        for p in pairs:
            assert ROLLOUT_KEYS <= p.keys()
            assert p["prompt_tokens"] == len(p["prompt_ids"]) and p["generated_tokens"] == len(p["generated_ids"])
            # responses are written as their text, without the end-of-turn token
            assert re.fullmatch(r"\d\d( \d\d)*", p["real"]) and p["prompt"].startswith("<|im_start|>user")
        assert len(rollouts(out_dir, t, "eval_rollouts.jsonl")) == 8


def test_the_run_prints_a_summary_table(run):
    _, proc = run
    for line in ("| after | step |", "| SFT | 6 |", "| SPIN iter 0 | 10 |", "| SPIN iter 1 | 14 |",
                 "| cont. SFT iter 0 | 18 |", "| cont. SFT iter 1 | 22 |"):
        assert line in proc.stdout, line
    assert "spin 0 done at step 10" in proc.stdout and "spin 1 done at step 14" in proc.stdout


def test_the_run_prints_its_memory_plan_first(run):
    _, proc = run
    plan = proc.stdout.index("memory plan per rank (world size 1):")
    assert plan < proc.stdout.index("sft step 1/6")
    training, rollout = proc.stdout[plan:].splitlines()[1:3]
    assert training.startswith("  training: master weights ") and "activations" in training
    assert rollout.startswith("  rollout: master weights ") and "KV cache" in rollout and "(8 x 96 tokens)" in rollout


def test_checkpoints_at_save_interval_and_phase_ends(run):
    out_dir, _ = run
    assert checkpoint_steps(out_dir) == CHECKPOINT_STEPS


def test_a_redirected_log_has_lines_not_progress_bars(run):
    """Output to a file (as a cluster job's): no carriage-return redraws, a line per logged step."""
    _, proc = run
    assert "\r" not in proc.stdout and "\r" not in proc.stderr
    assert "sft step 6/6: loss" in proc.stdout and "spin 1 step 4/4: loss" in proc.stdout
    assert len(proc.stdout.splitlines()) + len(proc.stderr.splitlines()) < 200


def test_progress_bars_are_drawn_on_a_terminal_by_rank_0(monkeypatch):
    from train import progress_bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stderr, rank, drawn in ((Terminal(), 0, True), (Terminal(), 1, False), (io.StringIO(), 0, False)):
        monkeypatch.setattr(sys, "stderr", stderr)
        bar = progress_bar(10, "sft", rank)
        assert bar.disable != drawn
        bar.close()


def test_each_iteration_starts_at_log2(run):
    """policy == opponent when an iteration starts, and the opponent's log-probs took the policy's numerical
    path, so its first step's loss is log 2 and its rewards 0, up to fp32 round-off."""
    out_dir, _ = run
    records = {r["step"]: r for r in metrics(out_dir) if r.get("phase") == "spin" and "loss" in r}
    for first, last in SPIN_STEPS.values():
        assert abs(records[first]["loss"] - math.log(2)) <= 1e-6
        assert abs(records[first]["rewards/real"]) <= 1e-6 and abs(records[first]["rewards/generated"]) <= 1e-6
        assert records[last]["loss"] < math.log(2) - 1e-3  # and training moves away from it


def first_spin_steps(out_dir) -> list[dict]:
    """The logged record of each SPIN iteration's first step."""
    records = [r for r in metrics(out_dir) if r.get("phase") == "spin" and "loss" in r and "event" not in r]
    return [min((r for r in records if r["iteration"] == t), key=lambda r: r["step"])
            for t in sorted({r["iteration"] for r in records})]


def bf16_copy(model, rt):
    """What train.sampler_of samples with on a GPU in bf16: a bf16 copy of the fp32 weights."""
    import checkpoint as ckpt
    return ckpt.model_from_state(model.config, {n: p.detach() for n, p in model.named_parameters()},
                                 dtype=torch.bfloat16)


def test_sampling_leaves_no_kv_cache_and_no_copy_behind(monkeypatch):
    """After model_for_sampling: no KV cache a compiled decode kept (it would stay alive into training), and a
    sampling copy's weights are gone even while its module is still referenced."""
    from contextlib import nullcontext

    import train
    from generate import generate
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_kv_head=1, n_embd=16))
    rt = train.Runtime(0, 0, 1, torch.device("cpu"), torch.float32, False, nullcontext())
    with train.model_for_sampling(model, rt) as sampler:
        assert sampler is model  # one process on the CPU samples with the model itself
        generate(sampler, [[1, 2, 3]], 4, compile="eager")
        assert sampler.kept_kv_caches is not None
    assert model.kept_kv_caches is None
    monkeypatch.setattr(train, "sampler_of", bf16_copy)  # as on one GPU in bf16
    with train.model_for_sampling(model, rt) as copy:
        assert copy is not model and generate(copy, [[1, 2, 3]], 4, compile="eager")
    assert all(p.is_meta for p in copy.parameters()) and copy.kept_kv_caches is None
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("sampler", ["the model", "a bf16 copy"])
def test_each_iteration_starts_at_log2_under_bf16_autocast(tmp_path, monkeypatch, sampler):
    """--dtype=bfloat16 on the CPU trains fp32 weights under bf16 autocast. The opponent's log-probs take that
    same path, so each iteration still starts at log 2 with zero rewards, also when the rollout samples with a
    bf16 copy as it does on a GPU: a copy may sample, never score."""
    import train
    if sampler == "a bf16 copy":
        monkeypatch.setattr(train, "sampler_of", bf16_copy)
    out = tmp_path / "bf16"
    assert run_in_process(*TINY, f"--out_dir={out}", "--dtype=bfloat16", "--stage=spin", "--baseline_sft=False",
                          "--save_interval=0") == 0
    firsts = first_spin_steps(out)
    assert len(firsts) == 2
    for record in firsts:
        assert abs(record["loss"] - math.log(2)) <= BF16_LOG2_TOLERANCE, record
        assert abs(record["rewards/real"]) <= BF16_REWARD_TOLERANCE, record
        assert abs(record["rewards/generated"]) <= BF16_REWARD_TOLERANCE, record


def test_final_export_loads_in_nanospin_and_transformers(run):
    from transformers import AutoModelForCausalLM

    from model import GPT
    out_dir, _ = run
    final = out_dir / "final"
    # the product is the model after the last SPIN iteration, not the continued-SFT baseline
    assert_same_weights(final_weights(out_dir), checkpoint_weights(out_dir, 14))
    ours = GPT.from_pretrained(str(final)).eval()
    theirs = AutoModelForCausalLM.from_pretrained(str(final), torch_dtype=torch.float32).eval()
    idx = torch.tensor([[257, 117, 115, 101, 114, 10, 51, 32, 100, 258, 10, 257, 97]])
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() < 1e-4
    meta = json.loads((final / "nanospin.json").read_text())
    assert meta["chat_template"] == "chatml"


def test_generate_cli_chats_with_the_final_model(run):
    out_dir, _ = run
    proc = subprocess.run([sys.executable, "generate.py", f"--model={out_dir}/final",
                           "--prompt=3 distinct 2-digit numbers, digits 147", "--max_new_tokens=8", "--seed=0",
                           "--device=cpu"], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, describe(proc)
    assert "error" not in proc.stderr and proc.stdout.endswith("\n"), describe(proc)  # the answer's text is the model's


def test_opponent_logps_are_the_weights_at_the_end_of_the_previous_iteration(run):
    """iter_1's opponent log-probs are the model after SPIN iteration 0 (checkpoint 10), not its start
    (checkpoint 6): the opponent is renewed every iteration."""
    from model import GPT
    from spin import pair_logps
    out_dir, _ = run
    pairs = rollouts(out_dir, 1)
    scored = {}
    for step in (10, 6):
        model = GPT.from_pretrained(str(out_dir / "checkpoints" / f"step_{step:08d}" / "model")).eval()
        with torch.no_grad():
            scored[step] = pair_logps(model, [p["prompt_ids"] for p in pairs], [p["real_ids"] for p in pairs],
                                      [p["generated_ids"] for p in pairs], 256, torch.device("cpu"))
    opponent_real = torch.tensor([p["opponent_real_logp"] for p in pairs])
    opponent_gen = torch.tensor([p["opponent_generated_logp"] for p in pairs])
    assert (scored[10][0] - opponent_real).abs().max() < 1e-3 and (scored[10][1] - opponent_gen).abs().max() < 1e-3
    assert (scored[6][0] - opponent_real).abs().max() > 0.05  # the previous opponent would score them differently


# ----------------------------------------------------------------------------------------------
# a pretrained model: its context, and an export as it came in


def bf16_mistral_dir(path) -> dict:
    """A bf16 Mistral-style model directory as a hub model comes: 32k context, a 4096 sliding window, rope and
    token-id settings, a config key nanospin does not know, generation_config.json, and a byte-level BPE
    tokenizer with the chat special tokens and special_tokens_map.json. Returns its config.json."""
    from hf_tokenizers import CHATML_JINJA, train_hf_tokenizer
    from transformers import MistralConfig, MistralForCausalLM

    train_hf_tokenizer(str(path), "gpt2", chat_template=CHATML_JINJA)
    (path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    cfg = MistralConfig(vocab_size=700, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                        sliding_window=4096, rope_theta=1e6, bos_token_id=0, eos_token_id=2, tie_word_embeddings=False,
                        custom_field_unknown_to_nanospin="kept")
    torch.manual_seed(0)
    MistralForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return json.loads((path / "config.json").read_text())


COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def test_a_bf16_model_trained_and_exported_comes_back_as_it_came_in(tmp_path):
    """final/ keeps every config.json field, the bf16 dtype and the tokenizer's and generation files byte for byte;
    transformers loads it with nanospin's logits. Checkpoints keep the fields with fp32 master weights, so the
    run resumes from them exactly (here: a second run of the finished command)."""
    import checkpoint as ckpt
    from transformers import AutoModelForCausalLM

    source = tmp_path / "mistral"
    hf_config = bf16_mistral_dir(source)
    out = tmp_path / "run"
    # block_size: the window, as long as nanospin refuses a longer context with a window (checkpoint.py)
    run = (*TINY, f"--out_dir={out}", f"--init_from={source}", "--tokenizer=auto", "--block_size=4096",
           "--stage=spin", "--baseline_sft=False", "--max_iterations=1", "--synthetic_train=16", "--save_interval=0")
    assert run_in_process(*run) == 0
    final = out / "final"
    assert json.loads((final / "config.json").read_text()) == hf_config
    for name in COMPANION_FILES:
        assert (final / name).read_bytes() == (source / name).read_bytes(), name
    exported, original = ckpt.read_safetensors_dir(str(final)), ckpt.read_safetensors_dir(str(source))
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    assert any(not torch.equal(exported[k], original[k]) for k in original)  # trained, not copied
    ours = ckpt.load_pretrained(str(final), block_size=4096).eval()
    theirs = AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32).eval()
    idx = torch.randint(0, 700, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() < 1e-4

    last = ckpt.list_checkpoints(str(out))[-1]
    assert json.loads((Path(last) / "model" / "config.json").read_text()) == {**hf_config, "dtype": "float32"}
    assert {t.dtype for t in ckpt.read_safetensors_dir(str(Path(last) / "model")).values()} == {torch.float32}
    assert run_in_process(*run) == 0  # the finished run again: it resumes from that checkpoint


def test_export_dtype_overrides_the_dtype_the_model_came_in():
    import checkpoint as ckpt
    from train import TrainConfig, export_dtype
    bf16 = ckpt.ModelSource("m", {}, torch.bfloat16)
    assert export_dtype(TrainConfig(), bf16) == torch.bfloat16
    assert export_dtype(TrainConfig(), ckpt.read_model_source(None)) == torch.float32
    assert export_dtype(TrainConfig(export_dtype="float32"), bf16) == torch.float32
    assert export_dtype(TrainConfig(export_dtype="bfloat16"), ckpt.read_model_source(None)) == torch.bfloat16


def test_block_size_defaults_to_the_models_context(tmp_path):
    """block_size 0 (the default) is a pretrained model's own context, from scratch max_len; sequences are
    capped by max_len whatever the context."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from configurator import UserError
    from templates import chat_format
    from tokenizer import load_tokenizer
    from train import TrainConfig, build_model
    tok, template = load_tokenizer("bytes"), chat_format("chatml")
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=32768)).save_pretrained(tmp_path / "m")
    pretrained = str(tmp_path / "m")

    def context(**settings) -> int:
        return build_model(TrainConfig(**settings), tok, template).config.block_size

    assert TrainConfig().block_size == 0
    assert context(init_from=pretrained, max_len=64) == context(init_from=pretrained, block_size=None) == 32768
    assert context(init_from=pretrained, max_len=64, block_size=128) == 128
    assert context(max_len=80) == 80 and context(max_len=80, block_size=96) == 96
    with pytest.raises(UserError, match="exceeds the model's context"):
        context(init_from=pretrained, max_len=64, block_size=32)


# ----------------------------------------------------------------------------------------------
# batch layout


@pytest.mark.parametrize("batch_size, grad_accum", [(4, 2), (1, 8)])
def test_grad_accumulation_equals_one_batch(run, tmp_path, batch_size, grad_accum):
    """k micro-batches of B/k (down to micro-batches of 1) make the same run as one batch of B."""
    out_dir, _ = run
    out = tmp_path / "accum"
    assert run_in_process(*TINY, f"--out_dir={out}", f"--batch_size={batch_size}", f"--grad_accum={grad_accum}",
                          "--baseline_sft=False", "--save_interval=0") == 0
    expected, got = step_losses(out_dir), step_losses(out)
    assert sorted(got) == list(range(1, 15))
    assert [got[s] for s in got] == pytest.approx([expected[s] for s in got], abs=1e-5)
    assert_same_weights(final_weights(out), final_weights(out_dir), atol=1e-5)
    for t in (0, 1):
        assert [p["generated_ids"] for p in rollouts(out, t)] == [p["generated_ids"] for p in rollouts(out_dir, t)]


def test_packed_and_unpacked_runs_end_alike(run, tmp_path):
    """pack_pairs (the default, the shared run) against pack_pairs=False, the unpacked reference: the same steps
    up to float round-off, in training, the opponent's scoring and evaluation."""
    out_dir, _ = run
    out = tmp_path / "unpacked"
    assert run_in_process(*TINY, f"--out_dir={out}", "--pack_pairs=False", "--baseline_sft=False",
                          "--save_interval=0") == 0
    expected, got = step_losses(out_dir), step_losses(out)
    assert sorted(got) == list(range(1, 15))
    assert [got[s] for s in got] == pytest.approx([expected[s] for s in got], abs=1e-5)
    assert_same_weights(final_weights(out), final_weights(out_dir), atol=1e-5)
    for t in (0, 1):
        packed, unpacked = rollouts(out_dir, t), rollouts(out, t)
        assert [p["generated_ids"] for p in unpacked] == [p["generated_ids"] for p in packed]
        for key in ("opponent_real_logp", "opponent_generated_logp"):  # sums of ~100 fp32 terms: a few ulps
            assert [p[key] for p in unpacked] == pytest.approx([p[key] for p in packed], rel=1e-6, abs=1e-5)
    evals = [[r for r in metrics(d) if r.get("event") == "phase_end"][:3] for d in (out_dir, out)]
    for packed, unpacked in zip(*evals):
        assert unpacked["eval/nll"] == pytest.approx(packed["eval/nll"], abs=1e-5)


def test_mix_previous_rollouts_and_lr_per_iteration(tmp_path):
    """mix_previous_rollouts trains iteration t on its own generations and those of t-1 (not older
    ones), the latter rescored by the current opponent; lr may be one value per iteration."""
    out = tmp_path / "mix"
    assert run_in_process(*TINY, f"--out_dir={out}", "--stage=spin", "--baseline_sft=False", "--max_iterations=3",
                          "--mix_previous_rollouts=True", "--lr=[1e-3, 5e-4]", "--save_interval=0") == 0
    it0, it1, it2 = (rollouts(out, t) for t in range(3))
    assert (len(it0), len(it1), len(it2)) == (32, 64, 64)
    assert [p["generated_ids"] for p in it2[32:]] == [p["generated_ids"] for p in it1[:32]]
    assert [p["generated_ids"] for p in it1[32:]] == [p["generated_ids"] for p in it0]
    # rescored under the new opponent, not copied
    assert max(abs(a["opponent_real_logp"] - b["opponent_real_logp"]) for a, b in zip(it1[32:], it0)) > 1e-3
    peak = {}
    for r in metrics(out):
        if r.get("phase") == "spin" and "lr" in r:
            peak[r["iteration"]] = max(peak.get(r["iteration"], 0.0), r["lr"])
    assert peak == pytest.approx({0: 1e-3, 1: 5e-4, 2: 5e-4})


# ----------------------------------------------------------------------------------------------
# kill and resume


def test_kill_mid_epoch_then_rerun_gives_identical_weights(run, tmp_path):
    """SIGKILL after step 13 (the last checkpoint is 12, mid-iteration): the same command again replays
    step 13 from checkpoint 12 with that iteration's saved rollouts and ends bit-identical."""
    out_dir, _ = run
    out = tmp_path / "killed"
    killed = run_train(out, fault="kill_after_step:13")
    assert killed.returncode == -9, describe(killed)
    assert checkpoint_steps(out)[-1] == 12 and not (out / "final").exists()
    resumed = run_train(out)
    assert resumed.returncode == 0, describe(resumed)
    assert "resumed from" in resumed.stdout and "step_00000012" in resumed.stdout
    assert "reusing the iteration's 32 rollouts" in resumed.stdout
    assert_same_weights(final_weights(out), final_weights(out_dir))
    assert_same_weights(checkpoint_weights(out, 22), checkpoint_weights(out_dir, 22))
    assert step_losses(out) == step_losses(out_dir)
    assert rollouts(out, 1) == rollouts(out_dir, 1)


# ----------------------------------------------------------------------------------------------
# what a user meets


def test_rerunning_a_finished_run_is_a_no_op_that_prints_the_table(run, tmp_path):
    out_dir, _ = run
    out = copy_run(out_dir, tmp_path / "again")
    metrics_before = (out / "metrics.jsonl").read_bytes()
    final_before = (out / "final" / "model.safetensors").stat().st_mtime_ns
    proc = run_train(out)
    assert proc.returncode == 0, describe(proc)
    assert "| SPIN iter 1 | 14 |" in proc.stdout and "| cont. SFT iter 1 | 22 |" in proc.stdout
    assert "saved checkpoint" not in proc.stdout and "rollout of" not in proc.stdout
    assert checkpoint_steps(out) == checkpoint_steps(out_dir)
    assert (out / "metrics.jsonl").read_bytes() == metrics_before
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == final_before


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    assert not any(line.startswith("Traceback") for line in err)
    return err[-1]


def test_resume_false_refuses_a_non_empty_out_dir(run, capsys):
    out_dir, _ = run
    before = sorted(p.name for p in out_dir.iterdir())
    assert run_in_process(*TINY, f"--out_dir={out_dir}", "--resume=False") == 2
    message = one_line_error(capsys)
    assert str(out_dir) in message and "resume=False" in message
    assert sorted(p.name for p in out_dir.iterdir()) == before


def test_a_different_config_is_refused_unless_allowed(run, tmp_path, capsys):
    out_dir, _ = run
    assert run_in_process(*TINY, f"--out_dir={out_dir}", "--lr=2e-3") == 2
    message = one_line_error(capsys)
    assert "different config" in message and "lr" in message and "allow_config_change" in message
    out = copy_run(out_dir, tmp_path / "changed")
    assert run_in_process(*TINY, f"--out_dir={out}", "--lr=2e-3", "--allow_config_change=True") == 0
    assert "| SPIN iter 1 | 14 |" in capsys.readouterr().out
    assert checkpoint_steps(out) == checkpoint_steps(out_dir)


def test_a_bad_data_file_is_a_one_line_error_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data.write_text(json.dumps(good) + "\n" + '{"messages": [{"role": "user", "content": "hi"}\n')
    out = tmp_path / "never"
    assert run_in_process(*TINY, f"--out_dir={out}", f"--train_data={data}", "--stage=spin",
                          "--baseline_sft=False") == 2
    assert f"{data}:2" in one_line_error(capsys)
    assert not out.exists()
