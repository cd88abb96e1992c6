"""train.py end to end on a tiny config/quick.py: outputs, exports, zero rewards at each iteration's start
(log 2 with the sigmoid loss, 1/(4β²) with IPO), grad accumulation, save/load, kill-and-resume exactness,
the opponent of each iteration, the options (k previous iterations mixed in, fresh rollouts per epoch, one
optimizer across iterations, the nll_weight anchor's normalisation), SPIN's dynamics against direct
computations, the verdict's paired intervals, and the errors a user meets (resume=False, a changed config, a
bad data file, bad values, a bad sampling value at start-up).

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

import numpy as np
import pytest
import torch

from data import Example
from templates import render_prompt, render_response
from tokenizer import load_tokenizer

from train_runs import (CHECKPOINT_STEPS, REPO, SPIN_STEPS, TINY, assert_same_weights, baseline, checkpoint_steps,
                        checkpoint_weights, child_env, describe, final_weights, metrics, records, rollouts,
                        run_in_process, run_train, step_losses)

SPIN_KEYS = {"iteration", "epoch", "step", "loss", "rewards/real", "rewards/generated", "rewards/margins",
             "rewards/accuracies", "logps/real", "logps/generated", "lr", "grad_norm", "tokens_per_sec",
             "gen_len_mean", "gen_len_p50", "gen_len_p90", "gen_len_max", "eos_rate", "dynamics/identical_frac",
             "nll/real"}
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
    from train_config import TrainConfig, get_lr
    cfg = TrainConfig(warmup_frac=0.2, min_lr_frac=0.1, lr_schedule="linear")
    lrs = [get_lr(s, 10, 1.0, cfg) for s in range(10)]
    assert lrs[:2] == pytest.approx([1 / 3, 2 / 3])  # 2 warmup steps climbing towards the peak
    assert lrs[2] == 1.0 and lrs[-1] > 0.1 and lrs == sorted(lrs[:2]) + sorted(lrs[2:], reverse=True)
    assert get_lr(10, 10, 1.0, cfg) == pytest.approx(0.1)  # reaches min_lr at the end
    cosine = TrainConfig(warmup_frac=0.0, min_lr_frac=0.0, lr_schedule="cosine")
    assert get_lr(0, 10, 2.0, cosine) == 2.0 and get_lr(5, 10, 2.0, cosine) == pytest.approx(1.0)
    constant = TrainConfig(warmup_frac=0.0, lr_schedule="constant")
    assert {get_lr(s, 10, 3.0, constant) for s in range(10)} == {3.0}


def test_pack_pairs_is_read_as_pack_sequences_with_one_line(capsys):
    from train_config import load_train_config
    cfg = load_train_config(["--pack_pairs=False"])
    assert cfg.pack_sequences is False and cfg.pack_pairs is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'pack_pairs' is now 'pack_sequences'" in err
    assert load_train_config([]).pack_sequences is True and capsys.readouterr().err == ""


def test_derived_seeds_keep_the_values_runs_always_used():
    """derive_seed is the one place a run's seeds come from; the quick demo's numbers depend on these values."""
    from generate import derive_seed
    assert [derive_seed(1337, "data_order", p) for p in (0, 3)] == [1337, 4337]
    assert derive_seed(1337, "prompt_subset", 2) == 1539 and derive_seed(1337, "rollout", 1) == 9114
    assert derive_seed(1337, "eval_rollout") == 1338 and derive_seed(1337, "checker", 64) == 1418
    assert derive_seed(5, "chat_turn", 2) == 7


def test_save_load_gives_identical_next_step(tmp_path):
    import checkpoint as ckpt
    from templates import render_prompt, render_response
    from model import GPT, GPTConfig
    from spin import sequence_logps
    from tokenizer import load_tokenizer
    from train_config import TrainConfig, make_optimizer

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
    from fsdp import progress_bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stderr, rank, drawn in ((Terminal(), 0, True), (Terminal(), 1, False), (io.StringIO(), 0, False)):
        monkeypatch.setattr(sys, "stderr", stderr)
        bar = progress_bar(10, "sft", rank)
        assert bar.disable != drawn
        bar.close()


def test_each_iteration_starts_at_zero_rewards(run):
    """policy == opponent when an iteration starts, and the opponent's log-probs took the policy's numerical
    path, so its first step's rewards are 0 and its sigmoid loss log 2, up to fp32 round-off."""
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
    """What fsdp.sampler_of samples with on a GPU in bf16 (fsdp.compute_dtype_copy), here on the CPU."""
    import fsdp
    return fsdp.compute_dtype_copy(model, torch.device("cpu"), torch.bfloat16)


