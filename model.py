"""The language model: one GPT module that covers GPT-2 and the Llama family (Llama, Qwen2, Mistral).

Design choices:
- One nn.Module and one dataclass; the family only switches small pieces (LayerNorm or RMSNorm, GELU
  or SwiGLU MLP, learned positions or RoPE, biases), so the forward pass reads the same for all.
- q, k and v come from one fused projection; grouped-query attention never repeats k/v in memory.
- Attention goes through `attend`, which picks 'sdpa' (PyTorch) or 'triton' (kernels/attention.py).
- `forward(idx, targets)` computes the loss and per-token log-probs with the fused log-prob kernel
  (kernels/logprob.py) from the final hidden states, so the [B, T, vocab] logits never exist in
  training; `forward(idx)` alone returns logits for sampling and tests.
- An optional static KV cache (KVCache) plus per-row positions and an attention mask make the same
  forward serve generate.py's prefill and decode steps.
- Hugging Face checkpoints (safetensors only, never pickle) load with `GPT.from_pretrained` and are
  written back with `save_pretrained`, which transformers loads with identical logits.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import UserError

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "mistral")


@dataclass
class GPTConfig:
    model_type: str = "llama"  # Hugging Face family: 'gpt2' | 'llama' | 'qwen2' | 'mistral'
    vocab_size: int = 512
    block_size: int = 512  # longest sequence the model is used with (positions for GPT-2)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4  # < n_head: grouped-query attention
    n_embd: int = 128
    head_dim: int | None = None  # None: n_embd // n_head
    intermediate_size: int | None = None  # None: 4*n_embd (gpt2) or ~8/3*n_embd rounded to 64 (llama)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None or Llama-3's {'rope_type': 'llama3', 'factor': ..., ...}
    tie_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2 has biases on q, k, v
    attn_out_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None  # carried into the exported config.json
    eos_token_id: int | list[int] | None = None
    attention: str = "sdpa"  # 'sdpa' | 'triton'

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(f"model_type '{self.model_type}' is not supported; use one of {SUPPORTED_MODEL_TYPES}")
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise UserError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; change one of them")
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise UserError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.intermediate_size is None:
            if self.is_gpt2:
                self.intermediate_size = 4 * self.n_embd
            else:
                self.intermediate_size = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        if self.attention not in ("sdpa", "triton"):
            raise UserError(f"attention='{self.attention}' is unknown; use 'sdpa' or 'triton'")

    @property
    def is_gpt2(self) -> bool:
        return self.model_type == "gpt2"


# ----------------------------------------------------------------------------------------------
# small math functions


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # normalise in fp32 and cast back before the weight, as Llama's reference does, so bf16 matches
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_inv_freq(cfg: GPTConfig, device=None) -> torch.Tensor:
    """(head_dim/2,) fp32 inverse frequencies, with Llama-3's long-context scaling if configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.int64).float() / d))
    scaling = cfg.rope_scaling
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(cfg: GPTConfig, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """pos (B, T) -> cos, sin (B, 1, T, head_dim), computed in fp32 then cast."""
    freqs = pos.float()[..., None] * rope_inv_freq(cfg, pos.device)  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, D): the half-split layout Hugging Face uses
    return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D): rotate pairs (i, i + D/2) by the position's angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "sdpa",
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) -> (B, Hq, Tq, D).

    Without a mask the attention is causal over aligned q/k (training, full forward); with a boolean
    mask (B, 1, Tq, Tk), True = may attend (the KV-cached sampler), it is used as given.
    """
    gqa = q.shape[1] != k.shape[1]
    if mask is None and impl == "triton":
        from kernels.attention import attention
        return attention(q, k, v, causal=True)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


# ----------------------------------------------------------------------------------------------
# modules


class KVCache(nn.Module):
    """Static, preallocated per-layer cache: k, v (B, n_kv_head, max_len, head_dim)."""

    def __init__(self, batch_size: int, max_len: int, cfg: GPTConfig, device=None, dtype=torch.float32):
        super().__init__()
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at cache slots (T,) and return the whole cache."""
        self.k.index_copy_(2, slots, k.to(self.k.dtype))
        self.v.index_copy_(2, slots, v.to(self.v.dtype))
        return self.k, self.v


