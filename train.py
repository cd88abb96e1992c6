"""Train: SFT and SPIN iterations, on one CPU, one GPU, or many under torchrun + FSDP2.

    python train.py config/quick.py [--key=value ...]
    torchrun --standalone --nproc_per_node=8 train.py config/zephyr_7b.py

Design choices:
- A run is a fixed list of phases, derived from the config: 'sft' (supervised fine-tuning on the
  real responses), then 'spin' iterations t = 0..max_iterations-1, then optionally 'baseline'
  iterations (continued SFT from the SFT model for the same number of steps, for an honest
  comparison). Each SPIN iteration starts with a rollout by the opponent (the model as it stands
  then) and a fresh optimizer and learning-rate schedule, like the official SPIN code.
- Resuming is running the same command again: the latest checkpoint names the phase and step; a
  resume mid-iteration reuses that iteration's rollouts, a resume at an iteration boundary
  regenerates them with the new opponent.
- Losses are normalised by the global count (tokens for SFT, pairs for SPIN) of the whole optimizer
  step, so any micro-batch size, grad_accum and world size give the same update.
- Under torchrun every block and the root are wrapped with FSDP2's fully_shard; the rollout uses a
  plain model built from the gathered weights once per rollout, never a per-token all-gather.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from configurator import UserError, config_to_json, load_config, run_main
from model import ATTENTION_IMPLS, SCRATCH_MODEL_TYPES


@dataclass
class TrainConfig:
    # --- I/O -------------------------------------------------------------------------------------
    out_dir: str = "out"
    init_from: str = "scratch"  # 'scratch', a Hugging Face model directory, or a nanospin checkpoint/out_dir
    resume: bool | str = "auto"  # 'auto': continue from out_dir's latest checkpoint; False: refuse a non-empty out_dir
    allow_config_change: bool = False  # resume an out_dir whose saved config differs from this one
    tokenizer: str = "auto"  # 'auto' (the model directory's, or 'bytes' from scratch), 'bytes', 'gpt2', a path...
    chat_template: str = "auto"  # 'auto' (from the model directory, else 'chatml'), 'chatml', 'llama3', 'zephyr', 'plain'
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
    compile: bool = False  # torch.compile the training forward/backward and the decode step (GPU)
    attention: str = "sdpa"  # 'sdpa' | 'triton'
    # --- model, when init_from='scratch' ---------------------------------------------------------
    model_type: str = "llama"  # 'gpt2' | 'llama' (the block style; see model.py)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 128
    block_size: int = 512  # context length; 0 = keep a pretrained model's
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
    mix_previous_rollouts: bool = False  # also train on iteration t-1's generations (the official repository)
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
    log_interval: int = 10
    save_interval: int = 0  # steps between mid-iteration checkpoints (0 = only at phase ends)
    keep_checkpoints: int = 2
    # --- distributed ---------------------------------------------------------------------------
    activation_checkpointing: bool = False


# ------------------------------------------------------------------------------------------------
# small helpers


def print0(*args, **kwargs) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


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


def check_config(cfg: TrainConfig) -> None:
    """Values the type system cannot catch, as one-line errors naming the key."""
    choices = {"stage": ("sft", "spin", "sft+spin"), "loss_type": ("sigmoid", "hinge"), "optimizer": ("adamw", "rmsprop"),
               "lr_schedule": ("linear", "cosine", "constant"), "device": ("auto", "cpu", "cuda"),
               "dtype": ("auto", "float32", "bfloat16", "float16"), "attention": ATTENTION_IMPLS,
               "model_type": SCRATCH_MODEL_TYPES}
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
    if cfg.max_prompt_len >= cfg.max_len:
        raise UserError(f"max_prompt_len={cfg.max_prompt_len} must be < max_len={cfg.max_len}")
    for key in ("beta", "lr"):
        if isinstance(getattr(cfg, key), list) and not getattr(cfg, key):
            raise UserError(f"config key '{key}' is an empty list; give a float or one value per iteration")
    if cfg.baseline_sft and cfg.stage != "sft+spin":
        raise UserError("baseline_sft=True needs stage='sft+spin' (it continues SFT from the SFT model)")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device='cuda' but no CUDA GPU is visible; use --device=cpu")
    if cfg.temperature < 0:
        raise UserError(f"config key 'temperature' must be >= 0, got {cfg.temperature}")


def config_fingerprint(cfg: TrainConfig, world_size: int) -> dict:
    """The settings a resumed run must share with the run that wrote the checkpoint. The batch counts
    as its global size, so a run may resume at another world size or micro-batch split."""
    ignore = {"out_dir", "resume", "allow_config_change", "log_interval", "eval_interval", "save_interval",
              "keep_checkpoints", "compile", "device", "batch_size", "grad_accum"}
    fingerprint = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ignore}
    fingerprint["global_batch"] = cfg.batch_size * cfg.grad_accum * world_size
    return fingerprint


def phases_of(cfg: TrainConfig) -> list[tuple[str, int]]:
    phases = [("sft", 0)] if cfg.stage in ("sft", "sft+spin") else []
    if cfg.stage in ("spin", "sft+spin"):
        phases += [("spin", t) for t in range(cfg.max_iterations)]
    if cfg.baseline_sft:
        phases += [("baseline", t) for t in range(cfg.max_iterations)]
    return phases


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU, for MFU; None where unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12), ("L40S", 362e12),
                       ("A10", 125e12), ("4090", 165e12)):
        if key in name:
            return flops
    return None


def init_distributed() -> tuple[int, int, int]:
    """(rank, local_rank, world_size); a process group only when launched by torchrun."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return rank, local_rank, world