def test_sampling_leaves_no_kv_cache_and_no_copy_behind(monkeypatch):
    """After model_for_sampling: no KV cache a compiled decode kept (it would stay alive into training), and a
    sampling copy's weights are gone even while its module is still referenced."""
    from contextlib import nullcontext

    import fsdp
    from generate import generate
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_kv_head=1, n_embd=16))
    rt = fsdp.Runtime(0, 0, 1, torch.device("cpu"), torch.float32, False, nullcontext())
    with fsdp.model_for_sampling(model, rt) as sampler:
        assert sampler is model  # one process on the CPU samples with the model itself
        generate(sampler, [[1, 2, 3]], 4, compile="eager")
        assert sampler.kept_kv_caches is not None
    assert model.kept_kv_caches is None
    monkeypatch.setattr(fsdp, "sampler_of", bf16_copy)  # as on one GPU in bf16
    with fsdp.model_for_sampling(model, rt) as copy:
        assert copy is not model and generate(copy, [[1, 2, 3]], 4, compile="eager")
        assert {p.dtype for p in copy.parameters()} == {torch.bfloat16} and copy.lm_head.weight is copy.wte.weight
        assert torch.equal(copy.wte.weight, model.wte.weight.to(torch.bfloat16))
    assert all(p.is_meta for p in copy.parameters()) and copy.kept_kv_caches is None
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("sampler", ["the model", "a bf16 copy"])
def test_each_iteration_starts_at_zero_rewards_under_bf16_autocast(tmp_path, monkeypatch, sampler):
    """--dtype=bfloat16 on the CPU trains fp32 weights under bf16 autocast. The opponent's log-probs take that
    same path, so each iteration still starts at zero rewards (loss log 2), also when the rollout samples with a
    bf16 copy as it does on a GPU: a copy may sample, never score."""
    import fsdp
    if sampler == "a bf16 copy":
        monkeypatch.setattr(fsdp, "sampler_of", bf16_copy)
    out = tmp_path / "bf16"
    assert run_in_process(*TINY, f"--out_dir={out}", "--dtype=bfloat16", "--stage=spin", "--baseline_sft=False",
                          "--save_interval=0") == 0
    firsts = first_spin_steps(out)
    assert len(firsts) == 2
    for record in firsts:
        assert abs(record["loss"] - math.log(2)) <= BF16_LOG2_TOLERANCE, record
        assert abs(record["rewards/real"]) <= BF16_REWARD_TOLERANCE, record
        assert abs(record["rewards/generated"]) <= BF16_REWARD_TOLERANCE, record


def test_ipo_iterations_start_at_zero_rewards_and_move_away(tmp_path):
    """loss_type='ipo' through the whole run: the loss over per-token log-probs (the opponent's sums on disk
    divided by the response lengths) starts each iteration at zero rewards, where it is (1/(2β))², and falls."""
    out = tmp_path / "ipo"
    assert run_in_process(*TINY, f"--out_dir={out}", "--loss_type=ipo", "--stage=spin", "--baseline_sft=False",
                          "--save_interval=0") == 0
    records = [r for r in metrics(out) if r.get("phase") == "spin" and "loss" in r and "event" not in r]
    firsts = first_spin_steps(out)
    assert len(firsts) == 2
    for record in firsts:
        assert record["loss"] == pytest.approx(1 / (2 * 0.1) ** 2, rel=1e-6), record
        assert abs(record["rewards/real"]) <= 1e-7 and abs(record["rewards/generated"]) <= 1e-7, record
        last = max((r for r in records if r["iteration"] == record["iteration"]), key=lambda r: r["step"])
        assert last["loss"] < record["loss"] - 1e-3 and last["rewards/margins"] > 0


