"""Everything on disk: Hugging Face model directories in and out, and resumable run checkpoints.

Design choices:
- A model directory is Hugging Face's format (config.json + safetensors, sharded above 4 GiB), so what nanospin
  writes loads in transformers with identical logits, and back. Weights are never unpickled; the architecture is
  read from config.json, never guessed from a name; a model is built on the meta device and its tensors assigned.
- A model goes out as it came in (`ModelSource`): its config.json with every field kept and only the dtype
  updated, its companion files copied, the export in its own dtype; a checkpoint's model/ keeps fp32 master
  weights, so a resume is exact.
- A run checkpoint, out_dir/checkpoints/step_XXXXXXXX/, holds tensors and JSON only: model/ (a model directory),
  optimizer/ (one safetensors file per rank with each shard's place in the full tensor: any world size reads it),
  state.json (loop position, RNG, config, and the sha256 of every file a resume reads) and the iteration's
  rollouts.jsonl. It is written under a temporary name and renamed when whole; older ones go only after that.
  A disk error removes the partial directory and is one line on every rank.
- A run resumes from its latest checkpoint or stops and says why (never a quiet fallback); metrics.jsonl is
  cut to what it held at that checkpoint, so it reads as one run's records in order."""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor
# the offset of a rank's shard in the full tensor, as torch.distributed.checkpoint computes it
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from configurator import DISK_ERRNOS, UserError, disk_error
from templates import ChatFormat, chat_format, format_config, resolve_template, stop_ids
from tokenizer import Tokenizer, load_tokenizer
from model import GPT, SUPPORTED_MODEL_TYPES, GPTConfig

CHECKPOINTS = "checkpoints"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def read_json(file: str):
    """The JSON value in `file`; invalid JSON (or not text at all) is a UserError naming file:line."""
    with open(file, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{file}:{e.lineno}: invalid JSON: {e.msg}") from None
        except UnicodeDecodeError:
            raise UserError(f"{file}:1: not UTF-8 text, so not JSON") from None


# ----------------------------------------------------------------------------------------------
# Hugging Face format: config.json, tensor names, safetensors files


def read_hf_config(path: str) -> dict:
    config_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise UserError(f"model directory '{path}' does not exist; give a Hugging Face model directory "
                        f"(config.json + *.safetensors) or a nanospin checkpoint directory")
    if not os.path.isfile(config_path):
        raise UserError(f"'{path}' has no config.json; it is not a Hugging Face model directory")
    return read_json(config_path)


def _rope_settings(hf: dict, where: str) -> tuple[float, dict | None]:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or None
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type == "llama3":
        source = params if params.get("rope_type") == "llama3" else scaling
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return float(theta), {"rope_type": "llama3", **{k: source[k] for k in keys}}
    raise UserError(f"{where}: rope type '{rope_type}' is not supported (only 'default' and 'llama3')")


def _sliding_window(hf: dict, block: int, where: str) -> int | None:
    """Mistral's sliding_window, or Qwen2's when use_sliding_window is set; nanospin windows every layer or none,
    so a Qwen2 split (max_window_layers / layer_types) is refused where the window is shorter than the context."""
    window = hf.get("sliding_window")
    if hf.get("model_type") == "qwen2":
        if not hf.get("use_sliding_window", False) or window is None:
            return None
        n_layer = hf["num_hidden_layers"]
        types = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28)
                                          else "full_attention" for i in range(n_layer)]
        windowed = sum(t == "sliding_attention" for t in types)
        if windowed == 0:
            return None
        if windowed < n_layer:
            if window < block:
                raise UserError(f"{where}: sliding_window={window} applies to {windowed} of {n_layer} layers "
                                f"(max_window_layers / layer_types); nanospin windows every layer or none, so set "
                                f"block_size <= {window}")
            return None
    elif hf.get("model_type") != "mistral":
        return None
    if window is not None and (not isinstance(window, int) or window < 1):
        raise UserError(f"{where}: sliding_window={window!r} must be a positive integer or null")
    return window


def hf_config_to_gpt_config(hf: dict, attention: str = "sdpa", block_size: int | None = None,
                            where: str = "config.json") -> GPTConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"{where}: model_type '{model_type}' is not supported; nanospin loads {SUPPORTED_MODEL_TYPES}")
    required = ("vocab_size", "n_layer", "n_head", "n_embd") if model_type == "gpt2" else (
        "vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size")
    missing = [k for k in required if k not in hf]
    if missing:
        raise UserError(f"{where}: '{missing[0]}' is missing; is this a Hugging Face model's config.json?")
    common = dict(model_type=model_type, vocab_size=hf["vocab_size"], attention=attention,
                  bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))
    if model_type == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"{where}: activation_function '{hf['activation_function']}' is not supported (gelu_new)")
        n_positions = hf.get("n_positions", 1024)
        if block_size and block_size > n_positions:
            raise UserError(f"block_size={block_size} exceeds the model's n_positions={n_positions} ({where})")
        return GPTConfig(**common, block_size=n_positions, n_layer=hf["n_layer"], n_head=hf["n_head"],
                         n_kv_head=hf["n_head"], n_embd=hf["n_embd"], intermediate_size=hf.get("n_inner"),
                         norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                         tie_embeddings=hf.get("tie_word_embeddings", True))
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act '{hf['hidden_act']}' is not supported (silu)")
    max_pos = hf.get("max_position_embeddings", 2048)
    block = block_size or max_pos
    window = _sliding_window(hf, block, where)
    theta, scaling = _rope_settings(hf, where)
    n_head = hf["num_attention_heads"]
    return GPTConfig(**common, block_size=block, n_layer=hf["num_hidden_layers"], n_head=n_head,
                     n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=hf["hidden_size"],
                     head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
                     intermediate_size=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                     rope_theta=theta, rope_scaling=scaling, tie_embeddings=hf.get("tie_word_embeddings", False),
                     qkv_bias=model_type == "qwen2" or hf.get("attention_bias", False),
                     attn_out_bias=model_type != "qwen2" and hf.get("attention_bias", False),
                     mlp_bias=hf.get("mlp_bias", False), sliding_window=window)


