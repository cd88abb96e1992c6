"""SPIN (Self-Play Fine-Tuning, Chen et al. 2024): the loss, sequence log-probs, the rollout, and an iteration's pairs.

Design choices:
- At iteration t the opponent is the model as the iteration starts. The rollout samples y' ~ p_θt(·|x) and, in
  the same pass, stores the opponent's summed log-probs of the real and generated responses, so training holds
  ONE model. Sampling may use a cheaper copy; scoring uses the model itself.
- A loss is one entry of LOSSES: a function of the two unscaled log-ratios and β, applied inside as torchtune's
  DPOLoss and TRL apply it, so a loss copied from either needs no rescaling. An iteration starts at zero
  rewards (log 2 only for sigmoid).
- By default a pair is scored in one packed row, its prompt run once (packing.py); pack=False is the padded
  reference (data.collate). `spin_terms` names every training metric where it is computed.
- The held-out KL(policy ‖ opponent) outlives the opponent: the rollout keeps its next-token distributions
  on the held-out responses (all, or the top k plus the rest's mass as one outcome).
- What an iteration trains on is built in `build_iteration`, one function per variant.
- Rollouts are the same at any world size: prompts sorted by length are dealt to the ranks in turn, prompt i
  draws from seed (seed, iteration, i), and a row's numbers never depend on its neighbours (generate.py)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file

from checkpoint import iteration_dir, save_tensors
from configurator import UserError
from data import collate
from generate import Sampling, derive_seed, generate_stream, mix_seed
from packing import pack_documents, response_logps

SCORING_CHUNKS = 4  # opponent_logps scores a rollout batch's pairs in this many forwards (memory_plan counts one)

# ----------------------------------------------------------------------------------------------
# the loss


def sigmoid_loss(real_ratio: torch.Tensor, generated_ratio: torch.Tensor, beta: float) -> torch.Tensor:
    """SPIN's logistic loss −log σ(h), h = β·r_real − β·r_generated (β multiplies each ratio before the
    difference, so h is the logged rewards' difference bit for bit)."""
    return -F.logsigmoid(beta * real_ratio - beta * generated_ratio)


def hinge_loss(real_ratio: torch.Tensor, generated_ratio: torch.Tensor, beta: float) -> torch.Tensor:
    """max(0, 1 − h), h as in sigmoid_loss."""
    return torch.relu(1 - (beta * real_ratio - beta * generated_ratio))


def ipo_loss(real_ratio: torch.Tensor, generated_ratio: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023) in TRL's form: (Δ − 1/(2β))², Δ = r_real − r_generated: it pulls Δ to 1/(2β) and no
    further."""
    return (real_ratio - generated_ratio - 1 / (2 * beta)) ** 2


@dataclass(frozen=True)
class Loss:
    """A pair loss: fn(r_real (B,), r_generated (B,), β) -> (B,), on unscaled log-ratios r = log p_θ − log p_θt."""
    fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    # the ratios are of per-token log-probs (each response's sums divided by its length, policy and opponent)
    length_averaged: bool = False


LOSSES = {"sigmoid": Loss(sigmoid_loss), "hinge": Loss(hinge_loss), "ipo": Loss(ipo_loss, length_averaged=True)}


def spin_terms(policy_real_logps: torch.Tensor, policy_generated_logps: torch.Tensor,
               opponent_real_logps: torch.Tensor, opponent_generated_logps: torch.Tensor, beta: float,
               loss_type: str = "sigmoid", nll_weight: float = 0.0, real_tokens: torch.Tensor | None = None,
               generated_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair (B,) losses, and each pair's metrics by name (no grad), from (B,) summed log-probs.

    The loss gets r = log p_θ − log p_θt of the real and generated responses (per token when the entry is
    length_averaged: then the lengths are needed). With `real_tokens`, `nll/real` is the real response's
    per-token NLL, added nll_weight times to the loss (an anchor, as RPO adds)."""
    if loss_type not in LOSSES:
        raise ValueError(f"loss_type '{loss_type}' is unknown; use one of {', '.join(LOSSES)}")
    loss = LOSSES[loss_type]
    if loss.length_averaged:
        if real_tokens is None or generated_tokens is None:
            raise ValueError(f"loss_type '{loss_type}' needs real_tokens and generated_tokens, the responses' lengths")
        real_ratio = policy_real_logps / real_tokens - opponent_real_logps / real_tokens  # (B,)
        generated_ratio = policy_generated_logps / generated_tokens - opponent_generated_logps / generated_tokens
    else:
        real_ratio = policy_real_logps - opponent_real_logps  # (B,)
        generated_ratio = policy_generated_logps - opponent_generated_logps  # (B,)
    losses = loss.fn(real_ratio, generated_ratio, beta)
    real_rewards, generated_rewards = beta * real_ratio, beta * generated_ratio  # (B,) each
    real_nll = None if real_tokens is None else -policy_real_logps / real_tokens  # (B,)
    if nll_weight:
        if real_nll is None:
            raise ValueError("nll_weight needs real_tokens, the real responses' lengths")
        losses = losses + nll_weight * real_nll
    metrics = {"loss": losses, "rewards/real": real_rewards, "rewards/generated": generated_rewards,
               "rewards/accuracies": (real_rewards > generated_rewards).float(),
               "logps/real": policy_real_logps, "logps/generated": policy_generated_logps}
    if real_nll is not None:
        metrics["nll/real"] = real_nll
    return losses, {name: values.detach() for name, values in metrics.items()}