def test_a_bad_top_p_fails_at_start_up_before_anything_is_built(tmp_path):
    """A bad sampling value is a one-line error naming its key before data, model or out_dir are made, not at
    the first rollout after the whole SFT phase."""
    out = tmp_path / "never"
    r = subprocess.run([sys.executable, "train.py", "config/quick.py", "--top_p=1.5", f"--out_dir={out}"], cwd=REPO,
                       env=child_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, describe(r)
    assert r.stderr == "error: config key 'top_p' must be in (0, 1] (None: no top-p filter), got 1.5\n"
    assert r.stdout == "" and not out.exists()  # not even the runtime line main prints first


def test_final_export_loads_in_nanospin_and_transformers(run):
    from transformers import AutoModelForCausalLM

    from checkpoint import load_pretrained
    out_dir, _ = run
    final = out_dir / "final"
    # the product is the model after the last SPIN iteration, not the continued-SFT baseline
    assert_same_weights(final_weights(out_dir), checkpoint_weights(out_dir, 14))
    ours = load_pretrained(str(final)).eval()
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
    from checkpoint import load_pretrained
    from spin import pair_logps
    out_dir, _ = run
    pairs = rollouts(out_dir, 1)
    scored = {}
    for step in (10, 6):
        model = load_pretrained(str(out_dir / "checkpoints" / f"step_{step:08d}" / "model")).eval()
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
    # block_size 0 (TrainConfig's default): the model's 32k context, its 4096 window; max_len caps the sequences
    run = (*TINY, f"--out_dir={out}", f"--init_from={source}", "--tokenizer=auto", "--block_size=0",
           "--stage=spin", "--baseline_sft=False", "--max_iterations=1", "--synthetic_train=16", "--save_interval=0")
    assert run_in_process(*run) == 0
    final = out / "final"
    assert json.loads((final / "config.json").read_text()) == hf_config
    for name in COMPANION_FILES:
        assert (final / name).read_bytes() == (source / name).read_bytes(), name
    exported, original = ckpt.read_safetensors_dir(str(final)), ckpt.read_safetensors_dir(str(source))
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    assert any(not torch.equal(exported[k], original[k]) for k in original)  # trained, not copied
    ours = ckpt.load_pretrained(str(final)).eval()
    assert (ours.config.block_size, ours.config.sliding_window) == (32768, 4096)
    theirs = AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32).eval()
    idx = torch.randint(0, 700, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() < 1e-4

    last = ckpt.list_checkpoints(str(out))[-1]
    assert json.loads((Path(last) / "model" / "config.json").read_text()) == {**hf_config, "dtype": "float32"}
    assert {t.dtype for t in ckpt.read_safetensors_dir(str(Path(last) / "model")).values()} == {torch.float32}
    # one more iteration (the finished run itself has nothing left to do): it resumes from that checkpoint
    assert run_in_process(*run, "--max_iterations=2", "--allow_config_change=True") == 0


def test_export_dtype_overrides_the_dtype_the_model_came_in():
    import checkpoint as ckpt
    from train_config import TrainConfig, export_dtype
    bf16 = ckpt.ModelSource("m", {}, torch.bfloat16).dtype
    assert export_dtype(TrainConfig(), bf16) == torch.bfloat16
    assert export_dtype(TrainConfig(), ckpt.read_model_source(None).dtype) == torch.float32
    assert export_dtype(TrainConfig(export_dtype="float32"), bf16) == torch.float32
    assert export_dtype(TrainConfig(export_dtype="bfloat16"), ckpt.read_model_source(None).dtype) == torch.bfloat16


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


# SPIN's dynamics and the verdict


def test_rollout_records_describe_the_opponents_generations(run):
    out_dir, _ = run
    records = {r["iteration"]: r for r in metrics(out_dir) if "rollout_seconds" in r}
    assert sorted(records) == [0, 1]
    for t, r in records.items():
        pairs = rollouts(out_dir, t)
        lengths = [p["generated_tokens"] for p in pairs]
        assert r["gen_len_mean"] == pytest.approx(sum(lengths) / len(lengths))
        assert r["gen_len_p50"] == pytest.approx(float(np.percentile(lengths, 50)))
        assert r["gen_len_p90"] == pytest.approx(float(np.percentile(lengths, 90)))
        assert r["gen_len_max"] == max(lengths) and r["eos_rate"] == pytest.approx(sum(p["eos"] for p in pairs) / 32)
        assert r["dynamics/identical_frac"] == sum(p["generated_ids"] == p["real_ids"] for p in pairs) / 32
    for r in metrics(out_dir):  # every SPIN step carries its iteration's rollout statistics
        if r.get("phase") == "spin" and "loss" in r:
            assert r["gen_len_p90"] == records[r["iteration"]]["gen_len_p90"]


def test_identical_frac_counts_generations_equal_to_the_real_response():
    from spin import IterationPairs, Pair, rollout_stats
    same, other = [5, 6, 258], [5, 7, 258]
    pairs = [Pair("t", [1], same, same, 0.0, 0.0, True), Pair("t", [1], same, other, 0.0, 0.0, True),
             Pair("t", [1], same, same[:2], 0.0, 0.0, False), Pair("t", [1], other, other, 0.0, 0.0, True)]
    stats = rollout_stats(IterationPairs(pairs, own=4, blocks=1, eval_pairs=[], opponent_eval=None))
    assert stats["dynamics/identical_frac"] == 0.5 and stats["eos_rate"] == 0.75
    assert (stats["gen_len_mean"], stats["gen_len_p50"], stats["gen_len_max"]) == (2.75, 3.0, 3.0)


def held_out_logprobs(model_dir, pairs: list[dict]) -> torch.Tensor:
    """(N, V) next-token log-probs along each held-out real response, each sequence alone, in float64."""
    from checkpoint import load_pretrained
    model = load_pretrained(str(model_dir)).eval()
    rows = []
    with torch.no_grad():
        for p in pairs:
            prompt, real = p["prompt_ids"], p["real_ids"]
            logits = model(torch.tensor([prompt + real]))[0].double()
            rows.append(torch.log_softmax(logits, -1)[len(prompt) - 1:len(prompt) + len(real) - 1])
    return torch.cat(rows)


def test_held_out_kl_to_the_opponent_equals_a_direct_computation(run):
    """eval/kl_opponent at SPIN 0's end: KL(policy ‖ opponent) per held-out real-response token, the
    policy at step 10 against the opponent at step 6, computed here from both saved models."""
    out_dir, _ = run
    end = next(r for r in metrics(out_dir) if r.get("event") == "phase_end" and r["phase"] == "spin")
    pairs = rollouts(out_dir, 0, "eval_rollouts.jsonl")
    steps = out_dir / "checkpoints"
    policy = held_out_logprobs(steps / "step_00000010" / "model", pairs)
    opponent = held_out_logprobs(steps / "step_00000006" / "model", pairs)
    direct = (policy.exp() * (policy - opponent)).sum(-1).mean().item()
    assert direct > 1e-4 and end["eval/kl_opponent"] == pytest.approx(direct, rel=1e-3)
    assert (out_dir / "iter_0" / "opponent_eval.safetensors").exists()


def test_held_out_log_prob_changes_equal_a_direct_computation(run):
    """dynamics/delta_logps_*: the policy's summed log-probs of the held-out real and generated responses
    at the iteration's end minus the opponent's; their difference times beta is the reward margin."""
    out_dir, _ = run
    end = next(r for r in metrics(out_dir) if r.get("event") == "phase_end" and r["phase"] == "spin")
    pairs = rollouts(out_dir, 0, "eval_rollouts.jsonl")
    real, generated = scored_by(out_dir / "checkpoints" / "step_00000010" / "model", pairs)
    opponent_real, opponent_generated = stored_logps(pairs)
    assert end["dynamics/delta_logps_real"] == pytest.approx((real - opponent_real).mean().item(), abs=1e-4)
    assert end["dynamics/delta_logps_generated"] == pytest.approx((generated - opponent_generated).mean().item(),
                                                                  abs=1e-4)
    assert end["eval/reward_margin"] == pytest.approx(
        0.1 * (end["dynamics/delta_logps_real"] - end["dynamics/delta_logps_generated"]), abs=1e-5)


def test_held_out_nll_is_the_mean_over_response_tokens_not_examples():
    """eval/nll: the held-out real responses' summed NLL over their token count, in batches (here 2 + 1 examples of
    4, 2 and 6 response tokens), not a mean of per-example or per-batch means."""
    from evaluator import held_out_nll
    from fsdp import init_runtime
    from model import GPT, GPTConfig
    from spin import sequence_logps
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=268, block_size=96, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)).eval()
    examples = [Example([257, 5, 6], [20, 21, 22, 258], "t:0", [], ""), Example([257, 7], [23, 258], "t:1", [], ""),
                Example([257, 8, 9, 10], [24, 25, 26, 27, 28, 258], "t:2", [], "")]
    with torch.no_grad():
        logps = sequence_logps(model, [e.prompt_ids for e in examples], [e.real_ids for e in examples], 256,
                               torch.device("cpu"))
    expected = -logps.sum().item() / 12
    for pack in (True, False):
        got = held_out_nll(model, examples, 2, 256, init_runtime("cpu", "auto"), pack)
        assert got == pytest.approx(expected, rel=1e-5)


