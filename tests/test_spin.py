"""spin.py: the SPIN loss and its metrics against hand-worked numbers (with the nll_weight anchor), IPO
against TRL's formula, zero rewards at equal policies (log 2 for sigmoid), the direction of a gradient step,
which tokens the sequence log-probs sum over, the KL to the opponent (exact and top-k) against a direct
computation, and the rollout: the opponent's log-probs, its order, its seeding, stopping it, rescoring and the
rollout file."""

import math
from dataclasses import replace

import pytest
import torch

from data import Example, collate, synthetic_conversations
from templates import render_prompt, render_response
from model import GPT, GPTConfig
import spin
from tokenizer import load_tokenizer
from spin import (LOSSES, RolloutSettings, kl_per_token, opponent_top_k, pair_logps, pair_terms, per_iteration,
                  read_rollouts, rescore, response_logprobs, rollout, sequence_logps, spin_metrics, spin_terms,
                  write_rollouts)

CPU = torch.device("cpu")


def tiny_gpt(seed: int = 0, model_type: str = "llama") -> GPT:
    torch.manual_seed(seed)
    n_kv_head = 2 if model_type == "gpt2" else 1  # GPT-2 has no grouped-query attention
    return GPT(GPTConfig(model_type=model_type, vocab_size=268, block_size=96, n_layer=2, n_head=2,
                         n_kv_head=n_kv_head, n_embd=32)).eval()


def chat_pair(tok, question: str, answer: str, generated: str):
    prompt = render_prompt(tok, [{"role": "user", "content": question}], "chatml")
    return prompt, render_response(tok, answer, "chatml"), render_response(tok, generated, "chatml")


