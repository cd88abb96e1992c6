"""The per-rank memory plan train.py prints before it starts: what a run holds, phase by phase.

Design choices:
- Pure functions of the model's GPTConfig and the run's settings, in bytes per rank, so a researcher
  knows before launching whether a run fits, and which knob to turn when it does not.
- Two phases peak separately. Training holds the fp32 master weights, fp32 gradients, the optimizer
  state (all three sharded by world size under FSDP), the compute-dtype weights a step gathers (FSDP:
  the root and two blocks; autocast: its cached casts of every block's weights) and one micro-batch's
  activations. A rollout holds the master weights, one compute-dtype copy of the weights to sample
  with (none where the model samples itself), the KV cache of rollout_batch_size x max_len tokens, and
  the temporaries of its largest forward: the scoring's, in quarters of its 2 x rollout_batch_size
  sequences (SCORING_CHUNKS; the prefill runs one prompt at a time); gradients and optimizer state
  are freed first.
- Activations count what autograd saves per token and layer, as measured on nanospin's blocks
  (tests/test_memory_plan.py checks the count against the saved tensors); activation checkpointing
  keeps one block input per layer and recomputes one block at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model import GPTConfig
from spin import SCORING_CHUNKS
from spin_kernels.logprob import default_slice_bytes

GIB = 1 << 30
OPTIMIZER_STATES = {"adamw": 2, "rmsprop": 1}  # fp32 tensors per parameter: AdamW's two moments, RMSprop's square
FIT_FRACTION = 0.9  # of the GPU's memory; the rest goes to the CUDA context and the allocator's fragmentation


def block_params(cfg: GPTConfig) -> int:
    """Parameters of one transformer block."""
    C, D, I = cfg.n_embd, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.n_head * D, cfg.n_kv_head * D
    attention = C * (q + 2 * kv) + q * C
    attention += (q + 2 * kv) * (cfg.is_gpt2 or cfg.qkv_bias) + C * (cfg.is_gpt2 or cfg.attn_out_bias)
    if cfg.is_gpt2:
        return attention + 2 * C * I + I + C + 4 * C  # MLP up/down with biases, two LayerNorms with biases
    return attention + 3 * C * I + (2 * I + C) * cfg.mlp_bias + 2 * C  # SwiGLU gate/up/down, two RMSNorms


def root_params(cfg: GPTConfig) -> int:
    """Parameters outside the blocks: embeddings, final norm, head (once when tied)."""
    C = cfg.n_embd
    n = cfg.vocab_size * C * (1 if cfg.tie_embeddings else 2)
    if cfg.is_gpt2:
        return n + cfg.block_size * C + 2 * C
    return n + C


def total_params(cfg: GPTConfig) -> int:
    return cfg.n_layer * block_params(cfg) + root_params(cfg)


def norm_input_bytes(cfg: GPTConfig, residual_bytes: int) -> int:
    """Bytes a norm keeps per token of its input: LayerNorm the input (and mean, rstd); RMSNorm the input
    in fp32 (a copy unless it is fp32 already), its rsqrt and the normalised input."""
    if cfg.is_gpt2:
        return cfg.n_embd * residual_bytes + 8
    return 4 * cfg.n_embd + cfg.n_embd * residual_bytes + 4


def layer_activation_bytes(cfg: GPTConfig, compute_bytes: int, residual_bytes: int) -> int:
    """Bytes autograd saves per token in one block. The residual stream and the norms run in residual_bytes
    (fp32 under autocast with fp32 weights); when that differs from compute_bytes every linear layer saves a
    cast copy of its input (q/k/v; then gate and up each their own), else the norm's output is that input."""
    C, D, I, H, K = cfg.n_embd, cfg.head_dim, cfg.intermediate_size, cfg.n_head, cfg.n_kv_head
    e, r = compute_bytes, residual_bytes
    cast = r != e
    mlp_inputs = 1 if cfg.is_gpt2 else 2  # up (GPT-2); gate and up (SwiGLU)
    norm1 = norm_input_bytes(cfg, r) + C * (e if cast else r)
    norm2 = norm_input_bytes(cfg, r) + C * (mlp_inputs * e if cast else r)
    attention = (H + 2 * K) * D * e + H * D * e + 4 * H  # q/k/v, attention output, log-sum-exp
    if cfg.is_gpt2:
        return norm1 + norm2 + attention + 2 * I * e  # MLP up and GELU output
    rope = (H + K) * D * e  # the rotated q and k
    return norm1 + norm2 + attention + rope + 4 * I * e  # SwiGLU gate, up, silu(gate), product


