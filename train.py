"""Train: SFT and SPIN iterations, on one CPU, one GPU, or many under torchrun + FSDP2.

    python train.py config/quick.py [--key=value ...]
    torchrun --standalone --nproc_per_node=8 train.py config/zephyr_7b.py

Design choices:
- A run is a fixed list of phases, derived from the config: 'sft' (supervised fine-tuning on the
  real responses), then 'spin' iterations t = 0..max_iterations-1, then optionally 'baseline'
  iterations (continued SFT from the SFT model for the same number of steps, for an honest
  comparison). Each SPIN iteration starts with a rollout by the opponent (the model as it stands
  then) and a fresh optimizer and learning-rate schedule, like the official SPIN code (or one of
  each across the iterations, like NeMo-Aligner). Everything an iteration trains on is drawn then:
  with regenerate_per_epoch one rollout per epoch, and earlier iterations' generations mixed in.
- Resuming is running the same command again: the latest checkpoint names the phase and step; a
  resume mid-iteration reuses that iteration's rollouts, a resume at an iteration boundary
  regenerates them with the new opponent.
- Losses are normalised by the global count (tokens for SFT, pairs for SPIN) of the whole optimizer
  step, so any micro-batch size, grad_accum and world size give the same update.
- Under torchrun every block and the root are wrapped with FSDP2's fully_shard. A rollout all-gathers
  the weights once, in the compute dtype, and samples with a plain GPT over them (never a per-token
  all-gather, never a full fp32 state dict); the previous optimizer state is freed before it.
- The opponent's log-probs are scored by the model itself, on the numerical path its log-probs take in
  training (weights, autocast, kernels): a cheaper copy may sample, never score, so each iteration's
  first step has loss log 2 and zero rewards.
- At start a per-rank memory plan (memory_plan.py) is printed, with a warning when it cannot fit.
- SPIN's dynamics are logged per iteration: the rollout's length and EOS distribution and share of
  y' = y, and at evaluations the held-out log-prob changes and KL(policy ‖ opponent) per token; the
  final table ends with SPIN's last iteration against the SFT start and continued SFT as paired
  differences over the held-out prompts with 95% intervals.
- `main` is the run, top to bottom; every step it takes is a function above it, with what it needs as
  arguments. Progress bars are drawn on a terminal only; a log file gets a line per logged step.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import sys
import time
from dataclasses import dataclass, replace

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import checkpoint as ckpt
from configurator import UserError, config_to_json, load_config, run_main
from data import BatchOrder, Example, examples_from_messages, load_examples, synthetic_split
from evaluator import HeldOut, evaluate, headline, summary_table
from fsdp import (DTYPES, Runtime, StopRequest, add_sums, all_reduce_sum, all_reduce_sums, barrier,
                  catch_stop_signals, close_runtime, init_runtime, mfu, model_for_sampling, place_model, print0,
                  progress_bar)
from memory_plan import MemoryPlan, describe_plan, plan_memory, plan_warning
from model import ATTENTION_IMPLS, GPT, SCRATCH_MODEL_TYPES, GPTConfig
from plot import plot_runs
from metrics_log import open_metrics, write_metrics
from spin import (Pair, RolloutSettings, opponent_eval_logprobs, pair_terms, per_iteration, read_rollouts, rescore,
                  rollout, sequence_logps, spin_metrics, write_rollouts)
from templates import ChatFormat, chat_format, missing_tokens, resolve_template, response_text, stop_ids
from tokenizer import Tokenizer, add_special_tokens, load_tokenizer

# ------------------------------------------------------------------------------------------------
# config


@dataclass
class TrainConfig:
    """Every setting of a run, with its default; a config file and --key=value overrides change them."""
    # --- I/O -------------------------------------------------------------------------------------
    out_dir: str = "out"
    init_from: str = "scratch"  # 'scratch', a Hugging Face model directory, or a nanospin checkpoint/out_dir
    resume: bool | str = "auto"  # 'auto': continue from out_dir's latest checkpoint; False: refuse a non-empty out_dir
    allow_config_change: bool = False  # resume an out_dir whose saved config differs from this one
    tokenizer: str = "auto"  # 'auto' (the model directory's, or 'bytes' from scratch), 'bytes', 'gpt2', a path...
    tokenizer_pattern: str | None = None  # the split regex of a tiktoken BPE file no known encoding matches
    # 'auto' (the model directory's, else 'chatml'), 'chatml', 'llama3', 'zephyr', 'plain', or a dict (README)
    chat_template: str | dict = "auto"
    train_data: str = "synthetic"  # a .jsonl/.json chat file, or 'synthetic' (the quick demo's task)
    val_data: str = ""  # held-out file; '' = none (the synthetic task has its own split)
    skip_invalid: bool = False  # skip malformed records (counted) instead of stopping at the first
    synthetic_train: int = 2000  # examples in the synthetic task's train split
    synthetic_val: int = 200
    max_len: int = 512  # prompt + response tokens; longer responses are cut (counted)
    max_prompt_len: int = 256  # prompts keep their last max_prompt_len tokens
    seed: int = 1337
    device: str = "auto"  # 'auto' | 'cpu' | 'cuda'
    dtype: str = "auto"  # 'auto' (bfloat16 on a GPU, float32 on the CPU) | 'float32' | 'bfloat16' | 'float16'
    export_dtype: str = "auto"  # out_dir/final's weights: 'auto' (as they came in; fp32 from scratch) or a dtype name
    compile: bool = False  # torch.compile the training forward/backward and the decode step (GPU)
    attention: str = "sdpa"  # 'sdpa' | 'triton'
    # one row per SPIN pair, its prompt run once for both responses, several pairs (or SFT examples) to a row, for
    # training, the opponent's scoring and evaluation alike; False: a padded row per sequence (the reference)
    pack_pairs: bool = True
    # --- model, when init_from='scratch' ---------------------------------------------------------
    model_type: str = "llama"  # 'gpt2' | 'llama' (the block style; see model.py)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 128
    block_size: int | None = 0  # context length; 0/None = a pretrained model's own (from scratch: max_len)
    # --- what to run -------------------------------------------------------------------------------
    stage: str = "spin"  # 'sft' | 'spin' | 'sft+spin'
    baseline_sft: bool = False  # after SPIN, continue SFT from the SFT model for as many steps, for comparison
    baseline_lr: float = 0.0  # the continued-SFT baseline's peak lr; 0 = sft_lr (a re-warmup to it can hurt)
    # --- SFT -------------------------------------------------------------------------------------
    sft_steps: int = 1000
    sft_lr: float = 1e-3
    # --- SPIN ------------------------------------------------------------------------------------
    max_iterations: int = 3
    max_epochs: int = 1  # epochs over the iteration's pairs
    prompts_per_iteration: int = 0  # 0 = every training prompt, else a seeded subset of that size
    # also train iteration t on the generations of iterations t-1 .. t-k (their first rollout's), rescored by
    # t's opponent; 0 = off; the official repository mixes t-1's, its authors later recommended k = 2
    mix_previous_rollouts: int = 0
    # fresh y' for every epoch of an iteration, as NeMo-Aligner samples them: each epoch trains on its own
    # rollout by the iteration's opponent (drawn at the iteration's start: the opponent does not change)
    regenerate_per_epoch: bool = False
    # True: a fresh optimizer and lr schedule per iteration (the official code); False: one optimizer and one
    # schedule across all SPIN iterations, and one across the continued-SFT ones (NeMo-Aligner)
    optimizer_per_iteration: bool = True
    nll_weight: float = 0.0  # + nll_weight x the real response's per-token NLL in each pair's loss (RPO-style)
    regenerate_iteration_0: bool = False  # sample iteration 0's y' even when the data brings SPIN's 'generated'
    beta: float | list[float] = 0.1  # a float, or one per iteration (the last repeats)
    loss_type: str = "sigmoid"  # 'sigmoid' | 'hinge'
    lr: float | list[float] = 5e-7  # SPIN's peak learning rate: a float, or one per iteration (the last repeats)
    # --- rollout -----------------------------------------------------------------------------------
    rollout_batch_size: int = 64
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    # --- optimisation ----------------------------------------------------------------------------
    batch_size: int = 8  # micro-batch per rank; one optimizer step = batch_size * grad_accum * world size
    grad_accum: int = 1
    optimizer: str = "adamw"  # 'adamw' | 'rmsprop' (the paper's)
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    lr_schedule: str = "linear"  # 'linear' | 'cosine' | 'constant', after warmup, down to min_lr; per iteration
    warmup_frac: float = 0.1
    min_lr_frac: float = 0.0  # min_lr = min_lr_frac * lr
    # --- evaluation, logging, checkpoints --------------------------------------------------------
    eval_interval: int = 0  # steps between evaluations (0 = only at the end of each phase)
    eval_samples: int = 128  # held-out prompts scored by the task's checker (and SPIN pairs)
    # memory for the opponent's next-token distributions on the held-out real responses (eval/kl_opponent):
    # exact when they fit, else each position's top-k that fit plus the rest of the mass; 0 = no eval/kl_opponent
    kl_opponent_mb: float = 64.0
    log_interval: int = 10
    save_interval: int = 0  # steps between mid-iteration checkpoints (0 = only at phase ends)
    keep_checkpoints: int = 2
    plot: bool = True  # out_dir/metrics.png at the end of the run (plot.py), when matplotlib is installed
    # --- distributed ---------------------------------------------------------------------------
    activation_checkpointing: bool = False


def check_config(cfg: TrainConfig) -> None:
    """Values the type system cannot catch, as one-line errors naming the key."""
    choices = {"stage": ("sft", "spin", "sft+spin"), "loss_type": ("sigmoid", "hinge"),
               "optimizer": ("adamw", "rmsprop"), "lr_schedule": ("linear", "cosine", "constant"),
               "device": ("auto", "cpu", "cuda"), "dtype": ("auto", *DTYPES), "export_dtype": ("auto", *DTYPES),
               "attention": ATTENTION_IMPLS, "model_type": SCRATCH_MODEL_TYPES}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f"config key '{key}' is {getattr(cfg, key)!r}; use one of {allowed}")
    if cfg.resume not in ("auto", True, False):
        raise UserError(f"config key 'resume' is {cfg.resume!r}; use 'auto', True or False")
    positive = ("batch_size", "grad_accum", "rollout_batch_size", "max_new_tokens", "max_len", "max_prompt_len",
                "max_epochs", "log_interval", "keep_checkpoints", "n_layer", "n_head", "n_kv_head", "n_embd")
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise UserError(f"config key '{key}' must be > 0, got {getattr(cfg, key)}")
    if cfg.block_size is not None and cfg.block_size < 0:
        raise UserError(f"config key 'block_size' must be >= 0 (0: the model's own context), got {cfg.block_size}")
    if cfg.max_prompt_len >= cfg.max_len:
        raise UserError(f"max_prompt_len={cfg.max_prompt_len} must be < max_len={cfg.max_len}")
    for key in ("beta", "lr"):
        if isinstance(getattr(cfg, key), list) and not getattr(cfg, key):
            raise UserError(f"config key '{key}' is an empty list; give a float or one value per iteration")
    if cfg.baseline_sft and cfg.stage != "sft+spin":
        raise UserError("baseline_sft=True needs stage='sft+spin' (it continues SFT from the SFT model)")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device='cuda' but no CUDA GPU is visible; use --device=cpu")
    for key in ("temperature", "mix_previous_rollouts", "nll_weight", "kl_opponent_mb"):
        if getattr(cfg, key) < 0:
            raise UserError(f"config key '{key}' must be >= 0, got {getattr(cfg, key)}")
    if cfg.chat_template != "auto":
        chat_format(cfg.chat_template)  # a bad name or dict field fails here, naming the key


def phases_of(cfg: TrainConfig) -> list[tuple[str, int]]:
    """The run's (kind, iteration) phases in order: 'sft', then 'spin' t, then 'baseline' t."""
    phases = [("sft", 0)] if cfg.stage in ("sft", "sft+spin") else []
    if cfg.stage in ("spin", "sft+spin"):
        phases += [("spin", t) for t in range(cfg.max_iterations)]
    if cfg.baseline_sft:
        phases += [("baseline", t) for t in range(cfg.max_iterations)]
    if not phases:
        raise UserError("nothing to run: stage='spin' with max_iterations=0")
    return phases