def spin_metrics(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """The logged means: the summed metrics over sums['pairs'], and rewards/margins."""
    pairs = sums["pairs"].item()
    metrics = {name: total.item() / pairs for name, total in sums.items() if name != "pairs"}
    metrics["rewards/margins"] = (sums["rewards/real"] - sums["rewards/generated"]).item() / pairs
    return metrics


def per_iteration(value: float | list[float], iteration: int) -> float:
    """β and the learning rate are a float or a per-iteration list (the last entry repeats)."""
    if isinstance(value, list):
        return value[min(iteration, len(value) - 1)]
    return value


# ----------------------------------------------------------------------------------------------
# sequence log-probs


def packed_logps(model, documents: list[tuple[list[int], list[list[int]]]], pad_id: int,
                 device: torch.device) -> torch.Tensor:
    """(n_responses,) fp32 sums of log p(response | prompt) of (prompt, responses) documents, from packed rows."""
    batch = pack_documents(documents, pad_id).to(device)
    return response_logps(model.token_logprobs(batch.input_ids, batch.targets, batch.layout), batch)


def sequence_logps(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int, device: torch.device,
                   pack: bool = True) -> torch.Tensor:
    """(B,) fp32 sum of log p(response | prompt) over response tokens (end-of-turn included)."""
    if pack:
        return packed_logps(model, [(p, [r]) for p, r in zip(prompts, responses)], pad_id, device)
    input_ids, targets = collate(prompts, responses, pad_id)  # (B, T), (B, T) with -100 outside responses
    input_ids, targets = input_ids.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    return model.token_logprobs(input_ids, targets).sum(-1)  # (B,)


def pair_logps(model, prompts, real, generated, pad_id, device, pack: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and generated (B,) log-probs: one packed row per pair (prompt run once), or 2B unpacked sequences."""
    if pack:
        logps = packed_logps(model, [(p, [r, g]) for p, r, g in zip(prompts, real, generated)], pad_id, device)
        return logps[0::2], logps[1::2]
    logps = sequence_logps(model, prompts + prompts, real + generated, pad_id, device, pack=False)
    return logps[: len(prompts)], logps[len(prompts):]


def pair_terms(model, pairs: list[Pair], beta: float, loss_type: str, pad_id: int, device: torch.device,
               pack: bool = True, nll_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`spin_terms` of rollout pairs: the policy's log-probs now against the opponent's stored at rollout."""
    real, generated = pair_logps(model, [p.prompt_ids for p in pairs], [p.real_ids for p in pairs],
                                 [p.generated_ids for p in pairs], pad_id, device, pack)
    opponent_real = torch.tensor([p.opponent_real_logp for p in pairs], device=device)
    opponent_generated = torch.tensor([p.opponent_generated_logp for p in pairs], device=device)
    real_tokens = torch.tensor([float(len(p.real_ids)) for p in pairs], device=device)
    generated_tokens = torch.tensor([float(len(p.generated_ids)) for p in pairs], device=device)
    return spin_terms(real, generated, opponent_real, opponent_generated, beta, loss_type, nll_weight, real_tokens,
                      generated_tokens)


def spin_micro_batch(model, pairs: list[Pair], beta: float, loss_type: str, nll_weight: float, pack: bool,
                     pad_id: int, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(summed loss, summed metrics with the pair count, tokens run) of a micro-batch of SPIN pairs."""
    losses, metrics = pair_terms(model, pairs, beta, loss_type, pad_id, device, pack, nll_weight)
    sums = {name: values.sum() for name, values in metrics.items()}
    sums["pairs"] = torch.tensor(float(len(pairs)), device=device)
    prompt_runs = 1 if pack else 2
    tokens = sum(len(p.real_ids) + len(p.generated_ids) + prompt_runs * len(p.prompt_ids) for p in pairs)
    return losses.sum(), sums, tokens


def sft_micro_batch(model, examples: list, pad_id: int, device: torch.device,
                    pack: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(summed NLL of the real responses, the sums to log, tokens run) of a micro-batch of SFT examples."""
    logps = sequence_logps(model, [e.prompt_ids for e in examples], [e.real_ids for e in examples], pad_id, device,
                           pack)
    loss_sum = -logps.sum()
    sums = {"loss": loss_sum.detach(),
            "tokens": torch.tensor(float(sum(len(e.real_ids) for e in examples)), device=device)}
    return loss_sum, sums, sum(len(e.real_ids) + len(e.prompt_ids) for e in examples)


# ----------------------------------------------------------------------------------------------
# the opponent's next-token distributions, for the held-out KL(policy ‖ opponent)


def response_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                      device: torch.device) -> torch.Tensor:
    """(N, V) fp32 next-token log-softmax at each response position (full logits: held-out diagnostics only)."""
    input_ids, targets = collate(prompts, responses, pad_id)  # (B, T), (B, T)
    logits = model(input_ids.to(device))  # (B, T, V) fp32
    return logits[targets.to(device) != -100].log_softmax(-1)  # (N, V), rows in (example, position) order


def opponent_top_k(logprobs: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """What is kept of the opponent's (N, V) log-probs: all ({'logprobs'}) when k >= V, else each position's top k
    ('logprobs', 'ids') and 'rest' (N,), the log of the other tokens' mass."""
    if k >= logprobs.shape[-1]:
        return {"logprobs": logprobs}
    values, ids = logprobs.topk(k, dim=-1)  # (N, k), (N, k)
    return {"logprobs": values, "ids": ids, "rest": rest_logprob(logprobs, ids)}


def rest_logprob(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(N,) log of the probability of every token but `ids` (N, k)."""
    return logprobs.scatter(-1, ids, float("-inf")).logsumexp(-1)


def kl_per_token(policy_logprobs: torch.Tensor, opponent: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,) KL(policy ‖ opponent) per position against what `opponent_top_k` kept: exact with all V; with the top k,
    both folded onto those k plus 'any other token', a lower bound (log-sum inequality)."""
    if "ids" not in opponent:
        return (policy_logprobs.exp() * (policy_logprobs - opponent["logprobs"])).sum(-1)
    policy_top = policy_logprobs.gather(-1, opponent["ids"])  # (N, k)
    kl_top = (policy_top.exp() * (policy_top - opponent["logprobs"])).sum(-1)  # (N,)
    policy_rest = rest_logprob(policy_logprobs, opponent["ids"])  # (N,)
    kl_rest = torch.where(policy_rest == float("-inf"), 0.0, policy_rest.exp() * (policy_rest - opponent["rest"]))
    return kl_top + kl_rest


LOGITS_PER_BATCH = 2**26  # full-logit diagnostics run in batches of at most about this many fp32 logits (256 MB)


def logit_batches(examples: list, vocab_size: int, max_len: int) -> list[list]:
    size = max(1, LOGITS_PER_BATCH // (max_len * vocab_size))
    return [examples[i:i + size] for i in range(0, len(examples), size)]


def opponent_eval_logprobs(opponent, examples: list, pad_id: int, max_len: int, budget_mb: float,
                           autocast: AbstractContextManager, device: torch.device) -> dict[str, torch.Tensor] | None:
    """The opponent's held-out next-token log-probs for eval/kl_opponent: all V if they fit in budget_mb (4 bytes
    each), else the top k that fit (12 bytes each, 4 for the rest). None without examples or budget."""
    if not examples or not budget_mb:
        return None
    vocab, n_tokens = opponent.config.vocab_size, sum(len(e.real_ids) for e in examples)
    k = vocab if n_tokens * vocab * 4 <= budget_mb * 2**20 else max(1, int((budget_mb * 2**20 / n_tokens - 4) // 12))
    kept = []
    with torch.no_grad(), autocast:
        for batch in logit_batches(examples, vocab, max_len):
            logprobs = response_logprobs(opponent, [e.prompt_ids for e in batch], [e.real_ids for e in batch], pad_id,
                                         device)  # (n, V)
            kept.append({name: values.cpu() for name, values in opponent_top_k(logprobs, k).items()})
    return {name: torch.cat([part[name] for part in kept]) for name in kept[0]}


# ----------------------------------------------------------------------------------------------
# rollout


@dataclass
class Pair:
    """One training pair of an iteration, with the opponent's log-probs computed at rollout time."""
    source: str
    prompt_ids: list[int]
    real_ids: list[int]
    generated_ids: list[int]
    opponent_real_logp: float
    opponent_generated_logp: float
    eos: bool  # whether the generation ended with a stop token (False: cut at max_new_tokens)


@dataclass
class RolloutSettings:
    """How the opponent samples and scores, and where (this process's rank of world_size, its device)."""
    max_new_tokens: int
    max_len: int  # prompt + response: each prompt may add max_len minus its own length
    stop: list[int]  # token ids that end a generation
    pad_id: int
    batch_size: int  # cache rows sampled together on each rank (continuous batching); prompts per scoring batch
    seed: int
    device: torch.device
    sampling: Sampling = field(default_factory=Sampling)  # checked when made (generate.Sampling)
    compile: bool = False  # torch.compile the decode step
    autocast: AbstractContextManager | None = None  # the context the forwards run under; None = no autocast
    pack_pairs: bool = True  # score each pair in one packed row (False: the unpacked reference)
    rank: int = 0
    world_size: int = 1


def _all_gather_lists(local: list, world_size: int) -> list:
    if world_size == 1:
        return local
    gathered = [None] * world_size
    dist.all_gather_object(gathered, local)
    return [item for part in gathered for item in part]


def opponent_logps(scorer, prompts: list[list[int]], real: list[list[int]], generated: list[list[int]],
                   s: RolloutSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The scorer's (B,) log-probs of real and generated responses, in SCORING_CHUNKS forwards, so temporaries stay
    small beside the weights and the rollout's KV cache."""
    chunk = max(1, -(-len(prompts) // SCORING_CHUNKS))
    with torch.no_grad():
        parts = [pair_logps(scorer, prompts[i:i + chunk], real[i:i + chunk], generated[i:i + chunk], s.pad_id,
                            s.device, s.pack_pairs) for i in range(0, len(prompts), chunk)]
    return torch.cat([r for r, _ in parts]), torch.cat([g for _, g in parts])


def _score(model, examples: list, generated: list[list[int]], s: RolloutSettings) -> list[Pair]:
    prompts, real = [e.prompt_ids for e in examples], [e.real_ids for e in examples]
    real_logps, generated_logps = opponent_logps(model, prompts, real, generated, s)
    return [Pair(e.source, p, r, g, rl, gl, bool(g) and g[-1] in s.stop)  # one device-to-host copy each, below
            for e, p, r, g, rl, gl in zip(examples, prompts, real, generated, real_logps.tolist(),
                                          generated_logps.tolist())]


def rollout(model, examples: list, settings: RolloutSettings, iteration: int,
            progress: Callable[[int], None] | None = None,
            should_stop: Callable[[], bool] | None = None, scorer=None) -> list[Pair] | None:
    """y' for every example's prompt sampled by `model`, both responses scored by `scorer` (default `model`): the
    pairs in the examples' order on every rank, or None if should_stop() said to abort. Every `batch_size`
    finished prompts a rank scores them, reports progress(n) and asks should_stop(), a collective: every rank
    asks as often as the rank with the largest share."""
    s = settings
    if not examples:
        return []
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].prompt_ids), i))
    mine = order[s.rank::s.world_size]
    checks = -(-len(order[0::s.world_size]) // s.batch_size)  # rank 0's share is the largest
    # the same cache shape on every rank: as many rows as the whole rollout can fill, the longest row's length
    rows = min(s.batch_size, len(order))
    max_len = min(s.max_len, max(len(e.prompt_ids) for e in examples) + s.max_new_tokens)
    local: list[tuple[int, Pair]] = []
    done: list[tuple[int, list[int]]] = []  # finished, not yet scored: (example index, generated)
    n_checked = 0

    def check() -> bool:
        """Score what is done, report it, and whether to stop."""
        nonlocal done, n_checked
        if done:
            pairs = _score(scorer or model, [examples[i] for i, _ in done], [g for _, g in done], s)
            local.extend(zip([i for i, _ in done], pairs))
            if progress is not None:
                progress(len(done) * s.world_size)
        done, n_checked = [], n_checked + 1
        return should_stop is not None and should_stop()

    # one autocast context around sampling and scoring (entering the same context twice would not restore it)
    with s.autocast or torch.autocast(s.device.type, enabled=False):
        stream = generate_stream(model, [examples[i].prompt_ids for i in mine], s.max_new_tokens, sampling=s.sampling,
                                 eos_id=s.stop, seed=[mix_seed(s.seed, iteration, i) for i in mine],
                                 compile=s.compile, batch_size=rows, max_len=max_len)
        try:
            for j, generated, _ in stream:
                done.append((mine[j], generated))
                if len(done) == s.batch_size and check():
                    return None
        finally:
            stream.close()
        while n_checked < checks:  # a rank with a smaller share still answers every collective
            if check():
                return None
    by_index = dict(_all_gather_lists(local, s.world_size))
    return [by_index[i] for i in range(len(examples))]


def rescore(model, pairs: list[Pair], settings: RolloutSettings) -> list[Pair]:
    """The same pairs with the opponent's log-probs recomputed under `model` (earlier iterations' generations)."""
    s, local = settings, []
    for start in range(s.rank * s.batch_size, len(pairs), s.world_size * s.batch_size):  # batch j on rank j % world
        batch = pairs[start:start + s.batch_size]
        with s.autocast or torch.autocast(s.device.type, enabled=False):
            real_logps, generated_logps = opponent_logps(
                model, [p.prompt_ids for p in batch], [p.real_ids for p in batch], [p.generated_ids for p in batch], s)
        local += [(start + j, replace(p, opponent_real_logp=r, opponent_generated_logp=g))
                  for j, (p, r, g) in enumerate(zip(batch, real_logps.tolist(), generated_logps.tolist()))]
    by_index = dict(_all_gather_lists(local, s.world_size))
    return [by_index[i] for i in range(len(pairs))]


# ----------------------------------------------------------------------------------------------
# rollout files


def write_rollouts(path: str, pairs: list[Pair], decode, decode_response=None) -> None:
    """JSONL, one pair per line: texts for people, ids and log-probs for an exact resume; written, then renamed."""
    decode_response = decode_response or decode
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for p in pairs:
            record = {"source": p.source, "prompt": decode(p.prompt_ids), "real": decode_response(p.real_ids),
                      "generated": decode_response(p.generated_ids), "prompt_tokens": len(p.prompt_ids),
                      "real_tokens": len(p.real_ids), "generated_tokens": len(p.generated_ids), "eos": p.eos,
                      "opponent_real_logp": p.opponent_real_logp,
                      "opponent_generated_logp": p.opponent_generated_logp,
                      "prompt_ids": p.prompt_ids, "real_ids": p.real_ids, "generated_ids": p.generated_ids}
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def read_rollouts(path: str) -> list[Pair]:
    """The pairs write_rollouts wrote; a damaged line is an error naming path:line."""
    pairs = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                pairs.append(Pair(r["source"], r["prompt_ids"], r["real_ids"], r["generated_ids"],
                                  r["opponent_real_logp"], r["opponent_generated_logp"], r["eos"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{path}:{number}: not a rollout record ({type(e).__name__}: {e}); the file is "
                                f"damaged: restore it, or start the run over with --resume=restart") from None
    return pairs


# ----------------------------------------------------------------------------------------------
# what an iteration trains on


@dataclass
class IterationRecipe:
    """What SPIN iterations train on, as the config asks (see `build_iteration`)."""
    prompts_per_iteration: int  # 0: every training prompt, else a seeded subset of that size
    rollouts: int  # rollouts of the prompts by the opponent: 1, or max_epochs (regenerate_per_epoch)
    mix_previous: int  # also the first rollouts of iterations t-1 .. t-k (mix_previous_rollouts)
    use_given: bool  # iteration 0 takes the y' SPIN's own data files bring (not regenerate_iteration_0)
    kl_opponent_mb: float  # memory for the opponent's held-out next-token log-probs (0: none kept)
    out_dir: str  # where the earlier iterations' rollouts are


@dataclass
class IterationPairs:
    """A SPIN iteration's data, as out_dir/iter_t/ holds it: `blocks` blocks of `own` pairs (one per prompt; one block
    per epoch with regenerate_per_epoch), then earlier iterations' pairs mixed in, rescored."""
    pairs: list[Pair]
    own: int  # pairs per block: one per prompt of the iteration
    blocks: int
    eval_pairs: list[Pair]  # the opponent's held-out pairs (eval_rollouts.jsonl)
    opponent_eval: dict[str, torch.Tensor] | None  # what `opponent_top_k` kept of its held-out log-probs


def build_iteration(sampler, opponent, examples: list, eval_examples: list, iteration: int,
                    recipe: IterationRecipe, settings: RolloutSettings, progress: Callable[[int], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> IterationPairs | None:
    """Iteration t's pairs, one function per variant: the data's given y' (iteration 0 of SPIN's own files), else
    the opponent's rollout(s), then earlier iterations' first rollouts; its held-out pairs and the opponent's
    held-out log-probs. `sampler` samples, `opponent` scores (as in training, so rewards start at zero).
    None if should_stop() aborted the rollout."""
    prompts = prompts_for_iteration(examples, recipe.prompts_per_iteration, settings.seed, iteration)
    use_given = recipe.use_given and iteration == 0
    own = given_generations(opponent, prompts, settings) if use_given else None
    if own is not None and settings.rank == 0:
        print(f"spin {iteration}: y' are the data's 'generated' responses, scored by the opponent", flush=True)
    if own is None:
        own = sampled_generations(sampler, opponent, prompts, settings, iteration, recipe.rollouts, progress,
                                  should_stop)
        if own is None:
            return None
    eval_pairs = given_generations(opponent, eval_examples, settings) if use_given else None
    if eval_pairs is None:  # another seed, and never compiled
        eval_settings = replace(settings, seed=derive_seed(settings.seed, "eval_rollout"), compile=False)
        eval_pairs = rollout(sampler, eval_examples, eval_settings, iteration, scorer=opponent)
    mixed = previous_generations(opponent, recipe.out_dir, iteration, recipe.mix_previous, len(prompts), settings)
    opponent_eval = opponent_eval_logprobs(opponent, eval_examples, settings.pad_id, settings.max_len,
                                           recipe.kl_opponent_mb, settings.autocast or nullcontext(), settings.device)
    return IterationPairs(own + mixed, len(prompts), len(own) // len(prompts), eval_pairs, opponent_eval)


def prompts_for_iteration(examples: list, count: int, seed: int, iteration: int) -> list:
    """Every training prompt (count 0), or a seeded subset of `count` of them."""
    if not count:
        return examples
    g = torch.Generator().manual_seed(derive_seed(seed, "prompt_subset", iteration))
    perm = torch.randperm(len(examples), generator=g)[:count]
    return [examples[i] for i in perm.tolist()]


def given_generations(opponent, examples: list, settings: RolloutSettings) -> list[Pair] | None:
    """The y' SPIN's own data format brings, scored by the opponent; None when the examples bring none."""
    given = [e for e in examples if e.generated_ids is not None]
    if not given:
        return None
    if len(given) < len(examples):
        raise UserError(f"{len(given)} of {len(examples)} examples have SPIN's 'generated' response (e.g. "
                        f"{given[0].source}); give it in every record, or set regenerate_iteration_0=True to sample "
                        f"iteration 0's y' instead")
    pairs = [Pair(e.source, e.prompt_ids, e.real_ids, e.generated_ids, opponent_real_logp=0.0,
                  opponent_generated_logp=0.0, eos=e.generated_ids[-1] in settings.stop) for e in examples]
    return rescore(opponent, pairs, settings)


def sampled_generations(sampler, opponent, prompts: list, settings: RolloutSettings, iteration: int, rollouts: int,
                        progress: Callable[[int], None] | None = None,
                        should_stop: Callable[[], bool] | None = None) -> list[Pair] | None:
    """The opponent's y' for every prompt, `rollouts` times over (the first as a single rollout); None if aborted."""
    generations = []
    for epoch in range(rollouts):
        seeded = replace(settings, seed=derive_seed(settings.seed, "rollout", epoch))
        pairs = rollout(sampler, prompts, seeded, iteration, progress=progress, should_stop=should_stop,
                        scorer=opponent)
        if pairs is None:
            return None
        generations += pairs
    return generations


def previous_generations(opponent, out_dir: str, iteration: int, k: int, own: int,
                         settings: RolloutSettings) -> list[Pair]:
    """The first rollouts of iterations t-1 .. t-k, rescored by this iteration's opponent."""
    mixed = []
    for back in range(1, min(k, iteration) + 1):
        earlier = read_rollouts(os.path.join(iteration_dir(out_dir, iteration - back), "rollouts.jsonl"))
        mixed += rescore(opponent, earlier[:own], settings)
    return mixed


def prompt_count(recipe: IterationRecipe, n_examples: int) -> int:
    return min(recipe.prompts_per_iteration, n_examples) if recipe.prompts_per_iteration else n_examples


def pairs_per_epoch(recipe: IterationRecipe, n_examples: int, iteration: int) -> int:
    """Pairs an epoch of iteration t trains on, known before any rollout (a schedule needs every iteration's length)."""
    return (1 + min(recipe.mix_previous, iteration)) * prompt_count(recipe, n_examples)


def epoch_pairs(it: IterationPairs, epoch: int) -> list[Pair]:
    block = epoch % it.blocks
    return it.pairs[block * it.own:(block + 1) * it.own] + it.pairs[it.blocks * it.own:]


def rollout_stats(it: IterationPairs) -> dict[str, float]:
    """The opponent's own generations (not those mixed in): length (mean, p50, p90 linearly interpolated, max), the
    share that stopped, and the share identical to y (zero SPIN gradient)."""
    generations = it.pairs[:it.blocks * it.own]
    lengths = torch.tensor([float(len(p.generated_ids)) for p in generations])
    return {"gen_len_mean": sum(len(p.generated_ids) for p in generations) / len(generations),
            "gen_len_p50": torch.quantile(lengths, 0.5).item(), "gen_len_p90": torch.quantile(lengths, 0.9).item(),
            "gen_len_max": lengths.max().item(), "eos_rate": sum(p.eos for p in generations) / len(generations),
            "dynamics/identical_frac": sum(p.generated_ids == p.real_ids for p in generations) / len(generations)}


def write_iteration(iter_dir: str, made: IterationPairs, decode, decode_response) -> None:
    write_rollouts(os.path.join(iter_dir, "rollouts.jsonl"), made.pairs, decode, decode_response)
    if made.eval_pairs:
        write_rollouts(os.path.join(iter_dir, "eval_rollouts.jsonl"), made.eval_pairs, decode, decode_response)
    if made.opponent_eval is not None:  # written whole, then renamed, as the rollouts are
        path = os.path.join(iter_dir, "opponent_eval.safetensors")
        save_tensors({name: t.contiguous() for name, t in made.opponent_eval.items()}, path + ".tmp")
        os.replace(path + ".tmp", path)


def read_iteration(rollouts_path: str, iter_dir: str, own: int, mixed_iterations: int,
                   eval_examples: list) -> IterationPairs:
    """An iteration's pairs as written; the opponent's held-out log-probs only if kept for these held-out examples."""
    pairs = read_rollouts(rollouts_path)
    eval_file = os.path.join(iter_dir, "eval_rollouts.jsonl")
    eval_pairs = read_rollouts(eval_file) if eval_examples and os.path.isfile(eval_file) else []
    opponent_file = os.path.join(iter_dir, "opponent_eval.safetensors")
    opponent_eval = load_file(opponent_file) if eval_examples and os.path.isfile(opponent_file) else None
    if opponent_eval and len(opponent_eval["logprobs"]) != sum(len(e.real_ids) for e in eval_examples):
        opponent_eval = None  # kept for other held-out examples (eval_samples changed): no eval/kl_opponent
    blocks = len(pairs) // own - mixed_iterations  # what is not mixed in is its own
    return IterationPairs(pairs, own, blocks, eval_pairs, opponent_eval)