def summed(metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """spin_terms' per-pair metrics summed, with the pair count, as train.py sums them."""
    sums = {name: values.sum() for name, values in metrics.items()}
    sums["pairs"] = torch.tensor(float(len(metrics["loss"])))
    return sums


# ----------------------------------------------------------------------------------------------
# the loss and its metrics


# Worked by hand, beta = 0.5:
#   real rewards      0.5 * ([-10, -20] - [-11, -20]) = [0.5, 0.0]
#   generated rewards 0.5 * ([-12, -15] - [-11, -16]) = [-0.5, 0.5]
#   h = real - generated = [1.0, -0.5]
#   sigmoid: log(1 + e^-1) = 0.3132617, log(1 + e^0.5) = 0.9740770
#   hinge:   max(0, 1 - 1) = 0,         max(0, 1 + 0.5) = 1.5
POLICY_REAL, POLICY_GEN = [-10.0, -20.0], [-12.0, -15.0]
OPPONENT_REAL, OPPONENT_GEN = [-11.0, -20.0], [-11.0, -16.0]


def hand_terms(loss_type: str = "sigmoid"):
    t = torch.tensor
    return spin_terms(t(POLICY_REAL), t(POLICY_GEN), t(OPPONENT_REAL), t(OPPONENT_GEN), beta=0.5, loss_type=loss_type)


@pytest.mark.parametrize("loss_type, expected", [("sigmoid", [0.3132617, 0.9740770]), ("hinge", [0.0, 1.5])])
def test_spin_losses_equal_hand_computed_values(loss_type, expected):
    losses, metrics = hand_terms(loss_type)
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(metrics["loss"], losses)


def test_spin_metrics_per_pair_equal_hand_computed_values():
    _, metrics = hand_terms()
    assert {name: values.tolist() for name, values in metrics.items() if name != "loss"} == {
        "rewards/real": [0.5, 0.0], "rewards/generated": [-0.5, 0.5], "rewards/accuracies": [1.0, 0.0],
        "logps/real": POLICY_REAL, "logps/generated": POLICY_GEN}
    assert not any(values.requires_grad for values in metrics.values())


def test_logged_metrics_are_per_pair_means_with_the_margin():
    _, metrics = hand_terms()
    logged = spin_metrics(summed(metrics))
    assert logged == pytest.approx({"loss": (0.3132617 + 0.9740770) / 2, "rewards/real": 0.25,
                                    "rewards/generated": 0.0, "rewards/margins": 0.25, "rewards/accuracies": 0.5,
                                    "logps/real": -15.0, "logps/generated": -13.5})
    assert all(isinstance(v, float) for v in logged.values())


# The anchor, by hand: real responses of 4 and 5 tokens, so per-token NLLs 10/4 = 2.5 and 20/5 = 4.0;
# with nll_weight 0.5 the sigmoid losses above grow by 1.25 and 2.0.
REAL_TOKENS = [4.0, 5.0]


def test_nll_weight_adds_the_real_responses_per_token_nll():
    t = torch.tensor
    terms = spin_terms(t(POLICY_REAL), t(POLICY_GEN), t(OPPONENT_REAL), t(OPPONENT_GEN), beta=0.5,
                       nll_weight=0.5, real_tokens=t(REAL_TOKENS))
    losses, metrics = terms
    assert losses.tolist() == pytest.approx([0.3132617 + 1.25, 0.9740770 + 2.0], abs=1e-6)
    assert metrics["nll/real"].tolist() == [2.5, 4.0] and torch.equal(metrics["loss"], losses)
    logged = spin_metrics(summed(metrics))  # per pair: mean loss 2.2686694, mean per-token NLL 3.25
    assert logged["loss"] == pytest.approx((0.3132617 + 1.25 + 0.9740770 + 2.0) / 2, abs=1e-6)
    assert logged["nll/real"] == 3.25
    # weight 0 reports the NLL and leaves the loss the plain SPIN loss
    plain, metrics = spin_terms(t(POLICY_REAL), t(POLICY_GEN), t(OPPONENT_REAL), t(OPPONENT_GEN), beta=0.5,
                                real_tokens=t(REAL_TOKENS))
    assert torch.equal(plain, hand_terms()[0]) and metrics["nll/real"].tolist() == [2.5, 4.0]


def test_nll_weight_gradient_is_the_per_token_nll_gradient():
    """d loss / d log p_θ(y|x) gains −nll_weight/|y|: the anchor raises the real response's log-prob."""
    t = torch.tensor
    real = t(POLICY_REAL, requires_grad=True)
    losses, _ = spin_terms(real, t(POLICY_GEN), t(OPPONENT_REAL), t(OPPONENT_GEN), beta=0.5)
    (plain,) = torch.autograd.grad(losses.sum(), real)
    real = t(POLICY_REAL, requires_grad=True)
    losses, _ = spin_terms(real, t(POLICY_GEN), t(OPPONENT_REAL), t(OPPONENT_GEN), beta=0.5, nll_weight=2.0,
                           real_tokens=t(REAL_TOKENS))
    (anchored,) = torch.autograd.grad(losses.sum(), real)
    assert (anchored - plain).tolist() == pytest.approx([-2.0 / 4, -2.0 / 5])


def test_nll_weight_without_lengths_is_an_error():
    t = torch.tensor
    with pytest.raises(ValueError, match="real_tokens"):
        spin_terms(t(POLICY_REAL), t(POLICY_GEN), t(OPPONENT_REAL), t(OPPONENT_GEN), beta=0.5, nll_weight=1.0)


def test_unknown_loss_type_is_an_error_listing_the_losses():
    with pytest.raises(ValueError, match="loss_type 'dpo' is unknown; use one of sigmoid, hinge, ipo"):
        hand_terms("dpo")


# each loss at equal policies (Δ = 0), as a function of β: a new entry of spin.LOSSES adds its value here
LOSS_AT_EQUAL_POLICIES = {"sigmoid": lambda beta: math.log(2), "hinge": lambda beta: 1.0,
                          "ipo": lambda beta: 1 / (2 * beta) ** 2}


@pytest.mark.parametrize("loss_type", list(LOSSES))
def test_rewards_are_zero_when_policy_equals_opponent(loss_type):
    """When an iteration starts the policy is the opponent: every loss sees zero rewards (sigmoid's loss is
    then log 2)."""
    torch.manual_seed(0)
    real, gen = -50 * torch.rand(16), -50 * torch.rand(16)
    real_tokens, generated_tokens = torch.randint(1, 40, (16,)).float(), torch.randint(1, 40, (16,)).float()
    for beta in (0.01, 0.1, 5.0):
        losses, metrics = spin_terms(real, gen, real.clone(), gen.clone(), beta, loss_type, real_tokens=real_tokens,
                                     generated_tokens=generated_tokens)
        assert losses.tolist() == pytest.approx([LOSS_AT_EQUAL_POLICIES[loss_type](beta)] * 16, rel=1e-7)
        assert not metrics["rewards/real"].any() and not metrics["rewards/generated"].any()
        logged = spin_metrics(summed(metrics))
        assert logged["rewards/margins"] == 0.0 and logged["rewards/accuracies"] == 0.0


def test_ipo_is_trls_formula_over_length_averaged_logps(setup, pairs):
    """IPO on real pairs scored by another policy, against TRL's ipo loss written out here: log-probs averaged
    over each response's tokens (the policy's and the opponent's), logits = (chosen − rejected) − (ref_chosen −
    ref_rejected), loss = (logits − 1/(2β))², rewards β·(logp − ref_logp)."""
    tok = setup[0]
    policy, beta = tiny_gpt(seed=5, model_type="gpt2"), 0.3
    with torch.no_grad():
        losses, metrics = pair_terms(policy, pairs, beta, "ipo", tok.eos_id, CPU)
        real, gen = pair_logps(policy, [p.prompt_ids for p in pairs], [p.real_ids for p in pairs],
                               [p.generated_ids for p in pairs], tok.eos_id, CPU)
    real_len = torch.tensor([len(p.real_ids) for p in pairs], dtype=torch.float64)
    gen_len = torch.tensor([len(p.generated_ids) for p in pairs], dtype=torch.float64)
    assert (real_len != gen_len).any()  # the averaging matters
    chosen, rejected = real.double() / real_len, gen.double() / gen_len
    ref_chosen = torch.tensor([p.opponent_real_logp for p in pairs], dtype=torch.float64) / real_len
    ref_rejected = torch.tensor([p.opponent_generated_logp for p in pairs], dtype=torch.float64) / gen_len
    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    assert logits.abs().min() > 1e-3  # the policy differs from the opponent
    want = (logits - 1 / (2 * beta)) ** 2
    assert losses.double().tolist() == pytest.approx(want.tolist(), rel=1e-5)
    assert metrics["rewards/real"].double().tolist() == pytest.approx((beta * (chosen - ref_chosen)).tolist(),
                                                                       rel=1e-4, abs=1e-6)
    assert metrics["rewards/generated"].double().tolist() == pytest.approx((beta * (rejected - ref_rejected)).tolist(),
                                                                            rel=1e-4, abs=1e-6)


def test_a_length_averaged_loss_without_lengths_is_an_error():
    t = torch.tensor
    with pytest.raises(ValueError, match="generated_tokens"):
        spin_terms(t(POLICY_REAL), t(POLICY_GEN), t(OPPONENT_REAL), t(OPPONENT_GEN), beta=0.5, loss_type="ipo",
                   real_tokens=t(REAL_TOKENS))


def test_summed_micro_batches_give_the_whole_batch_metrics():
    """What train.py relies on to sum over micro-batches, steps and ranks: each pair's terms depend on
    that pair alone."""
    torch.manual_seed(1)
    a, b, c, d = (-20 * torch.rand(6) for _ in range(4))
    whole = spin_metrics(summed(spin_terms(a, b, c, d, 0.1)[1]))
    parts = [summed(spin_terms(a[i:i + 2], b[i:i + 2], c[i:i + 2], d[i:i + 2], 0.1)[1]) for i in range(0, 6, 2)]
    total = {name: sum(p[name] for p in parts) for name in parts[0]}
    assert spin_metrics(total) == pytest.approx(whole, abs=1e-6)


def test_beta_and_lr_per_iteration():
    assert per_iteration(0.2, 5) == 0.2
    assert [per_iteration([0.1, 0.2, 0.3], t) for t in range(5)] == [0.1, 0.2, 0.3, 0.3, 0.3]


# ----------------------------------------------------------------------------------------------
# sequence log-probs


def by_hand_logps(model, prompts, responses) -> list[float]:
    """Each sequence alone, no padding, full logits in float64."""
    out = []
    for p, r in zip(prompts, responses):
        with torch.no_grad():
            logits = model(torch.tensor([p + r]))[0]  # (len(p) + len(r), V)
        logp = torch.log_softmax(logits.double(), -1)
        # position len(p) - 1 + i predicts response token i; the prompt's own tokens are not scored
        out.append(sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(r)))
    return out