class Norm(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.eps = cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.n_embd))
        self.bias = nn.Parameter(torch.zeros(cfg.n_embd)) if cfg.is_gpt2 else None

    def forward(self, x):
        if self.bias is not None:
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        qkv_bias = cfg.is_gpt2 or cfg.qkv_bias
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.is_gpt2 or cfg.attn_out_bias)

    def forward(self, x, rope=None, cache: KVCache | None = None, slots=None, mask=None):
        cfg = self.cfg
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim,
                                     cfg.n_kv_head * cfg.head_dim], dim=-1)
        q = q.view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = k.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(slots, k, v)  # (B, Hkv, max_len, D)
            k, v = k.to(q.dtype), v.to(q.dtype)
        y = attend(q, k, v, cfg.attention, mask)  # (B, Hq, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        bias = cfg.is_gpt2 or cfg.mlp_bias
        self.up = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=bias)
        self.gate = None if cfg.is_gpt2 else nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=bias)
        self.down = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=bias)

    def forward(self, x):
        if self.gate is None:
            return self.down(F.gelu(self.up(x), approximate="tanh"))  # GPT-2's 'gelu_new'
        return self.down(F.silu(self.gate(x)) * self.up(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = Norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = Norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, cache=None, slots=None, mask=None):
        x = x + self.attn(self.norm1(x), rope, cache, slots, mask)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.is_gpt2 else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = Norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.kv_caches: list[KVCache] | None = None
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_weights)
            # residual projections scaled down so the residual stream's variance stays put with depth
            for name, p in self.named_parameters():
                if name.endswith("attn.proj.weight") or name.endswith("mlp.down.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # --- the forward pass --------------------------------------------------------------------

    def hidden_states(self, idx: torch.Tensor, pos: torch.Tensor | None = None,
                      slots: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) -> final hidden states (B, T, C), after the last norm.

        pos (B, T) are the positions (default 0..T-1 for every row). With `setup_kv_cache` called,
        `slots` (T,) says where in the cache these tokens go and `mask` (B, 1, T, max_len) which
        cache entries each query may see.
        """
        B, T = idx.shape
        if pos is None:
            if T > self.config.block_size:
                raise UserError(f"sequence of {T} tokens is longer than block_size={self.config.block_size}; "
                                f"raise block_size or shorten max_len")
            pos = torch.arange(T, device=idx.device).expand(B, T)
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        else:
            rope = rope_cos_sin(self.config, pos, x.dtype)
        caches = self.kv_caches if slots is not None else None
        for i, block in enumerate(self.blocks):
            x = block(x, rope, caches[i] if caches else None, slots, mask)
        return self.norm_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, return_logprobs: bool = False,
                pos=None, slots=None, mask=None) -> torch.Tensor:
        """Without targets: logits (B, T, V) in fp32.
        With targets (B, T) (-100 = ignore): the mean cross-entropy over the kept tokens, or, with
        return_logprobs=True, per-token log-probs (B, T) fp32 (0 where ignored) — both from the fused
        log-prob kernel, so the full logits are never materialised.
        """
        h = self.hidden_states(idx, pos, slots, mask)  # (B, T, C)
        if targets is None:
            return self.lm_head(h).float()
        from kernels.logprob import token_logprobs
        B, T, C = h.shape
        logps = token_logprobs(h.reshape(B * T, C), self.lm_head.weight, targets.reshape(B * T))
        logps = logps.view(B, T).clone()  # a fresh tensor, not a view: FSDP's forward hooks warn about views
        if return_logprobs:
            return logps
        return -logps.sum() / (targets != -100).sum().clamp(min=1)

    # --- KV cache for generate.py ------------------------------------------------------------

    def setup_kv_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        param = self.lm_head.weight
        self.kv_caches = [KVCache(batch_size, max_len, self.config, param.device, dtype or param.dtype)
                          for _ in range(self.config.n_layer)]

    def clear_kv_cache(self) -> None:
        self.kv_caches = None

    # --- accounting --------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if non_embedding:
            n -= self.wte.weight.numel()
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 per weight plus attention (PaLM appendix B)."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len

    # --- Hugging Face import/export ----------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str, attention: str = "sdpa", block_size: int | None = None,
                        dtype: torch.dtype = torch.float32) -> "GPT":
        """Load a local Hugging Face model directory (config.json + safetensors, sharded or not)."""
        cfg = hf_config_to_gpt_config(read_hf_config(path), attention=attention, block_size=block_size,
                                      where=os.path.join(path, "config.json"))
        hf_state = read_safetensors_dir(path)
        state = hf_state_to_nanospin(hf_state, cfg, path)
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.wte.weight
        return model

    def save_pretrained(self, path: str, max_shard_bytes: int = 4 << 30, dtype: torch.dtype | None = None) -> None:
        """Write a Hugging Face directory (config.json + model.safetensors, sharded above
        max_shard_bytes) that transformers' AutoModelForCausalLM loads as it is."""
        state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous()
                 for k, v in nanospin_state_to_hf(self.state_dict(), self.config).items()}
        save_hf_dir(path, gpt_config_to_hf_config(self.config, dtype or self.lm_head.weight.dtype), state,
                    max_shard_bytes)


