"""spin.py: the SPIN loss against hand-worked numbers, log 2 at equal policies, the direction of a
gradient step, which tokens the sequence log-probs sum over, and the rollout's opponent log-probs."""

import math

import pytest
import torch

from data import Example, collate, render_prompt, render_response, synthetic_conversations
from model import GPT, GPTConfig
from spin import (pair_logps, per_iteration, read_rollouts, rollout, sequence_logps, spin_loss, spin_terms,
                  write_rollouts)
from tokenizer import load_tokenizer

CPU = torch.device("cpu")



def tiny_gpt(seed: int = 0, model_type: str = "llama") -> GPT:
    torch.manual_seed(seed)
    n_kv_head = 2 if model_type == "gpt2" else 1  # GPT-2 has no grouped-query attention
    return GPT(GPTConfig(model_type=model_type, vocab_size=268, block_size=96, n_layer=2, n_head=2,
                         n_kv_head=n_kv_head, n_embd=32)).eval()


def chat_pair(tok, question: str, answer: str, generated: str):
    prompt = render_prompt(tok, [{"role": "user", "content": question}], "chatml")
    return prompt, render_response(tok, answer, "chatml"), render_response(tok, generated, "chatml")


# ----------------------------------------------------------------------------------------------
# the loss


# Worked by hand, beta = 0.5:
#   real rewards      0.5 * ([-10, -20] - [-11, -20]) = [0.5, 0.0]
#   generated rewards 0.5 * ([-12, -15] - [-11, -16]) = [-0.5, 0.5]
#   h = real - generated = [1.0, -0.5]
#   sigmoid: log(1 + e^-1) = 0.3132617, log(1 + e^0.5) = 0.9740770  -> mean 0.6436693
#   hinge:   max(0, 1 - 1) = 0,         max(0, 1 + 0.5) = 1.5       -> mean 0.75
POLICY_REAL, POLICY_GEN = [-10.0, -20.0], [-12.0, -15.0]
REF_REAL, REF_GEN = [-11.0, -20.0], [-11.0, -16.0]


@pytest.mark.parametrize("loss_type, expected", [("sigmoid", (0.3132617 + 0.9740770) / 2), ("hinge", 0.75)])
def test_spin_loss_equals_hand_computed_values(loss_type, expected):
    t = torch.tensor
    loss, metrics = spin_loss(t(POLICY_REAL), t(POLICY_GEN), t(REF_REAL), t(REF_GEN), beta=0.5, loss_type=loss_type)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics == pytest.approx({"rewards/real": 0.25, "rewards/generated": 0.0, "rewards/margins": 0.25,
                                     "rewards/accuracies": 0.5, "logps/real": -15.0, "logps/generated": -13.5})
    assert all(isinstance(v, float) for v in metrics.values())


def test_spin_terms_per_pair_and_unknown_loss_type():
    t = torch.tensor
    losses, real_rewards, gen_rewards = spin_terms(t(POLICY_REAL), t(POLICY_GEN), t(REF_REAL), t(REF_GEN), 0.5)
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(0.5))], abs=1e-6)
    assert real_rewards.tolist() == [0.5, 0.0] and gen_rewards.tolist() == [-0.5, 0.5]
    with pytest.raises(ValueError, match="loss_type"):
        spin_terms(t(POLICY_REAL), t(POLICY_GEN), t(REF_REAL), t(REF_GEN), 0.5, "ipo")


def test_loss_is_log2_when_policy_equals_opponent():
    torch.manual_seed(0)
    real, gen = -50 * torch.rand(16), -50 * torch.rand(16)
    for beta in (0.01, 0.1, 5.0):
        loss, metrics = spin_loss(real, gen, real.clone(), gen.clone(), beta)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
        assert metrics["rewards/margins"] == 0.0 and metrics["rewards/accuracies"] == 0.0
        hinge, _ = spin_loss(real, gen, real.clone(), gen.clone(), beta, "hinge")
        assert hinge.item() == 1.0


def test_batch_mean_is_the_mean_of_micro_batches_of_one():
    torch.manual_seed(1)
    a, b, c, d = (-20 * torch.rand(6) for _ in range(4))
    whole, _ = spin_loss(a, b, c, d, 0.1)
    singles = [spin_loss(a[i:i + 1], b[i:i + 1], c[i:i + 1], d[i:i + 1], 0.1)[0] for i in range(6)]
    assert whole.item() == pytest.approx(torch.stack(singles).mean().item(), abs=1e-7)


def test_beta_and_lr_per_iteration():
    assert per_iteration(0.2, 5) == 0.2
    assert [per_iteration([0.1, 0.2, 0.3], t) for t in range(5)] == [0.1, 0.2, 0.3, 0.3, 0.3]


# ----------------------------------------------------------------------------------------------
# sequence log-probs


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_sequence_logps_sum_response_tokens_with_end_of_turn_only(model_type):
    tok = load_tokenizer("bytes")
    model = tiny_gpt(model_type=model_type)
    eot = tok.specials["<|im_end|>"]
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
    responses = [[20, 21, 22, eot], [30, eot]]

    expected = []
    for p, r in zip(prompts, responses):  # by hand: each sequence alone, no padding, full logits
        with torch.no_grad():
            logits = model(torch.tensor([p + r]))[0]  # (len(p) + len(r), V)
        logp = torch.log_softmax(logits.double(), -1)
        # position len(p) - 1 + i predicts response token i; the prompt's own tokens are not scored
        expected.append(sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(r)))

    with torch.no_grad():
        got = sequence_logps(model, prompts, responses, pad_id=tok.eos_id, device=CPU)
        other_pad = sequence_logps(model, prompts, responses, pad_id=3, device=CPU)
        without_eot = sequence_logps(model, prompts, [r[:-1] for r in responses], pad_id=tok.eos_id, device=CPU)
    assert got.dtype == torch.float32 and got.shape == (2,)
    assert got.tolist() == pytest.approx(expected, abs=1e-4)
    assert torch.equal(got, other_pad), "the padding token changed the result"
    # the end-of-turn token's own log-prob is part of the sum
    eot_logps = [torch.log_softmax(model(torch.tensor([p + r]))[0, len(p) + len(r) - 2].double(), -1)[eot].item()
                 for p, r in zip(prompts, responses)]
    assert (got - without_eot).tolist() == pytest.approx(eot_logps, abs=1e-4)