def logits_slice_bytes(tokens: int, vocab_size: int) -> int:
    """The fused log-prob's logits of one vocabulary slice (spin_kernels/logprob.py), fp32 (never more than all)."""
    return min(tokens * vocab_size * 4, default_slice_bytes(tokens, vocab_size, 4))


def activation_bytes(cfg: GPTConfig, tokens: int, compute_bytes: int, residual_bytes: int,
                     checkpointing: bool) -> int:
    """What one micro-batch of `tokens` keeps for the backward, plus one logits slice. With activation
    checkpointing each block keeps its input and one block's activations exist at a time."""
    layer = layer_activation_bytes(cfg, compute_bytes, residual_bytes)
    # the final norm and the head's input; RoPE's cos and sin
    outside = norm_input_bytes(cfg, residual_bytes) + cfg.n_embd * residual_bytes + 2 * cfg.head_dim * residual_bytes
    per_token = outside + (cfg.n_layer * cfg.n_embd * residual_bytes + layer if checkpointing else cfg.n_layer * layer)
    return tokens * per_token + logits_slice_bytes(tokens, cfg.vocab_size)


def kv_cache_bytes(cfg: GPTConfig, batch_size: int, max_len: int, cache_bytes: int) -> int:
    """The sampler's static cache: k and v per layer, (batch, n_kv_head, max_len, head_dim)."""
    return 2 * cfg.n_layer * batch_size * cfg.n_kv_head * max_len * cfg.head_dim * cache_bytes


def forward_bytes(cfg: GPTConfig, tokens: int, compute_bytes: int, residual_bytes: int) -> int:
    """The largest temporaries of a forward without grad over `tokens`: one block's MLP (three intermediate
    tensors alive at once) beside the residual stream, plus one logits slice."""
    per_token = 3 * cfg.intermediate_size * compute_bytes + 3 * cfg.n_embd * residual_bytes
    return tokens * per_token + logits_slice_bytes(tokens, cfg.vocab_size)


@dataclass
class MemoryPlan:
    """Bytes per rank, by what holds them."""
    params: int  # fp32 master weights (this rank's shard)
    grads: int  # fp32 gradients (shard)
    optimizer: int  # optimizer state (shard)
    step_weights: int  # compute-dtype weights a training step holds besides the master weights
    activations: int  # one micro-batch's, saved for the backward
    rollout_weights: int  # the compute-dtype copy the rollout samples with (0: the model samples itself)
    kv_cache: int  # rollout_batch_size x max_len tokens
    rollout_forward: int  # a scoring forward: 2 x rollout_batch_size / SCORING_CHUNKS sequences of max_len

    @property
    def training(self) -> int:
        return self.params + self.grads + self.optimizer + self.step_weights + self.activations

    @property
    def rollout(self) -> int:
        return self.params + self.rollout_weights + self.kv_cache + self.rollout_forward


