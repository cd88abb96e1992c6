"""memory_plan.py: parameter counts equal the model's, the activation count equals what autograd saves, the KV
cache equals the sampler's buffers, per-rank sharding and the sampling copy follow train.py, and the warning
names what to change. bench/memory.py checks the whole plan against a run's measured memory."""

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from memory_plan import (GIB, MemoryPlan, activation_bytes, block_params, describe_plan, kv_cache_bytes,
                         layer_activation_bytes, logits_slice_bytes, plan_memory, plan_warning, root_params,
                         total_params)
from model import GPT, GPTConfig

T = 24  # a sequence length no weight dimension below equals: saved tensors with it are activations

CONFIGS = {
    "llama-gqa": dict(model_type="llama", n_head=8, n_kv_head=2, n_embd=64, tie_embeddings=False),
    "llama-tied": dict(model_type="llama", n_head=4, n_kv_head=4, n_embd=64, tie_embeddings=True),
    "qwen2-biases": dict(model_type="qwen2", n_head=4, n_kv_head=2, n_embd=64, qkv_bias=True, tie_embeddings=False),
    "llama-all-biases": dict(model_type="llama", n_head=4, n_kv_head=2, n_embd=64, attn_out_bias=True, mlp_bias=True),
    "gpt2": dict(model_type="gpt2", n_head=4, n_kv_head=4, n_embd=64, tie_embeddings=True),
}


def config(name: str, n_layer: int = 2) -> GPTConfig:
    return GPTConfig(vocab_size=300, block_size=64, n_layer=n_layer, **CONFIGS[name])


@pytest.mark.parametrize("name", CONFIGS)
def test_parameter_counts_equal_the_models(name):
    cfg = config(name)
    with torch.device("meta"):
        model = GPT(cfg)
    assert total_params(cfg) == sum(p.numel() for p in model.parameters())
    assert block_params(cfg) == sum(p.numel() for p in model.blocks[0].parameters())
    assert root_params(cfg) == total_params(cfg) - cfg.n_layer * block_params(cfg)