def test_collate_masks_prompt_and_padding():
    input_ids, targets = collate([[1, 2, 3], [4]], [[7, 8], [9, 10]], pad_id=0)
    assert input_ids.tolist() == [[1, 2, 3, 7], [4, 9, 0, 0]]
    assert targets.tolist() == [[-100, -100, 7, 8], [9, 10, -100, -100]]


def test_pair_logps_equal_separate_calls():
    model = tiny_gpt()
    prompts, real, gen = [[1, 2], [3, 4, 5]], [[6, 7, 8], [9]], [[10], [11, 12, 13, 14]]
    with torch.no_grad():
        r, g = pair_logps(model, prompts, real, gen, 0, CPU)
        assert r.tolist() == pytest.approx(sequence_logps(model, prompts, real, 0, CPU).tolist(), abs=1e-5)
        assert g.tolist() == pytest.approx(sequence_logps(model, prompts, gen, 0, CPU).tolist(), abs=1e-5)


def test_gradient_step_raises_real_and_lowers_generated_logps():
    tok = load_tokenizer("bytes")
    model = tiny_gpt(seed=3).train()
    triples = [chat_pair(tok, "3 distinct 2-digit numbers, digits 147", "14 71 44", "x1 y2 zz"),
               chat_pair(tok, "4 distinct 2-digit numbers, digits 2589", "25 89 52 99", "abc 9"),
               chat_pair(tok, "5 distinct 2-digit numbers, digits 1479", "47 91 14 79 44", "5 5 5")]
    prompts, real, gen = (list(x) for x in zip(*triples))
    with torch.no_grad():  # the opponent: the same weights, scored before the step
        ref_real, ref_gen = pair_logps(model, prompts, real, gen, tok.eos_id, CPU)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    policy_real, policy_gen = pair_logps(model, prompts, real, gen, tok.eos_id, CPU)
    loss, _ = spin_loss(policy_real, policy_gen, ref_real, ref_gen, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after_real, after_gen = pair_logps(model, prompts, real, gen, tok.eos_id, CPU)
        after_loss, metrics = spin_loss(after_real, after_gen, ref_real, ref_gen, beta=0.1)
    assert (after_real > ref_real).all(), (after_real - ref_real)
    assert (after_gen < ref_gen).all(), (after_gen - ref_gen)
    assert after_loss.item() < math.log(2)
    assert metrics["rewards/accuracies"] == 1.0 and metrics["rewards/margins"] > 0


# ----------------------------------------------------------------------------------------------
# rollout


def synthetic_examples(tok, n: int) -> list[Example]:
    examples = []
    for i, (user, assistant) in enumerate(synthetic_conversations(n, seed=0)):
        messages, answer = [user], assistant["content"]
        examples.append(Example(render_prompt(tok, messages, "chatml"), render_response(tok, answer, "chatml"),
                                f"test:{i}", messages, answer))
    return examples


def test_rollout_scores_real_and_generated_under_the_opponent(tmp_path):
    tok = load_tokenizer("bytes")
    model = tiny_gpt(seed=4, model_type="gpt2")
    model.config.eos_token_id = tok.eos_id
    examples = synthetic_examples(tok, 7)
    stop = [tok.specials["<|im_end|>"], tok.eos_id]
    kwargs = dict(max_new_tokens=10, max_len=96, stop=stop, pad_id=tok.eos_id, batch_size=3, seed=11, iteration=2,
                  device=CPU)
    pairs = rollout(model, examples, **kwargs)
    assert [p.source for p in pairs] == [e.source for e in examples]  # the examples' order, whatever the batching
    assert [p.real_ids for p in pairs] == [e.real_ids for e in examples]
    assert all(1 <= len(p.generated_ids) <= 10 for p in pairs)
    assert all(p.eos == (p.generated_ids[-1] in stop) for p in pairs)
    with torch.no_grad():
        real, gen = pair_logps(model, [p.prompt_ids for p in pairs], [p.real_ids for p in pairs],
                               [p.generated_ids for p in pairs], tok.eos_id, CPU)
    assert [p.ref_real_logp for p in pairs] == pytest.approx(real.tolist(), abs=1e-4)
    assert [p.ref_generated_logp for p in pairs] == pytest.approx(gen.tolist(), abs=1e-4)
    # seeded: the same call samples the same responses; another iteration samples others
    assert [p.generated_ids for p in rollout(model, examples, **kwargs)] == [p.generated_ids for p in pairs]
    other = rollout(model, examples, **{**kwargs, "iteration": 3})
    assert [p.generated_ids for p in other] != [p.generated_ids for p in pairs]
    # a should_stop() that says stop aborts the rollout
    assert rollout(model, examples, **kwargs, should_stop=lambda: True) is None

    path = str(tmp_path / "iter_2" / "rollouts.jsonl")
    write_rollouts(path, pairs, tok.decode)
    assert read_rollouts(path) == pairs
    assert not (tmp_path / "iter_2" / "rollouts.jsonl.tmp").exists()
