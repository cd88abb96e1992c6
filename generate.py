"""Batched KV-cached sampling (the SPIN rollout engine) and a chat command line.

Design choices:
- gpt-fast's structure: a static, preallocated KV cache (model.setup_kv_cache), one `prefill` over the
  prompts, then `decode_one_token` steps whose shapes never change, so the step can be torch.compile'd
  (CUDA graphs on the GPU) and does no per-row Python work.
- Ragged prompts are left-padded to a common length P: every row writes the same cache slot each step,
  its positions are slot - pad (so RoPE/learned positions equal those of the prompt alone) and the mask
  hides its pad slots (and keys past a sliding window: `cache_mask`). Each row may generate until
  prompt + new = block_size, so a row gives the same tokens in a batch as alone.
- Sampling is temperature, then top-k, then top-p, as small pure functions; ties at a cut-off are kept.
- `generate_ref` recomputes the whole sequence every step: the plain reference the tests compare against.

CLI: python generate.py --model=<HF dir | nanospin checkpoint or out_dir> [--prompt="..."] [--temperature=0.7 ...]
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

import configurator
from checkpoint import load_for_chat
from configurator import UserError
from model import GPT

# ----------------------------------------------------------------------------------------------
# sampling: small pure functions on (B, V) logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (and any tied with the k-th), set the rest to -inf."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sums to >= p
    (always at least one token), plus any token tied with the least likely one kept; -inf elsewhere."""
    probs = torch.softmax(logits, dim=-1)
    sorted_probs = torch.sort(probs, dim=-1, descending=True).values  # (B, V)
    # tokens needed = 1 + how many prefix sums are still short of p
    n_keep = ((torch.cumsum(sorted_probs, dim=-1) < p).sum(-1, keepdim=True) + 1).clamp(max=logits.shape[-1])
    threshold = sorted_probs.gather(-1, n_keep - 1)  # (B, 1) probability of the last token kept
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) fp32 -> next tokens (B,); temperature 0 is greedy (argmax, first on ties)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def token_logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per row, (B, V), (B,) -> (B,), without materialising the log-softmax."""
    return logits.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


# ----------------------------------------------------------------------------------------------
# the KV-cached forward passes


def cache_mask(query_slots: torch.Tensor, key_slots: torch.Tensor, key_ok: torch.Tensor,
               window: int | None) -> torch.Tensor:
    """(B, 1, Tq, L) bool: query slots (Tq,) see the row's own keys (key_ok (B, L)) written so far and, with a
    sliding window, fewer than `window` slots back (a row's positions are its slots minus its padding, so slot
    distances are position distances). A pad query sees itself only: a fully masked row would give NaN, which
    would then leak into the cache through its (masked, but NaN * 0 = NaN) values."""
    back = query_slots[:, None] - key_slots[None, :]  # (Tq, L) how far back each key is
    seen = back >= 0 if window is None else (back >= 0) & (back < window)
    return ((key_ok[:, None, :] & seen) | (back == 0))[:, None]


def prefill(model: GPT, tokens: torch.Tensor, pad_lens: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
    """Run the left-padded prompts (B, P) through the model, filling cache slots 0..P-1.
    Returns the last position's logits (B, V) fp32 (the other positions never reach the vocab)."""
    B, P = tokens.shape
    slots = torch.arange(P, device=tokens.device)  # (P,)
    pos = (slots[None, :] - pad_lens[:, None]).clamp(min=0)  # (B, P)
    key_slots = torch.arange(key_ok.shape[1], device=tokens.device)  # (L,)
    mask = cache_mask(slots, key_slots, key_ok, model.config.sliding_window)  # (B, 1, P, L)
    h = model.hidden_states(tokens, pos, slots, mask)  # (B, P, C)
    return model.lm_head(h[:, -1]).float()  # (B, V)


def decode_logits(model: GPT, token: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor,
                  key_ok: torch.Tensor, key_slots: torch.Tensor) -> torch.Tensor:
    """One step for all rows: token, pos (B, 1), slot (1,) -> logits (B, V) fp32. Static shapes
    (the slot is a tensor), so this is the function torch.compile captures."""
    mask = cache_mask(slot, key_slots, key_ok, model.config.sliding_window)  # (B, 1, 1, L)
    h = model.hidden_states(token, pos, slot, mask)  # (B, 1, C)
    return model.lm_head(h[:, -1]).float()