def gpt_config_to_hf_config(cfg: GPTConfig, dtype: torch.dtype) -> dict:
    common = {"model_type": cfg.model_type, "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
              "dtype": str(dtype).removeprefix("torch."), "use_cache": True}
    if cfg.is_gpt2:
        return {**common, "architectures": ["GPT2LMHeadModel"], "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
                "n_head": cfg.n_head, "n_positions": cfg.block_size, "n_inner": cfg.intermediate_size,
                "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
                "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[cfg.model_type]
    out = {**common, "architectures": [arch], "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
           "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
           "intermediate_size": cfg.intermediate_size, "max_position_embeddings": cfg.block_size,
           "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "rope_theta": cfg.rope_theta,
           "rope_scaling": cfg.rope_scaling, "attention_dropout": 0.0}
    if cfg.model_type == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    if cfg.model_type == "qwen2":
        out.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window)
        if cfg.sliding_window is not None:
            out.update(max_window_layers=0)  # nanospin's window covers every layer
    if cfg.model_type == "mistral":
        out.update(sliding_window=cfg.sliding_window)
    return out


def safetensors_files(path: str) -> list[str]:
    """The weight files of a model directory: model.safetensors, or the shards its index names."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        names = sorted(set(read_json(index)["weight_map"].values()))
    elif os.path.isfile(single):
        names = ["model.safetensors"]
    else:
        hint = " (pickled .bin weights are never loaded; convert them to safetensors)" if any(
            f.endswith(".bin") for f in os.listdir(path)) else ""
        raise UserError(f"'{path}' has no model.safetensors or model.safetensors.index.json{hint}")
    files = [os.path.join(path, name) for name in names]
    for file in files:
        if not os.path.isfile(file):
            raise UserError(f"shard '{file}' named in model.safetensors.index.json is missing")
    return files


def read_safetensors_dir(path: str) -> dict[str, torch.Tensor]:
    state = {}
    for file in safetensors_files(path):
        try:
            state.update(load_file(file))
        except Exception as e:
            raise UserError(f"cannot read '{file}': {e}") from None
    return state


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtype(path: str) -> torch.dtype:
    """The floating dtype most of a model directory's tensors have, from the headers; float32 when there is none."""
    counts: Counter = Counter()
    for file in safetensors_files(path):
        try:
            with safe_open(file, "pt") as f:
                counts.update(f.get_slice(name).get_dtype() for name in f.keys())
        except Exception as e:
            raise UserError(f"cannot read '{file}': {e}") from None
    counts = Counter({_SAFETENSORS_DTYPES[k]: n for k, n in counts.items() if k in _SAFETENSORS_DTYPES})
    return counts.most_common(1)[0][0] if counts else torch.float32


