"""Where a run computes: the process group, the device and dtype, FSDP2 sharding, and the model to sample from.

Design choices:
- A process group exists only under torchrun; one process is the plain case, never a group of one.
- Under torchrun every block and then the root are wrapped with FSDP2's fully_shard (torchtitan's recipe):
  parameters in the compute dtype, gradients reduced in fp32. One process keeps fp32 master weights under autocast.
- Sampling never gathers weights per token: `model_for_sampling` all-gathers each FSDP module once and hands out
  a plain GPT over those weights (one GPU in a lower dtype: a copy in it). Scoring always uses the model itself.
- Every rank does the same work; only rank 0 prints (`print0`) and draws progress bars (on a terminal only)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from tqdm import tqdm

from checkpoint import model_from_state
from model import GPT

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # the dtype keys' names


@dataclass
class Runtime:
    """Where this process runs: its rank of world_size, its device, and the dtype the forwards compute in."""
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    compute_dtype: torch.dtype
    fsdp: bool  # under torchrun the model is sharded with FSDP2
    autocast: AbstractContextManager  # the context every forward runs under


def init_runtime(device: str, dtype: str) -> Runtime:
    """A process group only under torchrun; dtype 'auto' is bfloat16 on a GPU, float32 on the CPU."""
    rank, local_rank, world_size = 0, 0, 1
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    torch_device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    compute_dtype = DTYPES.get(dtype, torch.bfloat16 if torch_device.type == "cuda" else torch.float32)  # or auto
    fsdp = world_size > 1
    # single process: fp32 master weights under autocast; FSDP: its mixed-precision policy instead
    autocast = (torch.autocast(torch_device.type, dtype=compute_dtype)
                if compute_dtype != torch.float32 and not fsdp else nullcontext())
    return Runtime(rank, local_rank, world_size, torch_device, compute_dtype, fsdp, autocast)


def close_runtime(rt: Runtime) -> None:
    if rt.world_size > 1:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# rank 0's output, sums over ranks, stop signals


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def progress_bar(total: int, desc: str, rank: int, initial: int = 0) -> tqdm:
    """Rank 0's tqdm bar, drawn only on a terminal: in a log file `show_progress` prints a line per logged step."""
    return tqdm(total=total, initial=initial, desc=desc, leave=False, disable=None if rank == 0 else True)


def show_progress(bar: tqdm, name: str, step: int, total_steps: int, record: dict) -> None:
    """A logged step's loss: on the bar where it is drawn, else as a line of its own."""
    if not bar.disable:
        bar.set_postfix(loss=f"{record['loss']:.4f}")
    else:
        print0(f"{name} step {step}/{total_steps}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
               f"{record['tokens_per_sec']:.0f} tokens/s")


def barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, world_size: int) -> torch.Tensor:
    """`values` summed over the ranks, in place."""
    if world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def add_sums(total: dict[str, torch.Tensor], more: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Named sums added name by name ({} is the empty total)."""
    return {name: total[name] + value if name in total else value for name, value in more.items()}


def all_reduce_sums(sums: dict[str, torch.Tensor], world_size: int) -> dict[str, torch.Tensor]:
    """Each named sum summed over the ranks, in one collective."""
    if world_size == 1:
        return sums
    return dict(zip(sums, all_reduce_sum(torch.stack(list(sums.values())), world_size)))


@dataclass
class StopRequest:
    """SIGTERM or SIGINT asks the run to save and stop at the next step boundary; it then exits 128 + the signal's
    number, as a shell reports a process the signal ended."""
    world_size: int
    signum: int = 0  # the signal this process caught; after requested(), the one any rank caught

    def requested(self) -> bool:
        """Whether any rank caught one (a collective: every rank asks at the same points)."""
        caught = torch.tensor([float(self.signum)])
        if self.world_size > 1:
            dist.all_reduce(caught, op=dist.ReduceOp.MAX)
        self.signum = int(caught.item())
        return self.signum > 0

    @property
    def signal(self) -> str:
        return signal.Signals(self.signum).name

    def exit(self, message: str) -> None:
        """Say where the run stopped, and exit 128 + the signal's number."""
        print0(message)
        sys.exit(128 + self.signum)


def catch_stop_signals(world_size: int) -> StopRequest:
    stop = StopRequest(world_size)

    def on_signal(signum, frame):
        stop.signum = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


# ------------------------------------------------------------------------------------------------
# placing and sharding the model


def place_model(model: GPT, rt: Runtime, activation_checkpointing: bool, compile: bool) -> None:
    """On the device; sharded with FSDP2 under torchrun; each block compiled on a GPU if asked."""
    compile = compile and rt.device.type == "cuda"
    if rt.fsdp:  # fully_shard moves each block to the device as it shards it: the whole model never is there
        apply_fsdp(model, rt.compute_dtype, activation_checkpointing, compile)
        return
    model.to(rt.device)
    if compile:
        for block in model.blocks:  # per block, as under FSDP: model.compile() would cover forward() only
            block.compile()


def apply_fsdp(model: GPT, param_dtype: torch.dtype, activation_checkpointing: bool, compile: bool) -> None:
    """FSDP2: shard each transformer block, then the root."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for i, block in enumerate(model.blocks):
        if activation_checkpointing:
            block = checkpoint_wrapper(block)
        if compile:
            block = torch.compile(block)
        model.blocks[i] = block
        # the last block's parameters are needed again at once by the backward: keep them gathered
        fully_shard(block, mp_policy=mp, reshard_after_forward=i < len(model.blocks) - 1)
    fully_shard(model, mp_policy=mp)
    register_fsdp_forward_method(model, "token_logprobs")  # the training forward, besides forward()


def clip_gradients(model: GPT, grad_clip: float) -> torch.Tensor:
    """Clip the gradients' global norm to grad_clip (0: no clipping); the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP


# ------------------------------------------------------------------------------------------------
# the model to sample from


@contextmanager
def model_for_sampling(model: GPT, rt: Runtime) -> Iterator[GPT]:
    """The model to sample from (`sampler_of`). On exit its KV caches go, a copy's weights go (to the meta device),
    FSDP reshards, and a GPU's allocator cache is emptied."""
    with unsharded(model) if rt.fsdp else nullcontext():
        sampler = sampler_of(model, rt)
        try:
            yield sampler
        finally:
            sampler.release_kv_caches()
            if sampler is not model and not rt.fsdp:
                sampler.to("meta")
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()


def sampler_of(model: GPT, rt: Runtime) -> GPT:
    """The model itself (CPU, or fp32); one GPU in a lower compute dtype: a copy in it; FSDP (inside `unsharded`): a
    plain GPT over the unsharded weights, no hooks, so a compiled decode step is one graph."""
    if rt.fsdp:
        params = {name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", ""): p
                  for name, p in model.named_parameters()}
        return model_from_state(model.config, params)
    if rt.device.type == "cuda" and rt.compute_dtype != torch.float32:
        return compute_dtype_copy(model, rt.device, rt.compute_dtype)
    return model


def compute_dtype_copy(model: GPT, device: torch.device, dtype: torch.dtype) -> GPT:
    """A copy of the model's weights in `dtype` on `device` (tied embeddings stay tied)."""
    params = {name: p.detach() for name, p in model.named_parameters()}  # tied weights once
    return model_from_state(model.config, params, device, dtype)


@contextmanager
def unsharded(model: GPT) -> Iterator[None]:
    """Every FSDP module's weights all-gathered once and kept through any number of forwards (no collective in them);
    on exit resharded, the blocks as apply_fsdp set them."""
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in fsdp_modules:
        module.unshard()
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for module in fsdp_modules:
            module.reshard()
        for i, block in enumerate(model.blocks):
            block.set_reshard_after_forward(i < len(model.blocks) - 1, recurse=False)


# ------------------------------------------------------------------------------------------------
# throughput


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


def mfu(tokens_per_sec: float, model: GPT, seq_len: int, rt: Runtime) -> dict[str, float]:
    """{'mfu': model FLOPs utilisation} against the GPU's peak; {} where unknown."""
    flops = peak_flops(rt.device)
    return {"mfu": tokens_per_sec * model.flops_per_token(seq_len) / (flops * rt.world_size)} if flops else {}
