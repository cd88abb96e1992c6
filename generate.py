"""Batched KV-cached sampling with continuous batching (the SPIN rollout engine) and a chat command line.

Design choices:
- gpt-fast's structure: a static KV cache of `batch_size` rows, a `prefill` per prompt, then `decode_one_token`
  steps whose shapes never change, so the step can be torch.compile'd (CUDA graphs on the GPU).
- Continuous batching: a row whose answer has ended takes the next prompt while the others keep decoding.
- A row keeps its tokens at cache positions 0, 1, ... and a step attends to the whole cache, masked past the
  row's position: attending only to the filled part would make the width, and so SDPA's CPU reductions' last
  bits, depend on the other rows. Draws come from a per-prompt SplitMix64 stream, so a prompt's answer does not
  depend on its neighbours or the world size.
- How a token is drawn is one `Sampling` value, checked when made; temperature, top-k, top-p, min-p in Hugging
  Face's order, as small pure functions. `generate_ref` (a full forward per step) is the tests' reference.

CLI: python generate.py --model=<HF dir | nanospin checkpoint or out_dir> [--prompt="..."] [--temperature=0.7]
     [--top_k=...] [--top_p=...] [--min_p=...]"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import configurator

if __name__ == "__main__":  # --help answers before torch's seconds of imports
    configurator.help_if_asked(sys.argv[1:], __file__, "GenerateConfig",
                                'python generate.py --model=DIR [--prompt="..."] [--key=value ...]',
                                "DIR is a Hugging Face model directory, a nanospin checkpoint or a run's out_dir (its "
                                "final/); without --prompt it chats until 'exit' or Ctrl-D. More: README.md (Chat "
                                "with a model).")

import numpy as np
import torch

from checkpoint import load_for_chat
from configurator import UserError
from model import GPT

# decode steps between reading which rows are done (a host sync): every step costs little on the CPU; on the
# GPU a sync per step would stall the queue of launches, and a row found done late only marks time
CHECK_EVERY = {"cpu": 1, "default": 8}

# ----------------------------------------------------------------------------------------------
# sampling: what to draw from, and small pure functions on (B, V) logits


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn; its fields are config keys of train.py and generate.py, checked when made."""
    temperature: float = 1.0  # 0 = greedy (argmax; the filters then change nothing)
    top_k: int | None = None  # keep the k most likely tokens (and any tied with the k-th)
    top_p: float | None = None  # keep the smallest most-likely set whose probability sums to >= top_p
    min_p: float | None = None  # keep the tokens at least min_p times as likely as the most likely one

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise UserError(f"config key 'temperature' must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"config key 'top_k' must be >= 1 (None: no top-k filter), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"config key 'top_p' must be in (0, 1] (None: no top-p filter), got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise UserError(f"config key 'min_p' must be in [0, 1] (None: no min-p filter), got {self.min_p}")


GREEDY = Sampling(temperature=0.0)


def sampling_of(cfg) -> Sampling:
    return Sampling(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(Sampling)})


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (and any tied with the k-th), set the rest to -inf."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest most-likely set whose probability sums to >= p (and ties); -inf elsewhere."""
    probs = torch.softmax(logits, dim=-1)
    sorted_probs = torch.sort(probs, dim=-1, descending=True).values  # (B, V)
    # tokens needed = 1 + how many prefix sums are still short of p
    n_keep = ((torch.cumsum(sorted_probs, dim=-1) < p).sum(-1, keepdim=True) + 1).clamp(max=logits.shape[-1])
    threshold = sorted_probs.gather(-1, n_keep - 1)  # (B, 1) probability of the last token kept
    return logits.masked_fill(probs < threshold, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p (as vLLM and Hugging Face): keep tokens with probability >= min_p times the row's largest."""
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))


_U64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """One 63-bit seed from integers (SplitMix64's finaliser): (seed, i) and (seed, i + 1) give unrelated streams."""
    h = 0
    for value in values:
        h = (h ^ (value & _U64)) + 0x9E3779B97F4A7C15 & _U64
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & _U64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _U64
        h ^= h >> 31
    return h >> 1


