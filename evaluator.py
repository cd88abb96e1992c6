"""Held-out evaluation: what a phase's end reports, and the run's summary table and verdict.

Design choices:
- Every score is on the held-out set (the first eval_samples held-out examples), with no grad, in
  batches of rollout_batch_size: the real responses' NLL per token; in a SPIN iteration the SPIN loss,
  rewards and log-prob changes on the opponent's held-out pairs and KL(policy ‖ opponent) per token
  against the opponent's next-token log-probs kept at its rollout (spin.opponent_eval_logprobs).
- The task's checker (config key 'checker') scores greedy and sampled (T=1) answers and keeps each prompt's validity
  (per_prompt/valid_*), so two phases compare as paired differences over the same prompts.
- The verdict sets SPIN's last iteration against the SFT start and against continued SFT's same
  iteration, with 95% Student t intervals (metrics_log.paired_interval); seeds.py does the same across runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data import Example, check_answer, check_final_number
from fsdp import Runtime, add_sums, model_for_sampling
from generate import GREEDY, Sampling, derive_seed, generate
from metrics_log import paired_interval
from model import GPT
from spin import IterationPairs, Pair, kl_per_token, logit_batches, pair_terms, response_logprobs, sequence_logps
from templates import ChatFormat, response_text, strip_stop
from tokenizer import Tokenizer


@dataclass
class HeldOut:
    """The held-out set and how a model is scored on it (made once from the run's config and data)."""
    examples: list[Example]  # the first eval_samples held-out examples
    tok: Tokenizer
    template: ChatFormat
    stop: list[int]  # token ids that end a sampled answer
    pad_id: int
    batch_size: int  # examples per forward and per sampling batch
    max_new_tokens: int
    max_len: int  # bounds the full-logit batches of eval/kl_opponent
    seed: int
    pack: bool  # score in packed rows (False: the unpacked reference)
    loss_type: str
    checker: str  # 'synthetic' | 'final_number' | 'none': how sampled answers are scored


def evaluate(model: GPT, rt: Runtime, held: HeldOut, beta: float,
             spin_data: IterationPairs | None = None) -> dict[str, float | list[int]]:
    """Held-out NLL of the real responses; in a SPIN iteration (spin_data) the SPIN loss, rewards and log-prob
    changes on its held-out pairs and the KL to its opponent; the checker."""
    model.eval()
    results = {}
    if held.examples:
        results["eval/nll"] = held_out_nll(model, held.examples, held.batch_size, held.pad_id, rt, held.pack)
    if spin_data is not None and spin_data.eval_pairs:
        results.update(held_out_pair_metrics(model, spin_data.eval_pairs, beta, held, rt))
    if spin_data is not None and spin_data.opponent_eval is not None:
        results["eval/kl_opponent"] = held_out_kl(model, held.examples, spin_data.opponent_eval, held.max_len,
                                                  held.pad_id, rt)
    if held.checker != "none" and held.examples:
        results.update(checker_scores(model, held, rt))
    model.train()
    return results


def held_out_nll(model: GPT, examples: list[Example], batch_size: int, pad_id: int, rt: Runtime,
                 pack: bool = True) -> float:
    """The mean negative log-likelihood per response token of the held-out real responses."""
    nll, tokens = torch.zeros(2)
    with torch.no_grad(), rt.autocast:
        for i in range(0, len(examples), batch_size):
            batch = examples[i:i + batch_size]
            logps = sequence_logps(model, [e.prompt_ids for e in batch], [e.real_ids for e in batch], pad_id, rt.device,
                                   pack)
            nll -= logps.sum().cpu()
            tokens += sum(len(e.real_ids) for e in batch)
    return (nll / tokens).item()


def held_out_pair_metrics(model: GPT, pairs: list[Pair], beta: float, held: HeldOut, rt: Runtime) -> dict[str, float]:
    """On the iteration's held-out pairs, means per pair: the SPIN loss (without the nll_weight anchor),
    reward accuracy and margin, and dynamics/delta_logps_real and _generated, how far the policy has moved
    each response's summed log-prob from the opponent's: log p_θ(y|x) − log p_θt(y|x) (and of y')."""
    sums = {}
    with torch.no_grad(), rt.autocast:
        for i in range(0, len(pairs), held.batch_size):
            batch = pairs[i:i + held.batch_size]
            losses, metrics = pair_terms(model, batch, beta, held.loss_type, held.pad_id, rt.device, held.pack)
            metrics = {name: values.cpu() for name, values in metrics.items()}
            opponent_real = torch.tensor([p.opponent_real_logp for p in batch])
            opponent_generated = torch.tensor([p.opponent_generated_logp for p in batch])
            sums = add_sums(sums, {
                "eval/spin_loss": losses.sum().cpu(), "eval/reward_accuracy": metrics["rewards/accuracies"].sum(),
                "eval/reward_margin": (metrics["rewards/real"] - metrics["rewards/generated"]).sum(),
                "dynamics/delta_logps_real": (metrics["logps/real"] - opponent_real).sum(),
                "dynamics/delta_logps_generated": (metrics["logps/generated"] - opponent_generated).sum()})
    return {name: total.item() / len(pairs) for name, total in sums.items()}


def held_out_kl(model: GPT, examples: list[Example], opponent_eval: dict[str, torch.Tensor], max_len: int,
                pad_id: int, rt: Runtime) -> float:
    """eval/kl_opponent: KL(policy ‖ opponent) of the next-token distributions along the held-out real
    responses, mean per token, against the opponent's kept at the iteration's rollout (exact, or the
    top-k lower bound of spin.kl_per_token when only the top k fitted in kl_opponent_mb)."""
    total, row = 0.0, 0
    with torch.no_grad(), rt.autocast:
        for batch in logit_batches(examples, model.config.vocab_size, max_len):
            policy = response_logprobs(model, [e.prompt_ids for e in batch], [e.real_ids for e in batch], pad_id,
                                       rt.device)  # (n, V): the same rows, in the same order, as the opponent's
            opponent = {name: t[row:row + len(policy)].to(rt.device) for name, t in opponent_eval.items()}
            total += kl_per_token(policy, opponent).sum().item()
            row += len(policy)
    return total / row


def checker_scores(model: GPT, held: HeldOut, rt: Runtime) -> dict[str, float | list[int]]:
    """The task's checker on greedy and on sampled (T=1) answers to the held-out prompts, how
    often an answer equals the real one, and per_prompt/valid_*: each prompt's validity (0/1), for the
    paired intervals of the summary."""
    examples, tok, template = held.examples, held.tok, held.template
    samplings = {"greedy": GREEDY, "sampled": Sampling(temperature=1.0)}
    answers_by_name = {name: [] for name in samplings}
    with model_for_sampling(model, rt) as sampler, rt.autocast:
        for name, sampling in samplings.items():
            for i in range(0, len(examples), held.batch_size):
                prompts = [e.prompt_ids for e in examples[i:i + held.batch_size]]
                answers_by_name[name] += generate(sampler, prompts, held.max_new_tokens, sampling=sampling,
                                                  eos_id=held.stop, seed=derive_seed(held.seed, "checker", i))
    out = {}
    for name, answers in answers_by_name.items():
        scores: dict[str, float] = {}
        valid = []
        for e, ids in zip(examples, answers):
            answer = response_text(tok, ids, template)
            checked = (check_answer(e.prompt_messages[-1]["content"], answer) if held.checker == "synthetic" else
                       check_final_number(answer, response_text(tok, e.real_ids, template)))
            for key, value in checked.items():
                scores[key] = scores.get(key, 0.0) + value
            valid.append(int(checked["valid"]))
        out.update({f"eval/{key}_{name}": v / len(answers) for key, v in scores.items()})
        out[f"eval/exact_{name}"] = sum(strip_stop(tok, ids, template) == strip_stop(tok, e.real_ids, template)
                                        for e, ids in zip(examples, answers)) / len(answers)
        out[f"per_prompt/valid_{name}"] = valid
    return out


# ------------------------------------------------------------------------------------------------
# what the run prints


def headline(name: str, global_step: int, results: dict) -> str:
    """The line printed at a phase's end: its main evaluation results."""
    shown = {k: v for k, v in results.items()
             if k.startswith("eval/") and any(w in k for w in ("nll", "spin", "reward", "valid", "exact"))}
    return f"{name} done at step {global_step}: " + ", ".join(f"{k.removeprefix('eval/')} {v:.4f}"
                                                             for k, v in shown.items())


PHASE_LABELS = {"sft": "SFT", "spin": "SPIN iter {}", "baseline": "cont. SFT iter {}"}


def summary_table(history: list[dict]) -> str:
    """One row per phase end: the checker's scores and the held-out SPIN metrics; then the verdict."""
    cols = [("eval/valid_sampled", "valid@T=1"), ("eval/valid_greedy", "valid@greedy"), ("eval/nll", "nll"),
            ("eval/reward_margin", "margin"), ("eval/reward_accuracy", "reward acc")]
    cols = [(k, label) for k, label in cols if any(k in h for h in history)]
    lines = ["| after | step | " + " | ".join(label for _, label in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for h in history:
        cells = [f"{h[k]:.3f}" if k in h else "" for k, _ in cols]
        lines.append(f"| {PHASE_LABELS[h['phase']].format(h['iteration'])} | {h['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines + verdict(history))


def verdict(history: list[dict]) -> list[str]:
    """SPIN's last iteration against the SFT start and against continued SFT's same iteration: held-out
    validity at T=1 and greedy, as paired differences over the held-out prompts with 95% intervals."""
    spin = [h for h in history if h["phase"] == "spin" and "per_prompt/valid_sampled" in h]
    if not spin:
        return []
    last, ends = spin[-1], {(h["phase"], h["iteration"]): h for h in history}
    lines = []
    for other in (ends.get(("sft", 0)), ends.get(("baseline", last["iteration"]))):
        if other is None or "per_prompt/valid_sampled" not in other:
            continue
        cells = []
        for key, label in (("valid_sampled", "valid@T=1"), ("valid_greedy", "valid@greedy")):
            mean, half = paired_interval(last[f"per_prompt/{key}"], other[f"per_prompt/{key}"])
            if half is None:
                cells.append(f"{label} {100 * mean:+.1f} points")
                continue
            reading = "within noise" if abs(mean) <= half else ("SPIN higher" if mean > 0 else "SPIN lower")
            cells.append(f"{label} {100 * mean:+.1f} ± {100 * half:.1f} points ({reading})")
        name = PHASE_LABELS[other["phase"]].format(other["iteration"])
        lines.append(f"SPIN iter {last['iteration']} − {name}: " + ", ".join(cells) +
                     f"; paired over {len(last['per_prompt/valid_sampled'])} held-out prompts, 95% intervals")
    return lines
