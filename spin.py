"""SPIN (Self-Play Fine-Tuning, Chen et al. 2024): the loss, sequence log-probs, and the rollout.

Design choices:
- At iteration t the opponent is the model as it stands when the iteration starts. The rollout
  samples y' ~ p_θt(·|x) for every prompt and, in the same pass, computes the opponent's summed
  log-probs of the real and the generated responses; they are stored with the rollout, so training
  holds ONE model and never a second reference copy.
- Log-probs are summed over response tokens, end-of-turn included, through the model's fused
  log-prob path (the [tokens, vocab] logits never exist).
- Rollouts are reproducible whatever the world size: prompts are sorted by length, cut into global
  batches of `rollout_batch_size`, batch j runs on rank j % world with a seed derived from
  (seed, iteration, j), and every rank ends up with the same list.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import collate

# ----------------------------------------------------------------------------------------------
# the loss


def spin_terms(policy_real_logps: torch.Tensor, policy_gen_logps: torch.Tensor, ref_real_logps: torch.Tensor,
               ref_gen_logps: torch.Tensor, beta: float, loss_type: str = "sigmoid"):
    """Per-pair (B,) losses, real rewards and generated rewards.

    h = β[(log p_θ(y|x) − log p_θt(y|x)) − (log p_θ(y'|x) − log p_θt(y'|x))];
    'sigmoid': ℓ(h) = log(1 + e^{−h}) = −log σ(h);  'hinge': max(0, 1 − h).
    """
    real_rewards = beta * (policy_real_logps - ref_real_logps)
    gen_rewards = beta * (policy_gen_logps - ref_gen_logps)
    h = real_rewards - gen_rewards
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(h)
    elif loss_type == "hinge":
        losses = torch.relu(1 - h)
    else:
        raise ValueError(f"loss_type '{loss_type}' is unknown; use 'sigmoid' or 'hinge'")
    return losses, real_rewards, gen_rewards


def spin_loss(policy_real_logps: torch.Tensor, policy_gen_logps: torch.Tensor, ref_real_logps: torch.Tensor,
              ref_gen_logps: torch.Tensor, beta: float, loss_type: str = "sigmoid") -> tuple[torch.Tensor, dict]:
    """The batch-mean SPIN loss and its metrics (floats)."""
    losses, real_rewards, gen_rewards = spin_terms(policy_real_logps, policy_gen_logps, ref_real_logps,
                                                   ref_gen_logps, beta, loss_type)
    metrics = {
        "rewards/real": real_rewards.mean().item(),
        "rewards/generated": gen_rewards.mean().item(),
        "rewards/margins": (real_rewards - gen_rewards).mean().item(),
        "rewards/accuracies": (real_rewards > gen_rewards).float().mean().item(),
        "logps/real": policy_real_logps.detach().mean().item(),
        "logps/generated": policy_gen_logps.detach().mean().item(),
    }
    return losses.mean(), metrics


def per_iteration(value: float | list[float], iteration: int) -> float:
    """β and the learning rate are a float or a per-iteration list (the last entry repeats)."""
    if isinstance(value, list):
        return value[min(iteration, len(value) - 1)]
    return value


# ----------------------------------------------------------------------------------------------
# sequence log-probs


def sequence_logps(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                   device: torch.device) -> torch.Tensor:
    """(B,) fp32 sum of log p(response | prompt) over response tokens (end-of-turn included)."""
    input_ids, targets = collate(prompts, responses, pad_id)  # (B, T), (B, T) with -100 outside responses
    input_ids, targets = input_ids.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    return model.token_logprobs(input_ids, targets).sum(-1)  # (B,)


def pair_logps(model, prompts, real, generated, pad_id, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and generated (B,) log-probs from one forward over the 2B sequences."""
    logps = sequence_logps(model, prompts + prompts, real + generated, pad_id, device)
    return logps[: len(prompts)], logps[len(prompts):]


def pair_terms(model, pairs: list["Pair"], beta: float, loss_type: str, pad_id: int, device):
    """The policy's log-probs of a batch of rollout pairs and their SPIN terms against the opponent's
    stored log-probs: (losses, real_rewards, gen_rewards, policy_real_logps, policy_gen_logps), each (B,)."""
    real, gen = pair_logps(model, [p.prompt_ids for p in pairs], [p.real_ids for p in pairs],
                           [p.generated_ids for p in pairs], pad_id, device)
    ref_real = torch.tensor([p.ref_real_logp for p in pairs], device=device)
    ref_gen = torch.tensor([p.ref_generated_logp for p in pairs], device=device)
    losses, real_rewards, gen_rewards = spin_terms(real, gen, ref_real, ref_gen, beta, loss_type)
    return losses, real_rewards, gen_rewards, real, gen


# ----------------------------------------------------------------------------------------------
# rollout