# every seed derived from a run's seed, by purpose: (offset, stride) give seed + offset + stride x index. The values
# are the ones nanospin's runs have always drawn with, so results stay comparable; a new purpose takes a new pair.
SEED_PURPOSES = {
    "data_order": (0, 1000),  # the batch order of the run's phase number `index` (data.BatchOrder)
    "prompt_subset": (0, 101),  # iteration `index`'s prompts when prompts_per_iteration picks a subset
    "rollout": (0, 7777),  # an iteration's rollout number `index` (one per epoch with regenerate_per_epoch)
    "eval_rollout": (1, 0),  # an iteration's rollout of the held-out prompts
    "checker": (17, 1),  # the checker's answers to the held-out prompts from number `index` on
    "chat_turn": (0, 1),  # generate.py's chat: turn `index`
}


def derive_seed(seed: int, purpose: str, index: int = 0) -> int:
    """The seed for `purpose` (SEED_PURPOSES), e.g. derive_seed(1337, 'rollout', 2)."""
    offset, stride = SEED_PURPOSES[purpose]
    return seed + offset + stride * index


def uniforms(seed: int, n: int) -> np.ndarray:
    """The first n draws of the SplitMix64 stream `seed` as float64 in (0, 1), the same on every device and batch."""
    with np.errstate(over="ignore"):  # uint64 arithmetic is meant to wrap
        z = np.uint64(seed & _U64) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53  # 53 random bits, never 0 or 1


def sample_next(logits: torch.Tensor, sampling: Sampling, draws: torch.Tensor | None) -> torch.Tensor:
    """logits (B, V), draws (B,) -> next tokens (B,) by inverse CDF, so a row's token depends on its own logits and
    draw only; temperature 0 is greedy."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    if sampling.temperature != 1:  # x / 1 == x: skip the op and its (B, V) copy
        logits = logits / sampling.temperature
    if sampling.top_k is not None:
        logits = top_k_filter(logits, sampling.top_k)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        logits = top_p_filter(logits, sampling.top_p)
    if sampling.min_p:  # None or 0 keeps every token
        logits = min_p_filter(logits, sampling.min_p)
    cdf = torch.softmax(logits, dim=-1).cumsum(-1)  # (B, V)
    total = cdf[:, -1:]
    # just below the total, so the token found has cdf > target >= the previous cdf: probability > 0
    target = torch.minimum((draws[:, None] * total).float(), torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)[:, 0]


def token_logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per row, (B, V), (B,) -> (B,)."""
    return logits.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


# ----------------------------------------------------------------------------------------------
# the KV-cached forward passes


def attention_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """query_pos (B, T), key_pos (L,) -> (B, 1, T, L) bool, True = may attend: keys up to the query's position and,
    with a window, fewer than `window` back. The decode step's mask; a prefill uses the model's causal one."""
    query = query_pos[:, None, :, None]  # (B, 1, T, 1)
    seen = key_pos <= query  # (B, 1, T, L)
    return seen if window is None else seen & (key_pos > query - window)