def saved_activation_bytes(cfg: GPTConfig, batch: int, precision: str, checkpointing: bool = False) -> int:
    """Bytes autograd keeps for the backward of token_logprobs over (batch, T): tensors with a T dimension
    (weights and their autocast casts have none), each storage once."""
    torch.manual_seed(0)
    model = GPT(cfg)
    if precision == "bf16 weights":  # as FSDP's mixed-precision policy computes
        model.to(torch.bfloat16)
    if checkpointing:
        for i, block in enumerate(model.blocks):
            model.blocks[i] = checkpoint_wrapper(block)
    seen = {}

    def pack(t):
        if T in t.shape or batch * T in t.shape:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    idx = torch.randint(0, cfg.vocab_size, (batch, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16 autocast"):
            model.token_logprobs(idx, idx).sum().backward()
    return sum(seen.values())


PRECISIONS = {"fp32": (4, 4), "bf16 autocast": (2, 4), "bf16 weights": (2, 2)}  # (compute, residual) bytes


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-biases", "gpt2"])
def test_layer_activations_are_what_autograd_saves(name, precision):
    """One more block adds exactly the estimate, in fp32, under bf16 autocast and with bf16 weights."""
    compute, residual = PRECISIONS[precision]
    per_layer = (saved_activation_bytes(config(name, 2), 2, precision)
                 - saved_activation_bytes(config(name, 1), 2, precision)) / (2 * T)
    assert per_layer == pytest.approx(layer_activation_bytes(config(name), compute, residual), rel=0.01)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_of_a_micro_batch(checkpointing):
    """The whole micro-batch: what autograd saves, plus (with checkpointing) one block recomputed at a time and
    the log-prob kernel's logits slice, neither of which autograd saves."""
    cfg = config("llama-gqa", 3)
    tokens = 2 * T
    transient = logits_slice_bytes(tokens, cfg.vocab_size)
    if checkpointing:
        transient += tokens * layer_activation_bytes(cfg, 4, 4)
    saved = saved_activation_bytes(cfg, 2, "fp32", checkpointing)
    assert saved == pytest.approx(activation_bytes(cfg, tokens, 4, 4, checkpointing) - transient, rel=0.05)
    assert activation_bytes(cfg, tokens, 4, 4, True) < activation_bytes(cfg, tokens, 4, 4, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_estimate_is_the_samplers_buffers(dtype):
    cfg = config("llama-gqa")
    model = GPT(cfg).to(dtype)
    model.setup_kv_cache(batch_size=5, max_len=40)
    allocated = sum(c.k.nbytes + c.v.nbytes for c in model.kv_caches)
    assert allocated == kv_cache_bytes(cfg, 5, 40, dtype.itemsize)


def plan(cfg, world_size=1, fsdp=False, on_gpu=False, dtype=torch.float32, checkpointing=False):
    return plan_memory(cfg, world_size, fsdp, on_gpu, dtype, "adamw", train_sequences=16, max_len=512,
                       rollout_batch_size=64, activation_checkpointing=checkpointing)


def test_plan_shards_by_world_size_and_follows_the_rollouts_sampler():
    cfg = config("llama-gqa", 4)
    n = total_params(cfg)
    one_cpu = plan(cfg)
    assert (one_cpu.params, one_cpu.grads, one_cpu.optimizer) == (4 * n, 4 * n, 8 * n)
    assert one_cpu.rollout_weights == 0 and one_cpu.step_weights == 0  # samples with itself; fp32, no casts
    assert one_cpu.kv_cache == kv_cache_bytes(cfg, 64, 512, 4)
    one_gpu = plan(cfg, on_gpu=True, dtype=torch.bfloat16)
    assert one_gpu.rollout_weights == 2 * n and one_gpu.kv_cache == kv_cache_bytes(cfg, 64, 512, 2)  # a bf16 copy
    assert one_gpu.step_weights == 2 * cfg.n_layer * block_params(cfg)  # autocast's cached casts
    fsdp = plan(cfg, world_size=4, fsdp=True, on_gpu=True, dtype=torch.bfloat16)
    assert (fsdp.params, fsdp.grads, fsdp.optimizer) == (n, n, 2 * n)
    assert fsdp.rollout_weights == 2 * n  # one unsharded bf16 copy per rank, never the fp32 weights
    assert fsdp.step_weights == 2 * (root_params(cfg) + 2 * block_params(cfg))
    assert fsdp.rollout == fsdp.params + fsdp.rollout_weights + fsdp.kv_cache + fsdp.rollout_forward
    assert fsdp.training == fsdp.params + fsdp.grads + fsdp.optimizer + fsdp.step_weights + fsdp.activations
    assert plan(cfg, checkpointing=True).activations < one_cpu.activations


def test_the_plan_depends_on_max_len_not_the_models_context():
    short, long = (GPTConfig(vocab_size=300, block_size=b, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
                   for b in (512, 32768))
    assert plan(short) == plan(long)


def test_a_plan_that_does_not_fit_names_what_to_change():
    fits = MemoryPlan(params=GIB, grads=GIB, optimizer=2 * GIB, step_weights=0, activations=4 * GIB,
                      rollout_weights=GIB, kv_cache=GIB, rollout_forward=GIB)
    assert plan_warning(fits, 80 * GIB, 1, False) is None
    training = plan_warning(fits, 8 * GIB, 2, False)
    assert training.startswith("warning: this run needs about 8.00 GiB per rank")
    assert "activation_checkpointing=True" in training and "more ranks" in training
    assert "rollout_batch_size" not in training and "\n" not in training
    assert "lower batch_size" in plan_warning(fits, 8 * GIB, 2, True)
    rollout = plan_warning(MemoryPlan(GIB, 0, 0, 0, 0, GIB, 20 * GIB, GIB), 16 * GIB, 1, False)
    assert "rollout_batch_size (KV cache 20.00 GiB" in rollout and "activation_checkpointing" not in rollout
    lines = describe_plan(fits, 2, 64, 512, False, 80 * GIB)
    assert "= 8.00 GiB of the GPU's 80.00 GiB" in lines[1] and "(64 x 512 tokens)" in lines[2]