def save_hf_dir(path: str, hf_config: dict, state: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    os.makedirs(path, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if len(shards) == 1:
        save_tensors(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_tensors(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _hf_layer_names(cfg: GPTConfig, i: int) -> dict[str, str]:
    """nanospin name -> Hugging Face name for layer i (fused qkv handled separately)."""
    if cfg.is_gpt2:
        pairs = (("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.proj", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
                 ("mlp.down", "mlp.c_proj"))
        return {f"blocks.{i}.{ours}.{w}": f"h.{i}.{theirs}.{w}" for ours, theirs in pairs for w in ("weight", "bias")}
    p = f"model.layers.{i}."
    names = {f"blocks.{i}.norm1.weight": p + "input_layernorm.weight",
             f"blocks.{i}.norm2.weight": p + "post_attention_layernorm.weight",
             f"blocks.{i}.attn.proj.weight": p + "self_attn.o_proj.weight"}
    for ours, theirs in (("up", "up_proj"), ("gate", "gate_proj"), ("down", "down_proj")):
        names[f"blocks.{i}.mlp.{ours}.weight"] = p + f"mlp.{theirs}.weight"
        if cfg.mlp_bias:
            names[f"blocks.{i}.mlp.{ours}.bias"] = p + f"mlp.{theirs}.bias"
    if cfg.attn_out_bias:
        names[f"blocks.{i}.attn.proj.bias"] = p + "self_attn.o_proj.bias"
    return names


def _hf_global_names(cfg: GPTConfig) -> dict[str, str]:
    if cfg.is_gpt2:
        names = {"wte.weight": "wte.weight", "wpe.weight": "wpe.weight", "norm_f.weight": "ln_f.weight",
                 "norm_f.bias": "ln_f.bias"}
    else:
        names = {"wte.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


# GPT-2's Conv1D layers store weights as (in, out): transpose to and from nn.Linear's (out, in)
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_state_to_nanospin(hf_state: dict[str, torch.Tensor], cfg: GPTConfig, where: str) -> dict[str, torch.Tensor]:
    if cfg.is_gpt2:  # checkpoints come with or without the 'transformer.' prefix
        hf_state = {k.removeprefix("transformer."): v for k, v in hf_state.items()}
    if cfg.tie_embeddings:
        hf_state.pop("lm_head.weight", None)

    def take(name: str) -> torch.Tensor:
        if name not in hf_state:
            raise UserError(f"tensor '{name}' is missing from the checkpoint in '{where}'")
        t = hf_state.pop(name)
        return t.t() if cfg.is_gpt2 and name.endswith(_CONV1D) else t

    names = {**_hf_global_names(cfg), **{k: v for i in range(cfg.n_layer) for k, v in _hf_layer_names(cfg, i).items()}}
    state = {ours: take(theirs) for ours, theirs in names.items()}
    for i in range(cfg.n_layer):
        if cfg.is_gpt2:
            state[f"blocks.{i}.attn.qkv.weight"] = take(f"h.{i}.attn.c_attn.weight")
            state[f"blocks.{i}.attn.qkv.bias"] = take(f"h.{i}.attn.c_attn.bias")
        else:
            p = f"model.layers.{i}.self_attn."
            state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([take(p + f"{x}_proj.weight") for x in "qkv"])
            if cfg.qkv_bias:
                state[f"blocks.{i}.attn.qkv.bias"] = torch.cat([take(p + f"{x}_proj.bias") for x in "qkv"])
    leftover = [k for k in hf_state if not k.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))]
    if leftover:
        raise UserError(f"checkpoint in '{where}' has tensors nanospin does not use, e.g. '{leftover[0]}'; "
                        f"is config.json's model_type right?")
    with torch.device("meta"):
        expected = GPT(cfg).state_dict()
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(f"tensor '{names.get(name, name)}' in '{where}' has shape {tuple(tensor.shape)}, but "
                            f"config.json implies {tuple(expected[name].shape)}")
    return state


def nanospin_state_to_hf(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    state = dict(state)
    out = {}
    for ours, theirs in _hf_global_names(cfg).items():
        out[theirs] = state[ours]
    for i in range(cfg.n_layer):
        for ours, theirs in _hf_layer_names(cfg, i).items():
            out[theirs] = state[ours]
        qkv_w = state[f"blocks.{i}.attn.qkv.weight"]
        if cfg.is_gpt2:
            out[f"h.{i}.attn.c_attn.weight"] = qkv_w
            out[f"h.{i}.attn.c_attn.bias"] = state[f"blocks.{i}.attn.qkv.bias"]
        else:
            sizes = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
            p = f"model.layers.{i}.self_attn."
            for x, w in zip("qkv", qkv_w.split(sizes)):
                out[p + f"{x}_proj.weight"] = w
            if cfg.qkv_bias:
                for x, b in zip("qkv", state[f"blocks.{i}.attn.qkv.bias"].split(sizes)):
                    out[p + f"{x}_proj.bias"] = b
    if cfg.is_gpt2:
        out = {"transformer." + k: (v.t() if k.endswith(_CONV1D) else v) for k, v in out.items()}
    return out


# ----------------------------------------------------------------------------------------------
# model directories: find, load, save


def _is_model_dir(path: str) -> bool:
    """config.json beside weights (a run's out_dir has a config.json of its own, without weights)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        return False
    return any(f.endswith((".safetensors", ".safetensors.index.json", ".bin")) for f in os.listdir(path))


def resolve_model_dir(path: str, key: str = "model") -> str:
    """A Hugging Face dir as is; a nanospin checkpoint -> its model/; a run's out_dir -> final/, else its latest
    checkpoint's model/. `key` names the setting that gave the path, for the error."""
    candidates = [path, os.path.join(path, "model"), os.path.join(path, "final")]
    checkpoints = os.path.join(path, CHECKPOINTS)
    if os.path.isdir(checkpoints):  # step_XXXXXXXX names sort in step order
        candidates += [os.path.join(checkpoints, d, "model") for d in sorted(os.listdir(checkpoints), reverse=True)]
    for candidate in candidates:
        if os.path.isdir(candidate) and _is_model_dir(candidate):
            return candidate
    what = "does not exist" if not os.path.exists(path) else "holds no model (config.json with weights)"
    raise UserError(f"model path {key}='{path}' {what}; point {key} at a local Hugging Face model directory, a "
                    f"nanospin checkpoint or a run's out_dir (--{key}=/path/to/model; nothing is downloaded)")


def read_chat_template(model_dir: str) -> str | dict | None:
    """The chat template in <model_dir>/nanospin.json (a name or a dict, see templates.py), or None."""
    file = os.path.join(model_dir, "nanospin.json")
    if not os.path.isfile(file):
        return None
    meta = read_json(file)
    if not isinstance(meta, dict):
        raise UserError(f"{file}:1: expected a JSON object with a 'chat_template' key")
    return meta.get("chat_template")


# ----------------------------------------------------------------------------------------------
# a model goes out as it came in


@dataclass
class ModelSource:
    """Where a run's model came from: its exports keep its config.json, companion files and dtype."""
    dir: str | None  # the model directory (None: built from scratch)
    hf_config: dict | None  # its config.json, every field as read
    dtype: torch.dtype  # the dtype its weights are stored in (float32 from scratch)


DTYPE_KEYS = ("dtype", "torch_dtype")  # transformers >= 4.56 writes the first, older versions the second


def read_model_source(path: str | None) -> ModelSource:
    """The source of a model loaded from directory `path`; None: a model built from scratch."""
    if path is None:
        return ModelSource(None, None, torch.float32)
    return ModelSource(path, read_hf_config(path), stored_dtype(path))


def export_hf_config(cfg: GPTConfig, dtype: torch.dtype, source: ModelSource | None = None) -> dict:
    """config.json for `cfg` stored in `dtype`: the source's with every field kept, only the dtype and a grown
    vocabulary updated; from scratch, nanospin's."""
    if source is None or source.hf_config is None:
        return gpt_config_to_hf_config(cfg, dtype)
    config = dict(source.hf_config)
    if "vocab_size" in config:
        config["vocab_size"] = cfg.vocab_size  # grown when a chat template's markers were added
    keys = [k for k in DTYPE_KEYS if k in config] or ["dtype"]
    config.update(dict.fromkeys(keys, str(dtype).removeprefix("torch.")))
    return config


def model_from_state(cfg: GPTConfig, state: dict[str, torch.Tensor], device=None,
                     dtype: torch.dtype | None = None) -> GPT:
    """A GPT holding `state` (nanospin names) on device/dtype, built on the meta device (no wasted init)."""
    with torch.device("meta"):
        model = GPT(cfg)
    missing, unexpected = model.load_state_dict({k: v.to(device, dtype) for k, v in state.items()},
                                                strict=False, assign=True)
    if cfg.tie_embeddings:  # assignment replaced the shared parameter: share it again
        model.lm_head.weight = model.wte.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise UserError(f"the weights do not fit the model: {'missing' if missing else 'unexpected'} tensor "
                        f"'{(missing or unexpected)[0]}'")
    return model


def load_pretrained(path: str, attention: str = "sdpa", block_size: int | None = None,
                    dtype: torch.dtype | None = None) -> GPT:
    """A local Hugging Face model directory as a GPT on the CPU, in dtype (None: float32)."""
    cfg = hf_config_to_gpt_config(read_hf_config(path), attention=attention, block_size=block_size,
                                  where=os.path.join(path, "config.json"))
    state = hf_state_to_nanospin(read_safetensors_dir(path), cfg, path)
    return model_from_state(cfg, state, dtype=dtype or torch.float32)


def load_weights(model: torch.nn.Module, path: str) -> None:
    """A model directory's weights into an existing model, plain or FSDP-sharded (each rank keeps its shard)."""
    weights = hf_state_to_nanospin(read_safetensors_dir(path), model.config, path)
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))


def vocab_rows_needed(tok: Tokenizer, template: ChatFormat) -> int:
    """Embedding rows the ids a run can feed need: the tokenizer's vocabulary up to the specials after it, and the
    template's."""
    special_ids = set(tok.specials.values())
    vocab_end = tok.n_vocab
    while vocab_end > 0 and vocab_end - 1 in special_ids:
        vocab_end -= 1
    used = stop_ids(tok, template) + [tok.specials[t] for t in template.new_tokens if t in tok.specials]
    return max(vocab_end, *(i + 1 for i in used))


def load_for_training(path: str, tok: Tokenizer, template: ChatFormat, attention: str = "sdpa",
                      block_size: int | None = None) -> tuple[GPT, int]:
    """(the model in `path` in fp32 on the CPU, rows grown for the run's added chat markers, each the mean
    embedding)."""
    model = load_pretrained(resolve_model_dir(path), attention=attention, block_size=block_size)
    rows, had = vocab_rows_needed(tok, template), model.config.vocab_size
    if had >= rows:
        return model, 0
    if not set(range(had, rows)) <= set(tok.specials.values()):
        raise UserError(f"the tokenizer has {tok.n_vocab} tokens but the model in '{path}' only {had}; use the "
                        f"model's own tokenizer (tokenizer='auto')")
    model.grow_vocab(rows)
    return model, rows - had


def chat_template_for(chat_template: str | dict, model_dir: str | None, tok: Tokenizer) -> ChatFormat:
    """The configured template; for 'auto', a nanospin model dir's nanospin.json, else the tokenizer's, else chatml."""
    if chat_template != "auto":
        return chat_format(chat_template)
    saved = read_chat_template(model_dir) if model_dir else None
    if saved:
        return chat_format(saved, os.path.join(model_dir, "nanospin.json"))
    return resolve_template(tok, "auto") if tok.chat_template else chat_format("chatml")


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device='{device}' was asked for but CUDA is not available; use --device=cpu")
    return device


def load_for_chat(path: str, device: str = "auto",
                  dtype: torch.dtype | None = None) -> tuple[GPT, Tokenizer, ChatFormat]:
    """(model, tokenizer, chat template) for a model dir, checkpoint or out_dir; dtype None: bf16 on a GPU."""
    model_dir = resolve_model_dir(path)
    device = pick_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    model = load_pretrained(model_dir, dtype=dtype).to(device).eval()
    tok = load_tokenizer(model_dir)
    template = read_chat_template(model_dir) or read_chat_template(path)
    if template:
        return model, tok, chat_format(template, os.path.join(model_dir, "nanospin.json"))
    return model, tok, resolve_template(tok, "auto")


def full_model_state(model) -> dict[str, torch.Tensor]:
    """The full weights on rank 0, offloaded to the CPU (a collective under FSDP; other ranks get {})."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_model_dir(path: str, state: dict[str, torch.Tensor], cfg: GPTConfig, tokenizer: Tokenizer | None = None,
                   chat_template: ChatFormat | str | None = None, dtype: torch.dtype | None = None,
                   max_shard_bytes: int = 4 << 30, source: ModelSource | None = None) -> None:
    """A model directory transformers loads as it is; with a tokenizer, also its files and nanospin.json (tokenizer
    name, chat template). dtype None: the weights' own."""
    hf_state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous()
                for k, v in nanospin_state_to_hf(state, cfg).items()}
    save_hf_dir(path, export_hf_config(cfg, dtype or next(iter(hf_state.values())).dtype, source), hf_state,
                max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save(path)
        with open(os.path.join(path, "nanospin.json"), "w") as f:
            template = format_config(chat_format(chat_template)) if chat_template else None
            json.dump({"chat_template": template, "tokenizer": tokenizer.name}, f, indent=2, ensure_ascii=False)
    companion = os.path.join(source.dir, "generation_config.json") if source and source.dir else None
    if companion and os.path.isfile(companion):  # it describes the model to other tools: copied unchanged
        shutil.copyfile(companion, os.path.join(path, "generation_config.json"))


def export_model(path: str, model, cfg: GPTConfig, tokenizer, chat_template: ChatFormat | str, rank: int,
                 dtype: torch.dtype | None = None, source: ModelSource | None = None) -> None:
    """Rank 0 writes the full weights to `path` atomically; a disk error is a UserError on every rank."""
    state = full_model_state(model)
    error = None
    if rank == 0:
        tmp = path + ".tmp"

        def write() -> None:
            shutil.rmtree(tmp, ignore_errors=True)
            save_model_dir(tmp, state, cfg, tokenizer, chat_template, dtype=dtype, source=source)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)

        error = _attempt(write, tmp)
        if error:
            shutil.rmtree(tmp, ignore_errors=True)
    error = _first_error(error)
    if error:
        raise UserError(f"cannot export the model to '{path}': {error}")


# ----------------------------------------------------------------------------------------------
# disk errors: one line on every rank, never half a directory


def _as_os_error(e: Exception, path: str) -> OSError | None:
    """The OSError behind a failed write (safetensors names it only in its message); None for anything else."""
    if isinstance(e, OSError):
        return e if e.filename else OSError(e.errno, e.strerror, path)
    found = re.search(r"\(os error (\d+)\)", str(e)) if isinstance(e, SafetensorError) else None
    if found is None:
        return None
    number = int(found.group(1))
    return OSError(number, os.strerror(number), path)


def save_tensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with the usual file mode (not its temporary file's 0600); disk errors as OSError."""
    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as e:
        raise (_as_os_error(e, path) or e) from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _attempt(write, path: str) -> str | None:
    """Run write(); a disk error is returned as its one-line description, anything else raised."""
    try:
        write()
    except Exception as e:  # noqa: BLE001 - only disk errors are kept, the rest re-raised
        os_error = _as_os_error(e, path)
        if os_error is None or os_error.errno not in DISK_ERRNOS:
            raise
        return disk_error(os_error)
    return None


def _gather(value) -> list:
    """`value` of every rank, in rank order (a collective)."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _first_error(error: str | None) -> str | None:
    """The lowest failing rank's error on every rank (a collective, so no rank is left waiting in a barrier)."""
    return next((e for e in _gather(error) if e), None)


def _check_free_space(path: str, needed: int) -> None:
    """ENOSPC before the first byte is written when the disk holding `path` has fewer than `needed` bytes free."""
    stat = os.statvfs(path)
    free = stat.f_bavail * stat.f_frsize
    if free < needed:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (the checkpoint needs {needed / 2**20:.1f} MiB, "
                                    f"{free / 2**20:.1f} MiB are free)", path)


def probe_out_dir(out_dir: str) -> None:
    """A one-line error, before data and model are built, when out_dir cannot be written (a file, read-only, no
    permission, full); the probe file is removed."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"out_dir '{out_dir}' is a file, not a directory; use another --out_dir")
    where = os.path.abspath(out_dir)
    while not os.path.exists(where):
        where = os.path.dirname(where)
    if not os.path.isdir(where):
        raise UserError(f"out_dir '{out_dir}' cannot be created: '{where}' is a file; use another --out_dir")
    try:
        fd, probe = tempfile.mkstemp(prefix=".nanospin-write-probe-", dir=where)
        try:
            os.write(fd, b"nanospin")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        raise UserError(f"out_dir '{out_dir}' cannot be written: {disk_error(_as_os_error(e, where))}") from None


# ----------------------------------------------------------------------------------------------
# file hashes: every file a resume reads is checked against the one its checkpoint saw


def file_digest(path: str) -> dict:
    """{'bytes', 'sha256'} of a file, cached by (size, mtime, inode) so an unchanged file is hashed once."""
    st = os.stat(path)
    size, sha256 = _digest(path, st.st_size, st.st_mtime_ns, st.st_ino)
    return {"bytes": size, "sha256": sha256}


@functools.lru_cache(maxsize=4096)
def _digest(path: str, size: int, mtime_ns: int, inode: int) -> tuple[int, str]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return size, h.hexdigest()


def _digests_under(root: str, relative_to: str) -> dict[str, dict]:
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            file = os.path.join(folder, name)
            found[os.path.relpath(file, relative_to)] = file_digest(file)
    return dict(sorted(found.items()))


# what of out_dir a resume reads besides its checkpoint: the iterations' rollouts, held-out rollouts and the
# opponent's held-out log-probs, and the SFT model the continued-SFT baseline starts from
_RUN_INPUTS = re.compile(r"(iter_\d+|sft)")


def run_inputs(out_dir: str) -> dict[str, dict]:
    """The digests of the files in out_dir's iter_*/ and sft/ (temporary ones excluded)."""
    found = {}
    for name in sorted(os.listdir(out_dir)):
        if _RUN_INPUTS.fullmatch(name) and os.path.isdir(os.path.join(out_dir, name)):
            found.update({k: v for k, v in _digests_under(os.path.join(out_dir, name), out_dir).items()
                          if not k.endswith(".tmp")})
    return found


def _check_file(file: str, digest: dict, fix: str) -> None:
    if not os.path.isfile(file):
        raise UserError(f"'{file}' is missing; {fix}")
    actual = file_digest(file)
    if actual != digest:
        how = (f"{actual['bytes']} bytes where {digest['bytes']} were saved: cut short or appended to"
               if actual["bytes"] != digest["bytes"] else "its sha256 differs: edited or replaced")
        raise UserError(f"'{file}' is not the file its checkpoint saved ({how}); {fix}")


def _prefix_digest(path: str, size: int) -> dict | None:
    if not os.path.isfile(path) or os.path.getsize(path) < size:
        return None
    with open(path, "rb") as f:
        return {"bytes": size, "sha256": hashlib.sha256(f.read(size)).hexdigest()}


# ----------------------------------------------------------------------------------------------
# run checkpoints


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
                    chat_template: ChatFormat | str, rollouts_path: str | None, rank: int, keep: int = 2,
                    source: ModelSource | None = None) -> str:
    """Write checkpoint `step` (all ranks call this) and return its path: fp32 master weights, optimizer shards, the
    rollouts, and last state.json (`state`, RNG, the digests of its files, of `run_inputs` and of metrics.jsonl)."""
    root = os.path.join(out_dir, CHECKPOINTS)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = os.path.join(root, f"tmp-step_{step:08d}")
    # the collectives first: a rank that fails a write later must not leave the others in one
    weights = full_model_state(model)
    shard, layout, index = optimizer_shard(model, optimizer, rank)
    nbytes = sum(t.numel() * t.element_size() for t in (*shard.values(), *weights.values()))
    if rank == 0 and rollouts_path is not None:
        nbytes += os.path.getsize(rollouts_path)
    nbytes_by_rank = _gather(nbytes)
    shard_file = os.path.join(tmp, "optimizer", f"rank_{rank:05d}.safetensors")

    def begin() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "optimizer"))
        _check_free_space(tmp, sum(nbytes_by_rank))

    def write_parts() -> None:
        save_tensors(shard, shard_file, metadata={"layout": json.dumps(layout)})
        if rank == 0:
            save_model_dir(os.path.join(tmp, "model"), weights, cfg, tokenizer, chat_template, source=source)
            if rollouts_path is not None:
                shutil.copyfile(rollouts_path, os.path.join(tmp, "rollouts.jsonl"))
            with open(os.path.join(tmp, "optimizer", "index.json"), "w") as f:
                json.dump({**index, "files": [f"rank_{r:05d}.safetensors" for r in range(len(nbytes_by_rank))]}, f)

    def finish() -> None:
        metrics = os.path.join(out_dir, METRICS)
        saved = {**state, "rng": rng_state(), "files": _digests_under(tmp, tmp), "run_inputs": run_inputs(out_dir),
                 "metrics": file_digest(metrics) if os.path.isfile(metrics) else {"bytes": 0, "sha256": _EMPTY_SHA},
                 "rollouts_of": rollouts_path and os.path.relpath(rollouts_path, out_dir)}
        with open(os.path.join(tmp, "state.json"), "w") as f:  # written last: its presence marks a whole checkpoint
            json.dump(saved, f)
        if os.path.exists(final):  # the same step saved again: the old one goes aside first, never half-deleted
            os.replace(final, os.path.join(root, f"old-step_{step:08d}"))
        os.replace(tmp, final)

    error = _first_error(_attempt(begin, tmp) if rank == 0 else None)
    if not error:
        error = _first_error(_attempt(write_parts, tmp))
    if not error:
        error = _first_error(_attempt(finish, tmp) if rank == 0 else None)
    if error:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        before = list_checkpoints(out_dir)
        raise UserError(f"cannot save checkpoint '{final}': {error}; then run the same command again: it resumes "
                        f"from {repr(before[-1]) if before else 'the start'}")
    if rank == 0:
        leftovers = [os.path.join(root, n) for n in os.listdir(root) if n.startswith(("tmp-step_", "old-step_"))]
        for old in list_checkpoints(out_dir)[:-keep] + leftovers:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