def prefill(model: GPT, prompts: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Run right-padded prompts (B, T) into cache rows `rows` at positions 0..T-1 and return their last logits (B, V)
    fp32. A fresh row sees only its own keys; a pad's key is masked by the decode steps, then overwritten."""
    pos = torch.arange(prompts.shape[1], device=prompts.device).expand_as(prompts)  # (B, T)
    h = model.hidden_states(prompts, pos, (rows, pos))  # (B, T, C)
    last = h[torch.arange(len(rows), device=h.device), lengths - 1]  # (B, C)
    return model.lm_head(last).float()


def decode_logits(model: GPT, token: torch.Tensor, pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """One step for every cache row: token, pos (B, 1) -> logits (B, V) fp32, attending to the whole cache (static
    shapes: what torch.compile captures)."""
    mask = attention_mask(pos, key_pos, model.config.sliding_window)  # (B, 1, 1, L)
    h = model.hidden_states(token, pos, (None, pos), mask)  # (B, 1, C)
    return model.lm_head(h[:, -1]).float()


@functools.cache
def compiled_decode(device_type: str, backend: str = "inductor") -> Callable:
    """decode_logits under torch.compile, once per (device type, backend); CUDA graphs on the GPU."""
    if device_type == "cuda" and backend == "inductor":
        return torch.compile(decode_logits, mode="reduce-overhead", fullgraph=True)
    return torch.compile(decode_logits, backend=backend, fullgraph=True)


def decode_one_token(model: GPT, token: torch.Tensor, pos: torch.Tensor, key_pos: torch.Tensor, sampling: Sampling,
                     draws: torch.Tensor | None, compile: bool | str = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step: returns the next tokens (B,) and the step's raw logits (B, V)."""
    step = decode_logits
    if compile:
        step = compiled_decode(token.device.type, "inductor" if compile is True else compile)
    logits = step(model, token, pos, key_pos)
    return sample_next(logits, sampling, draws), logits


# ----------------------------------------------------------------------------------------------
# generate


def _as_id_list(eos_id: int | list[int] | None) -> list[int]:
    if eos_id is None:
        return []
    return [eos_id] if isinstance(eos_id, int) else list(eos_id)


def _row_budgets(prompts: list[list[int]], max_new_tokens: int | list[int], max_len: int, limit: str) -> list[int]:
    """How many tokens each row may add: its max_new_tokens, and prompt + new <= max_len (from `limit`)."""
    if isinstance(max_new_tokens, int):
        max_new_tokens = [max_new_tokens] * len(prompts)
    elif len(max_new_tokens) != len(prompts):
        raise UserError(f"max_new_tokens is a list of {len(max_new_tokens)} for {len(prompts)} prompts; "
                        f"give one per prompt or one int")
    budgets = []
    for i, (p, max_new) in enumerate(zip(prompts, max_new_tokens)):
        if max_new < 0:
            raise UserError(f"max_new_tokens={max_new} (prompt {i}) must be >= 0")
        if not p:
            raise UserError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        if len(p) >= max_len:
            raise UserError(f"prompt {i} has {len(p)} tokens, which leaves no room in {limit}={max_len} tokens; "
                            f"shorten the prompt")
        budgets.append(min(max_new, max_len - len(p)))
    return budgets


def _cut_rows(new_tokens: list[list[int]], budgets: list[int], stop: list[int]) -> list[list[int]]:
    """Cut each row after its first stop token (kept) or at its budget."""
    out = []
    for row, budget in zip(new_tokens, budgets):
        ends = [j for j, t in enumerate(row[:budget]) if t in stop]
        out.append(row[:ends[0] + 1] if ends else row[:budget])
    return out


def _prompt_seeds(seed: int | list[int] | None, n: int) -> list[int]:
    if isinstance(seed, list):
        if len(seed) != n:
            raise UserError(f"seed is a list of {len(seed)} seeds for {n} prompts; give one per prompt")
        return seed
    if seed is None:  # the global RNG picks the base seed, so torch.manual_seed still reproduces a run
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return [mix_seed(seed, i) for i in range(n)]


@dataclass
class Rows:
    """The sampler's state, one entry per cache row (R rows, W = the longest budget + 1)."""
    token: torch.Tensor  # (R,) the token each row feeds next
    pos: torch.Tensor  # (R,) its position = its cache index
    n_new: torch.Tensor  # (R,) tokens sampled in the row so far
    budget: torch.Tensor  # (R,) tokens the row may sample
    done: torch.Tensor  # (R,) bool: the row's answer has ended
    new_tokens: torch.Tensor  # (R, W) the row's answer so far; the extra column takes the writes of idle rows
    logps: torch.Tensor | None  # (R, W) their log-probs, when asked for
    draws: torch.Tensor | None  # (R, W) float64: the row's prompt's uniforms, when sampling
    prompt: list[int | None]  # the prompt each row is answering (None: the row marks time)


def _empty_rows(n_rows: int, width: int, device: torch.device, return_logprobs: bool, sampled: bool) -> Rows:
    def zeros(*shape, dtype=torch.long):
        return torch.zeros(*shape, dtype=dtype, device=device)
    return Rows(zeros(n_rows), zeros(n_rows), zeros(n_rows), zeros(n_rows), torch.ones(n_rows, dtype=torch.bool,
                device=device), zeros(n_rows, width), zeros(n_rows, width, dtype=torch.float32) if return_logprobs
                else None, zeros(n_rows, width, dtype=torch.float64) if sampled else None, [None] * n_rows)


def _cache_len(prompts: list[list[int]], budgets: list[int], max_len: int | None, compile: bool | str) -> int:
    """Cache positions a call needs (the last token is never fed back); a given max_len fixes it; compiled, rounded up
    to 128 (fewer recompiles)."""
    if max_len:
        return max_len - 1
    cache_len = max(len(p) + b for p, b in zip(prompts, budgets)) - 1
    return -(-cache_len // 128) * 128 if compile else cache_len


def _start_rows(model: GPT, rows: Rows, free: list[int], waiting: deque, prompts: list[list[int]],
                budgets: list[int], seeds: list[int] | None, stop_ids: torch.Tensor, sampling: Sampling) -> None:
    """Prefill the next waiting prompts into the free rows, one per prefill, and sample their first tokens."""
    width = rows.new_tokens.shape[1]
    for r in free:
        rows.prompt[r] = waiting.popleft() if waiting else None
    for r in [r for r in free if rows.prompt[r] is not None]:
        i = rows.prompt[r]
        at = torch.tensor([r], device=rows.token.device)
        logits = prefill(model, torch.tensor([prompts[i]], device=at.device), torch.tensor([len(prompts[i])],
                         device=at.device), at)  # (1, V)
        if rows.draws is not None:
            rows.draws[r] = torch.from_numpy(uniforms(seeds[i], width)).to(at.device)
        first = sample_next(logits, sampling, None if rows.draws is None else rows.draws[at, 0])
        rows.token[r], rows.pos[r], rows.n_new[r], rows.budget[r] = first[0], len(prompts[i]), 1, budgets[i]
        rows.new_tokens[r, 0] = first[0]
        if rows.logps is not None:
            rows.logps[r, 0] = token_logprobs_of(logits, first)[0]
        rows.done[r] = torch.isin(first, stop_ids)[0] | (budgets[i] == 1)  # no host sync


def _finished_rows(rows: Rows) -> list[int]:
    flags = rows.done.tolist()
    return [r for r, flag in enumerate(flags) if flag and rows.prompt[r] is not None]


@torch.inference_mode()
def generate_stream(model: GPT, prompts: list[list[int]], max_new_tokens: int | list[int], *,
                    sampling: Sampling = Sampling(), eos_id: int | list[int] | None = None,
                    seed: int | list[int] | None = None, return_logprobs: bool = False,
                    compile: bool | str = False, batch_size: int | None = None, max_len: int | None = None,
                    on_step: Callable[[torch.Tensor], None] | None = None
                    ) -> Iterator[tuple[int, list[int], list[float] | None]]:
    """`generate`, yielding (prompt index, new tokens, their log-probs or None) as each prompt ends; closing the
    iterator early stops the work and frees the cache."""
    block_size = model.config.block_size
    if max_len is not None and max_len > block_size:
        raise UserError(f"max_len={max_len} exceeds the model's block_size={block_size}; lower max_len")
    budgets = _row_budgets(prompts, max_new_tokens, max_len or block_size,
                           "block_size" if max_len is None else "max_len")
    for i in range(len(prompts)):
        if budgets[i] == 0:
            yield i, [], [] if return_logprobs else None
    if not prompts or max(budgets) <= 0:
        return
    stop = _as_id_list(eos_id)
    seeds = _prompt_seeds(seed, len(prompts)) if sampling.temperature > 0 else None
    n_rows = batch_size or len(prompts)
    cache_len = _cache_len(prompts, budgets, max_len, compile)
    last_pos = min(cache_len, block_size) - 1  # where rows without a prompt mark time (static shapes)
    device = model.lm_head.weight.device
    check_every = CHECK_EVERY.get(device.type, CHECK_EVERY["default"])

    was_training = model.training
    model.eval()
    model.setup_kv_cache(n_rows, cache_len, reuse=bool(compile))
    try:
        rows = _empty_rows(n_rows, max(budgets) + 1, device, return_logprobs, seeds is not None)
        all_rows = torch.arange(n_rows, device=device)
        stop_ids = torch.tensor(stop, device=device, dtype=torch.long)
        key_pos = torch.arange(cache_len, device=device)  # (L,) the cache positions a step may attend to
        start = functools.partial(_start_rows, model, rows, waiting=deque(i for i in range(len(prompts))
                                  if budgets[i] > 0), prompts=prompts, budgets=budgets, seeds=seeds,
                                  stop_ids=stop_ids, sampling=sampling)
        start(list(range(n_rows)))
        if on_step is not None:
            on_step(rows.token)
        step = 0
        while True:
            if step % check_every == 0:
                while ended := _finished_rows(rows):  # a new prompt may end at its first token: check again
                    for r, tokens in zip(ended, rows.new_tokens[ended].tolist()):
                        i = rows.prompt[r]
                        out = _cut_rows([tokens], [budgets[i]], stop)[0]
                        yield i, out, rows.logps[r, :len(out)].tolist() if rows.logps is not None else None
                    start(ended)
                if all(i is None for i in rows.prompt):
                    break
            row_draws = None if rows.draws is None else rows.draws.gather(1, rows.n_new[:, None])[:, 0]  # (R,)
            rows.token, logits = decode_one_token(model, rows.token[:, None], rows.pos[:, None], key_pos, sampling,
                                                  row_draws, compile)
            rows.new_tokens[all_rows, rows.n_new] = rows.token
            if rows.logps is not None:
                rows.logps[all_rows, rows.n_new] = token_logprobs_of(logits, rows.token)
            rows.n_new.add_(1).clamp_(max=rows.new_tokens.shape[1] - 1)
            rows.pos.add_(1).clamp_(max=last_pos)
            rows.done |= rows.n_new >= rows.budget
            if stop:
                rows.done |= torch.isin(rows.token, stop_ids)
            if on_step is not None:
                on_step(rows.token)
            step += 1
    finally:
        model.clear_kv_cache()
        model.train(was_training)


def generate(model: GPT, prompts: list[list[int]], max_new_tokens: int | list[int], *, sampling: Sampling = Sampling(),
             eos_id: int | list[int] | None = None, seed: int | list[int] | None = None, return_logprobs: bool = False,
             compile: bool | str = False, batch_size: int | None = None, max_len: int | None = None,
             on_step: Callable[[torch.Tensor], None] | None = None
             ) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
    """Sample up to max_new_tokens (an int, or one per prompt) for each prompt; returns the new tokens, cut after the
    first eos_id token (kept).

    batch_size rows decode together (continuous batching). A row stops at prompt + new = max_len (default
    block_size); a given max_len also fixes the cache length, so a row's numbers do not depend on its neighbours.
    seed: an int (prompt i draws from mix_seed(seed, i)), one per prompt, or None (from torch's global RNG).
    return_logprobs: each new token's log-prob under the raw logits (before temperature and filters).
    compile: True for torch.compile (the cache is kept for the next call of the same shape), or a backend name.
    on_step(tokens) runs after every step (a device sync; the CLI streams with it)."""
    out: list[list[int]] = [[] for _ in prompts]
    out_logps: list[list[float]] = [[] for _ in prompts]
    for i, tokens, logps in generate_stream(model, prompts, max_new_tokens, sampling=sampling, eos_id=eos_id, seed=seed,
                                            return_logprobs=return_logprobs, compile=compile, batch_size=batch_size,
                                            max_len=max_len, on_step=on_step):
        out[i], out_logps[i] = tokens, logps
    return (out, out_logps) if return_logprobs else out


@torch.inference_mode()
def generate_ref(model: GPT, prompts: list[list[int]], max_new_tokens: int,
                 eos_id: int | list[int] | None = None) -> list[list[int]]:
    """Greedy decoding by a full forward every step, no cache (the reference); ragged prompts row by row."""
    if len({len(p) for p in prompts}) > 1:
        return [generate_ref(model, [p], max_new_tokens, eos_id)[0] for p in prompts]
    budgets = _row_budgets(prompts, max_new_tokens, model.config.block_size, "block_size")
    stop = _as_id_list(eos_id)
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    idx = torch.tensor(prompts, device=device)  # (B, T)
    for _ in range(max(budgets)):
        logits = model.lm_head(model.hidden_states(idx)[:, -1]).float()  # (B, V)
        idx = torch.cat([idx, logits.argmax(-1)[:, None]], dim=1)
        if stop and all(any(t in stop for t in row) for row in idx[:, len(prompts[0]):].tolist()):
            break
    model.train(was_training)
    return _cut_rows(idx[:, len(prompts[0]):].tolist(), budgets, stop)


# ----------------------------------------------------------------------------------------------
# command line


@dataclass
class GenerateConfig:
    model: str = ""  # a Hugging Face model dir, a nanospin checkpoint dir or a run's out_dir
    prompt: str | None = None  # None: interactive chat (until EOF or 'exit')
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = 0.9
    min_p: float | None = None  # e.g. 0.05: drop tokens under 5% of the most likely one's probability
    seed: int | None = None
    device: str = "auto"  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' ...
    dtype: str = "auto"  # 'auto' (bf16 on a GPU, fp32 on the CPU) | 'float32' | 'bfloat16' | 'float16'
    chat_template: str | dict | None = None  # override the template found with the model (a name or a dict, see README)
    compile: bool = False  # torch.compile the decode step (worth it on a GPU for long answers)


def stream_answer(model: GPT, tok, prompt_ids: list[int], cfg: GenerateConfig, template, stop: list[int],
                  seed: int | None) -> list[int]:
    """One answer (batch 1), printed as it grows; returns the new tokens."""
    from templates import response_text

    ids: list[int] = []
    printed = ""

    def text_of(tokens: list[int]) -> str:
        # ids past the tokenizer (a vocabulary padded for speed) have no text to show
        return response_text(tok, [t for t in tokens if t < tok.n_vocab], template)

    def on_step(token: torch.Tensor) -> None:
        nonlocal printed
        if ids and ids[-1] in stop:
            return
        ids.append(int(token[0]))
        text = text_of(ids)
        # a multi-byte character split across tokens decodes to U+FFFD until its last byte arrives
        if not text.endswith("\ufffd") and text.startswith(printed):
            print(text[len(printed):], end="", flush=True)
            printed = text

    new = generate(model, [prompt_ids], cfg.max_new_tokens, sampling=sampling_of(cfg), eos_id=stop or None, seed=seed,
                   compile=cfg.compile, on_step=on_step)[0]
    text = text_of(new)
    if text.startswith(printed):
        print(text[len(printed):], end="")
    print(flush=True)
    return new


def main(argv: list[str]) -> None:
    from templates import render_prompt, resolve_template, response_text, stop_ids

    cfg = parse_args(argv)
    dtype = None if cfg.dtype == "auto" else getattr(torch, cfg.dtype, None)
    if cfg.dtype != "auto" and not isinstance(dtype, torch.dtype):
        raise UserError(f"dtype='{cfg.dtype}' is unknown; use auto, float32, bfloat16 or float16")
    model, tok, template = load_for_chat(cfg.model, cfg.device, dtype)
    template = resolve_template(tok, cfg.chat_template) if cfg.chat_template else template
    stop = stop_ids(tok, template)
    if cfg.prompt is not None:
        prompt_ids = render_prompt(tok, [{"role": "user", "content": cfg.prompt}], template)
        stream_answer(model, tok, prompt_ids, cfg, template, stop, cfg.seed)
        return
    print(f"chatting with {cfg.model} (template '{template.name}'); 'exit' or Ctrl-D to quit", file=sys.stderr)
    messages: list[dict] = []
    turn = 0
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        if line.strip() == "exit":
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            prompt_ids = render_prompt(tok, messages, template)
            seed = None if cfg.seed is None else derive_seed(cfg.seed, "chat_turn", turn)
            new = stream_answer(model, tok, prompt_ids, cfg, template, stop, seed)
        except UserError as e:  # e.g. the history outgrew the context: say so, keep the session
            print(f"error: {e}", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant",
                         "content": response_text(tok, [t for t in new if t < tok.n_vocab], template)})
        turn += 1


def parse_args(argv: list[str]) -> GenerateConfig:
    cfg = configurator.load_config(GenerateConfig, argv)
    if not cfg.model:
        raise UserError("no model given; pass --model=<a Hugging Face model dir, nanospin checkpoint or out_dir>")
    sampling_of(cfg)  # a bad temperature or filter fails here, before the model loads
    return cfg


if __name__ == "__main__":
    configurator.run_main(main, sys.argv[1:])