EOT = load_tokenizer("bytes").specials["<|im_end|>"]
PROMPTS, RESPONSES = [[5, 6, 7], [8, 9, 10, 11, 12, 13]], [[20, 21, 22, EOT], [30, EOT]]


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_sequence_logps_sum_the_response_tokens(model_type, pack):
    model = tiny_gpt(model_type=model_type)
    with torch.no_grad():
        got = sequence_logps(model, PROMPTS, RESPONSES, pad_id=256, device=CPU, pack=pack)
    assert got.dtype == torch.float32 and got.shape == (2,)
    assert got.tolist() == pytest.approx(by_hand_logps(model, PROMPTS, RESPONSES), abs=1e-4)


@pytest.mark.parametrize("pack", [True, False])
def test_sequence_logps_do_not_depend_on_the_padding_token(pack):
    model = tiny_gpt()
    with torch.no_grad():
        assert torch.equal(sequence_logps(model, PROMPTS, RESPONSES, 256, CPU, pack),
                           sequence_logps(model, PROMPTS, RESPONSES, 3, CPU, pack))


def test_sequence_logps_include_the_end_of_turn_token():
    model = tiny_gpt()
    with torch.no_grad():
        with_eot = sequence_logps(model, PROMPTS, RESPONSES, 256, CPU)
        without_eot = sequence_logps(model, PROMPTS, [r[:-1] for r in RESPONSES], 256, CPU)
        eot_logps = [torch.log_softmax(model(torch.tensor([p + r]))[0, len(p) + len(r) - 2].double(), -1)[EOT].item()
                     for p, r in zip(PROMPTS, RESPONSES)]
    assert (with_eot - without_eot).tolist() == pytest.approx(eot_logps, abs=1e-4)