def all_reduce_sum(values: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def apply_fsdp(model, param_dtype: torch.dtype, activation_checkpointing: bool, compile: bool) -> None:
    """FSDP2: shard each transformer block, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for i, block in enumerate(model.blocks):
        if activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
            block = checkpoint_wrapper(block)
        if compile:
            block = torch.compile(block)
        model.blocks[i] = block
        # the last block's parameters are needed again at once by the backward: keep them gathered
        fully_shard(block, mp_policy=mp, reshard_after_forward=i < len(model.blocks) - 1)
    fully_shard(model, mp_policy=mp)
    register_fsdp_forward_method(model, "token_logprobs")  # the training forward, besides forward()


def make_optimizer(model, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # no decay on norms, biases and embeddings' single vectors: the usual nanoGPT split by dimension
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2))


def file_sha(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# model and data setup


def build_model(cfg: TrainConfig, vocab_size: int, eos_id: int):
    """A GPT on the CPU in fp32 (master weights), from scratch or a Hugging Face/nanospin directory."""
    from checkpoint import load_pretrained, resolve_model_dir
    from model import GPT, GPTConfig
    if cfg.init_from == "scratch":
        if cfg.block_size < cfg.max_len:
            raise UserError(f"block_size={cfg.block_size} is smaller than max_len={cfg.max_len}; raise block_size")
        torch.manual_seed(cfg.seed)
        gpt_cfg = GPTConfig(model_type=cfg.model_type, vocab_size=vocab_size,
                            block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_kv_head=cfg.n_kv_head,
                            n_embd=cfg.n_embd, attention=cfg.attention, eos_token_id=eos_id)
        return GPT(gpt_cfg)
    model = load_pretrained(resolve_model_dir(cfg.init_from), attention=cfg.attention,
                            block_size=cfg.block_size or None)
    if model.config.vocab_size < vocab_size:
        raise UserError(f"the tokenizer has {vocab_size} tokens but the model in '{cfg.init_from}' only "
                        f"{model.config.vocab_size}; use the model's own tokenizer (tokenizer='auto')")
    if model.config.block_size < cfg.max_len:
        raise UserError(f"max_len={cfg.max_len} exceeds the model's context ({model.config.block_size}); lower max_len")
    return model


def load_data(cfg: TrainConfig, tok, template: str):
    """(train examples, val examples, whether the synthetic checker applies)."""
    from data import examples_from_messages, load_examples, synthetic_split
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
# the run


def main(argv: list[str]) -> None:
    # ---- config ---------------------------------------------------------------------------------
    cfg = load_config(TrainConfig, argv)
    check_config(cfg)

    # ---- distributed init and device --------------------------------------------------------------
    rank, local_rank, world = init_distributed()
    device = torch.device(f"cuda:{local_rank}" if cfg.device in ("auto", "cuda") and torch.cuda.is_available()
                          else "cpu")
    compute_dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
                     "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    use_fsdp = world > 1
    # single process: fp32 master weights under autocast; FSDP: its mixed-precision policy instead
    autocast = (torch.autocast(device.type, dtype=compute_dtype)
                if compute_dtype != torch.float32 and not use_fsdp else nullcontext())
    print0(f"nanospin: world size {world}, device {device.type}, compute dtype {str(compute_dtype)[6:]}")

    # ---- out_dir and resume -----------------------------------------------------------------------
    import checkpoint as ckpt
    checkpoints = ckpt.list_checkpoints(cfg.out_dir)
    saved_config = os.path.join(cfg.out_dir, "config.json")
    if os.path.isdir(cfg.out_dir) and os.listdir(cfg.out_dir):
        if cfg.resume is False:
            raise UserError(f"out_dir '{cfg.out_dir}' is not empty and resume=False; pick a new --out_dir or "
                            f"pass --resume=auto to continue it")
        if os.path.isfile(saved_config) and not cfg.allow_config_change:
            old = json.load(open(saved_config))
            new = json.loads(json.dumps(config_fingerprint(cfg, world)))
            diff = sorted(k for k in new if old.get(k) != new[k])
            if diff:
                raise UserError(f"out_dir '{cfg.out_dir}' holds a run with a different config (keys: "
                                f"{', '.join(diff[:5])}); use another --out_dir or pass --allow_config_change=True")
    if cfg.resume is True and not checkpoints:
        raise UserError(f"resume=True but out_dir '{cfg.out_dir}' has no checkpoint; use resume='auto' to start fresh")
    resume_from = checkpoints[-1] if checkpoints and cfg.resume else None
    print0(config_to_json(cfg))

    # ---- tokenizer and data -----------------------------------------------------------------------
    from data import BatchOrder, check_answer, load_tokenizer, stop_ids, strip_stop
    model_dir = None if cfg.init_from == "scratch" else ckpt.resolve_model_dir(cfg.init_from)
    tok_name = cfg.tokenizer if cfg.tokenizer != "auto" else (model_dir or "bytes")
    tok = load_tokenizer(tok_name)
    template = cfg.chat_template
    if template == "auto":
        template = (model_dir and ckpt.read_chat_template(model_dir)) or tok.chat_template or "chatml"
    train_examples, val_examples, has_checker = load_data(cfg, tok, template)
    stop = stop_ids(tok, template)
    pad_id = tok.eos_id

    # ---- model and optimizer ----------------------------------------------------------------------
    model = build_model(cfg, tok.n_vocab, tok.eos_id)
    gpt_cfg = model.config
    print0(f"model: {gpt_cfg.model_type}, {model.num_params() / 1e6:.2f}M non-embedding parameters, "
           f"{gpt_cfg.n_layer} layers, {gpt_cfg.n_embd} wide")
    model.to(device)
    if use_fsdp:
        apply_fsdp(model, compute_dtype, cfg.activation_checkpointing, cfg.compile and device.type == "cuda")
    elif cfg.compile and device.type == "cuda":
        for block in model.blocks:  # per block, as under FSDP: model.compile() would cover forward() only
            block.compile()
    phases = phases_of(cfg)
    if not phases:
        raise UserError("nothing to run: stage='spin' with max_iterations=0")

    state = {"phase": 0, "step": 0, "global_step": 0, "order": None, "rollouts_sha": None, "history": []}
    optimizer = make_optimizer(model, cfg, cfg.sft_lr)  # every step sets its own lr (cfg.lr may be a list)
    if resume_from:
        state = ckpt.load_checkpoint(resume_from, model, optimizer, gpt_cfg)
        print0(f"resumed from {resume_from}: phase {state['phase']}, step {state['step']}")
    elif rank == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(saved_config, "w") as f:
            json.dump(config_fingerprint(cfg, world), f, indent=2)
    if world > 1:
        dist.barrier()

    # ---- signals: save and stop at the next step boundary -------------------------------------
    stop_requested = {"signal": None}

    def on_signal(signum, frame):
        stop_requested["signal"] = signal.Signals(signum).name

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def should_stop() -> bool:
        flag = torch.tensor([1.0 if stop_requested["signal"] else 0.0])
        return bool(all_reduce_sum(flag, world).item() > 0)

    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if resume_from and rank == 0 and os.path.isfile(metrics_path):
        # the steps after the checkpoint are run again: drop their first records so each step logs once
        # (and a line cut short by a kill)
        kept = []
        for line in open(metrics_path):
            try:
                if json.loads(line).get("step", 0) <= state["global_step"]:
                    kept.append(line)
            except json.JSONDecodeError:
                pass
        with open(metrics_path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(metrics_path + ".tmp", metrics_path)
    metrics_file = open(metrics_path, "a") if rank == 0 else None

    def log(record: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def rollout_model():
        """The opponent for sampling: on the CPU the model itself; on a GPU or under FSDP a plain copy
        in the compute dtype, built from the gathered weights once per rollout and dropped after it."""
        if not use_fsdp and device.type == "cpu":
            return model
        weights = ckpt.full_model_state(model, every_rank=True)
        return ckpt.model_from_state(gpt_cfg, weights, device, compute_dtype).eval()

    def save(phase_state: dict, rollouts_path: str | None) -> str:
        phase_state = {**phase_state, "config": dataclasses.asdict(cfg)}  # the resolved config travels with it
        path = ckpt.save_checkpoint(cfg.out_dir, state["global_step"], model, optimizer, phase_state, gpt_cfg, tok,
                                    template, rollouts_path, rank, cfg.keep_checkpoints)
        print0(f"saved checkpoint {path}")
        return path

    # ---- evaluation ---------------------------------------------------------------------------
    from spin import pair_terms, per_iteration, read_rollouts, rescore, rollout, sequence_logps, write_rollouts
    eval_examples = val_examples[: cfg.eval_samples]

    def evaluate(eval_pairs, beta) -> dict:
        """Held-out NLL of real responses; SPIN loss and reward accuracy on held-out pairs; the checker."""
        from generate import generate
        model.eval()
        out = {}
        if eval_examples:
            nll, ntok = torch.zeros(2)
            with torch.no_grad(), autocast:
                for i in range(0, len(eval_examples), cfg.rollout_batch_size):
                    batch = eval_examples[i:i + cfg.rollout_batch_size]
                    logps = sequence_logps(model, [e.prompt_ids for e in batch], [e.real_ids for e in batch], pad_id,
                                           device)
                    nll -= logps.sum().cpu()
                    ntok += sum(len(e.real_ids) for e in batch)
            out["eval/nll"] = (nll / ntok).item()
        if eval_pairs:
            sums = torch.zeros(3)
            with torch.no_grad(), autocast:
                for i in range(0, len(eval_pairs), cfg.rollout_batch_size):
                    batch = eval_pairs[i:i + cfg.rollout_batch_size]
                    losses, rr, rg, _, _ = pair_terms(model, batch, beta, cfg.loss_type, pad_id, device)
                    sums += torch.stack([losses.sum(), (rr > rg).float().sum(), (rr - rg).sum()]).cpu()
            out.update({"eval/spin_loss": sums[0].item() / len(eval_pairs),
                        "eval/reward_accuracy": sums[1].item() / len(eval_pairs),
                        "eval/reward_margin": sums[2].item() / len(eval_pairs)})
        if has_checker and eval_examples:
            gen_model = rollout_model()
            prompts = [e.prompt_ids for e in eval_examples]
            for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):
                answers = []
                with autocast:
                    for i in range(0, len(prompts), cfg.rollout_batch_size):
                        answers += generate(gen_model, prompts[i:i + cfg.rollout_batch_size], cfg.max_new_tokens,
                                            temperature=temperature, eos_id=stop, seed=cfg.seed + 17 + i)
                scores: dict[str, float] = {}
                for e, ids in zip(eval_examples, answers):
                    prompt_text = e.prompt_messages[-1]["content"]
                    for key, value in check_answer(prompt_text, tok.decode(strip_stop(tok, ids, template))).items():
                        scores[key] = scores.get(key, 0.0) + value
                out.update({f"eval/{key}_{name}": v / len(answers) for key, v in scores.items()})
                out[f"eval/exact_{name}"] = sum(strip_stop(tok, ids, template) == strip_stop(tok, e.real_ids, template)
                                                for e, ids in zip(eval_examples, answers)) / len(answers)
            del gen_model
        model.train()
        return out

    # ---- the phases ---------------------------------------------------------------------------
    t_run = time.time()
    while state["phase"] < len(phases):
        kind, iteration = phases[state["phase"]]
        name = f"{kind} {iteration}" if kind != "sft" else "sft"
        starting = state["step"] == 0
        beta = per_iteration(cfg.beta, iteration)
        max_lr = per_iteration(cfg.lr, iteration) if kind == "spin" else cfg.sft_lr
        if kind == "baseline" and cfg.baseline_lr:
            max_lr = cfg.baseline_lr
        rollouts_path = None
        eval_pairs = []
        rollout_stats = {}

        if kind == "baseline" and iteration == 0 and starting:
            # continued SFT starts from the SFT model, not from the SPIN result
            ckpt.load_weights(model, os.path.join(cfg.out_dir, "sft"))

        # -- the iteration's data: real responses (SFT) or rollout pairs (SPIN) --
        if kind == "spin":
            iter_dir = os.path.join(cfg.out_dir, f"iter_{iteration}")
            rollouts_path = os.path.join(iter_dir, "rollouts.jsonl")
            if not starting:
                saved = os.path.join(resume_from, "rollouts.jsonl")
                if not os.path.isfile(saved) or file_sha(saved) != state.get("rollouts_sha"):
                    raise UserError(f"the rollouts in checkpoint '{resume_from}' are missing or do not match its "
                                    f"state.json; delete that checkpoint to resume from the one before it")
                if rank == 0:  # the iteration's canonical file, as the checkpoint saw it
                    shutil.copyfile(saved, rollouts_path + ".tmp")
                    os.replace(rollouts_path + ".tmp", rollouts_path)
                pairs = read_rollouts(saved)
                eval_file = os.path.join(iter_dir, "eval_rollouts.jsonl")
                eval_pairs = read_rollouts(eval_file) if eval_examples and os.path.isfile(eval_file) else []
                rollout_stats = rollout_stats_of(pairs)
                print0(f"{name}: reusing the iteration's {len(pairs)} rollouts from {saved}")
            else:
                subset = train_examples
                if cfg.prompts_per_iteration:
                    g = torch.Generator().manual_seed(cfg.seed + 101 * iteration)
                    perm = torch.randperm(len(train_examples), generator=g)[: cfg.prompts_per_iteration]
                    subset = [train_examples[i] for i in perm.tolist()]
                opponent = rollout_model()
                opponent.eval()
                t0 = time.time()
                bar = tqdm(total=len(subset), desc=f"rollout {iteration}", disable=rank != 0, leave=False)
                pairs = rollout(opponent, subset, cfg.max_new_tokens, cfg.max_len, stop, pad_id,
                                cfg.rollout_batch_size, cfg.seed, iteration, device, rank, world, cfg.temperature,
                                cfg.top_k, cfg.top_p, cfg.compile and device.type == "cuda", autocast=autocast,
                                progress=lambda n: bar.update(min(n, bar.total - bar.n)), should_stop=should_stop)
                bar.close()
                if pairs is None:
                    print0(f"stopped by {stop_requested['signal']} during rollout {iteration}; the last checkpoint "
                           f"stays valid: run the same command to resume (this rollout is regenerated)")
                    return
                if eval_examples:
                    eval_pairs = rollout(opponent, eval_examples, cfg.max_new_tokens, cfg.max_len, stop, pad_id,
                                         cfg.rollout_batch_size, cfg.seed + 1, iteration, device, rank, world,
                                         cfg.temperature, cfg.top_k, cfg.top_p, autocast=autocast)
                if cfg.mix_previous_rollouts and iteration > 0:
                    previous = read_rollouts(os.path.join(cfg.out_dir, f"iter_{iteration - 1}", "rollouts.jsonl"))
                    # that file starts with iteration t-1's own generations (as many as here); what follows
                    # them is t-2's, which iteration t does not train on
                    previous = previous[:len(pairs)]
                    pairs = pairs + rescore(opponent, previous, pad_id, cfg.rollout_batch_size, device,
                                            rank, world, autocast)
                del opponent
                rollout_stats = rollout_stats_of(pairs)
                if rank == 0:
                    write_rollouts(rollouts_path, pairs, tok.decode)
                    if eval_pairs:
                        write_rollouts(os.path.join(iter_dir, "eval_rollouts.jsonl"), eval_pairs, tok.decode)
                if world > 1:
                    dist.barrier()
                dt = time.time() - t0
                gen_tokens = rollout_stats["gen_len_mean"] * len(pairs)
                print0(f"{name}: rollout of {len(pairs)} prompts in {dt:.1f}s ({gen_tokens / dt:.0f} tokens/s), "
                       f"mean length {rollout_stats['gen_len_mean']:.1f}, EOS reached {rollout_stats['eos_rate']:.0%}")
                log({"iteration": iteration, "phase": kind, "step": state["global_step"], "rollout_seconds": dt,
                     **rollout_stats})
        data_size = len(pairs) if kind == "spin" else len(train_examples)

        # -- the steps --
        order = BatchOrder(n=data_size, batch_size=cfg.batch_size * cfg.grad_accum, rank=rank, world_size=world,
                           seed=cfg.seed + 1000 * state["phase"])
        if kind == "spin":
            total_steps = cfg.max_epochs * order.batches_per_epoch()
        elif kind == "sft":
            total_steps = cfg.sft_steps
        else:  # continued SFT runs exactly as many steps as the SPIN iteration it is compared with
            total_steps = next(h["steps"] for h in state["history"] if h["phase"] == "spin" and h["iteration"] == iteration)
        if total_steps <= 0:
            raise UserError(f"{name} has no steps: {data_size} examples do not fill one global batch of "
                            f"{cfg.batch_size * cfg.grad_accum * world}; lower batch_size or grad_accum")
        if starting:
            optimizer = make_optimizer(model, cfg, max_lr)  # a fresh optimizer and schedule per phase
        elif state["order"] is not None:
            order.load_state_dict(state["order"])
        if starting:
            state["rollouts_sha"] = file_sha(rollouts_path) if rollouts_path else None
        model.train()
        sums, t_log, tokens_seen = None, time.time(), 0
        bar = tqdm(total=total_steps, initial=state["step"], desc=name, disable=rank != 0, leave=False)
        while state["step"] < total_steps:
            step = state["step"]
            lr = get_lr(step, total_steps, max_lr, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            indices = order.next_batch()  # this rank's share of the global batch: batch_size * grad_accum
            micro = [indices[i:i + cfg.batch_size] for i in range(0, len(indices), cfg.batch_size)]
            # the global count of loss units (tokens for SFT, pairs for SPIN) in this optimizer step
            if kind == "spin":
                units = torch.tensor([float(len(indices))])
            else:
                units = torch.tensor([float(sum(len(train_examples[i].real_ids) for i in indices))])
            units = all_reduce_sum(units, world).item()
            step_sums = torch.zeros(7, device=device)
            for k, mb in enumerate(micro):
                if use_fsdp:
                    model.set_requires_gradient_sync(k == len(micro) - 1)
                with autocast:
                    if kind == "spin":
                        batch = [pairs[i] for i in mb]
                        losses, rr, rg, real, gen = pair_terms(model, batch, beta, cfg.loss_type, pad_id, device)
                        loss_sum = losses.sum()
                        ntok = sum(len(p.real_ids) + len(p.generated_ids) + 2 * len(p.prompt_ids) for p in batch)
                        step_sums += torch.stack([loss_sum.detach(), rr.sum().detach(), rg.sum().detach(),
                                                  (rr > rg).float().sum(), real.detach().sum(), gen.detach().sum(),
                                                  torch.tensor(float(len(batch)), device=device)])
                    else:
                        batch = [train_examples[i] for i in mb]
                        logps = sequence_logps(model, [e.prompt_ids for e in batch], [e.real_ids for e in batch],
                                               pad_id, device)
                        loss_sum = -logps.sum()
                        ntok = sum(len(e.real_ids) + len(e.prompt_ids) for e in batch)
                        step_sums[0] += loss_sum.detach()
                        step_sums[6] += float(sum(len(e.real_ids) for e in batch))
                # FSDP averages gradients over ranks; scale so the update is the global mean
                (loss_sum * world / units).backward()
                tokens_seen += ntok
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0
                                                        else float("inf")))
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            step_sums = all_reduce_sum(step_sums, world)
            if not torch.isfinite(step_sums[0]) or not torch.isfinite(grad_norm):
                last = ckpt.list_checkpoints(cfg.out_dir)
                bar.close()  # the error then gets a line of its own, not the tail of the progress bar's
                # steps are named 1-based, as metrics.jsonl and the checkpoints count them
                raise UserError(f"{name}, step {step + 1} of {total_steps} (global step {state['global_step'] + 1}): "
                                f"loss or gradient is "
                                f"NaN/Inf (loss sum {step_sums[0].item()}, grad norm {grad_norm.item()}); the last "
                                f"good checkpoint is {last[-1] if last else 'none'}; lower the learning rate")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["global_step"] += 1
            bar.update(1)
            sums = step_sums if sums is None else sums + step_sums
            last_step = state["step"] == total_steps
            if state["step"] % cfg.log_interval == 0 or last_step:
                dt = time.time() - t_log
                tps = all_reduce_sum(torch.tensor([float(tokens_seen)]), world).item() / dt
                record = {"iteration": iteration, "phase": kind, "epoch": order.epoch, "step": state["global_step"],
                          "lr": lr, "grad_norm": grad_norm.item(), "tokens_per_sec": tps}
                if kind == "spin":
                    n = sums[6].item()
                    record.update({"loss": sums[0].item() / n, "rewards/real": sums[1].item() / n,
                                   "rewards/generated": sums[2].item() / n,
                                   "rewards/margins": (sums[1] - sums[2]).item() / n,
                                   "rewards/accuracies": sums[3].item() / n, "logps/real": sums[4].item() / n,
                                   "logps/generated": sums[5].item() / n, **rollout_stats})
                else:
                    record["loss"] = sums[0].item() / sums[6].item()
                flops = peak_flops(device)
                if flops:
                    record["mfu"] = tps * model.flops_per_token(cfg.max_len) / (flops * world)
                log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                sums, t_log, tokens_seen = None, time.time(), 0
            if cfg.eval_interval and state["step"] % cfg.eval_interval == 0 and not last_step:
                log({"iteration": iteration, "phase": kind, "step": state["global_step"], **evaluate(eval_pairs, beta)})
            stopping = should_stop()
            if (cfg.save_interval and state["global_step"] % cfg.save_interval == 0 and not last_step) or \
                    (stopping and not last_step):
                save({**state, "order": order.state_dict()}, rollouts_path)
            if stopping and not last_step:
                print0(f"stopped by {stop_requested['signal']} at {name}, step {state['step']}; checkpoint saved: "
                       f"run the same command to resume")
                return
        bar.close()

        # -- end of phase: evaluate, export the SFT model, checkpoint at the boundary --
        results = evaluate(eval_pairs, beta)
        summary = {"phase": kind, "iteration": iteration, "step": state["global_step"], "steps": total_steps,
                   **results}
        log({"iteration": iteration, "phase": kind, "step": state["global_step"], "event": "phase_end", **results})
        state["history"].append(summary)
        headline = {k: v for k, v in results.items() if any(w in k for w in ("nll", "spin", "reward", "valid", "exact"))}
        print0(f"{name} done at step {state['global_step']}: " +
               ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in headline.items()))
        if kind == "sft" and cfg.baseline_sft:
            ckpt.export_model(os.path.join(cfg.out_dir, "sft"), model, gpt_cfg, tok, template, rank)
        if kind != "baseline" and all(k == "baseline" for k, _ in phases[state["phase"] + 1:]):
            # the product is the model after the last SFT/SPIN phase; a baseline only compares against it
            ckpt.export_model(os.path.join(cfg.out_dir, "final"), model, gpt_cfg, tok, template, rank)
            print0(f"exported the final model to {cfg.out_dir}/final (python generate.py --model={cfg.out_dir}/final)")
        state.update(phase=state["phase"] + 1, step=0, order=None, rollouts_sha=None)
        save(dict(state), None)
        if should_stop():
            print0(f"stopped by {stop_requested['signal']} after {name}; run the same command to resume")
            return

    # ---- summary ---------------------------------------------------------------------------------
    print0(summary_table(state["history"]))
    print0(f"total time {time.time() - t_run:.0f}s")
    if metrics_file is not None:
        metrics_file.close()
    if world > 1:
        dist.destroy_process_group()


def rollout_stats_of(pairs) -> dict:
    return {"gen_len_mean": sum(len(p.generated_ids) for p in pairs) / len(pairs),
            "eos_rate": sum(p.eos for p in pairs) / len(pairs)}


def summary_table(history: list[dict]) -> str:
    """One row per phase end: the checker's scores and the held-out SPIN metrics."""
    cols = [("eval/valid_sampled", "valid@T=1"), ("eval/valid_greedy", "valid@greedy"), ("eval/nll", "nll"),
            ("eval/reward_margin", "margin"), ("eval/reward_accuracy", "reward acc")]
    cols = [(k, label) for k, label in cols if any(k in h for h in history)]
    lines = ["| after | step | " + " | ".join(label for _, label in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for h in history:
        label = "SFT" if h["phase"] == "sft" else f"{'SPIN' if h['phase'] == 'spin' else 'cont. SFT'} iter {h['iteration']}"
        cells = [f"{h[k]:.3f}" if k in h else "" for k, _ in cols]
        lines.append(f"| {label} | {h['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
