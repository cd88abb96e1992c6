"""Checkpoints: everything a run needs to resume exactly, written so a kill never corrupts one.

Design choices:
- A checkpoint is a directory `out_dir/checkpoints/step_XXXXXXXX/` holding
    model/          full weights as a Hugging Face directory (safetensors) + tokenizer + nanospin.json,
                    so any checkpoint also works with generate.py and transformers;
    optimizer/      the optimizer state through torch.distributed.checkpoint, sharded per rank and
                    loadable at another world size;
    state.json      loop position (phase, step, data order), RNG states, the resolved config;
    rollouts.jsonl  the current iteration's pairs, so a mid-iteration resume never regenerates.
- It is written under a temporary name and renamed when complete; older ones are deleted only
  after that, so the previous checkpoint stays valid until the new one is whole.
- Never unpickles: weights are safetensors, RNG states are JSON, the optimizer is torch.distributed.checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from configurator import UserError
from model import (GPTConfig, gpt_config_to_hf_config, hf_config_to_gpt_config, hf_state_to_nanospin,
                   nanospin_state_to_hf, read_hf_config, read_safetensors_dir, save_hf_dir)

CHECKPOINTS = "checkpoints"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def full_model_state(model, every_rank: bool = False) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights, a collective under FSDP: on rank 0 only, offloaded to the CPU
    tensor by tensor (for saving), or on every rank, on the model's device (for a rollout copy)."""
    if every_rank:
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_model_dir(path: str, state: dict[str, torch.Tensor], cfg: GPTConfig, tokenizer, chat_template: str,
                   dtype: torch.dtype | None = None) -> None:
    """A Hugging Face model directory with nanospin's tokenizer and chat template beside it."""
    hf_state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous()
                for k, v in nanospin_state_to_hf(state, cfg).items()}
    save_hf_dir(path, gpt_config_to_hf_config(cfg, dtype or next(iter(hf_state.values())).dtype), hf_state,
                max_shard_bytes=4 << 30)
    tokenizer.save(path)
    with open(os.path.join(path, "nanospin.json"), "w") as f:
        json.dump({"chat_template": chat_template, "tokenizer": tokenizer.name}, f, indent=2)


def export_model(path: str, model, cfg: GPTConfig, tokenizer, chat_template: str, rank: int) -> None:
    """Rank 0 writes the full weights to `path` atomically (temporary directory, then rename)."""
    state = full_model_state(model)
    if rank == 0:
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model_dir(tmp, state, cfg, tokenizer, chat_template)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    _barrier()


def rng_state() -> dict:
    """Every random generator's state as JSON-able lists (checkpoints never hold pickles)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_checkpoint(out_dir: str, step: int, model, optimizer, state: dict, cfg: GPTConfig, tokenizer,
                    chat_template: str, rollouts_path: str | None, rank: int, keep: int = 2) -> str:
    """Write checkpoint `step` (all ranks call this) and return its path."""
    root = os.path.join(out_dir, CHECKPOINTS)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = os.path.join(root, f"tmp-step_{step:08d}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    weights = full_model_state(model)
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=os.path.join(tmp, "optimizer"))
    if rank == 0:
        save_model_dir(os.path.join(tmp, "model"), weights, cfg, tokenizer, chat_template)
        if rollouts_path is not None:
            shutil.copyfile(rollouts_path, os.path.join(tmp, "rollouts.jsonl"))
        with open(os.path.join(tmp, "state.json"), "w") as f:  # written last: its presence marks a whole checkpoint
            json.dump({**state, "rng": rng_state()}, f)
        if os.path.exists(final):  # the same step saved again (a resumed run that saves at the same place)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def list_checkpoints(out_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (a temporary directory left by a kill is not one)."""
    root = os.path.join(out_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step_"))
    return [os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n, "state.json"))]


def read_state(path: str) -> dict:
    file = os.path.join(path, "state.json")
    try:
        return json.load(open(file))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint state '{file}' is unreadable ({e}); delete that checkpoint directory to "
                        f"resume from the one before it") from None


def load_checkpoint(path: str, model, optimizer, cfg: GPTConfig) -> dict:
    """Load weights, optimizer and RNG into the (possibly FSDP-sharded) model; return state.json."""
    state = read_state(path)
    model_dir = os.path.join(path, "model")
    if not os.path.isdir(model_dir):
        raise UserError(f"checkpoint '{path}' has no model/ directory; it is incomplete, delete it to resume "
                        f"from the one before it")
    saved = hf_config_to_gpt_config(read_hf_config(model_dir), where=os.path.join(model_dir, "config.json"))
    shape_keys = ("model_type", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size")
    differ = [k for k in shape_keys if getattr(saved, k) != getattr(cfg, k)]
    if differ:
        raise UserError(f"checkpoint '{model_dir}' holds a model with "
                        f"{', '.join(f'{k}={getattr(saved, k)}' for k in differ)} but this run's config has "
                        f"{', '.join(f'{k}={getattr(cfg, k)}' for k in differ)}; resume with the checkpoint's "
                        f"model settings or use another out_dir")
    weights = hf_state_to_nanospin(read_safetensors_dir(model_dir), cfg, model_dir)
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    load_optimizer(path, model, optimizer)
    if "rng" in state:
        set_rng_state(state["rng"])
    return state


def load_optimizer(path: str, model, optimizer) -> None:
    optim_dir = os.path.join(path, "optimizer")
    if not os.path.isdir(optim_dir):
        raise UserError(f"checkpoint '{path}' has no optimizer/ directory; it is incomplete, delete it to resume "
                        f"from the one before it")
    optim_state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    try:
        dcp.load(optim_state, checkpoint_id=optim_dir)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        # its first line only names the failing ranks; the cause is on the last
        cause = [line for line in str(e).splitlines() if line.strip()][-1:] or [type(e).__name__]
        raise UserError(f"cannot read the optimizer state in '{optim_dir}' ({cause[0][:200]}); delete that "
                        f"checkpoint directory to resume from the one before it") from None
    set_optimizer_state_dict(model, optimizer, optim_state["optimizer"])