def test_collate_masks_prompt_and_padding():
    input_ids, targets = collate([[1, 2, 3], [4]], [[7, 8], [9, 10]], pad_id=0)
    assert input_ids.tolist() == [[1, 2, 3, 7], [4, 9, 0, 0]]
    assert targets.tolist() == [[-100, -100, 7, 8], [9, 10, -100, -100]]


@pytest.mark.parametrize("pack", [True, False])
def test_pair_logps_equal_separate_calls(pack):
    model = tiny_gpt()
    prompts, real, gen = [[1, 2], [3, 4, 5]], [[6, 7, 8], [9]], [[10], [11, 12, 13, 14]]
    with torch.no_grad():
        r, g = pair_logps(model, prompts, real, gen, 0, CPU, pack)
        for pack_alone in (True, False):
            alone = sequence_logps(model, prompts, real, 0, CPU, pack_alone), sequence_logps(model, prompts, gen, 0,
                                                                                              CPU, pack_alone)
            assert r.tolist() == pytest.approx(alone[0].tolist(), abs=1e-5)
            assert g.tolist() == pytest.approx(alone[1].tolist(), abs=1e-5)


def test_gradient_step_raises_real_and_lowers_generated_logps():
    tok = load_tokenizer("bytes")
    model = tiny_gpt(seed=3).train()
    triples = [chat_pair(tok, "3 distinct 2-digit numbers, digits 147", "47 14 71", "x1 y2 zz"),
               chat_pair(tok, "4 distinct 2-digit numbers, digits 2589", "25 98 52 89", "abc 9"),
               chat_pair(tok, "5 distinct 2-digit numbers, digits 136", "13 61 36 33 16", "5 5 5")]
    prompts, real, gen = (list(x) for x in zip(*triples))
    with torch.no_grad():  # the opponent: the same weights, scored before the step
        opponent_real, opponent_gen = pair_logps(model, prompts, real, gen, tok.eos_id, CPU)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    policy_real, policy_gen = pair_logps(model, prompts, real, gen, tok.eos_id, CPU)
    losses, _ = spin_terms(policy_real, policy_gen, opponent_real, opponent_gen, beta=0.1)
    assert losses.mean().item() == pytest.approx(math.log(2), abs=1e-5)
    losses.mean().backward()
    optimizer.step()
    with torch.no_grad():
        after_real, after_gen = pair_logps(model, prompts, real, gen, tok.eos_id, CPU)
        after_losses, metrics = spin_terms(after_real, after_gen, opponent_real, opponent_gen, beta=0.1)
    assert (after_real > opponent_real).all(), (after_real - opponent_real)
    assert (after_gen < opponent_gen).all(), (after_gen - opponent_gen)
    assert after_losses.mean().item() < math.log(2)
    assert spin_metrics(summed(metrics))["rewards/accuracies"] == 1.0