@functools.cache
def compiled_decode(device_type: str, backend: str = "inductor") -> Callable:
    """decode_logits under torch.compile, made once per (device type, backend); dynamo keeps its graphs.
    On the GPU inductor also records CUDA graphs ('reduce-overhead')."""
    if device_type == "cuda" and backend == "inductor":
        return torch.compile(decode_logits, mode="reduce-overhead", fullgraph=True)
    return torch.compile(decode_logits, backend=backend, fullgraph=True)


def decode_one_token(model: GPT, token: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, key_ok: torch.Tensor,
                     key_slots: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                     generator: torch.Generator | None,
                     compile: bool | str = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step: returns the next tokens (B,) and the step's raw logits (B, V)."""
    step = decode_logits
    if compile:
        step = compiled_decode(token.device.type, "inductor" if compile is True else compile)
    logits = step(model, token, pos, slot, key_ok, key_slots)
    return sample_next(logits, temperature, top_k, top_p, generator), logits


# ----------------------------------------------------------------------------------------------
# generate


def _as_id_list(eos_id: int | list[int] | None) -> list[int]:
    if eos_id is None:
        return []
    return [eos_id] if isinstance(eos_id, int) else list(eos_id)


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise UserError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k={top_k} must be >= 1 (or None for no top-k filter)")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p={top_p} must be in (0, 1] (or None for no top-p filter)")


def _row_budgets(prompts: list[list[int]], max_new_tokens: int, block_size: int) -> list[int]:
    """How many tokens each row may add: prompt + new <= block_size."""
    budgets = []
    for i, p in enumerate(prompts):
        if not p:
            raise UserError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        if len(p) >= block_size:
            raise UserError(f"prompt {i} has {len(p)} tokens, which leaves no room in the model's context of "
                            f"block_size={block_size} tokens; shorten the prompt")
        budgets.append(min(max_new_tokens, block_size - len(p)))
    return budgets


def _cut_rows(new_tokens: list[list[int]], budgets: list[int], stop: list[int]) -> list[list[int]]:
    """Cut each row after its first stop token (kept) or at its budget."""
    out = []
    for row, budget in zip(new_tokens, budgets):
        row = row[:budget]
        for j, t in enumerate(row):
            if t in stop:
                row = row[:j + 1]
                break
        out.append(row)
    return out