def test_held_out_pair_metrics_are_means_over_pairs_in_batches():
    """held_out_pair_metrics over 3 pairs in batches of 2: the SPIN loss, reward accuracy and margin and the log-prob
    changes, each the mean over the pairs of spin_terms' values computed here in one batch. The opponent's
    log-probs are set around the policy's so that one pair of three has the larger real reward."""
    from evaluator import HeldOut, held_out_pair_metrics
    from fsdp import init_runtime
    from model import GPT, GPTConfig
    from spin import Pair, pair_logps, spin_terms
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=268, block_size=96, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)).eval()
    shapes = [([257, 5, 6], [20, 21, 22, 258], [30, 258]), ([257, 7], [23, 258], [31, 32, 33, 34, 35, 258]),
              ([257, 8, 9, 10], [24, 25, 26, 27, 28, 258], [36, 258])]
    with torch.no_grad():
        real, generated = pair_logps(model, *(list(x) for x in zip(*shapes)), 256, torch.device("cpu"))
    opponent_real, opponent_generated = real + torch.tensor([1.0, -1.0, 2.0]), generated - torch.tensor([0.5, 0.5, 0.5])
    pairs = [Pair("t", *shape, r, g, True) for shape, r, g in zip(shapes, opponent_real.tolist(),
                                                                  opponent_generated.tolist())]
    held = HeldOut([], None, None, [], 256, 2, 1, 96, 0, True, "sigmoid", "none")
    got = held_out_pair_metrics(model, pairs, 0.1, held, init_runtime("cpu", "auto"))
    opponent_real, opponent_generated = (torch.tensor([getattr(p, k) for p in pairs])
                                         for k in ("opponent_real_logp", "opponent_generated_logp"))
    losses, terms = spin_terms(real, generated, opponent_real, opponent_generated, 0.1)
    expected = {"eval/spin_loss": losses, "eval/reward_accuracy": terms["rewards/accuracies"],
                "eval/reward_margin": terms["rewards/real"] - terms["rewards/generated"],
                "dynamics/delta_logps_real": real - opponent_real,
                "dynamics/delta_logps_generated": generated - opponent_generated}
    assert got.keys() == expected.keys()
    for name, values in expected.items():
        assert got[name] == pytest.approx(values.mean().item(), abs=1e-5), name
    assert got["eval/reward_accuracy"] == pytest.approx(1 / 3)