def test_sft_micro_batch_is_the_summed_nll_and_a_step_on_it_raises_the_responses_logps():
    """SFT's micro-batch loss is the summed NLL of the real responses (the step normalises it by the tokens it
    logs), so a gradient step on it makes every response more likely."""
    tok = load_tokenizer("bytes")
    model = tiny_gpt(seed=4).train()
    examples = [Example(p, r, f"s:{i}", [], "") for i, (p, r, _) in enumerate([
        chat_pair(tok, "3 distinct 2-digit numbers, digits 147", "47 14 71", ""),
        chat_pair(tok, "2 distinct 2-digit numbers, digits 58", "58 85", "")])]
    prompts, real = [e.prompt_ids for e in examples], [e.real_ids for e in examples]
    with torch.no_grad():
        before = sequence_logps(model, prompts, real, tok.eos_id, CPU)
    loss_sum, sums, tokens = spin.sft_micro_batch(model, examples, tok.eos_id, CPU)
    assert loss_sum.item() == pytest.approx(-before.sum().item(), rel=1e-6)
    assert sums["tokens"].item() == sum(len(r) for r in real)
    assert tokens == sum(len(p) + len(r) for p, r in zip(prompts, real))
    (loss_sum / sums["tokens"]).backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    with torch.no_grad():
        after = sequence_logps(model, prompts, real, tok.eos_id, CPU)
    assert (after > before).all(), (after - before)


def test_a_prompt_subset_is_a_seeded_draw_of_distinct_prompts_from_all_of_them():
    """prompts_per_iteration: `count` distinct prompts drawn from all of them, the same for a seed and iteration,
    another for the next iteration (so over iterations every prompt is trained on); 0 is every prompt."""
    examples = [f"prompt {i}" for i in range(40)]
    drawn = [spin.prompts_for_iteration(examples, 8, seed=5, iteration=t) for t in range(12)]
    assert all(len(set(d)) == 8 and set(d) <= set(examples) for d in drawn)
    assert spin.prompts_for_iteration(examples, 8, seed=5, iteration=0) == drawn[0]
    assert drawn[0] != drawn[1] and drawn[0] != spin.prompts_for_iteration(examples, 8, seed=6, iteration=0)
    assert drawn[0] != examples[:8] and len(set().union(*drawn)) > 32  # not the first prompts, nor a few only
    assert spin.prompts_for_iteration(examples, 0, seed=5, iteration=3) == examples


# ----------------------------------------------------------------------------------------------
# KL(policy ‖ opponent)