@dataclass
class Pair:
    """One training pair of an iteration, with the opponent's log-probs computed at rollout time."""
    source: str
    prompt_ids: list[int]
    real_ids: list[int]
    generated_ids: list[int]
    ref_real_logp: float
    ref_generated_logp: float
    eos: bool  # whether the generation ended with a stop token (False: cut at max_new_tokens)


def _all_gather_lists(local: list, world_size: int) -> list:
    if world_size == 1:
        return local
    gathered = [None] * world_size
    dist.all_gather_object(gathered, local)
    return [item for part in gathered for item in part]


def rollout(model, examples: list, max_new_tokens: int, max_len: int, stop: list[int], pad_id: int,
            batch_size: int, seed: int, iteration: int, device: torch.device, rank: int = 0, world_size: int = 1,
            temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
            compile: bool = False, logp_model=None, autocast=None, progress=None,
            should_stop=None) -> list[Pair] | None:
    """Generate y' for every example's prompt with `model` (the opponent) and score real and
    generated responses under `logp_model` (default: the same weights). Returns the pairs in the
    examples' order on every rank, or None if `should_stop()` said to abort."""
    from generate import generate

    logp_model = logp_model or model
    autocast = autocast or torch.autocast(device.type, enabled=False)
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].prompt_ids), i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    local = []
    for first in range(0, len(batches), world_size):
        # every rank runs the same number of rounds: should_stop() is a collective
        if should_stop is not None and should_stop():
            return None
        j = first + rank
        if j >= len(batches):
            continue
        idx = batches[j]
        prompts = [examples[i].prompt_ids for i in idx]
        budget = min(max_new_tokens, max_len - max(len(p) for p in prompts))
        with autocast:
            generated = generate(model, prompts, max(budget, 1), temperature=temperature, top_k=top_k, top_p=top_p,
                                 eos_id=stop, seed=(seed * 1_000_003 + iteration * 7919 + j) % (2**63),
                                 compile=compile)
            real = [examples[i].real_ids for i in idx]
            with torch.no_grad():
                real_logps, gen_logps = pair_logps(logp_model, prompts, real, generated, pad_id, device)
        for k, i in enumerate(idx):
            local.append((i, Pair(examples[i].source, prompts[k], real[k], generated[k], real_logps[k].item(),
                                  gen_logps[k].item(), bool(generated[k]) and generated[k][-1] in stop)))
        if progress is not None:
            progress(len(idx) * world_size)
    pairs = dict(_all_gather_lists(local, world_size))
    return [pairs[i] for i in range(len(examples))]


def rescore(logp_model, pairs: list[Pair], pad_id: int, batch_size: int, device, rank=0, world_size=1,
            autocast=None) -> list[Pair]:
    """The same pairs with reference log-probs recomputed under `logp_model` (for earlier
    iterations' generations mixed into this iteration: their reference is the current opponent)."""
    autocast = autocast or torch.autocast(device.type, enabled=False)
    batches = [list(range(i, min(i + batch_size, len(pairs)))) for i in range(0, len(pairs), batch_size)]
    local = []
    for j in range(rank, len(batches), world_size):
        idx = batches[j]
        with autocast, torch.no_grad():
            real_logps, gen_logps = pair_logps(logp_model, [pairs[i].prompt_ids for i in idx],
                                               [pairs[i].real_ids for i in idx],
                                               [pairs[i].generated_ids for i in idx], pad_id, device)
        for k, i in enumerate(idx):
            local.append((i, Pair(**{**asdict(pairs[i]), "ref_real_logp": real_logps[k].item(),
                                     "ref_generated_logp": gen_logps[k].item()})))
    rescored = dict(_all_gather_lists(local, world_size))
    return [rescored[i] for i in range(len(pairs))]


# ----------------------------------------------------------------------------------------------
# rollout files


def write_rollouts(path: str, pairs: list[Pair], decode) -> None:
    """JSONL, one pair per line: texts for people, ids and log-probs for an exact resume.
    Written to a temporary file and renamed, so a kill never leaves half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for p in pairs:
            record = {"source": p.source, "prompt": decode(p.prompt_ids), "real": decode(p.real_ids),
                      "generated": decode(p.generated_ids), "prompt_tokens": len(p.prompt_ids),
                      "real_tokens": len(p.real_ids), "generated_tokens": len(p.generated_ids), "eos": p.eos,
                      "ref_real_logp": p.ref_real_logp, "ref_generated_logp": p.ref_generated_logp,
                      "prompt_ids": p.prompt_ids, "real_ids": p.real_ids, "generated_ids": p.generated_ids}
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def read_rollouts(path: str) -> list[Pair]:
    pairs = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            pairs.append(Pair(r["source"], r["prompt_ids"], r["real_ids"], r["generated_ids"], r["ref_real_logp"],
                              r["ref_generated_logp"], r["eos"]))
    return pairs