METRICS = "metrics.jsonl"
_EMPTY_SHA = hashlib.sha256(b"").hexdigest()


def list_checkpoints(out_dir: str) -> list[str]:
    """Complete checkpoints, oldest first."""
    root = os.path.join(out_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step_"))
    return [os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n, "state.json"))]


def _remedy(path: str) -> str:
    """What to do when checkpoint `path` cannot be used: resume from the one before, or start over."""
    root, name = os.path.split(os.path.abspath(path))
    earlier = sorted(n for n in os.listdir(root) if n.startswith("step_") and n < name)
    if earlier:
        return f"delete the checkpoint directory '{path}' to resume from '{os.path.join(root, earlier[-1])}'"
    return "it is the run's only checkpoint: pass --resume=restart to start the run over"


_STATE_KEYS = ("files", "run_inputs", "rollouts_of", "metrics", "rng")


def read_state(path: str) -> dict:
    file = os.path.join(path, "state.json")
    try:
        with open(file) as f:
            state = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint state '{file}' is unreadable ({e}); {_remedy(path)}") from None
    if not isinstance(state, dict) or any(k not in state for k in _STATE_KEYS):
        raise UserError(f"checkpoint state '{file}' records no file digests (an older nanospin's, or damaged), so "
                        f"the checkpoint cannot be checked; {_remedy(path)}")
    return state