def phase_name(kind: str, iteration: int) -> str:
    """How messages name a phase: 'sft', 'spin 0', 'baseline 2'."""
    return "sft" if kind == "sft" else f"{kind} {iteration}"


def phase_lr(cfg: TrainConfig, kind: str, iteration: int) -> float:
    """The phase's peak learning rate."""
    if kind == "spin":
        return per_iteration(cfg.lr, iteration)
    if kind == "baseline" and cfg.baseline_lr:
        return cfg.baseline_lr
    return cfg.sft_lr


def get_lr(step: int, total_steps: int, max_lr: float, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_frac of the steps, then linear/cosine/constant down to min_lr."""
    warmup = int(cfg.warmup_frac * total_steps)
    min_lr = cfg.min_lr_frac * max_lr
    if step < warmup:
        return max_lr * (step + 1) / (warmup + 1)
    if cfg.lr_schedule == "constant":
        return max_lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    if cfg.lr_schedule == "linear":
        return max_lr + (min_lr - max_lr) * progress
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))


def save(cfg: TrainConfig, rank: int, model, optimizer, state: ckpt.RunState, data: RunData,
         rollouts_path: str | None) -> str:
    """A checkpoint of the run as it stands (every rank calls this)."""
    path = ckpt.save_run(cfg.out_dir, state, cfg, model, optimizer, data.tok, data.template, data.source,
                         rollouts_path, rank, cfg.keep_checkpoints)
    print0(f"saved checkpoint {path}")
    return path


def show_progress(bar: tqdm, name: str, step: int, total_steps: int, record: dict) -> None:
    """A logged step's loss: on the bar where it is drawn, else as a line of its own."""
    if not bar.disable:
        bar.set_postfix(loss=f"{record['loss']:.4f}")
    else:
        print0(f"{name} step {step}/{total_steps}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
               f"{record['tokens_per_sec']:.0f} tokens/s")


# ------------------------------------------------------------------------------------------------
# tokenizer and data


@dataclass
class RunData:
    """The tokenizer, chat template and examples every phase reads."""
    tok: Tokenizer
    template: ChatFormat
    stop: list[int]  # token ids that end a generation
    pad_id: int
    train_examples: list[Example]
    eval_examples: list[Example]  # the first eval_samples held-out examples
    has_checker: bool  # the synthetic task's checker can score sampled answers
    source: ckpt.ModelSource  # the model directory the run starts from: exports go out as the model came in


def prepare_data(cfg: TrainConfig) -> RunData:
    """The tokenizer ('auto': the model directory's, or bytes from scratch) with the markers its chat template needs
    and it lacks (build_model grows the embeddings for them), the chat template, the examples."""
    model_dir = None if cfg.init_from == "scratch" else ckpt.resolve_model_dir(cfg.init_from)
    tok = load_tokenizer(cfg.tokenizer if cfg.tokenizer != "auto" else (model_dir or "bytes"), cfg.tokenizer_pattern)
    template = chat_template_for(cfg, model_dir, tok)
    if missing_tokens(tok, template):
        print0(f"chat template '{template.name}': adding {missing_tokens(tok, template)} to the tokenizer")
        tok = add_special_tokens(tok, missing_tokens(tok, template))
    train, val, has_checker = load_data(cfg, tok, template)
    return RunData(tok, template, stop_ids(tok, template), tok.eos_id, train, val[: cfg.eval_samples], has_checker,
                   ckpt.read_model_source(model_dir))


def chat_template_for(cfg: TrainConfig, model_dir: str | None, tok: Tokenizer) -> ChatFormat:
    """The configured template; for 'auto', the one a nanospin model directory was trained with (its
    nanospin.json), else the tokenizer's, else chatml."""
    if cfg.chat_template != "auto":
        return chat_format(cfg.chat_template)
    saved = ckpt.read_chat_template(model_dir) if model_dir else None
    if saved:
        return chat_format(saved, os.path.join(model_dir, "nanospin.json"))
    return resolve_template(tok, "auto") if tok.chat_template else chat_format("chatml")


def load_data(cfg: TrainConfig, tok: Tokenizer, template: ChatFormat) -> tuple[list[Example], list[Example], bool]:
    """(train examples, val examples, whether the synthetic checker applies)."""
    if cfg.train_data == "synthetic":
        train_convs, val_convs = synthetic_split(cfg.seed, cfg.synthetic_train, cfg.synthetic_val)
        train, stats = examples_from_messages(train_convs, tok, template, cfg.max_len, cfg.max_prompt_len, "synthetic")
        val, _ = examples_from_messages(val_convs, tok, template, cfg.max_len, cfg.max_prompt_len, "synthetic-val")
        print0(f"data: synthetic task, {len(train)} train / {len(val)} held-out examples; {stats.summary()}")
        return train, val, True
    train, stats = load_examples(cfg.train_data, tok, template, cfg.max_len, cfg.max_prompt_len, cfg.skip_invalid)
    print0(f"data: {cfg.train_data}: {len(train)} examples; {stats.summary()}")
    val = []
    if cfg.val_data:
        val, vstats = load_examples(cfg.val_data, tok, template, cfg.max_len, cfg.max_prompt_len, cfg.skip_invalid)
        print0(f"data: {cfg.val_data}: {len(val)} held-out examples; {vstats.summary()}")
    if not train:
        raise UserError(f"'{cfg.train_data}' has no usable examples; check max_len/max_prompt_len")
    return train, val, False


# ------------------------------------------------------------------------------------------------
# model and optimizer


def vocab_rows_needed(tok: Tokenizer, template: ChatFormat) -> int:
    """Embedding rows a model needs for the ids a run can feed it: the tokenizer's vocabulary up to the specials
    after it (a named tiktoken encoding appends chat specials a template may never use), and the template's."""
    special_ids = set(tok.specials.values())
    vocab_end = tok.n_vocab
    while vocab_end > 0 and vocab_end - 1 in special_ids:
        vocab_end -= 1
    used = stop_ids(tok, template) + [tok.specials[t] for t in template.new_tokens if t in tok.specials]
    return max(vocab_end, *(i + 1 for i in used))


def grow_vocab(model: GPT, vocab_size: int) -> None:
    """New embedding (and untied output) rows up to vocab_size, each the mean of the existing rows: a new marker
    starts as an average token rather than noise, so it disturbs the pretrained model least."""
    old = model.config.vocab_size
    with torch.no_grad():
        wte = torch.nn.Embedding(vocab_size, model.config.n_embd)  # (V', C)
        wte.weight[:old] = model.wte.weight
        wte.weight[old:] = model.wte.weight.mean(0)
        model.wte = wte
        if model.config.tie_embeddings:
            model.lm_head = torch.nn.Linear(model.config.n_embd, vocab_size, bias=False)
            model.lm_head.weight = model.wte.weight
        else:
            head = torch.nn.Linear(model.config.n_embd, vocab_size, bias=False)  # weight (V', C)
            head.weight[:old] = model.lm_head.weight
            head.weight[old:] = model.lm_head.weight.mean(0)
            model.lm_head = head
    model.config.vocab_size = vocab_size


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
    model = ckpt.load_pretrained(ckpt.resolve_model_dir(cfg.init_from), attention=cfg.attention,
                                 block_size=cfg.block_size or None)
    rows = vocab_rows_needed(tok, template)
    if model.config.vocab_size < rows:
        if not set(range(model.config.vocab_size, rows)) <= set(tok.specials.values()):
            raise UserError(f"the tokenizer has {tok.n_vocab} tokens but the model in '{cfg.init_from}' only "
                            f"{model.config.vocab_size}; use the model's own tokenizer (tokenizer='auto')")
        print0(f"model: {rows - model.config.vocab_size} new embedding rows for chat template "
               f"'{template.name}' ({model.config.vocab_size} -> {rows}), each the mean embedding")
        grow_vocab(model, rows)
    if model.config.block_size < cfg.max_len:
        raise UserError(f"max_len={cfg.max_len} exceeds the model's context ({model.config.block_size}); lower max_len")
    return model


def print_memory_plan(model_config: GPTConfig, cfg: TrainConfig, rt: Runtime) -> MemoryPlan:
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
    return plan


def make_optimizer(model, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW (or the paper's RMSprop) over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    # no decay on norms, biases and embeddings' single vectors: the usual nanoGPT split by dimension
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2))


def load_sft_weights(model: GPT, sft_dir: str) -> None:
    """The SFT model exported at the end of SFT, into the (possibly sharded) model."""
    ckpt.load_weights(model, sft_dir)


# ------------------------------------------------------------------------------------------------
# a SPIN iteration's pairs


def rollout_settings(cfg: TrainConfig, rt: Runtime, data: RunData) -> RolloutSettings:
    """How and where the opponent samples the iteration's responses (see spin.rollout)."""
    return RolloutSettings(max_new_tokens=cfg.max_new_tokens, max_len=cfg.max_len, stop=data.stop, pad_id=data.pad_id,
                           batch_size=cfg.rollout_batch_size, seed=cfg.seed, device=rt.device,
                           temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                           compile=cfg.compile and rt.device.type == "cuda", autocast=rt.autocast,
                           pack_pairs=cfg.pack_pairs, rank=rt.rank, world_size=rt.world_size)


def prompts_for_iteration(examples: list[Example], cfg: TrainConfig, iteration: int) -> list[Example]:
    """Every training prompt, or a seeded subset of prompts_per_iteration of them."""
    if not cfg.prompts_per_iteration:
        return examples
    g = torch.Generator().manual_seed(cfg.seed + 101 * iteration)
    perm = torch.randperm(len(examples), generator=g)[: cfg.prompts_per_iteration]
    return [examples[i] for i in perm.tolist()]


def pairs_from_data(examples: list[Example], stop: list[int]) -> list[Pair] | None:
    """Pairs of the y' SPIN's own data format brings ('generated'), for iteration 0; their opponent log-probs are
    still to be scored. None when the examples bring none."""
    given = [e for e in examples if e.generated_ids is not None]
    if not given:
        return None
    if len(given) < len(examples):
        raise UserError(f"{len(given)} of {len(examples)} examples have SPIN's 'generated' response (e.g. "
                        f"{given[0].source}); give it in every record, or set regenerate_iteration_0=True to sample "
                        f"iteration 0's y' instead")
    return [Pair(e.source, e.prompt_ids, e.real_ids, e.generated_ids, opponent_real_logp=0.0,
                 opponent_generated_logp=0.0, eos=e.generated_ids[-1] in stop) for e in examples]


@dataclass
class IterationPairs:
    """A SPIN iteration's data, as out_dir/iter_t/ holds it. `pairs` is its rollouts.jsonl: the opponent's
    generations for the iteration's prompts, in `blocks` blocks of `own` pairs (one block; or one per
    epoch with regenerate_per_epoch), then those of iterations t-1 .. t-k mixed in, rescored by it."""
    pairs: list[Pair]
    own: int  # pairs per block: one per prompt of the iteration
    blocks: int
    eval_pairs: list[Pair]  # the opponent's held-out pairs (eval_rollouts.jsonl)
    opponent_eval: dict[str, torch.Tensor] | None  # what spin.opponent_top_k kept of its held-out log-probs


def rollout_blocks(cfg: TrainConfig) -> int:
    """How many rollouts of its prompts an iteration draws: one per epoch with regenerate_per_epoch."""
    return cfg.max_epochs if cfg.regenerate_per_epoch else 1


def spin_pairs_per_epoch(cfg: TrainConfig, examples: list[Example], iteration: int) -> int:
    """Pairs an epoch of SPIN iteration t trains on: one per prompt of t and of each iteration mixed in,
    known before any rollout (a schedule across iterations needs every iteration's length)."""
    return (1 + min(cfg.mix_previous_rollouts, iteration)) * len(prompts_for_iteration(examples, cfg, iteration))


def epoch_pairs(it: IterationPairs, epoch: int) -> list[Pair]:
    """The pairs an epoch trains on: its block of the opponent's generations, then the ones mixed in."""
    block = epoch % it.blocks
    return it.pairs[block * it.own:(block + 1) * it.own] + it.pairs[it.blocks * it.own:]


def own_generations(it: IterationPairs) -> list[Pair]:
    """The pairs whose y' this iteration's opponent sampled (every block, none mixed in)."""
    return it.pairs[:it.blocks * it.own]


def sample_generations(sampler: GPT, opponent: GPT, prompts: list[Example], settings: RolloutSettings,
                       cfg: TrainConfig, iteration: int, stop: StopRequest, rank: int) -> list[Pair] | None:
    """The opponent's y' for every prompt (sampled by `sampler`, scored by `opponent`), once, or once per epoch
    with regenerate_per_epoch (epoch e seeded by seed + 7777 e, so epoch 0 is the single rollout's); None if a
    stop signal came first."""
    blocks = rollout_blocks(cfg)
    bar = progress_bar(len(prompts) * blocks, f"rollout {iteration}", rank)
    generations = []
    for epoch in range(blocks):
        pairs = rollout(sampler, prompts, replace(settings, seed=cfg.seed + 7777 * epoch), iteration,
                        progress=lambda n: bar.update(min(n, bar.total - bar.n)), should_stop=stop.requested,
                        scorer=opponent)
        if pairs is None:
            generations = None
            break
        generations += pairs
    bar.close()
    return generations


def previous_generations(opponent: GPT, cfg: TrainConfig, iteration: int, own: int,
                         settings: RolloutSettings) -> list[Pair]:
    """The first `own` pairs (the first rollout) of iterations t-1 .. t-k, in that order, with the opponent's
    log-probs recomputed by this iteration's opponent: it is the opponent they are trained against now."""
    mixed = []
    for back in range(1, min(cfg.mix_previous_rollouts, iteration) + 1):
        earlier = read_rollouts(os.path.join(ckpt.iteration_dir(cfg.out_dir, iteration - back), "rollouts.jsonl"))
        mixed += rescore(opponent, earlier[:own], settings)
    return mixed


def write_iteration(iter_dir: str, made: IterationPairs, tok: Tokenizer, template: ChatFormat) -> None:
    """out_dir/iter_t/: rollouts.jsonl, eval_rollouts.jsonl and opponent_eval.safetensors (rank 0)."""
    response = functools.partial(response_text, tok, template=template)
    write_rollouts(os.path.join(iter_dir, "rollouts.jsonl"), made.pairs, tok.decode, response)
    if made.eval_pairs:
        write_rollouts(os.path.join(iter_dir, "eval_rollouts.jsonl"), made.eval_pairs, tok.decode, response)
    if made.opponent_eval is not None:  # written whole, then renamed, as the rollouts are
        path = os.path.join(iter_dir, "opponent_eval.safetensors")
        save_file({name: t.contiguous() for name, t in made.opponent_eval.items()}, path + ".tmp")
        os.replace(path + ".tmp", path)


def run_rollout(model: GPT, cfg: TrainConfig, rt: Runtime, data: RunData, iteration: int, stop: StopRequest,
                metrics_file, global_step: int) -> IterationPairs | None:
    """Iteration t's pairs (see IterationPairs), made by the opponent (the model as it stands now) or at
    iteration 0 given by the data (SPIN's 'generated') and scored by it, its held-out pairs and its held-out
    next-token log-probs. Rank 0 writes them to out_dir/iter_t/. None if a stop signal came first."""
    settings = rollout_settings(cfg, rt, data)
    prompts = prompts_for_iteration(data.train_examples, cfg, iteration)
    t0 = time.time()
    from_data = iteration == 0 and not cfg.regenerate_iteration_0  # SPIN's own data files may bring y'
    # the sampler may be a cheaper copy; the opponent's log-probs are the model's own, on the numerical path
    # its log-probs take in training (weights, autocast, kernels), so each iteration starts at loss log 2
    with model_for_sampling(model, rt) as sampler:
        given = pairs_from_data(prompts, data.stop) if from_data else None
        if given is not None:  # the opponent scores the data's y' as it scores its own samples
            generations = rescore(model, given, settings)
            print0("spin 0: y' are the data's 'generated' responses, scored by the opponent")
        else:
            generations = sample_generations(sampler, model, prompts, settings, cfg, iteration, stop, rt.rank)
            if generations is None:
                return None
        given = pairs_from_data(data.eval_examples, data.stop) if from_data else None
        eval_pairs = rescore(model, given, settings) if given is not None else []
        if given is None and data.eval_examples:  # another seed, and never compiled
            eval_pairs = rollout(sampler, data.eval_examples, replace(settings, seed=cfg.seed + 1, compile=False),
                                 iteration, scorer=model)
        mixed = previous_generations(model, cfg, iteration, len(prompts), settings)
        made = IterationPairs(generations + mixed, len(prompts), len(generations) // len(prompts), eval_pairs,
                              opponent_eval_logprobs(model, data.eval_examples, data.pad_id, cfg.max_len,
                                                     cfg.kl_opponent_mb, rt.autocast, rt.device))
    if rt.rank == 0:
        write_iteration(ckpt.iteration_dir(cfg.out_dir, iteration), made, data.tok, data.template)
    barrier(rt.world_size)
    dt = time.time() - t0
    stats = rollout_stats_of(generations)
    print0(f"spin {iteration}: rollout of {len(generations)} generations in {dt:.1f}s "
           f"({stats['gen_len_mean'] * len(generations) / dt:.0f} tokens/s), mean length "
           f"{stats['gen_len_mean']:.1f}, EOS reached {stats['eos_rate']:.0%}; {len(made.pairs)} training pairs")
    write_metrics(metrics_file, {"iteration": iteration, "phase": "spin", "step": global_step, "rollout_seconds": dt,
                                 **stats})
    return made


def reuse_rollouts(checkpoint: str, cfg: TrainConfig, iteration: int, rollouts_sha: str | None, data: RunData,
                   rank: int) -> IterationPairs:
    """A mid-iteration resume trains on the iteration's pairs as its checkpoint saved them."""
    iter_dir = ckpt.iteration_dir(cfg.out_dir, iteration)
    saved = ckpt.restore_rollouts(checkpoint, iter_dir, rollouts_sha, rank)
    pairs = read_rollouts(saved)
    eval_file = os.path.join(iter_dir, "eval_rollouts.jsonl")
    eval_pairs = read_rollouts(eval_file) if data.eval_examples and os.path.isfile(eval_file) else []
    opponent_file = os.path.join(iter_dir, "opponent_eval.safetensors")
    opponent_eval = load_file(opponent_file) if data.eval_examples and os.path.isfile(opponent_file) else None
    if opponent_eval and len(opponent_eval["logprobs"]) != sum(len(e.real_ids) for e in data.eval_examples):
        opponent_eval = None  # kept for other held-out examples (eval_samples changed): no eval/kl_opponent
    print0(f"spin {iteration}: reusing the iteration's {len(pairs)} rollouts from {saved}")
    own = len(prompts_for_iteration(data.train_examples, cfg, iteration))
    blocks = len(pairs) // own - min(cfg.mix_previous_rollouts, iteration)  # what is not mixed in is its own
    return IterationPairs(pairs, own, blocks, eval_pairs, opponent_eval)


def rollout_stats_of(generations: list[Pair]) -> dict[str, float]:
    """The opponent's generations (never those mixed in): their length in tokens (mean; median and 90th
    percentile, interpolated linearly between order statistics; longest), the share that reached a stop
    token, and the share equal to the real response token for token: pairs with y' = y, whose SPIN
    gradient is zero (both log-prob differences are the same function of θ)."""
    lengths = torch.tensor([float(len(p.generated_ids)) for p in generations])
    return {"gen_len_mean": sum(len(p.generated_ids) for p in generations) / len(generations),
            "gen_len_p50": torch.quantile(lengths, 0.5).item(), "gen_len_p90": torch.quantile(lengths, 0.9).item(),
            "gen_len_max": lengths.max().item(), "eos_rate": sum(p.eos for p in generations) / len(generations),
            "dynamics/identical_frac": sum(p.generated_ids == p.real_ids for p in generations) / len(generations)}


# ------------------------------------------------------------------------------------------------
# a training step


def phase_steps(cfg: TrainConfig, kind: str, iteration: int, order: BatchOrder, history: list[dict]) -> int:
    """Optimizer steps in the phase: sft_steps; max_epochs over a SPIN iteration's pairs; and for
    continued SFT exactly as many as the SPIN iteration it is compared with."""
    if kind == "spin":
        total = cfg.max_epochs * order.batches_per_epoch()
    elif kind == "sft":
        total = cfg.sft_steps
    else:
        total = next(h["steps"] for h in history if h["phase"] == "spin" and h["iteration"] == iteration)
    if total <= 0:
        raise UserError(f"{phase_name(kind, iteration)} has no steps: {order.n} examples do not fill one global "
                        f"batch of {order.global_batch_size}; lower batch_size or grad_accum")
    return total


def fresh_optimizer(cfg: TrainConfig, kind: str, iteration: int) -> bool:
    """Whether a phase starts with a new optimizer: every phase, or with optimizer_per_iteration=False
    only SFT and the first SPIN and continued-SFT iterations (the later ones keep its moments)."""
    return cfg.optimizer_per_iteration or kind == "sft" or iteration == 0


def schedule_span(cfg: TrainConfig, kind: str, iteration: int, total_steps: int, examples: list[Example],
                  global_batch: int) -> tuple[int, int]:
    """(the steps of the lr schedule before this phase's first, the schedule's length): the phase alone;
    with optimizer_per_iteration=False the SPIN iterations one after another (and the continued-SFT
    iterations, as long as SPIN's), over what every iteration's pairs will be."""
    if cfg.optimizer_per_iteration or kind == "sft":
        return 0, total_steps
    steps = [cfg.max_epochs * (spin_pairs_per_epoch(cfg, examples, t) // global_batch)
             for t in range(cfg.max_iterations)]
    if steps[iteration] != total_steps:
        raise RuntimeError(f"{phase_name(kind, iteration)} has {total_steps} steps, its schedule {steps[iteration]}")
    return sum(steps[:iteration]), sum(steps)


def spin_micro_batch(model: GPT, batch: list[Pair], beta: float, cfg: TrainConfig, pad_id: int,
                     device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(summed loss, summed metrics with the pair count, tokens run through the model) of a micro-batch of SPIN
    pairs: a packed pair runs its prompt once, an unpacked pair twice."""
    losses, metrics = pair_terms(model, batch, beta, cfg.loss_type, pad_id, device, cfg.pack_pairs, cfg.nll_weight)
    sums = {name: values.sum() for name, values in metrics.items()}
    sums["pairs"] = torch.tensor(float(len(batch)), device=device)
    prompt_runs = 1 if cfg.pack_pairs else 2
    tokens = sum(len(p.real_ids) + len(p.generated_ids) + prompt_runs * len(p.prompt_ids) for p in batch)
    return losses.sum(), sums, tokens


def sft_micro_batch(model: GPT, batch: list[Example], pad_id: int, device: torch.device,
                    pack: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(summed negative log-likelihood of the real responses, the sums to log, tokens) of a micro-batch."""
    logps = sequence_logps(model, [e.prompt_ids for e in batch], [e.real_ids for e in batch], pad_id, device, pack)
    loss_sum = -logps.sum()
    sums = {"loss": loss_sum.detach(),
            "tokens": torch.tensor(float(sum(len(e.real_ids) for e in batch)), device=device)}
    return loss_sum, sums, sum(len(e.real_ids) + len(e.prompt_ids) for e in batch)


def forward_backward(model: GPT, kind: str, indices: list[int], pairs: list[Pair], data: RunData, beta: float,
                     cfg: TrainConfig, rt: Runtime) -> tuple[dict[str, torch.Tensor], int]:
    """The gradients of one optimizer step from this rank's share of its global batch, in micro-batches
    of batch_size. Returns this rank's sums to log and the tokens it processed."""
    micro_batches = [indices[i:i + cfg.batch_size] for i in range(0, len(indices), cfg.batch_size)]
    # the loss is normalised by the global count of its units in the step: pairs for SPIN, tokens for SFT
    local_units = len(indices) if kind == "spin" else sum(len(data.train_examples[i].real_ids) for i in indices)
    units = all_reduce_sum(torch.tensor([float(local_units)]), rt.world_size).item()
    sums, tokens = {}, 0
    for k, micro in enumerate(micro_batches):
        if rt.fsdp:  # reduce the gradients once, after the last micro-batch
            model.set_requires_gradient_sync(k == len(micro_batches) - 1)
        with rt.autocast:
            if kind == "spin":
                loss_sum, micro_sums, micro_tokens = spin_micro_batch(model, [pairs[i] for i in micro], beta, cfg,
                                                                      data.pad_id, rt.device)
            else:
                loss_sum, micro_sums, micro_tokens = sft_micro_batch(model, [data.train_examples[i] for i in micro],
                                                                     data.pad_id, rt.device, cfg.pack_pairs)
        # FSDP averages gradients over ranks; scale so the update is the global mean
        (loss_sum * rt.world_size / units).backward()
        sums, tokens = add_sums(sums, micro_sums), tokens + micro_tokens
    return sums, tokens


def clip_gradients(model: GPT, grad_clip: float) -> torch.Tensor:
    """Clip the gradients' global norm to grad_clip (0: no clipping); the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP


def check_finite(loss_sum: torch.Tensor, grad_norm: torch.Tensor, name: str, state: ckpt.RunState, total_steps: int,
                 out_dir: str, bar: tqdm) -> None:
    """A NaN/Inf loss or gradient stops the run before the optimizer step, naming the last good checkpoint."""
    if torch.isfinite(loss_sum) and torch.isfinite(grad_norm):
        return
    last = ckpt.list_checkpoints(out_dir)
    bar.close()  # the error then gets a line of its own, not the tail of the progress bar's
    # steps are named 1-based, as metrics.jsonl and the checkpoints count them
    raise UserError(f"{name}, step {state.step + 1} of {total_steps} (global step {state.global_step + 1}): "
                    f"loss or gradient is NaN/Inf (loss sum {loss_sum.item()}, grad norm {grad_norm.item()}); the "
                    f"last good checkpoint is {last[-1] if last else 'none'}; lower the learning rate")


def step_metrics(kind: str, sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """The logged means of the summed step metrics: per pair for SPIN, per response token for SFT."""
    if kind == "spin":
        return spin_metrics(sums)
    return {"loss": sums["loss"].item() / sums["tokens"].item()}


# ------------------------------------------------------------------------------------------------
# evaluation and the end of a phase


def held_out_of(spin_data: IterationPairs | None) -> tuple[list[Pair], dict | None]:
    """The iteration's held-out pairs and the opponent's kept log-probs (none outside SPIN)."""
    return ([], None) if spin_data is None else (spin_data.eval_pairs, spin_data.opponent_eval)


def export_dtype(cfg: TrainConfig, source: ckpt.ModelSource) -> torch.dtype:
    """The dtype of out_dir/final's weights: export_dtype, or for 'auto' the one the model came in."""
    if cfg.export_dtype == "auto":
        return source.dtype
    return DTYPES[cfg.export_dtype]


def export_models(cfg: TrainConfig, rank: int, model: GPT, data: RunData, kind: str,
                  later_phases: list[tuple[str, int]]) -> None:
    """After SFT, the SFT model for the continued-SFT baseline (out_dir/sft, in fp32: the baseline starts from
    exactly the weights SPIN started from); after the last SFT or SPIN phase, the run's product (out_dir/final,
    in export_dtype): a baseline only compares against it. Both keep the source's config.json and files."""
    if kind == "sft" and cfg.baseline_sft:
        ckpt.export_model(os.path.join(cfg.out_dir, "sft"), model, model.config, data.tok, data.template, rank,
                          source=data.source)
    if kind != "baseline" and all(k == "baseline" for k, _ in later_phases):
        ckpt.export_model(os.path.join(cfg.out_dir, "final"), model, model.config, data.tok, data.template, rank,
                          dtype=export_dtype(cfg, data.source), source=data.source)
        print0(f"exported the final model to {cfg.out_dir}/final (python generate.py --model={cfg.out_dir}/final)")


# ------------------------------------------------------------------------------------------------
# the run


def main(argv: list[str]) -> None:
    """The run: config, distributed init, out_dir and resume, data, model, the phases, the summary."""
    # ---- config ----------------------------------------------------------------------------------
    cfg = load_config(TrainConfig, argv)
    check_config(cfg)
    phases = phases_of(cfg)

    # ---- distributed init and device -------------------------------------------------------------
    rt = init_runtime(cfg.device, cfg.dtype)
    print0(f"nanospin: world size {rt.world_size}, device {rt.device.type}, "
           f"compute dtype {str(rt.compute_dtype).removeprefix('torch.')}")

    # ---- out_dir and resume ----------------------------------------------------------------------
    fingerprint = ckpt.config_fingerprint(cfg, rt.world_size)
    resume_from = ckpt.prepare_out_dir(cfg.out_dir, cfg.resume, cfg.allow_config_change, fingerprint)
    print0(config_to_json(cfg))

    # ---- tokenizer and data ----------------------------------------------------------------------
    data = prepare_data(cfg)

    # ---- model and optimizer ---------------------------------------------------------------------
    model = build_model(cfg, data.tok, data.template)
    print0(f"model: {model.config.model_type}, {model.num_params() / 1e6:.2f}M non-embedding parameters, "
           f"{model.config.n_layer} layers, {model.config.n_embd} wide")
    print_memory_plan(model.config, cfg, rt)
    place_model(model, rt, cfg.activation_checkpointing, cfg.compile)
    optimizer = make_optimizer(model, cfg, cfg.sft_lr)  # every step sets its own lr; each phase makes a new one
    state = ckpt.start_or_resume(cfg.out_dir, resume_from, model, optimizer, fingerprint, rt.rank)
    if resume_from:
        print0(f"resumed from {resume_from}: phase {state.phase}, step {state.step}")
    metrics_file = open_metrics(cfg.out_dir, rt.rank, state.global_step if resume_from else None)
    stop = catch_stop_signals(rt.world_size)
    held = HeldOut(data.eval_examples, data.tok, data.template, data.stop, data.pad_id, cfg.rollout_batch_size,
                   cfg.max_new_tokens, cfg.max_len, cfg.seed, cfg.pack_pairs, cfg.loss_type, data.has_checker)  # SIGTERM/SIGINT: save and stop at the next step boundary

    # ---- the phases ------------------------------------------------------------------------------
    t_run = time.time()
    while state.phase < len(phases):
        kind, iteration = phases[state.phase]
        name = phase_name(kind, iteration)
        starting = state.step == 0
        beta, max_lr = per_iteration(cfg.beta, iteration), phase_lr(cfg, kind, iteration)
        if kind == "baseline" and iteration == 0 and starting:
            load_sft_weights(model, os.path.join(cfg.out_dir, "sft"))  # continued SFT starts from the SFT model

        # -- the phase's data: real responses (SFT) or the iteration's rollout pairs (SPIN) --
        spin_data, rollouts_path, rollout_stats, pairs = None, None, {}, []
        if kind == "spin":
            rollouts_path = os.path.join(ckpt.iteration_dir(cfg.out_dir, iteration), "rollouts.jsonl")
            if starting:
                if fresh_optimizer(cfg, kind, iteration):  # a new one follows the rollout: its moments need not
                    optimizer.state.clear()  # sit beside the sampler
                spin_data = run_rollout(model, cfg, rt, data, iteration, stop, metrics_file, state.global_step)
                if spin_data is None:
                    print0(f"stopped by {stop.signal} during rollout {iteration}; the last checkpoint stays valid: "
                           f"run the same command to resume (this rollout is regenerated)")
                    return
            else:
                spin_data = reuse_rollouts(resume_from, cfg, iteration, state.rollouts_sha, data, rt.rank)
            rollout_stats = rollout_stats_of(own_generations(spin_data))
        order = BatchOrder(n=len(epoch_pairs(spin_data, 0)) if kind == "spin" else len(data.train_examples),
                           batch_size=cfg.batch_size * cfg.grad_accum, rank=rt.rank, world_size=rt.world_size,
                           seed=cfg.seed + 1000 * state.phase)
        total_steps = phase_steps(cfg, kind, iteration, order, state.history)
        schedule_start, schedule_steps = schedule_span(cfg, kind, iteration, total_steps, data.train_examples,
                                                       order.global_batch_size)
        if starting:
            if fresh_optimizer(cfg, kind, iteration):
                optimizer = make_optimizer(model, cfg, max_lr)
            state.rollouts_sha = ckpt.file_sha(rollouts_path) if rollouts_path else None
        elif state.order is not None:
            order.load_state_dict(state.order)

        # -- the steps --
        model.train()
        bar = progress_bar(total_steps, name, rt.rank, initial=state.step)
        sums, tokens, t_log = {}, 0, time.time()
        while state.step < total_steps:
            lr = get_lr(schedule_start + state.step, schedule_steps, max_lr, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            indices = order.next_batch()  # this rank's share of the global batch: batch_size * grad_accum
            if kind == "spin":  # the epoch's pairs: its own rollout with regenerate_per_epoch
                pairs = epoch_pairs(spin_data, order.epoch)
            step_sums, step_tokens = forward_backward(model, kind, indices, pairs, data, beta, cfg, rt)
            grad_norm = clip_gradients(model, cfg.grad_clip)
            step_sums = all_reduce_sums(step_sums, rt.world_size)
            check_finite(step_sums["loss"], grad_norm, name, state, total_steps, cfg.out_dir, bar)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.global_step += 1
            bar.update(1)
            sums, tokens = add_sums(sums, step_sums), tokens + step_tokens
            last_step = state.step == total_steps
            if state.step % cfg.log_interval == 0 or last_step:
                dt = time.time() - t_log
                tokens_per_sec = all_reduce_sum(torch.tensor([float(tokens)]), rt.world_size).item() / dt
                record = {"iteration": iteration, "phase": kind, "epoch": order.epoch, "step": state.global_step,
                          "lr": lr, "grad_norm": grad_norm.item(), "tokens_per_sec": tokens_per_sec,
                          **step_metrics(kind, sums), **rollout_stats, **mfu(tokens_per_sec, model, cfg.max_len, rt)}
                write_metrics(metrics_file, record)
                show_progress(bar, name, state.step, total_steps, record)
                sums, tokens, t_log = {}, 0, time.time()
            if cfg.eval_interval and state.step % cfg.eval_interval == 0 and not last_step:
                results = evaluate(model, rt, held, beta, *held_out_of(spin_data))
                write_metrics(metrics_file, {"iteration": iteration, "phase": kind, "step": state.global_step,
                                             **results})
            stopping = stop.requested()
            if not last_step and (stopping or cfg.save_interval and state.global_step % cfg.save_interval == 0):
                save(cfg, rt.rank, model, optimizer, replace(state, order=order.state_dict()), data, rollouts_path)
            if stopping and not last_step:
                print0(f"stopped by {stop.signal} at {name}, step {state.step}; checkpoint saved: "
                       f"run the same command to resume")
                return
        bar.close()

        # -- end of phase: evaluate, export, checkpoint at the boundary --
        results = evaluate(model, rt, held, beta, *held_out_of(spin_data))
        write_metrics(metrics_file, {"iteration": iteration, "phase": kind, "step": state.global_step,
                                     "event": "phase_end", **results})
        state.history.append({"phase": kind, "iteration": iteration, "step": state.global_step, "steps": total_steps,
                              **results})
        print0(headline(name, state.global_step, results))
        export_models(cfg, rt.rank, model, data, kind, phases[state.phase + 1:])
        state = replace(state, phase=state.phase + 1, step=0, order=None, rollouts_sha=None)
        save(cfg, rt.rank, model, optimizer, state, data, None)
        if stop.requested():
            print0(f"stopped by {stop.signal} after {name}; run the same command to resume")
            return

    # ---- summary ---------------------------------------------------------------------------------
    print0(summary_table(state.history))
    print0(f"total time {time.time() - t_run:.0f}s")
    if metrics_file is not None:
        metrics_file.close()
        if cfg.plot:
            write_plot(cfg.out_dir)
    close_runtime(rt)


def write_plot(out_dir: str) -> None:
    """out_dir/metrics.png (plot.py) when matplotlib is importable; it is not a dependency, so without it one
    line says how to get the picture. The run is done by now: a plot that fails is reported, not raised."""
    if importlib.util.find_spec("matplotlib") is None:
        print(f"plot: pip install matplotlib, then python plot.py {out_dir}")
        return
    try:
        print(f"plot: {plot_runs([out_dir], os.path.join(out_dir, 'metrics.png'))}")
    except Exception as e:  # noqa: BLE001 - the weights and metrics are written; the picture is a convenience
        print(f"plot: not written ({type(e).__name__}: {e}); try python plot.py {out_dir}")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