# ----------------------------------------------------------------------------------------------
# Hugging Face checkpoint format


def read_hf_config(path: str) -> dict:
    config_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise UserError(f"model directory '{path}' does not exist; give a Hugging Face model directory "
                        f"(config.json + *.safetensors) or a nanospin checkpoint directory")
    if not os.path.isfile(config_path):
        raise UserError(f"'{path}' has no config.json; it is not a Hugging Face model directory")
    try:
        return json.load(open(config_path))
    except json.JSONDecodeError as e:
        raise UserError(f"{config_path}:{e.lineno}: invalid JSON: {e.msg}") from None


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
    window = hf.get("sliding_window")
    uses_window = model_type == "mistral" or hf.get("use_sliding_window", False)
    if uses_window and window is not None and window < block:
        raise UserError(f"{where}: sliding_window={window} is smaller than the context in use ({block}); nanospin "
                        f"has no sliding-window attention, so set block_size <= {window}")
    theta, scaling = _rope_settings(hf, where)
    n_head = hf["num_attention_heads"]
    return GPTConfig(**common, block_size=block, n_layer=hf["num_hidden_layers"], n_head=n_head,
                     n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=hf["hidden_size"],
                     head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
                     intermediate_size=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                     rope_theta=theta, rope_scaling=scaling, tie_embeddings=hf.get("tie_word_embeddings", False),
                     qkv_bias=model_type == "qwen2" or hf.get("attention_bias", False),
                     attn_out_bias=model_type != "qwen2" and hf.get("attention_bias", False),
                     mlp_bias=hf.get("mlp_bias", False))


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
        out.update(use_sliding_window=False, sliding_window=None)
    if cfg.model_type == "mistral":
        out.update(sliding_window=None)
    return out


def read_safetensors_dir(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    elif os.path.isfile(single):
        files = ["model.safetensors"]
    else:
        hint = " (pickled .bin weights are never loaded; convert them to safetensors)" if any(
            f.endswith(".bin") for f in os.listdir(path)) else ""
        raise UserError(f"'{path}' has no model.safetensors or model.safetensors.index.json{hint}")
    state = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise UserError(f"shard '{file}' named in model.safetensors.index.json is missing")
        try:
            state.update(load_file(file))
        except Exception as e:
            raise UserError(f"cannot read '{file}': {e}") from None
    return state


def save_hf_dir(path: str, hf_config: dict, state: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    from safetensors.torch import save_file
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
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _hf_layer_names(cfg: GPTConfig, i: int) -> dict[str, str]:
    """nanospin name -> Hugging Face name for layer i (fused qkv handled separately)."""
    if cfg.is_gpt2:
        p = f"h.{i}."
        return {f"blocks.{i}.norm1.weight": p + "ln_1.weight", f"blocks.{i}.norm1.bias": p + "ln_1.bias",
                f"blocks.{i}.norm2.weight": p + "ln_2.weight", f"blocks.{i}.norm2.bias": p + "ln_2.bias",
                f"blocks.{i}.attn.proj.weight": p + "attn.c_proj.weight", f"blocks.{i}.attn.proj.bias": p + "attn.c_proj.bias",
                f"blocks.{i}.mlp.up.weight": p + "mlp.c_fc.weight", f"blocks.{i}.mlp.up.bias": p + "mlp.c_fc.bias",
                f"blocks.{i}.mlp.down.weight": p + "mlp.c_proj.weight", f"blocks.{i}.mlp.down.bias": p + "mlp.c_proj.bias"}
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

    state = {ours: take(theirs) for ours, theirs in _hf_global_names(cfg).items()}
    for i in range(cfg.n_layer):
        state.update({ours: take(theirs) for ours, theirs in _hf_layer_names(cfg, i).items()})
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
            hf_name = {**_hf_global_names(cfg), **{k: v for i in range(cfg.n_layer)
                                                  for k, v in _hf_layer_names(cfg, i).items()}}.get(name, name)
            raise UserError(f"tensor '{hf_name}' in '{where}' has shape {tuple(tensor.shape)}, but config.json "
                            f"implies {tuple(expected[name].shape)}")
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


def gpt_config_from_dict(d: dict) -> GPTConfig:
    """Rebuild a GPTConfig from asdict() output (nanospin checkpoints store it this way)."""
    known = {f.name for f in fields(GPTConfig)}
    return GPTConfig(**{k: v for k, v in d.items() if k in known})


def gpt_config_to_dict(cfg: GPTConfig) -> dict:
    return asdict(cfg)