def test_kl_capture_keeps_the_top_k_that_fit_the_budget(monkeypatch):
    """opponent_eval_logprobs keeps all V log-probs within kl_opponent_mb, else the top k that fit, and
    held_out_kl lines its rows up with the policy's across batches: exact, and a lower bound."""
    import fsdp
    import spin
    from evaluator import held_out_kl
    from model import GPT, GPTConfig
    tok = load_tokenizer("bytes")
    examples = [Example(render_prompt(tok, [{"role": "user", "content": f"{k} distinct 2-digit numbers"}], "chatml"),
                        render_response(tok, " ".join(["12"] * k), "chatml"), "t", [], "") for k in (1, 2, 3, 4, 5)]
    config = GPTConfig(model_type="llama", vocab_size=268, block_size=96, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    torch.manual_seed(0)
    opponent, policy = GPT(config).eval(), GPT(config).eval()
    rt = fsdp.init_runtime("cpu", "auto")
    monkeypatch.setattr(spin, "LOGITS_PER_BATCH", 2 * 96 * 268)  # batches of 2 examples
    n_tokens = sum(len(e.real_ids) for e in examples)
    with torch.no_grad():
        p, q = held_out_rows(policy, examples), held_out_rows(opponent, examples)
    direct = (p.exp() * (p - q)).sum(-1).mean().item()
    kept = spin.opponent_eval_logprobs(opponent, examples, tok.eos_id, 96, 1.0, rt.autocast, rt.device)
    assert kept.keys() == {"logprobs"} and kept["logprobs"].shape == (n_tokens, 268)
    assert held_out_kl(policy, examples, kept, 96, tok.eos_id, rt) == pytest.approx(direct, rel=1e-4)
    # room for 10 of 268 per token: value, id and the rest's mass take 12 * 10 + 4 bytes per token
    kept = spin.opponent_eval_logprobs(opponent, examples, tok.eos_id, 96, n_tokens * (12 * 10 + 4) / 2**20,
                                       rt.autocast, rt.device)
    assert kept["ids"].shape == (n_tokens, 10) and kept["rest"].shape == (n_tokens,)
    bound = held_out_kl(policy, examples, kept, 96, tok.eos_id, rt)
    assert 0 < bound <= direct


def held_out_rows(model, examples) -> torch.Tensor:
    rows = []
    for e in examples:
        logits = model(torch.tensor([e.prompt_ids + e.real_ids]))[0]
        rows.append(torch.log_softmax(logits, -1)[len(e.prompt_ids) - 1:len(e.prompt_ids) + len(e.real_ids) - 1])
    return torch.cat(rows)


def test_phase_ends_store_each_held_out_prompts_validity(run):
    out_dir, _ = run
    for r in metrics(out_dir):
        if r.get("event") == "phase_end":
            for name in ("sampled", "greedy"):
                scores = r[f"per_prompt/valid_{name}"]
                assert len(scores) == 8 and set(scores) <= {0, 1}
                assert sum(scores) / 8 == r[f"eval/valid_{name}"]


def test_the_verdict_is_a_paired_interval_over_prompts():
    """By hand: SPIN − SFT differences [0, 1, 0, 0, 0, 1, 0, 0]: mean 0.25, sd 0.46291, t(0.975, 7) 2.3646,
    half-width 2.3646 x 0.46291 / sqrt(8) = 0.3870; SPIN − continued SFT all +1: 100 ± 0 points."""
    from metrics_log import paired_interval
    from evaluator import verdict
    sft = [1, 0, 1, 1, 0, 0, 1, 0]
    spin = [1, 1, 1, 1, 0, 1, 1, 0]
    mean, half = paired_interval(spin, sft)
    assert mean == 0.25 and half == pytest.approx(0.3870, abs=2e-4)
    assert paired_interval([1], [0]) == (1.0, None)
    history = [{"phase": "sft", "iteration": 0, "per_prompt/valid_sampled": sft, "per_prompt/valid_greedy": sft},
               {"phase": "spin", "iteration": 0, "per_prompt/valid_sampled": sft, "per_prompt/valid_greedy": sft},
               {"phase": "spin", "iteration": 1, "per_prompt/valid_sampled": spin, "per_prompt/valid_greedy": sft},
               {"phase": "baseline", "iteration": 1, "per_prompt/valid_sampled": [0] * 8,
                "per_prompt/valid_greedy": [1] * 8}]
    assert verdict(history) == [
        "SPIN iter 1 − SFT: valid@T=1 +25.0 ± 38.7 points (within noise), valid@greedy +0.0 ± 0.0 points "
        "(within noise); paired over 8 held-out prompts, 95% intervals",
        "SPIN iter 1 − cont. SFT iter 1: valid@T=1 +75.0 ± 38.7 points (SPIN higher), valid@greedy -50.0 ± 44.7 "
        "points (SPIN lower); paired over 8 held-out prompts, 95% intervals"]
    assert verdict(history[:1]) == []


def test_the_summary_prints_the_verdict(run):
    _, proc = run
    for comparison in ("SPIN iter 1 − SFT: valid@T=1 ", "SPIN iter 1 − cont. SFT iter 1: valid@T=1 "):
        line = next(line for line in proc.stdout.splitlines() if line.startswith(comparison))
        assert "valid@greedy" in line and "paired over 8 held-out prompts, 95% intervals" in line


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
    """pack_sequences (the default, the shared run) against pack_sequences=False, the unpacked reference: the same
    steps up to float round-off, in training, the opponent's scoring and evaluation."""
    out_dir, _ = run
    out = tmp_path / "unpacked"
    assert run_in_process(*TINY, f"--out_dir={out}", "--pack_sequences=False", "--baseline_sft=False",
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


def scored_by(model_dir, pairs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (real, generated) summed log-probs of rollout records under the model saved in model_dir."""
    from checkpoint import load_pretrained
    from spin import pair_logps
    model = load_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return pair_logps(model, [p["prompt_ids"] for p in pairs], [p["real_ids"] for p in pairs],
                          [p["generated_ids"] for p in pairs], 256, torch.device("cpu"))


def stored_logps(pairs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor([p["opponent_real_logp"] for p in pairs]),
            torch.tensor([p["opponent_generated_logp"] for p in pairs]))


def assert_scored_by(model_dir, pairs: list[dict]) -> None:
    """The pairs' opponent log-probs are those of the model in model_dir (to float32 batching noise)."""
    for scored, stored in zip(scored_by(model_dir, pairs), stored_logps(pairs)):
        assert (scored - stored).abs().max() < 1e-3


def test_mix_previous_rollouts_k_and_lr_per_iteration(tmp_path):
    """mix_previous_rollouts=2 trains iteration t on its own generations and the first rollouts of
    t-1 and t-2 (as many as exist), all rescored by t's opponent; lr may be one value per iteration."""
    out = tmp_path / "mix"
    assert run_in_process(*TINY, f"--out_dir={out}", "--stage=spin", "--baseline_sft=False", "--max_iterations=3",
                          "--mix_previous_rollouts=2", "--lr=[1e-3, 5e-4]", "--save_interval=0") == 0
    it0, it1, it2 = (rollouts(out, t) for t in range(3))
    assert (len(it0), len(it1), len(it2)) == (32, 64, 96)
    generated = lambda pairs: [p["generated_ids"] for p in pairs]  # noqa: E731
    assert generated(it1[32:]) == generated(it0)
    assert generated(it2[32:64]) == generated(it1[:32]) and generated(it2[64:]) == generated(it0)
    # iteration 2's opponent is the model after iteration 1 (steps: 4 + 8, then 12), and it rescored t-2's too
    assert_scored_by(out / "checkpoints" / "step_00000012" / "model", it2)
    assert max(abs(a["opponent_real_logp"] - b["opponent_real_logp"]) for a, b in zip(it2[64:], it0)) > 1e-3
    assert [r["step"] for r in metrics(out) if r.get("event") == "phase_end"] == [4, 12, 24]  # 32, 64, 96 pairs
    peak = {}
    for r in metrics(out):
        if r.get("phase") == "spin" and "lr" in r:
            peak[r["iteration"]] = max(peak.get(r["iteration"], 0.0), r["lr"])
    assert peak == pytest.approx({0: 1e-3, 1: 5e-4, 2: 5e-4})


def record_training_pairs(monkeypatch) -> list[list[tuple]]:
    """Patch train.forward_backward to record the generated responses each SPIN step trains on."""
    import train
    from spin import epoch_pairs
    steps = []
    real_forward_backward = train.forward_backward

    def recording(model, phase, indices, *args):
        if phase.spin_data is not None:
            pairs = epoch_pairs(phase.spin_data, phase.order.epoch)
            steps.append([tuple(pairs[i].generated_ids) for i in indices])
        return real_forward_backward(model, phase, indices, *args)

    monkeypatch.setattr(train, "forward_backward", recording)
    return steps


def test_regenerate_per_epoch_trains_each_epoch_on_a_new_rollout_by_the_opponent(tmp_path, monkeypatch):
    """With regenerate_per_epoch each epoch of an iteration trains on fresh y' for the same prompts,
    sampled and scored by the iteration's opponent (the model at its start), plus what is mixed in."""
    out = tmp_path / "regenerate"
    steps = record_training_pairs(monkeypatch)
    assert run_in_process(*TINY, f"--out_dir={out}", "--stage=spin", "--baseline_sft=False", "--max_epochs=2",
                          "--regenerate_per_epoch=True", "--mix_previous_rollouts=1", "--save_interval=0") == 0
    it0, it1 = rollouts(out, 0), rollouts(out, 1)
    assert (len(it0), len(it1)) == (64, 96)  # 2 blocks of 32; then 2 blocks and iteration 0's first block
    for pairs in (it0, it1):
        first, second = pairs[:32], pairs[32:64]
        assert [p["prompt_ids"] for p in first] == [p["prompt_ids"] for p in second]
        assert [p["real_ids"] for p in first] == [p["real_ids"] for p in second]
        assert sum(a["generated_ids"] != b["generated_ids"] for a, b in zip(first, second)) >= 24
    # iteration 1's opponent is the model after iteration 0 (8 steps), for both of its rollouts
    assert_scored_by(out / "checkpoints" / "step_00000008" / "model", it1)
    assert [p["generated_ids"] for p in it1[64:]] == [p["generated_ids"] for p in it0[:32]]
    # epoch e trains on block e, each pair once; iteration 1's epochs also on the pairs mixed in
    block = lambda pairs: {tuple(p["generated_ids"]) for p in pairs}  # noqa: E731
    assert len(steps) == 8 + 16
    used = lambda first, last: [g for step in steps[first:last] for g in step]  # noqa: E731
    assert sorted(used(0, 4)) == sorted(tuple(p["generated_ids"]) for p in it0[:32])
    assert sorted(used(4, 8)) == sorted(tuple(p["generated_ids"]) for p in it0[32:64])
    assert set(used(8, 16)) == block(it1[:32]) | block(it1[64:]) and len(used(8, 16)) == 64
    assert set(used(16, 24)) == block(it1[32:]) and len(used(16, 24)) == 64
    assert {r["epoch"] for r in metrics(out) if r.get("phase") == "spin" and "loss" in r} == {0, 1}


def test_one_optimizer_and_schedule_across_iterations(tmp_path, monkeypatch):
    """optimizer_per_iteration=False: optimizers are made for SFT and the first SPIN and continued-SFT
    iterations only, and the lr follows one schedule over all SPIN iterations (here of 4 and 8 steps,
    with k=1 mixing), and the same one over the continued-SFT iterations."""
    import train
    made = []
    real_make_optimizer = train.make_optimizer
    monkeypatch.setattr(train, "make_optimizer", lambda *a: made.append(a[2]) or real_make_optimizer(*a))
    out = tmp_path / "one-optimizer"
    assert run_in_process(*TINY, f"--out_dir={out}", "--optimizer_per_iteration=False", "--mix_previous_rollouts=1",
                          "--save_interval=0") == 0
    assert made == [2e-3, 2e-3, 1e-3, 2e-3]  # at start-up, then SFT, SPIN 0, continued SFT 0
    cfg = train.TrainConfig(warmup_frac=0.1, lr_schedule="linear")  # config/quick.py's schedule
    for phase, peak in (("spin", 1e-3), ("baseline", 2e-3)):
        lrs = [r["lr"] for r in metrics(out) if r.get("phase") == phase and "lr" in r]
        assert lrs == pytest.approx([train.get_lr(s, 12, peak, cfg) for s in range(12)]), phase
    fresh = tmp_path / "fresh"
    assert run_in_process(*TINY, f"--out_dir={fresh}", "--mix_previous_rollouts=1", "--save_interval=0") == 0
    assert len(made) == 4 + 6
    # both start SPIN from the same SFT model; the schedules and then the moments differ
    assert step_losses(out)[7] == step_losses(fresh)[7] and step_losses(out)[12] != step_losses(fresh)[12]


def test_nll_weight_is_normalised_by_the_steps_pairs(tmp_path):
    """forward_backward's gradient with nll_weight is that of the mean over the step's pairs of the
    SPIN loss plus nll_weight x the real response's per-token NLL, in one batch or micro-batches of 1."""
    import torch.nn.functional as F

    from model import GPT, GPTConfig
    from spin import Pair, pair_logps
    from data import BatchOrder
    from fsdp import init_runtime
    from spin import spin_metrics, spin_micro_batch
    from train import Phase, forward_backward
    torch.manual_seed(0)
    model = GPT(GPTConfig(model_type="llama", vocab_size=268, block_size=96, n_layer=2, n_head=2, n_kv_head=1,
                          n_embd=32))
    pairs = [Pair("t", [257, 5, 6], [20, 21, 22, 258], [30, 258], -20.0, -9.0, True),
             Pair("t", [257, 7], [23, 258], [31, 32, 33, 34, 35, 258], -8.0, -30.0, True),
             Pair("t", [257, 8, 9, 10], [24, 25, 26, 27, 28, 258], [36, 258], -33.0, -10.0, True)]
    rt = init_runtime("cpu", "auto")

    def gradients(batch_size: int) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], int]:
        phase = Phase("spin", 0, BatchOrder(n=3, batch_size=3), 1, 1e-3, (0, 1),
                      lambda model, indices, epoch: spin_micro_batch(model, [pairs[i] for i in indices], 0.1, "sigmoid",
                                                                     0.5, True, 256, rt.device),
                      len, spin_metrics, "spin 0")
        model.zero_grad()
        sums, tokens = forward_backward(model, phase, [0, 1, 2], batch_size, rt)
        return [p.grad.clone() for p in model.parameters()], sums, tokens

    model.zero_grad()
    real, generated = pair_logps(model, [p.prompt_ids for p in pairs], [p.real_ids for p in pairs],
                                 [p.generated_ids for p in pairs], 256, torch.device("cpu"))
    h = 0.1 * ((real - torch.tensor([-20.0, -8.0, -33.0])) - (generated - torch.tensor([-9.0, -30.0, -10.0])))
    objective = (-F.logsigmoid(h) + 0.5 * -real / torch.tensor([4.0, 2.0, 6.0])).mean()
    objective.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    whole = gradients(3)
    for batch_size in (3, 1):
        grads, sums, tokens = gradients(batch_size)
        for got, want in zip(grads, expected):
            assert (got - want).abs().max() < 1e-6
        # the logged sums and the tokens run (packed: each prompt once, (3+4+2) + (2+2+6) + (4+6+2)): the
        # micro-batches' added up, as one batch's
        assert sums.keys() == whole[1].keys() and sums["pairs"].item() == 3 and tokens == whole[2] == 31
        for name, value in sums.items():
            assert value.item() == pytest.approx(whole[1][name].item(), rel=1e-5, abs=1e-6), name


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
    assert records(out) == records(out_dir)  # each step logged once, in order
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


@pytest.mark.parametrize("override, message", [
    ("--mix_previous_rollouts=True", "'mix_previous_rollouts' must be int"),
    ("--mix_previous_rollouts=-1", "'mix_previous_rollouts' must be >= 0"),
    ("--nll_weight=-0.5", "'nll_weight' must be >= 0"),
    ("--kl_opponent_mb=-1", "'kl_opponent_mb' must be >= 0"),
    ("--loss_type=dpo", "'loss_type' is 'dpo'; use one of ('sigmoid', 'hinge', 'ipo')"),
    ("--beta=[0.1, 0]", "'beta' must be > 0"),
    ("--min_p=1.5", "'min_p' must be in [0, 1]"),
    ("--temperature=-1", "'temperature' must be >= 0")])
def test_bad_values_of_the_new_options_are_one_line_errors(tmp_path, capsys, override, message):
    out = tmp_path / "never"
    assert run_in_process(*TINY, f"--out_dir={out}", override) == 2
    assert message in one_line_error(capsys)
    assert not out.exists()


def test_a_bad_data_file_is_a_one_line_error_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data.write_text(json.dumps(good) + "\n" + '{"messages": [{"role": "user", "content": "hi"}\n')
    out = tmp_path / "never"
    assert run_in_process(*TINY, f"--out_dir={out}", f"--train_data={data}", "--stage=spin",
                          "--baseline_sft=False") == 2
    assert f"{data}:2" in one_line_error(capsys)
    assert not out.exists()