@torch.inference_mode()
def generate(model: GPT, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | list[int] | None = None,
             seed: int | None = None, return_logprobs: bool = False, compile: bool | str = False,
             on_step: Callable[[torch.Tensor], None] | None = None
             ) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
    """Sample up to max_new_tokens new tokens for each prompt (token-id lists of any lengths).

    Returns the new tokens of each prompt, cut after the first token in eos_id (kept). temperature 0 is
    greedy; a seed makes sampling reproducible (a torch.Generator on the model's device; None uses the
    global RNG). Each row stops at prompt + new = block_size; a prompt that fills the context is a
    UserError. Rows that are done stop producing tokens and the loop ends when all are done.
    return_logprobs=True also returns, per new token, its log-prob under the model's UNMODIFIED
    distribution (log_softmax of the raw logits, before temperature, top-k and top-p).
    compile=True runs the decode step under torch.compile (CUDA graphs on the GPU) and keeps the KV
    cache on the model for the next call of the same shape; a string names another torch.compile
    backend (the tests' 'eager' checks the step is one graph without a C++ compile).
    on_step(tokens (B,)) is called after every step (it costs a device sync; the CLI streams with it).
    The model is left without a KV cache and in its train/eval mode.
    """
    _check_sampling(temperature, top_k, top_p)
    budgets = _row_budgets(prompts, max_new_tokens, model.config.block_size)
    steps = max(budgets)
    stop = _as_id_list(eos_id)
    if steps == 0:
        return ([[] for _ in prompts], [[] for _ in prompts]) if return_logprobs else [[] for _ in prompts]
    device = model.lm_head.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    cache_len = P + steps - 1  # the last sampled token is never fed back
    if compile:  # fewer distinct shapes -> fewer recompiles / CUDA graph captures across calls
        cache_len = -(-cache_len // 128) * 128
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    was_training = model.training
    model.eval()
    model.setup_kv_cache(B, cache_len, reuse=bool(compile))
    try:
        tokens = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=device)  # (B, P) left-padded
        pad_lens = torch.tensor([P - len(p) for p in prompts], device=device)  # (B,)
        key_slots = torch.arange(cache_len, device=device)  # (L,)
        key_ok = key_slots[None, :] >= pad_lens[:, None]  # (B, L) slots that hold this row's tokens
        budget = torch.tensor(budgets, device=device)  # (B,)
        stop_ids = torch.tensor(stop, device=device, dtype=torch.long)
        new_tokens = torch.zeros(B, steps, dtype=torch.long, device=device)
        logps = torch.zeros(B, steps, device=device) if return_logprobs else None
        done = torch.zeros(B, dtype=torch.bool, device=device)
        # a sync per step costs little on the CPU; on the GPU it would stall the queue of launches
        check_every = 1 if device.type == "cpu" else 8

        logits = prefill(model, tokens, pad_lens, key_ok)
        token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        pos = torch.tensor([len(p) for p in prompts], device=device)[:, None]  # (B, 1) next token's position
        # (1,) cache slot of the token fed back; its own tensor, as a moving view would change the compiled inputs
        slot = torch.full((1,), P, device=device)
        for t in range(steps):
            if t > 0:
                token, logits = decode_one_token(model, token[:, None], pos, slot, key_ok, key_slots,
                                                 temperature, top_k, top_p, generator, compile)
                slot = slot + 1
                # rows past their budget keep running (static shapes) on a clamped, in-range position
                pos = (pos + 1).clamp_(max=model.config.block_size - 1)
            new_tokens[:, t] = token
            if logps is not None:
                logps[:, t] = token_logprobs_of(logits, token)
            done |= torch.isin(token, stop_ids) | (budget <= t + 1)
            if on_step is not None:
                on_step(token)
            if t + 1 < steps and (t + 1) % check_every == 0 and bool(done.all()):
                break
    finally:
        model.clear_kv_cache()
        model.train(was_training)
    out = _cut_rows(new_tokens[:, :t + 1].tolist(), budgets, stop)
    if not return_logprobs:
        return out
    return out, [row[:len(o)] for row, o in zip(logps.tolist(), out)]


@torch.inference_mode()
def generate_ref(model: GPT, prompts: list[list[int]], max_new_tokens: int,
                 eos_id: int | list[int] | None = None) -> list[list[int]]:
    """Greedy decoding by a full forward over the whole sequence every step, no cache (the reference).
    Prompts of equal length run as one batch; ragged ones row by row."""
    if len({len(p) for p in prompts}) > 1:
        return [generate_ref(model, [p], max_new_tokens, eos_id)[0] for p in prompts]
    budgets = _row_budgets(prompts, max_new_tokens, model.config.block_size)
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
    seed: int | None = None
    device: str = "auto"  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' ...
    dtype: str = "auto"  # 'auto' (bf16 on a GPU, fp32 on the CPU) | 'float32' | 'bfloat16' | 'float16'
    chat_template: str | dict | None = None  # override the template found with the model (a name or a dict, see README)
    compile: bool = False  # torch.compile the decode step (worth it on a GPU for long answers)


def stream_answer(model: GPT, tok, prompt_ids: list[int], cfg: GenerateConfig, template, stop: list[int],
                  seed: int | None) -> list[int]:
    """Generate one answer (batch 1), printing the text as it grows; returns the new tokens."""
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

    new = generate(model, [prompt_ids], cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, stop or None,
                   seed, compile=cfg.compile, on_step=on_step)[0]
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
            seed = None if cfg.seed is None else cfg.seed + turn
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
    return cfg


if __name__ == "__main__":
    configurator.run_main(main, sys.argv[1:])
