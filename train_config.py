"""The settings of a train.py run: TrainConfig with every key and its default, the checks the types cannot make,
and what the settings decide before anything runs: the run's phases, the lr schedule, the optimizer.

Design choices:
- A config file (config/*.py, bare assignments) and --key=value overrides set the fields (configurator.py);
  `check_config` then refuses bad values with one line naming the key, before any data or model is loaded.
  A renamed key keeps working under its former name, with a one-line message (`load_train_config`).
- train.py runs the settings; seeds.py and the benchmarks read them here, so none of them imports train.py.
- `phases_of` names the run's phases as metrics.jsonl does ('sft', then 'spin' t, then 'baseline' t): train.py
  runs them in this order and seeds.py knows from it when a run is finished.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace

import torch

from configurator import UserError, load_config
from fsdp import DTYPES, print0
from generate import sampling_of
from model import ATTENTION_IMPLS, SCRATCH_MODEL_TYPES
from spin import LOSSES
from templates import chat_format


@dataclass
class TrainConfig:
    """Every setting of a run, with its default; a config file and --key=value overrides change them."""
    # --- I/O -------------------------------------------------------------------------------------
    out_dir: str = "out"
    init_from: str = "scratch"  # 'scratch', a Hugging Face model directory, or a nanospin checkpoint/out_dir
    # 'auto': continue from out_dir's latest checkpoint (none yet: start at step 0); True: the same, but a checkpoint
    # must exist; False: refuse a non-empty out_dir; 'restart': delete what a run wrote there, then start at step 0
    resume: bool | str = "auto"
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
    # several sequences to a row: SFT examples, and SPIN pairs with the prompt run once for both responses, for
    # training, the opponent's scoring and evaluation alike; False: a padded row per sequence (the reference)
    pack_sequences: bool = True
    pack_pairs: bool | None = None  # pack_sequences' former name: still read, with a one-line deprecation message
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
    loss_type: str = "sigmoid"  # 'sigmoid' | 'hinge' | 'ipo' (spin.LOSSES)
    lr: float | list[float] = 5e-7  # SPIN's peak learning rate: a float, or one per iteration (the last repeats)
    # --- rollout -----------------------------------------------------------------------------------
    rollout_batch_size: int = 64
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None  # keep tokens at least min_p times as likely as the most likely one (after top-p)
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
    # how sampled held-out answers are scored: 'auto' (the synthetic task's own checker for train_data='synthetic',
    # none otherwise) | 'synthetic' | 'final_number' (the answer's last number equals the real answer's) | 'none'
    checker: str = "auto"
    # memory for the opponent's next-token distributions on the held-out real responses (eval/kl_opponent):
    # exact when they fit, else each position's top-k that fit plus the rest of the mass; 0 = no eval/kl_opponent
    kl_opponent_mb: float = 64.0
    log_interval: int = 10
    save_interval: int = 0  # steps between mid-iteration checkpoints (0 = only at phase ends)
    keep_checkpoints: int = 2
    plot: bool = True  # out_dir/metrics.png at the end of the run (plot.py), when matplotlib is installed
    # --- distributed ---------------------------------------------------------------------------
    activation_checkpointing: bool = False


def load_train_config(argv: list[str]) -> TrainConfig:
    """The config of a run from a config file and --key=value overrides (configurator.load_config), a former key
    name moved to its new one with a one-line message, then checked."""
    cfg = load_config(TrainConfig, argv)
    if cfg.pack_pairs is not None:
        print0("warning: config key 'pack_pairs' is now 'pack_sequences' (it packs SFT examples too); "
               "the old name still works", file=sys.stderr)
        cfg = replace(cfg, pack_sequences=cfg.pack_pairs, pack_pairs=None)
    check_config(cfg)
    return cfg


def checker_of(cfg: TrainConfig) -> str:
    """'auto' resolved: the synthetic task has its own checker; other data is scored only when asked."""
    if cfg.checker == "auto":
        return "synthetic" if cfg.train_data == "synthetic" else "none"
    return cfg.checker


def check_config(cfg: TrainConfig) -> None:
    """Values the type system cannot catch, as one-line errors naming the key."""
    sampling_of(cfg)  # temperature, top_k, top_p, min_p: a bad one fails here, naming its key
    choices = {"stage": ("sft", "spin", "sft+spin"), "loss_type": tuple(LOSSES),
               "optimizer": ("adamw", "rmsprop"), "lr_schedule": ("linear", "cosine", "constant"),
               "device": ("auto", "cpu", "cuda"), "dtype": ("auto", *DTYPES), "export_dtype": ("auto", *DTYPES),
               "attention": ATTENTION_IMPLS, "model_type": SCRATCH_MODEL_TYPES,
               "checker": ("auto", "synthetic", "final_number", "none")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f"config key '{key}' is {getattr(cfg, key)!r}; use one of {allowed}")
    if cfg.resume not in ("auto", True, False, "restart"):
        raise UserError(f"config key 'resume' is {cfg.resume!r}; use 'auto', True, False or 'restart'")
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
    if any(beta <= 0 for beta in (cfg.beta if isinstance(cfg.beta, list) else [cfg.beta])):
        raise UserError(f"config key 'beta' must be > 0 (each entry of a list), got {cfg.beta}")
    if cfg.baseline_sft and cfg.stage != "sft+spin":
        raise UserError("baseline_sft=True needs stage='sft+spin' (it continues SFT from the SFT model)")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device='cuda' but no CUDA GPU is visible; use --device=cpu")
    for key in ("mix_previous_rollouts", "nll_weight", "kl_opponent_mb"):
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
    if cfg.checker == "synthetic" and cfg.train_data != "synthetic":
        raise UserError(f"checker='synthetic' scores the synthetic task only, not train_data='{cfg.train_data}'; "
                        "use checker='final_number' or 'none'")
    return phases


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


def export_dtype(cfg: TrainConfig, source_dtype: torch.dtype) -> torch.dtype:
    """The dtype of out_dir/final's weights: export_dtype, or for 'auto' the one the model came in."""
    return source_dtype if cfg.export_dtype == "auto" else DTYPES[cfg.export_dtype]


def make_optimizer(model, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW (or the paper's RMSprop) over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    # no decay on norms, biases and embeddings' single vectors: the usual nanoGPT split by dimension
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2))