def verify_checkpoint(path: str) -> dict:
    """state.json of checkpoint `path`, once every file it records (its own, out_dir's inputs but the rollouts it holds
    a copy of, metrics.jsonl's first bytes) is as saved; otherwise a one-line error naming the file."""
    state = read_state(path)
    for name, digest in state["files"].items():
        _check_file(os.path.join(path, name), digest, _remedy(path))
    out_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    for name, digest in state["run_inputs"].items():
        if name != state["rollouts_of"]:
            _check_file(os.path.join(out_dir, name), digest,
                        f"restore it, or pass --resume=restart to start the run over")
    metrics = os.path.join(out_dir, METRICS)
    if state["metrics"]["bytes"] and _prefix_digest(metrics, state["metrics"]["bytes"]) != state["metrics"]:
        raise UserError(f"'{metrics}' does not begin with the {state['metrics']['bytes']} bytes checkpoint "
                        f"'{path}' saw (missing, cut short or edited); restore it, or pass --resume=restart to "
                        f"start the run over")
    return state


def resume_point(out_dir: str) -> str | None:
    """The latest checkpoint in out_dir, verified; None when there is none. A damaged latest one is an error."""
    root = os.path.join(out_dir, CHECKPOINTS)
    names = sorted(n for n in os.listdir(root) if n.startswith("step_")) if os.path.isdir(root) else []
    if not names:
        return None
    latest = os.path.join(root, names[-1])
    if not os.path.isfile(os.path.join(latest, "state.json")):
        raise UserError(f"checkpoint '{latest}' has no state.json, so it is incomplete (a checkpoint is renamed "
                        f"into place only when whole: something else removed it); {_remedy(latest)}")
    verify_checkpoint(latest)
    return latest


