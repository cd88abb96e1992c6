"""Train: SFT, then SPIN iterations and a continued-SFT baseline, on one CPU, one GPU, or many under torchrun.

    python train.py config/quick.py [--key=value ...]
    torchrun --standalone --nproc_per_node=8 train.py config/zephyr_7b.py

Design choices:
- The run is a fixed list of phases: SFT on the real responses; SPIN iterations t = 0..max_iterations-1, each
  a rollout by the opponent (the model as it stands then; spin.build_iteration) and max_epochs over its pairs;
  optionally continued SFT from the SFT model, as many steps per iteration as SPIN's, to compare with. Each
  phase is a function that says what its steps train on; one loop, `run_steps`, runs them all.
- A fresh optimizer and lr schedule per SPIN iteration, like the official code (or one of each across the
  iterations, like NeMo-Aligner). Losses are normalised by the global count (tokens for SFT, pairs for SPIN)
  of the whole optimizer step, so any micro-batch size, grad_accum and world size give the same update.
- Resuming is running the same command again: the latest checkpoint names the phase and step; a resume
  mid-iteration reuses that iteration's rollouts, one at an iteration boundary regenerates them.
- Elsewhere: processes, FSDP2 and the sampling copy in fsdp.py; everything on disk in checkpoint.py; what a
  phase's end reports in evaluator.py; the memory plan printed first in memory_plan.py.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TextIO

import configurator

if __name__ == "__main__":  # --help answers before torch's seconds of imports; the keys are in train_config.py
    configurator.help_if_asked(sys.argv[1:], os.path.join(os.path.dirname(__file__), "train_config.py"), "TrainConfig",
                                "python train.py [CONFIG.py] [--key=value ...]\ntorchrun --standalone "
                                "--nproc_per_node=8 train.py CONFIG.py [--key=value ...]", "More: README.md "
                                "(Configuration, Resume, The quick demo); recipes in config/, e.g. config/quick.py.",
                                __doc__.split("\n")[0])

import torch
from tqdm import tqdm

import checkpoint as ckpt
from configurator import UserError, run_main, run_plan, time_left
from data import BatchOrder, Example, examples_from_messages, load_examples, synthetic_split
from evaluator import HeldOut, evaluate, headline, summary_table
from fsdp import (Runtime, StopRequest, add_sums, all_reduce_sum, all_reduce_sums, barrier,
                  catch_stop_signals, clip_gradients, close_runtime, init_runtime, mfu, model_for_sampling,
                  place_model, print0, progress_bar, show_progress)
from generate import derive_seed, sampling_of
from memory_plan import describe_plan, plan_memory, plan_warning
from metrics_log import write_metrics
from model import GPT, GPTConfig
from plot import write_run_plot
from spin import (IterationPairs, IterationRecipe, RolloutSettings, build_iteration, epoch_pairs, pairs_per_epoch,
                  per_iteration, prompt_count, read_iteration, rollout_stats, sft_micro_batch, spin_metrics,
                  spin_micro_batch, write_iteration)
from templates import ChatFormat, missing_tokens, response_text, stop_ids
from tokenizer import Tokenizer, add_special_tokens, load_tokenizer
from train_config import TrainConfig, checker_of, export_dtype, get_lr, load_train_config, make_optimizer, phases_of

ETA_STEPS = 3  # steps timed before a phase says how long it has left

# ------------------------------------------------------------------------------------------------
# data and model


@dataclass
class RunData:
    """The tokenizer, chat template and examples every phase reads."""
    tok: Tokenizer
    template: ChatFormat
    stop: list[int]  # token ids that end a generation
    pad_id: int
    train_examples: list[Example]
    eval_examples: list[Example]  # the first eval_samples held-out examples
    checker: str  # how sampled held-out answers are scored: 'synthetic' | 'final_number' | 'none'
    source: ckpt.ModelSource  # the model directory the run starts from: exports go out as the model came in


def prepare_data(cfg: TrainConfig) -> RunData:
    """The tokenizer ('auto': the model directory's, or bytes from scratch) with the markers its chat template needs
    and it lacks (build_model grows the embeddings for them), the chat template, the examples."""
    model_dir = None if cfg.init_from == "scratch" else ckpt.resolve_model_dir(cfg.init_from, key="init_from")
    tok = load_tokenizer(cfg.tokenizer if cfg.tokenizer != "auto" else (model_dir or "bytes"), cfg.tokenizer_pattern)
    template = ckpt.chat_template_for(cfg.chat_template, model_dir, tok)
    if missing_tokens(tok, template):
        print0(f"chat template '{template.name}': adding {missing_tokens(tok, template)} to the tokenizer")
        tok = add_special_tokens(tok, missing_tokens(tok, template))
    lengths = (tok, template, cfg.max_len, cfg.max_prompt_len)
    if cfg.train_data == "synthetic":
        train_convs, val_convs = synthetic_split(cfg.seed, cfg.synthetic_train, cfg.synthetic_val)
        train, stats = examples_from_messages(train_convs, *lengths, "synthetic")
        val, _ = examples_from_messages(val_convs, *lengths, "synthetic-val")
        print0(f"data: synthetic task, {len(train)} train / {len(val)} held-out examples; {stats.summary()}")
    else:
        train, stats = load_examples(cfg.train_data, *lengths, cfg.skip_invalid)
        print0(f"data: {cfg.train_data}: {len(train)} examples; {stats.summary()}")
        val = []
        if cfg.val_data:
            val, val_stats = load_examples(cfg.val_data, *lengths, cfg.skip_invalid)
            print0(f"data: {cfg.val_data}: {len(val)} held-out examples; {val_stats.summary()}")
        if not train:
            raise UserError(f"'{cfg.train_data}' has no usable examples; check max_len/max_prompt_len")
    return RunData(tok, template, stop_ids(tok, template), tok.eos_id, train, val[: cfg.eval_samples],
                   checker_of(cfg), ckpt.read_model_source(model_dir))


def build_model(cfg: TrainConfig, tok: Tokenizer, template: ChatFormat) -> GPT:
    """A GPT on the CPU in fp32 (master weights), from scratch or a Hugging Face/nanospin directory, with rows for
    the chat markers prepare_data added to its tokenizer."""
    if cfg.init_from == "scratch":
        block_size = cfg.block_size or cfg.max_len  # the context nothing but max_len asks for
        if block_size < cfg.max_len:
            raise UserError(f"block_size={block_size} is smaller than max_len={cfg.max_len}; raise block_size")
        torch.manual_seed(cfg.seed)
        return GPT(GPTConfig(model_type=cfg.model_type, vocab_size=tok.n_vocab, block_size=block_size,
                             n_layer=cfg.n_layer, n_head=cfg.n_head, n_kv_head=cfg.n_kv_head, n_embd=cfg.n_embd,
                             attention=cfg.attention, eos_token_id=tok.eos_id))
    model, grown = ckpt.load_for_training(cfg.init_from, tok, template, cfg.attention, cfg.block_size or None)
    if grown:
        print0(f"model: {grown} new embedding rows for chat template '{template.name}' "
               f"({model.config.vocab_size - grown} -> {model.config.vocab_size}), each the mean embedding")
    if model.config.block_size < cfg.max_len:
        raise UserError(f"max_len={cfg.max_len} exceeds the model's context ({model.config.block_size}); lower max_len")
    return model


def print_memory_plan(model_config: GPTConfig, cfg: TrainConfig, rt: Runtime) -> None:
    """The per-rank memory plan (memory_plan.py), against the GPU's memory, with a one-line warning naming
    what to change when it cannot fit."""
    train_sequences = cfg.batch_size * (1 if cfg.stage == "sft" else 2)  # a SPIN micro-batch holds y and y'
    plan = plan_memory(model_config, rt.world_size, rt.fsdp, rt.device.type == "cuda", rt.compute_dtype, cfg.optimizer,
                       train_sequences, cfg.max_len, cfg.rollout_batch_size, cfg.activation_checkpointing)
    device_bytes = torch.cuda.get_device_properties(rt.device).total_memory if rt.device.type == "cuda" else None
    for line in describe_plan(plan, rt.world_size, cfg.rollout_batch_size, cfg.max_len, cfg.activation_checkpointing,
                              device_bytes):
        print0(line)
    warning = plan_warning(plan, device_bytes, rt.world_size, cfg.activation_checkpointing) if device_bytes else None
    if warning:
        print0(warning)


# ------------------------------------------------------------------------------------------------
# the phases


@dataclass
class Run:
    """What every phase reads and advances."""
    cfg: TrainConfig
    rt: Runtime
    data: RunData
    held: HeldOut  # what evaluations score
    model: GPT
    optimizer: torch.optim.Optimizer
    state: ckpt.RunState
    metrics_file: TextIO | None
    stop: StopRequest
    resume_from: str | None  # the checkpoint this process resumed from (a mid-iteration one holds the rollouts)


@dataclass
class Phase:
    """A phase as `run_steps` runs it; `sft_phase`, `spin_iteration` and `baseline_iteration` make it."""
    kind: str  # its name in metrics.jsonl and the summary: 'sft', 'spin' or 'baseline'
    iteration: int
    order: BatchOrder  # the data order its steps draw from
    total_steps: int
    max_lr: float
    schedule: tuple[int, int]  # (steps of the lr schedule before its first, the schedule's length)
    # (model, indices, epoch) -> (summed loss, named sums to log, tokens run) of a micro-batch
    micro_batch: Callable[[GPT, list[int], int], tuple[torch.Tensor, dict[str, torch.Tensor], int]]
    units: Callable[[list[int]], float]  # a step's indices -> what its summed loss is divided by (pairs, tokens)
    means: Callable[[dict[str, torch.Tensor]], dict[str, float]]  # the named sums -> the logged means
    name: str  # in messages: 'sft', 'spin 0', 'baseline 2'
    beta: float = 0.0
    spin_data: IterationPairs | None = None
    rollouts_path: str | None = None  # the iteration's rollouts, saved with its mid-phase checkpoints
    export_sft: bool = False  # out_dir/sft at its end, in fp32: exactly the weights the baseline starts from
    export_final: bool = False  # out_dir/final at its end, in export_dtype: the run's product


def sft_phase(run: Run, iteration: int) -> Phase:
    """Supervised fine-tuning on the real responses for sft_steps; the product when no SPIN iteration follows."""
    cfg = run.cfg
    if cfg.sft_steps <= 0:
        raise UserError(f"config key 'sft_steps' must be > 0 for stage='{cfg.stage}', got {cfg.sft_steps}")
    phase = steps_on_examples(run, "sft", 0, "sft", cfg.sft_steps, cfg.sft_lr, (0, cfg.sft_steps))
    phase.export_sft, phase.export_final = cfg.baseline_sft, cfg.stage == "sft" or cfg.max_iterations == 0
    return start_phase(run, phase, fresh=True)


def spin_iteration(run: Run, t: int) -> Phase:
    """SPIN iteration t: the opponent's pairs (made now, or as a mid-iteration checkpoint saved them), then
    max_epochs over them at t's lr and beta. A stop signal during the rollout ends the run (StopRequest.exit)."""
    cfg, rt, data, state = run.cfg, run.rt, run.data, run.state
    recipe, iter_dir = iteration_recipe(cfg), ckpt.iteration_dir(cfg.out_dir, t)
    fresh = cfg.optimizer_per_iteration or t == 0
    if state.step == 0:
        if fresh:  # a new optimizer follows the rollout: the old moments need not sit beside the sampler
            run.optimizer.state.clear()
        spin_data = rollout_iteration(run, t, recipe)
        if spin_data is None:
            run.stop.exit(f"stopped by {run.stop.signal} during rollout {t}; the last checkpoint stays valid: "
                          f"run the same command to resume (this rollout is regenerated)")
    else:  # resuming mid-iteration: the pairs the checkpoint saved
        saved = ckpt.restore_rollouts(run.resume_from, iter_dir, state.rollouts_sha, rt.rank)
        spin_data = read_iteration(saved, iter_dir, prompt_count(recipe, len(data.train_examples)),
                                   min(recipe.mix_previous, t), data.eval_examples)
        print0(f"spin {t}: reusing the iteration's {len(spin_data.pairs)} rollouts from {saved}")
    beta, order = per_iteration(cfg.beta, t), data_order(run, len(epoch_pairs(spin_data, 0)))
    total_steps = cfg.max_epochs * order.batches_per_epoch()

    def micro_batch(model: GPT, indices: list[int], epoch: int):  # the epoch's pairs: its own rollout, if regenerated
        pairs = epoch_pairs(spin_data, epoch)
        return spin_micro_batch(model, [pairs[i] for i in indices], beta, cfg.loss_type, cfg.nll_weight,
                                cfg.pack_sequences, data.pad_id, rt.device)

    phase = Phase("spin", t, order, total_steps, per_iteration(cfg.lr, t), schedule_span(run, t, total_steps),
                  micro_batch, len, spin_metrics, f"spin {t}", beta, spin_data,
                  os.path.join(iter_dir, "rollouts.jsonl"), export_final=t == cfg.max_iterations - 1)
    return start_phase(run, phase, fresh)


def baseline_iteration(run: Run, t: int) -> Phase:
    """Continued-SFT iteration t, to compare SPIN with: from the SFT model (loaded at iteration 0's start), as
    many steps as SPIN iteration t took, at baseline_lr (0: sft_lr)."""
    cfg, state = run.cfg, run.state
    if t == 0 and state.step == 0:
        ckpt.load_weights(run.model, os.path.join(cfg.out_dir, "sft"))
    total_steps = next(h["steps"] for h in state.history if h["phase"] == "spin" and h["iteration"] == t)
    phase = steps_on_examples(run, "baseline", t, f"baseline {t}", total_steps, cfg.baseline_lr or cfg.sft_lr,
                              schedule_span(run, t, total_steps))
    return start_phase(run, phase, fresh=cfg.optimizer_per_iteration or t == 0)


def steps_on_examples(run: Run, kind: str, t: int, name: str, total_steps: int, max_lr: float,
                      schedule: tuple[int, int]) -> Phase:
    """A phase of steps on the real responses (SFT, continued SFT): its loss per response token."""
    examples, pad_id, device, pack = run.data.train_examples, run.data.pad_id, run.rt.device, run.cfg.pack_sequences
    return Phase(kind, t, data_order(run, len(examples)), total_steps, max_lr, schedule,
                 lambda model, indices, epoch: sft_micro_batch(model, [examples[i] for i in indices], pad_id, device,
                                                               pack),
                 lambda indices: sum(len(examples[i].real_ids) for i in indices),
                 lambda sums: {"loss": sums["loss"].item() / sums["tokens"].item()}, name)


def data_order(run: Run, n: int) -> BatchOrder:
    """The phase's order over its n examples or pairs, in global batches of batch_size x grad_accum x ranks."""
    cfg, rt = run.cfg, run.rt
    return BatchOrder(n=n, batch_size=cfg.batch_size * cfg.grad_accum, rank=rt.rank, world_size=rt.world_size,
                      seed=derive_seed(cfg.seed, "data_order", run.state.phase))


def start_phase(run: Run, phase: Phase, fresh: bool) -> Phase:
    """At the phase's start a new optimizer (if `fresh`) and the hash its checkpoints record of the iteration's
    rollouts; resuming mid-phase, the data order where the checkpoint left it."""
    state = run.state
    if state.step == 0:
        if fresh:
            run.optimizer = make_optimizer(run.model, run.cfg, phase.max_lr)
        state.rollouts_sha = ckpt.file_sha(phase.rollouts_path) if phase.rollouts_path else None
    elif state.order is not None:
        phase.order.load_state_dict(state.order)
    return phase


def schedule_span(run: Run, t: int, total_steps: int) -> tuple[int, int]:
    """(the lr schedule's steps before iteration t's first, the schedule's length): the iteration alone; with
    optimizer_per_iteration=False the SPIN iterations one after another (and the continued-SFT iterations,
    as long as SPIN's), over what every iteration's pairs will be."""
    cfg = run.cfg
    if cfg.optimizer_per_iteration:
        return 0, total_steps
    global_batch, n_examples = cfg.batch_size * cfg.grad_accum * run.rt.world_size, len(run.data.train_examples)
    steps = [cfg.max_epochs * (pairs_per_epoch(iteration_recipe(cfg), n_examples, s) // global_batch)
             for s in range(cfg.max_iterations)]
    if steps[t] != total_steps:
        raise RuntimeError(f"iteration {t} has {total_steps} steps, its schedule {steps[t]}")
    return sum(steps[:t]), sum(steps)


def iteration_recipe(cfg: TrainConfig) -> IterationRecipe:
    """What the config asks SPIN iterations to train on (see spin.build_iteration)."""
    return IterationRecipe(cfg.prompts_per_iteration, cfg.max_epochs if cfg.regenerate_per_epoch else 1,
                           cfg.mix_previous_rollouts, not cfg.regenerate_iteration_0, cfg.kl_opponent_mb, cfg.out_dir)


def rollout_iteration(run: Run, t: int, recipe: IterationRecipe) -> IterationPairs | None:
    """Iteration t's pairs by its opponent, the model as it stands now (sampled by `model_for_sampling`'s model),
    written to out_dir/iter_t/ by rank 0. None if a stop signal came first."""
    cfg, rt, data, t0 = run.cfg, run.rt, run.data, time.time()
    settings = RolloutSettings(max_new_tokens=cfg.max_new_tokens, max_len=cfg.max_len, stop=data.stop,
                               pad_id=data.pad_id, batch_size=cfg.rollout_batch_size, seed=cfg.seed, device=rt.device,
                               sampling=sampling_of(cfg), compile=cfg.compile and rt.device.type == "cuda",
                               autocast=rt.autocast, pack_pairs=cfg.pack_sequences, rank=rt.rank,
                               world_size=rt.world_size)
    bar = progress_bar(prompt_count(recipe, len(data.train_examples)) * recipe.rollouts, f"rollout {t}", rt.rank)
    with model_for_sampling(run.model, rt) as sampler:
        made = build_iteration(sampler, run.model, data.train_examples, data.eval_examples, t, recipe, settings,
                               lambda n: bar.update(min(n, bar.total - bar.n)), run.stop.requested)
    bar.close()
    if made is None:
        return None
    if rt.rank == 0:
        write_iteration(ckpt.iteration_dir(cfg.out_dir, t), made, data.tok.decode,
                        partial(response_text, data.tok, template=data.template))
    barrier(rt.world_size)
    dt, stats, n = time.time() - t0, rollout_stats(made), made.blocks * made.own
    print0(f"spin {t}: rollout of {n} generations in {dt:.1f}s ({stats['gen_len_mean'] * n / dt:.0f} tokens/s), "
           f"mean length {stats['gen_len_mean']:.1f}, EOS reached {stats['eos_rate']:.0%}; {len(made.pairs)} "
           f"training pairs")
    write_metrics(run.metrics_file, {"iteration": t, "phase": "spin", "step": run.state.global_step,
                                     "rollout_seconds": dt, **stats})
    return made


# ------------------------------------------------------------------------------------------------
# the steps, and a phase's end


def run_steps(run: Run, phase: Phase) -> None:
    """The phase's optimizer steps from where the run stands, with logs, a time estimate, evaluations and
    checkpoints at their intervals. A stop signal ends the run after a checkpoint (StopRequest.exit)."""
    cfg, rt, state, model = run.cfg, run.rt, run.state, run.model
    model.train()
    bar = progress_bar(phase.total_steps, phase.name, rt.rank, initial=state.step)
    logged = rollout_stats(phase.spin_data) if phase.spin_data else {}  # with every step: the rollout's statistics
    sums, tokens, t_log = {}, 0, time.time()
    first_step, t_timed = state.step, None  # the pace is timed after the first step, which pays for warm-up
    while state.step < phase.total_steps:
        lr = get_lr(phase.schedule[0] + state.step, phase.schedule[1], phase.max_lr, cfg)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        indices = phase.order.next_batch()  # this rank's share of the global batch: batch_size * grad_accum
        step_sums, step_tokens = forward_backward(model, phase, indices, cfg.batch_size, rt)
        grad_norm = clip_gradients(model, cfg.grad_clip)
        step_sums = all_reduce_sums(step_sums, rt.world_size)
        check_finite(step_sums["loss"], grad_norm, phase, state, cfg.out_dir, bar)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.global_step += 1
        bar.update(1)
        sums, tokens = add_sums(sums, step_sums), tokens + step_tokens
        last_step = state.step == phase.total_steps
        if state.step == first_step + 1:
            t_timed = time.time()
        elif state.step == first_step + 1 + ETA_STEPS and not last_step:
            (bar.write if not bar.disable else print0)(
                time_left(phase.name, phase.total_steps, state.step, (time.time() - t_timed) / ETA_STEPS))
        if state.step % cfg.log_interval == 0 or last_step:
            dt = time.time() - t_log
            tokens_per_sec = all_reduce_sum(torch.tensor([float(tokens)]), rt.world_size).item() / dt
            record = {"iteration": phase.iteration, "phase": phase.kind, "epoch": phase.order.epoch,
                      "step": state.global_step, "lr": lr, "grad_norm": grad_norm.item(),
                      "tokens_per_sec": tokens_per_sec, **phase.means(sums), **logged,
                      **mfu(tokens_per_sec, model, cfg.max_len, rt)}
            write_metrics(run.metrics_file, record)
            show_progress(bar, phase.name, state.step, phase.total_steps, record)
            sums, tokens, t_log = {}, 0, time.time()
        if cfg.eval_interval and state.step % cfg.eval_interval == 0 and not last_step:
            results = evaluate(model, rt, run.held, phase.beta, phase.spin_data)
            write_metrics(run.metrics_file, {"iteration": phase.iteration, "phase": phase.kind,
                                             "step": state.global_step, **results})
        stopping = run.stop.requested()
        if not last_step and (stopping or cfg.save_interval and state.global_step % cfg.save_interval == 0):
            save(run, replace(state, order=phase.order.state_dict()), phase.rollouts_path)
        if stopping and not last_step:
            run.stop.exit(f"stopped by {run.stop.signal} at {phase.name}, step {state.step}; checkpoint saved: "
                          f"run the same command to resume")
    bar.close()


def forward_backward(model: GPT, phase: Phase, indices: list[int], batch_size: int,
                     rt: Runtime) -> tuple[dict[str, torch.Tensor], int]:
    """The gradients of one optimizer step from this rank's share of its global batch, in micro-batches of
    batch_size. Returns this rank's sums to log and the tokens it ran."""
    micro_batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    # the loss is normalised by the global count of its units in the step: pairs for SPIN, tokens for SFT
    units = all_reduce_sum(torch.tensor([float(phase.units(indices))]), rt.world_size).item()
    sums, tokens = {}, 0
    for k, micro in enumerate(micro_batches):
        if rt.fsdp:  # reduce the gradients once, after the last micro-batch
            model.set_requires_gradient_sync(k == len(micro_batches) - 1)
        with rt.autocast:
            loss_sum, micro_sums, micro_tokens = phase.micro_batch(model, micro, phase.order.epoch)
        # FSDP averages gradients over ranks; scale so the update is the global mean
        (loss_sum * rt.world_size / units).backward()
        sums, tokens = add_sums(sums, micro_sums), tokens + micro_tokens
    return sums, tokens


def check_finite(loss_sum: torch.Tensor, grad_norm: torch.Tensor, phase: Phase, state: ckpt.RunState, out_dir: str,
                 bar: tqdm) -> None:
    """A NaN/Inf loss or gradient stops the run before the optimizer step, naming the last good checkpoint."""
    if torch.isfinite(loss_sum) and torch.isfinite(grad_norm):
        return
    last = ckpt.list_checkpoints(out_dir)
    bar.close()  # the error then gets a line of its own, not the tail of the progress bar's
    # steps are named 1-based, as metrics.jsonl and the checkpoints count them
    raise UserError(f"{phase.name}, step {state.step + 1} of {phase.total_steps} (global step {state.global_step + 1}):"
                    f" loss or gradient is NaN/Inf (loss sum {loss_sum.item()}, grad norm {grad_norm.item()}); the "
                    f"last good checkpoint is {last[-1] if last else 'none'}; lower the learning rate")


def end_phase(run: Run, phase: Phase) -> None:
    """Evaluate, export, and checkpoint at the boundary; a stop signal ends the run there (StopRequest.exit)."""
    cfg, data, state, model = run.cfg, run.data, run.state, run.model
    results = evaluate(model, run.rt, run.held, phase.beta, phase.spin_data)
    write_metrics(run.metrics_file, {"iteration": phase.iteration, "phase": phase.kind, "step": state.global_step,
                                     "event": "phase_end", **results})
    state.history.append({"phase": phase.kind, "iteration": phase.iteration, "step": state.global_step,
                          "steps": phase.total_steps, **results})
    print0(headline(phase.name, state.global_step, results))
    export = partial(ckpt.export_model, model=model, cfg=model.config, tokenizer=data.tok, chat_template=data.template,
                     rank=run.rt.rank, source=data.source)
    if phase.export_sft:
        export(os.path.join(cfg.out_dir, "sft"))
    if phase.export_final:  # as the model came in, unless export_dtype says otherwise
        export(os.path.join(cfg.out_dir, "final"), dtype=export_dtype(cfg, data.source.dtype))
        print0(f"exported the final model to {cfg.out_dir}/final (python generate.py --model={cfg.out_dir}/final)")
    run.state = replace(state, phase=state.phase + 1, step=0, order=None, rollouts_sha=None)
    save(run, run.state, None)
    if run.stop.requested():
        run.stop.exit(f"stopped by {run.stop.signal} after {phase.name}; run the same command to resume")


def save(run: Run, state: ckpt.RunState, rollouts_path: str | None) -> None:
    """A checkpoint of the run as it stands (every rank calls this)."""
    path = ckpt.save_run(run.cfg.out_dir, state, run.cfg, run.model, run.optimizer, run.data.tok, run.data.template,
                         run.data.source, rollouts_path, run.rt.rank, run.cfg.keep_checkpoints)
    print0(f"saved checkpoint {path}")


# ------------------------------------------------------------------------------------------------
# the run


def main(argv: list[str]) -> None:
    """The run: config, distributed init, out_dir and resume, data, model, the phases, the summary."""
    # ---- config ----------------------------------------------------------------------------------
    cfg = load_train_config(argv)
    phases = phases_of(cfg)

    # ---- distributed init and device -------------------------------------------------------------
    rt = init_runtime(cfg.device, cfg.dtype)
    print0(f"nanospin: world size {rt.world_size}, device {rt.device.type}, "
           f"compute dtype {str(rt.compute_dtype).removeprefix('torch.')}")

    # ---- out_dir and resume ----------------------------------------------------------------------
    fingerprint = ckpt.config_fingerprint(cfg, rt.world_size)
    resume_from = ckpt.prepare_out_dir(cfg.out_dir, cfg.resume, cfg.allow_config_change, fingerprint, rt.rank)
    finished = ckpt.finished_history(resume_from, len(phases))
    if finished is not None:  # the same command after the run completed: nothing to train, say so
        print0(ckpt.finished_run_message(cfg.out_dir))
        print0(summary_table(finished))
        return

    # ---- tokenizer and data ----------------------------------------------------------------------
    data = prepare_data(cfg)
    print0(run_plan(cfg, phases, len(data.train_examples), rt.world_size, rt.device.type,
                    str(rt.compute_dtype).removeprefix("torch.")))
    held = HeldOut(data.eval_examples, data.tok, data.template, data.stop, data.pad_id, cfg.rollout_batch_size,
                   cfg.max_new_tokens, cfg.max_len, cfg.seed, cfg.pack_sequences, cfg.loss_type, data.checker)

    # ---- model and optimizer ---------------------------------------------------------------------
    model = build_model(cfg, data.tok, data.template)
    print0(f"model: {model.config.model_type}, {model.num_params() / 1e6:.2f}M non-embedding parameters, "
           f"{model.config.n_layer} layers, {model.config.n_embd} wide")
    print_memory_plan(model.config, cfg, rt)
    place_model(model, rt, cfg.activation_checkpointing, cfg.compile)
    optimizer = make_optimizer(model, cfg, cfg.sft_lr)  # every step sets its own lr; a phase may make a new one
    state = ckpt.start_or_resume(cfg.out_dir, resume_from, model, optimizer, cfg, fingerprint, rt.rank)
    if resume_from:
        print0(f"resumed from {resume_from}: phase {state.phase}, step {state.step}")
    metrics_file = ckpt.open_metrics(cfg.out_dir, rt.rank, resume_from)
    stop = catch_stop_signals(rt.world_size)  # SIGTERM/SIGINT: save and stop at the next step boundary
    run = Run(cfg, rt, data, held, model, optimizer, state, metrics_file, stop, resume_from)

    # ---- SFT, the SPIN iterations, the continued-SFT baseline: on from the phase the run stands in --
    t_run = time.time()
    make = {"sft": sft_phase, "spin": spin_iteration, "baseline": baseline_iteration}  # each phase's setup
    for kind, iteration in phases[run.state.phase:]:
        phase = make[kind](run, iteration)
        run_steps(run, phase)
        end_phase(run, phase)

    # ---- summary ---------------------------------------------------------------------------------
    print0(summary_table(run.state.history))
    print0(f"total time {time.time() - t_run:.0f}s")
    if metrics_file is not None:
        metrics_file.close()
        if cfg.plot:
            write_run_plot(cfg.out_dir)
    close_runtime(rt)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
