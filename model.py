"""The language model: one GPT module that covers GPT-2 and the Llama family (Llama, Qwen2, Mistral).

Design choices:
- One nn.Module and one dataclass; the family switches only small pieces (LayerNorm or RMSNorm, GELU or SwiGLU,
  learned positions or RoPE, biases), so the forward reads the same for all. q, k, v come from one projection;
  grouped-query attention never repeats k/v in memory.
- `attend` picks 'sdpa' or 'triton' (spin_kernels/attention.py); attention is causal, masked to packed rows'
  documents (packing.RowLayout) and to a sliding window, measured on positions so packed rows stay right.
- `token_logprobs` goes through the fused log-prob kernel from the final hidden states, so the (B, T, vocab)
  logits never exist in training. A static KV cache lets the same forward serve generate.py.
- The architecture only: checkpoint.py reads and writes Hugging Face directories; nothing above the kernels
  is imported here."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import UserError
from packing import RowLayout, sdpa_mask

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "mistral")  # the Hugging Face families loaded and saved
# the block styles a model built from scratch takes: Qwen2 and Mistral are Llama blocks plus what only a
# checkpoint brings (q/k/v biases, a sliding window)
SCRATCH_MODEL_TYPES = ("gpt2", "llama")
ATTENTION_IMPLS = ("sdpa", "triton")


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
    sliding_window: int | None = None  # Mistral's: a token attends to the last sliding_window positions only
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
        if self.attention not in ATTENTION_IMPLS:
            raise UserError(f"attention='{self.attention}' is unknown; use one of {ATTENTION_IMPLS}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise UserError(f"sliding_window={self.sliding_window} must be >= 1 (or None for full attention)")

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


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "sdpa", mask: torch.Tensor | None = None,
           layout: RowLayout | None = None, window: int | None = None) -> torch.Tensor:
    """q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) -> (B, Hq, Tq, D). A boolean mask (True = may attend) is used as given;
    without one attention is causal, within packed documents (layout) and the sliding window."""
    gqa = q.shape[1] != k.shape[1]
    if mask is None and impl == "triton":
        from spin_kernels import KernelError
        from spin_kernels.attention import attention
        try:
            return attention(q, k, v, causal=True, layout=layout, window=window)
        except KernelError as e:  # the kernels' own error, shown to people as every input error is
            raise UserError(str(e)) from None
    if mask is None:  # GPT.hidden_states passes it in (once for every layer); made here for other callers
        mask = sdpa_mask(layout, q.shape[2], window, q.device)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


# ----------------------------------------------------------------------------------------------
# modules


class KVCache(nn.Module):
    """Static, preallocated per-layer cache: k, v (B, n_kv_head, max_len, head_dim), one row per sequence."""

    def __init__(self, batch_size: int, max_len: int, cfg: GPTConfig, device=None, dtype=torch.float32):
        super().__init__()
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, slots: tuple[torch.Tensor | None, torch.Tensor], k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D); return the keys and values the queries attend to. slots = (rows, positions): rows
        None is a step of every row, token t of row b going to positions[b, t], and the whole cache comes back; rows
        (B,) is a prefill starting those rows at 0..T-1, which sees only its own keys: k, v come back."""
        rows, positions = slots
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if rows is None:
            index = positions[:, None, :, None].expand_as(k)  # (B, Hkv, T, D)
            self.k.scatter_(2, index, k)
            self.v.scatter_(2, index, v)
            return self.k, self.v
        T = k.shape[2]
        self.k[:, :, :T].index_copy_(0, rows, k)
        self.v[:, :, :T].index_copy_(0, rows, v)
        return k, v


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

    def forward(self, x, rope=None, cache: KVCache | None = None, slots=None, mask=None, layout=None):
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
            k, v = cache.update(slots, k, v)  # (B, Hkv, max_len or T, D)
            k, v = k.to(q.dtype), v.to(q.dtype)
        y = attend(q, k, v, cfg.attention, mask, layout, cfg.sliding_window)  # (B, Hq, T, D)
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

    def forward(self, x, rope=None, cache=None, slots=None, mask=None, layout=None):
        x = x + self.attn(self.norm1(x), rope, cache, slots, mask, layout)
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
        self.kv_caches: list[KVCache] | None = None  # the cache in use while generate.py samples
        self.kept_kv_caches: list[KVCache] | None = None  # the last setup_kv_cache(reuse=True) cache
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

    def hidden_states(self, idx: torch.Tensor, pos: torch.Tensor | None = None, slots: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None, layout: RowLayout | None = None) -> torch.Tensor:
        """idx (B, T) -> final hidden states (B, T, C). pos (B, T): default 0..T-1 (packed rows: layout.positions); with
        a KV cache, `slots` says where the tokens go (KVCache.update) and `mask` which keys each query sees."""
        B, T = idx.shape
        if layout is not None:
            pos = layout.positions
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
        if mask is None and self.config.attention == "sdpa":  # one mask for every layer (a prefill's too)
            mask = sdpa_mask(layout, T, self.config.sliding_window, idx.device)
        caches = self.kv_caches if slots is not None else None
        for i, block in enumerate(self.blocks):
            x = block(x, rope, caches[i] if caches else None, slots, mask, layout)
        return self.norm_f(x)

    def forward(self, idx: torch.Tensor, pos: torch.Tensor | None = None, slots: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, V) in fp32 (sampling and tests; training uses token_logprobs)."""
        return self.lm_head(self.hidden_states(idx, pos, slots, mask)).float()

    def token_logprobs(self, idx: torch.Tensor, targets: torch.Tensor,
                       layout: RowLayout | None = None) -> torch.Tensor:
        """idx, targets (B, T) -> log p(targets) (B, T) fp32 (0 where targets == -100), by the fused log-prob kernel."""
        from spin_kernels import KernelError
        from spin_kernels.logprob import token_logprobs
        h = self.hidden_states(idx, layout=layout)  # (B, T, C)
        B, T, C = h.shape
        try:
            logps = token_logprobs(h.reshape(B * T, C), self.lm_head.weight, targets.reshape(B * T))
        except KernelError as e:  # e.g. TRITON_INTERPRET set after triton was imported
            raise UserError(str(e)) from None
        return logps.view(B, T).clone()  # a fresh tensor, not a view: FSDP's forward hooks warn about views

    # --- KV cache for generate.py ------------------------------------------------------------

    def setup_kv_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                       reuse: bool = False) -> None:
        """Give every layer a zeroed static cache; reuse=True takes the kept one when shape, dtype and device match (a
        CUDA graph replays on fixed addresses)."""
        param, cfg = self.lm_head.weight, self.config
        dtype = dtype or param.dtype
        kept = self.kept_kv_caches
        if reuse and kept and kept[0].k.shape == (batch_size, cfg.n_kv_head, max_len, cfg.head_dim) and (
                kept[0].k.dtype == dtype and kept[0].k.device == param.device):
            for cache in kept:  # masked slots weigh 0, but 0 * a stale inf would still be NaN
                cache.k.zero_()
                cache.v.zero_()
            self.kv_caches = kept
            return
        self.kv_caches = [KVCache(batch_size, max_len, cfg, param.device, dtype) for _ in range(cfg.n_layer)]
        if reuse:
            self.kept_kv_caches = self.kv_caches

    def clear_kv_cache(self) -> None:
        self.kv_caches = None

    def release_kv_caches(self) -> None:
        """Drop the cache and the one kept for reuse, whose memory training needs back."""
        self.kv_caches = self.kept_kv_caches = None

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

    # --- a grown vocabulary ------------------------------------------------------------------

    def grow_vocab(self, vocab_size: int) -> None:
        """New embedding (and untied output) rows up to vocab_size, each the mean of the existing rows, so a new marker
        starts as an average token and disturbs the pretrained model least."""
        old, C = self.config.vocab_size, self.config.n_embd
        with torch.no_grad():
            wte = nn.Embedding(vocab_size, C)  # (V', C)
            wte.weight[:old] = self.wte.weight
            wte.weight[old:] = self.wte.weight.mean(0)
            self.wte = wte
            if self.config.tie_embeddings:
                self.lm_head = nn.Linear(C, vocab_size, bias=False)
                self.lm_head.weight = self.wte.weight
            else:
                head = nn.Linear(C, vocab_size, bias=False)  # weight (V', C)
                head.weight[:old] = self.lm_head.weight
                head.weight[old:] = self.lm_head.weight.mean(0)
                self.lm_head = head
        self.config.vocab_size = vocab_size