# what a run writes to out_dir; --resume=restart removes these and nothing else
RUN_FILES = (CHECKPOINTS, "final", "final.tmp", "sft", "sft.tmp", METRICS, "metrics.png", "config.json")


def run_files(out_dir: str) -> list[str]:
    if not os.path.isdir(out_dir):
        return []
    return sorted(n for n in os.listdir(out_dir) if n in RUN_FILES or re.fullmatch(r"iter_\d+", n))


def start_over(out_dir: str, rank: int) -> list[str]:
    """Remove what an earlier run wrote to out_dir (rank 0; every rank waits) and return the names."""
    names = run_files(out_dir)
    if rank == 0:
        for name in names:
            path = os.path.join(out_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    _barrier()
    return names


def open_metrics(out_dir: str, rank: int, checkpoint: str | None):
    """Rank 0's metrics.jsonl to append to, cut to the records written before `checkpoint` (all, none for a fresh
    start), so replayed steps are logged once; None on other ranks."""
    if rank != 0:
        return None
    path = os.path.join(out_dir, METRICS)
    kept = b""
    size = read_state(checkpoint)["metrics"]["bytes"] if checkpoint is not None else 0
    if size:
        with open(path, "rb") as f:  # its first bytes were checked by verify_checkpoint
            kept = f.read(size)
    with open(path + ".tmp", "wb") as f:
        f.write(kept)
    os.replace(path + ".tmp", path)
    return open(path, "a")


def finished_history(checkpoint: str | None, n_phases: int) -> list[dict] | None:
    """The phase summaries of a run whose latest checkpoint is past its last phase, else None."""
    if checkpoint is None:
        return None
    state = read_state(checkpoint)
    return state.get("history", []) if state.get("phase", 0) >= n_phases else None


def finished_run_message(out_dir: str) -> str:
    """One line for a completed run's command run again: where its results are, how to train afresh."""
    results = [os.path.join(out_dir, name) for name in ("final", "metrics.jsonl", "metrics.png")
               if os.path.exists(os.path.join(out_dir, name))]
    return (f"nothing to do: the run in '{out_dir}' is complete (results: {', '.join(results)}); to train again, "
            f"pass a new --out_dir=... or delete '{out_dir}'. Its summary:")


def load_checkpoint(path: str, model, optimizer, cfg: GPTConfig) -> dict:
    """Weights, optimizer and RNG from checkpoint `path` once verified; returns state.json."""
    state = verify_checkpoint(path)
    model_dir = os.path.join(path, "model")
    # read at this run's context: a checkpoint keeps its source's (a longer one is no reason to refuse it)
    saved = hf_config_to_gpt_config(read_hf_config(model_dir), block_size=cfg.block_size,
                                    where=os.path.join(model_dir, "config.json"))
    shape_keys = ("model_type", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size")
    differ = [k for k in shape_keys if getattr(saved, k) != getattr(cfg, k)]
    if differ:
        raise UserError(f"checkpoint '{model_dir}' holds a model with "
                        f"{', '.join(f'{k}={getattr(saved, k)}' for k in differ)} but this run's config has "
                        f"{', '.join(f'{k}={getattr(cfg, k)}' for k in differ)}; resume with the checkpoint's "
                        f"model settings or use another out_dir")
    load_weights(model, model_dir)
    load_optimizer(path, model, optimizer)
    set_rng_state(state["rng"])
    return state


# ----------------------------------------------------------------------------------------------
# optimizer state: one safetensors file per rank and a JSON index, loadable at any world size


def _local_place(value: torch.Tensor) -> tuple[torch.Tensor, list[int], bool]:
    """(the part of `value` this rank holds, its offset in the full tensor, whether it is a shard)."""
    if isinstance(value, DTensor) and any(p.is_shard() for p in value.placements):
        _, offset = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
        return value.to_local(), list(offset), True
    return (value.to_local() if isinstance(value, DTensor) else value), [0] * value.dim(), False


def optimizer_shard(model, optimizer, rank: int) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """This rank's optimizer state ('<parameter>/<name>'): its shard of each sharded tensor (rank 0 also the whole
    ones), their shapes and offsets, and on rank 0 the index (param groups, non-tensor values)."""
    osd = get_optimizer_state_dict(model, optimizer)  # keyed by parameter name, so any world size can load it
    shard, layout, values = {}, {}, {}
    for param, entries in osd["state"].items():
        for name, value in entries.items():
            key = f"{param}/{name}"
            if not torch.is_tensor(value):
                values[key] = value
                continue
            local, offset, sharded = _local_place(value)
            if sharded or rank == 0:
                shard[key] = local.detach().to("cpu").contiguous()
                layout[key] = {"shape": list(value.shape), "offset": offset}
    index = {"param_groups": osd["param_groups"], "values": values} if rank == 0 else {}
    return shard, layout, index


def load_optimizer(path: str, model, optimizer) -> None:
    """The optimizer state of checkpoint `path`, each rank reading the saved slices that overlap its own."""
    optim_dir = os.path.join(path, "optimizer")
    index = read_json(os.path.join(optim_dir, "index.json"))
    osd = get_optimizer_state_dict(model, optimizer)  # this run's layout, filled in below
    try:
        with ExitStack() as stack:
            pieces: dict[str, list] = {}  # key -> [(open file, its layout entry)]
            for name in index["files"]:
                f = stack.enter_context(safe_open(os.path.join(optim_dir, name), "pt"))
                for key, place in json.loads(f.metadata()["layout"]).items():
                    pieces.setdefault(key, []).append((f, place))
            expected = {f"{p}/{n}" for p, entries in osd["state"].items() for n in entries}
            saved = set(pieces) | set(index["values"])
            if saved != expected:
                key = sorted(saved ^ expected)[0]
                raise UserError(f"the optimizer state in '{optim_dir}' does not fit this run's optimizer "
                                f"('{key}' is {'missing' if key in expected else 'unexpected'}); resume with "
                                f"the checkpoint's optimizer and model settings")
            for param, entries in osd["state"].items():
                for name, value in entries.items():
                    key = f"{param}/{name}"
                    if torch.is_tensor(value):
                        _fill(value, key, pieces[key], optim_dir)
                    else:
                        entries[name] = index["values"][key]
    except (KeyError, TypeError, ValueError, SafetensorError) as e:
        raise UserError(f"cannot read the optimizer state in '{optim_dir}' ({type(e).__name__}: {e}); "
                        f"{_remedy(path)}") from None
    osd["param_groups"] = _param_groups(index["param_groups"], osd["param_groups"], optim_dir)
    set_optimizer_state_dict(model, optimizer, osd)


def _fill(value: torch.Tensor, key: str, pieces: list, where: str) -> None:
    """This rank's part of tensor `key`, copied from the saved pieces that overlap it."""
    target, offset, _ = _local_place(value)
    covered = 0
    for f, place in pieces:
        saved = f.get_slice(key)
        if place["shape"] != list(value.shape) or saved.get_dtype() != _SAFETENSORS_NAMES.get(value.dtype):
            raise UserError(f"'{key}' in '{where}' is {saved.get_dtype()} {place['shape']}, this run's optimizer "
                            f"holds {value.dtype} {list(value.shape)}; resume with the checkpoint's settings")
        lo = [max(a, b) for a, b in zip(offset, place["offset"])]
        hi = [min(a + n, b + m) for a, n, b, m in zip(offset, target.shape, place["offset"], saved.get_shape())]
        if any(low >= high for low, high in zip(lo, hi)):
            continue
        part = saved[tuple(slice(low - b, high - b) for low, high, b in zip(lo, hi, place["offset"]))] \
            if target.dim() else f.get_tensor(key)
        with torch.no_grad():
            target[tuple(slice(low - a, high - a) for low, high, a in zip(lo, hi, offset))].copy_(part)
        covered += part.numel()
    if covered != target.numel():
        raise UserError(f"the saved shards of '{key}' in '{where}' cover {covered} of this rank's {target.numel()} "
                        f"values; {_remedy(os.path.dirname(where))}")


_SAFETENSORS_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL", torch.uint8: "U8"}


def _param_groups(saved: list[dict], current: list[dict], where: str) -> list[dict]:
    """The saved groups' settings; JSON's lists become the tuples the optimizer holds (betas)."""
    if [g["params"] for g in saved] != [g["params"] for g in current]:
        raise UserError(f"the parameter groups in '{where}' are not this run's; resume with the checkpoint's "
                        f"model and optimizer settings")
    return [{k: tuple(v) if isinstance(mine.get(k), tuple) else v for k, v in group.items()}
            for group, mine in zip(saved, current)]


# ----------------------------------------------------------------------------------------------
# a run's out_dir: whether to resume, the run's state, its iterations' files


# settings a run may change when it resumes: where and how often it writes, how it splits the global batch,
# how it runs (packing changes float round-off only)
RESUMABLE_KEYS = {"out_dir", "resume", "allow_config_change", "log_interval", "eval_interval", "save_interval",
                  "keep_checkpoints", "compile", "device", "batch_size", "grad_accum", "kl_opponent_mb", "plot",
                  "pack_sequences", "pack_pairs"}


def config_fingerprint(config, world_size: int) -> dict:
    """The settings a resumed run must share with the one that wrote the checkpoint; the batch as its global size."""
    fingerprint = {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_KEYS}
    fingerprint["global_batch"] = config.batch_size * config.grad_accum * world_size
    return fingerprint


@dataclass
class RunState:
    """Where the run stands; saved in every checkpoint's state.json, so the same command continues it."""
    phase: int = 0  # index into the run's list of phases
    step: int = 0  # optimizer steps done in this phase
    global_step: int = 0  # optimizer steps done in the run; names the checkpoints
    order: dict | None = None  # the phase's data order (BatchOrder.state_dict()) at a mid-phase checkpoint
    rollouts_sha: str | None = None  # the SPIN iteration's rollouts.jsonl, checked on a mid-iteration resume
    history: list[dict] = field(default_factory=list)  # one summary per finished phase


def prepare_out_dir(out_dir: str, resume: bool | str, allow_config_change: bool, fingerprint: dict,
                    rank: int) -> str | None:
    """The verified checkpoint to resume from (None: step 0). resume=False refuses a non-empty out_dir, another
    config needs allow_config_change, resume='restart' first removes what a run wrote there."""
    probe_out_dir(out_dir)
    if resume == "restart":
        removed = start_over(out_dir, rank)
        if removed and rank == 0:
            print(f"resume='restart': removed {', '.join(removed)} from {out_dir}; starting at step 0", flush=True)
        return None
    saved_config = os.path.join(out_dir, "config.json")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if resume is False:
            raise UserError(f"out_dir '{out_dir}' is not empty and resume=False; pick a new --out_dir, pass "
                            f"--resume=auto to continue it or --resume=restart to start it over")
        if os.path.isfile(saved_config) and not allow_config_change:
            old = read_json(saved_config)
            new = json.loads(json.dumps(fingerprint))
            diff = sorted(k for k in new if old.get(k) != new[k])
            if diff:
                raise UserError(f"out_dir '{out_dir}' holds a run with a different config (keys: "
                                f"{', '.join(diff[:5])}); use another --out_dir or pass --allow_config_change=True")
    resume_from = resume_point(out_dir) if resume else None
    if resume is True and not resume_from:
        raise UserError(f"resume=True but out_dir '{out_dir}' has no checkpoint; use resume='auto' to start fresh")
    if resume_from is None and run_files(out_dir) and rank == 0:
        print(f"out_dir '{out_dir}' holds no checkpoint (the run there stopped before its first): starting at "
              f"step 0, and its metrics.jsonl starts over", flush=True)
    return resume_from


def start_or_resume(out_dir: str, resume_from: str | None, model, optimizer, config, fingerprint: dict,
                    rank: int) -> RunState:
    """The run state from the checkpoint, or a fresh one and out_dir/config.json (every rank calls this)."""
    _barrier()  # every rank has read out_dir (prepare_out_dir) before rank 0 writes config.json there
    state = RunState()
    if resume_from:
        saved = load_checkpoint(resume_from, model, optimizer, model.config)
        state = RunState(**{f.name: saved[f.name] for f in dataclasses.fields(RunState)})
    elif rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            # a resume compares only the fingerprint's keys
            json.dump({**dataclasses.asdict(config), **fingerprint}, f, indent=2, sort_keys=True)
    _barrier()
    return state


def save_run(out_dir: str, state: RunState, config, model, optimizer, tokenizer, chat_template: ChatFormat,
             source: ModelSource, rollouts_path: str | None, rank: int, keep: int) -> str:
    saved = {**dataclasses.asdict(state), "config": dataclasses.asdict(config)}
    return save_checkpoint(out_dir, state.global_step, model, optimizer, saved, model.config, tokenizer,
                           chat_template, rollouts_path, rank, keep, source=source)


def file_sha(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()[:16]


def iteration_dir(out_dir: str, iteration: int) -> str:
    """out_dir/iter_t/: SPIN iteration t's rollouts, held-out rollouts and opponent log-probs."""
    return os.path.join(out_dir, f"iter_{iteration}")


def restore_rollouts(checkpoint: str, iter_dir: str, rollouts_sha: str | None, rank: int) -> str:
    """The rollouts.jsonl a mid-iteration checkpoint saved, checked and put back in iter_dir (rank 0); returns the
    checkpoint's copy."""
    saved = os.path.join(checkpoint, "rollouts.jsonl")
    if not os.path.isfile(saved) or file_sha(saved) != rollouts_sha:
        raise UserError(f"the rollouts in checkpoint '{checkpoint}' are missing or do not match its "
                        f"state.json; delete that checkpoint to resume from the one before it")
    if rank == 0:
        rollouts_path = os.path.join(iter_dir, "rollouts.jsonl")
        shutil.copyfile(saved, rollouts_path + ".tmp")
        os.replace(rollouts_path + ".tmp", rollouts_path)
    return saved