def direct_kl(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """Σ_v p(v) log(p(v)/q(v)) per row, by torch's own kl_div."""
    return torch.nn.functional.kl_div(q_logprobs, p_logprobs, log_target=True, reduction="none").sum(-1)


def random_logprobs(rows: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(rows, vocab, generator=g)).log_softmax(-1)


def test_kl_with_the_whole_opponent_distribution_is_exact():
    p, q = random_logprobs(20, 50, 0), random_logprobs(20, 50, 1)
    kept = opponent_top_k(q, 50)
    assert kept.keys() == {"logprobs"}
    assert kl_per_token(p, kept).tolist() == pytest.approx(direct_kl(p, q).tolist(), abs=1e-5)
    assert kl_per_token(p, opponent_top_k(p, 99)).abs().max() < 1e-6  # KL(p ‖ p) = 0


def test_kl_with_the_top_k_by_hand():
    # p = [0.2, 0.5, 0.3], q = [0.5, 0.3, 0.2]; q's top 1 is token 0: folded p = [0.2, 0.8], q = [0.5, 0.5]
    #   folded KL = 0.2 ln(0.2/0.5) + 0.8 ln(0.8/0.5) = 0.1927448
    #   exact KL  = 0.2 ln(0.2/0.5) + 0.5 ln(0.5/0.3) + 0.3 ln(0.3/0.2) = 0.1937949
    p, q = torch.tensor([[0.2, 0.5, 0.3]]).log(), torch.tensor([[0.5, 0.3, 0.2]]).log()
    kept = opponent_top_k(q, 1)
    assert kept["ids"].tolist() == [[0]]
    assert kl_per_token(p, kept).item() == pytest.approx(0.1927448, abs=1e-6)
    assert direct_kl(p, q).item() == pytest.approx(0.1937949, abs=1e-6)


def test_kl_with_the_top_k_is_a_lower_bound_that_tightens_with_k():
    p, q = random_logprobs(30, 40, 2), random_logprobs(30, 40, 3)
    exact = direct_kl(p, q)
    previous = torch.zeros(30)
    for k in (1, 4, 16, 39):
        folded = kl_per_token(p, opponent_top_k(q, k))
        assert (folded <= exact + 1e-5).all() and (folded >= previous - 1e-5).all(), k
        previous = folded
    # with k = V - 1 the "other tokens" outcome is a single token: folding loses nothing
    assert previous.tolist() == pytest.approx(exact.tolist(), abs=1e-5)


def test_response_logprobs_are_each_response_positions_next_token_distribution():
    model = tiny_gpt()
    with torch.no_grad():
        rows = response_logprobs(model, PROMPTS, RESPONSES, pad_id=256, device=CPU)
        expected = torch.cat([torch.log_softmax(model(torch.tensor([p + r]))[0], -1)[len(p) - 1:len(p) + len(r) - 1]
                              for p, r in zip(PROMPTS, RESPONSES)])
    assert rows.shape == (sum(map(len, RESPONSES)), 268)
    assert (rows - expected).abs().max() < 1e-4
    # gathered at the responses' tokens, they sum to the sequence log-probs
    targets = torch.tensor([t for r in RESPONSES for t in r])
    picked = rows.gather(-1, targets[:, None])[:, 0]
    per_response = [picked[:4].sum().item(), picked[4:].sum().item()]
    assert per_response == pytest.approx(by_hand_logps(model, PROMPTS, RESPONSES), abs=1e-4)


# ----------------------------------------------------------------------------------------------
# rollout


def synthetic_examples(tok, n: int) -> list[Example]:
    examples = []
    for i, (user, assistant) in enumerate(synthetic_conversations(n, seed=0)):
        messages, answer = [user], assistant["content"]
        examples.append(Example(render_prompt(tok, messages, "chatml"), render_response(tok, answer, "chatml"),
                                f"test:{i}", messages, answer))
    return examples


@pytest.fixture
def setup():
    """A tiny GPT-2, 7 examples and rollout settings of 3 prompts a batch (so 3 batches, the last short)."""
    tok = load_tokenizer("bytes")
    model = tiny_gpt(seed=4, model_type="gpt2")
    model.config.eos_token_id = tok.eos_id
    stop = [tok.specials["<|im_end|>"], tok.eos_id]
    settings = RolloutSettings(max_new_tokens=10, max_len=96, stop=stop, pad_id=tok.eos_id, batch_size=3, seed=11,
                               device=CPU)
    return tok, model, synthetic_examples(tok, 7), settings


@pytest.fixture
def pairs(setup):
    _, model, examples, settings = setup
    return rollout(model, examples, settings, iteration=2)


def test_rollout_pairs_follow_the_examples_order(setup, pairs):
    _, _, examples, settings = setup
    assert [p.source for p in pairs] == [e.source for e in examples]  # whatever the length-sorted batching
    assert [p.prompt_ids for p in pairs] == [e.prompt_ids for e in examples]
    assert [p.real_ids for p in pairs] == [e.real_ids for e in examples]
    assert all(1 <= len(p.generated_ids) <= 10 for p in pairs)
    assert all(p.eos == (p.generated_ids[-1] in settings.stop) for p in pairs)


def test_rollout_scores_real_and_generated_under_the_opponent(setup, pairs):
    tok, model, _, _ = setup
    with torch.no_grad():
        real, gen = pair_logps(model, [p.prompt_ids for p in pairs], [p.real_ids for p in pairs],
                               [p.generated_ids for p in pairs], tok.eos_id, CPU)
    assert [p.opponent_real_logp for p in pairs] == pytest.approx(real.tolist(), abs=1e-4)
    assert [p.opponent_generated_logp for p in pairs] == pytest.approx(gen.tolist(), abs=1e-4)


def test_rollout_is_seeded_by_seed_and_iteration(setup, pairs):
    _, model, examples, settings = setup
    assert [p.generated_ids for p in rollout(model, examples, settings, 2)] == [p.generated_ids for p in pairs]
    assert [p.generated_ids for p in rollout(model, examples, settings, 3)] != [p.generated_ids for p in pairs]


def test_rollout_stops_when_asked(setup):
    _, model, examples, settings = setup
    done = []
    assert rollout(model, examples, settings, 2, progress=done.append, should_stop=lambda: len(done) == 2) is None
    assert done == [3, 3]  # two of the three batches ran


def test_each_ranks_share_gets_the_one_rank_answers(setup, pairs, monkeypatch):
    """2 ranks without processes: rank r samples its share (every 2nd prompt by length) and its answers are
    the one-rank answers; both ranks ask should_stop() equally often (a collective)."""
    _, model, examples, settings = setup
    for rank in (0, 1):
        shared = {}

        def gather(local, world_size):  # the other rank's pairs: the one-rank ones
            shared.update(local)
            return local + [(i, p) for i, p in enumerate(pairs) if i not in shared]

        monkeypatch.setattr(spin, "_all_gather_lists", gather)
        asked = []
        out = rollout(model, examples, replace(settings, rank=rank, world_size=2), 2,
                      should_stop=lambda: asked.append(1) and False)
        assert len(shared) == (4, 3)[rank] and len(asked) == 2  # shares of 4 and 3 prompts, batch_size 3
        assert [p.generated_ids for p in out] == [p.generated_ids for p in pairs]
        assert [p.opponent_generated_logp for p in out] == pytest.approx([p.opponent_generated_logp for p in pairs],
                                                                         abs=1e-5)


def test_rescore_recomputes_the_opponent_logps_under_another_model(setup, pairs):
    tok, _, _, settings = setup
    other = tiny_gpt(seed=5, model_type="gpt2")
    rescored = rescore(other, pairs, settings)
    with torch.no_grad():
        real, gen = pair_logps(other, [p.prompt_ids for p in pairs], [p.real_ids for p in pairs],
                               [p.generated_ids for p in pairs], tok.eos_id, CPU)
    assert [p.opponent_real_logp for p in rescored] == pytest.approx(real.tolist(), abs=1e-4)
    assert [p.opponent_generated_logp for p in rescored] == pytest.approx(gen.tolist(), abs=1e-4)
    assert [p.generated_ids for p in rescored] == [p.generated_ids for p in pairs]


def test_rollout_file_round_trip(setup, pairs, tmp_path):
    tok = setup[0]
    path = str(tmp_path / "iter_2" / "rollouts.jsonl")
    write_rollouts(path, pairs, tok.decode)
    assert read_rollouts(path) == pairs
    assert not (tmp_path / "iter_2" / "rollouts.jsonl.tmp").exists()