def plan_memory(cfg: GPTConfig, world_size: int, fsdp: bool, on_gpu: bool, compute_dtype: torch.dtype,
                optimizer: str, train_sequences: int, max_len: int, rollout_batch_size: int,
                activation_checkpointing: bool) -> MemoryPlan:
    """The plan of a run: train_sequences per micro-batch (SPIN: 2 x batch_size), sequences up to max_len.
    Mirrors train.py: FSDP casts the weights to the compute dtype (all activations in it); one process
    runs fp32 weights under autocast (fp32 residual stream, cached casts of the blocks' weights); a
    rollout samples with the unsharded FSDP weights, with a compute-dtype copy on one GPU when the
    compute dtype is not fp32, else with the model itself (whose KV cache is then fp32)."""
    e = compute_dtype.itemsize
    n = total_params(cfg)
    shard = n / world_size if fsdp else n
    if fsdp:  # every weight cast by the mixed-precision policy; the root stays gathered through a step
        residual = e
        step_weights = (root_params(cfg) + 2 * block_params(cfg)) * e
        rollout_weights, cache = n * e, e
    else:  # fp32 weights: autocast caches its casts of the blocks' weights for the step
        residual = 4
        step_weights = cfg.n_layer * block_params(cfg) * e if e != 4 else 0
        copy = on_gpu and e != 4
        rollout_weights, cache = (n * e, e) if copy else (0, 4)
    return MemoryPlan(
        params=round(4 * shard), grads=round(4 * shard), optimizer=round(4 * shard * OPTIMIZER_STATES[optimizer]),
        step_weights=step_weights,
        activations=activation_bytes(cfg, train_sequences * max_len, e, residual, activation_checkpointing),
        rollout_weights=rollout_weights, kv_cache=kv_cache_bytes(cfg, rollout_batch_size, max_len, cache),
        rollout_forward=forward_bytes(cfg, max(1, 2 * rollout_batch_size // SCORING_CHUNKS) * max_len, e, residual))


def size(n: float) -> str:
    """Bytes for people: GiB from 1 GiB up, else MiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / (1 << 20):.1f} MiB"


def describe_plan(plan: MemoryPlan, world_size: int, rollout_batch_size: int, max_len: int,
                  activation_checkpointing: bool, device_bytes: int | None) -> list[str]:
    """The lines train.py prints: every term, then each phase's total (against the GPU's memory, if any)."""
    against = f" of the GPU's {size(device_bytes)}" if device_bytes else ""
    return [f"memory plan per rank (world size {world_size}):",
            f"  training: master weights {size(plan.params)} + gradients {size(plan.grads)} + optimizer state "
            f"{size(plan.optimizer)} + gathered/cast weights {size(plan.step_weights)} + activations "
            f"{size(plan.activations)} (activation_checkpointing={activation_checkpointing}) = "
            f"{size(plan.training)}{against}",
            f"  rollout: master weights {size(plan.params)} + sampling copy {size(plan.rollout_weights)} + KV cache "
            f"{size(plan.kv_cache)} ({rollout_batch_size} x {max_len} tokens) + forward {size(plan.rollout_forward)}"
            f" = {size(plan.rollout)}{against}"]


def plan_warning(plan: MemoryPlan, device_bytes: int, world_size: int, activation_checkpointing: bool) -> str | None:
    """One line when the plan's peak exceeds FIT_FRACTION of the GPU's memory, naming what to change; None
    when it fits."""
    budget = FIT_FRACTION * device_bytes
    peak = max(plan.training, plan.rollout)
    if peak <= budget:
        return None
    fixes = []
    if plan.rollout > budget:
        fixes.append(f"lower rollout_batch_size (KV cache {size(plan.kv_cache)}, forward {size(plan.rollout_forward)})")
    if plan.training > budget:
        if activation_checkpointing:
            fixes.append(f"lower batch_size (activations {size(plan.activations)})")
        else:
            fixes.append(f"set activation_checkpointing=True (activations {size(plan.activations)})")
        sharded = plan.params + plan.grads + plan.optimizer
        fixes.append(f"use more ranks (weights, gradients and optimizer state, {size(sharded)} per rank at "
                     f"world size {world_size}, shrink with it)")
    return (f"warning: this run needs about {size(peak)} per rank but only {size(budget)} of the GPU's "
            f"{size(device_bytes)} are usable; " + "; or ".join(fixes))
