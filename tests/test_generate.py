"""generate.py: cache == no cache, ragged batch == rows alone, parity with transformers' greedy
generate, the top-k/top-p token sets, EOS and length limits, seeds, log-probs, and the CLI."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import generate as gen
from checkpoint import load_pretrained, save_model_dir
from configurator import UserError
from generate import (GREEDY, Sampling, generate, generate_ref, min_p_filter, mix_seed, sample_next, top_k_filter,
                      top_p_filter, uniforms)
from model import GPT, GPTConfig
from tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(model_type: str, vocab_size: int = 97, block_size: int = 64, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(model_type=model_type, vocab_size=vocab_size, block_size=block_size, n_layer=2,
                          n_head=4, n_kv_head=2 if model_type == "llama" else 4, n_embd=32))
    # the default init gives near-uniform, repetitive greedy text; larger weights make every token count
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [1, 2, 3], [42], [7, 7, 7, 60, 61]]


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_cached_greedy_equals_uncached_and_ragged_equals_alone(model_type):
    model = tiny_model(model_type)
    batch = generate(model, PROMPTS, 24, sampling=GREEDY)
    assert batch == generate_ref(model, PROMPTS, 24)
    assert batch == [generate(model, [p], 24, sampling=GREEDY)[0] for p in PROMPTS]
    assert all(len(row) == 24 for row in batch)
    assert len({tuple(row) for row in batch}) == len(PROMPTS)  # the rows really differ
    assert model.kv_caches is None


def test_model_state_restored():
    model = tiny_model("llama").train()
    generate(model, PROMPTS, 3, sampling=GREEDY)
    assert model.training and model.kv_caches is None
    model.eval()
    generate(model, PROMPTS, 3, sampling=GREEDY)
    assert not model.training


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_greedy_parity_with_transformers(tmp_path, model_type):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if model_type == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.eval().save_pretrained(tmp_path)
    model = load_pretrained(str(tmp_path))
    prompts = PROMPTS[:2]
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])  # left padding, as HF expects
    attention_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        # eos_token_id=None: HF never stops early, so both produce exactly 20 tokens
        expected = hf.generate(ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=20,
                               eos_token_id=None, pad_token_id=0)[:, P:].tolist()
    assert generate(model, prompts, 20, sampling=GREEDY) == expected


def test_top_k_filter_keeps_the_k_largest_and_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0]])

    def kept(k):
        return [torch.isfinite(row).nonzero().flatten().tolist() for row in top_k_filter(logits, k)]

    assert kept(1) == [[1, 3], [4]]  # the tie with the 1st-largest is kept
    assert kept(2) == [[1, 3], [3, 4]]
    assert kept(3) == [[1, 2, 3], [2, 3, 4]]
    assert kept(5) == kept(9) == [[0, 1, 2, 3, 4]] * 2
    assert torch.equal(top_k_filter(logits, 3)[0, [1, 2, 3]], logits[0, [1, 2, 3]])  # kept logits untouched
    # a tie at the cut below the top: the k-th largest and every token equal to it stay, nothing smaller
    tie = torch.tensor([[0.5, 2.0, 1.0, 0.0, 1.0]])
    assert [torch.isfinite(top_k_filter(tie, k)[0]).nonzero().flatten().tolist() for k in (1, 2, 3, 4)] == [
        [1], [1, 2, 4], [1, 2, 4], [0, 1, 2, 4]]


def test_top_p_filter_keeps_the_smallest_nucleus():
    def kept(probs, p):
        logits = torch.tensor(probs).log()[None]
        return torch.isfinite(top_p_filter(logits, p)[0]).nonzero().flatten().tolist()

    probs = [0.05, 0.5, 0.15, 0.3]
    assert kept(probs, 0.45) == [1]  # 0.5 alone reaches 0.45
    assert kept(probs, 0.7) == [1, 3]  # 0.5 + 0.3
    assert kept(probs, 0.81) == [1, 2, 3]
    assert kept(probs, 0.99) == [0, 1, 2, 3]
    assert kept(probs, 1.0) == [0, 1, 2, 3]
    assert kept(probs, 1e-9) == [1]  # at least one token
    # ties at the boundary: 0.4 + 0.2 passes 0.5, and every token tied with that last 0.2 stays
    assert kept([0.2, 0.4, 0.2, 0.2], 0.5) == [0, 1, 2, 3]
    assert kept([0.1, 0.3, 0.3, 0.3], 0.5) == [1, 2, 3]
    assert kept([0.1, 0.3, 0.3, 0.3], 0.25) == [1, 2, 3]  # tied with the top token
    # rows are filtered independently
    logits = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]]).log()
    assert torch.isfinite(top_p_filter(logits, 0.6)).tolist() == [[True, True, False], [False, True, True]]


# binary fractions in a shuffled order: their fp32 softmax is exact, so the prefix sums of the sorted
# probabilities are exactly 0.5, 0.75, 0.875, 0.9375, 1 and each filter can be put on its exact boundary
EXACT_PROBS = [0.125, 0.5, 0.0625, 0.25, 0.0625]  # by probability: tokens 1, 3, 0, then 2 and 4 (tied)


def exact_logits() -> torch.Tensor:
    logits = torch.tensor(EXACT_PROBS, dtype=torch.float64).log().float()[None]  # (1, 5)
    assert torch.softmax(logits, -1)[0].tolist() == EXACT_PROBS  # the boundaries below rest on this
    return logits


def kept_by(filtered: torch.Tensor) -> list[int]:
    return torch.isfinite(filtered[0]).nonzero().flatten().tolist()


def test_top_p_at_a_prefix_sum_equal_to_p_keeps_the_smallest_set():
    """A prefix sum that equals p exactly already reaches p: the token after it is not kept."""
    logits = exact_logits()
    step = 2.0**-20  # far above fp32's spacing at 0.75, so p +- step are other fp32 numbers than p
    assert kept_by(top_p_filter(logits, 0.5)) == [1]
    assert kept_by(top_p_filter(logits, 0.5 + step)) == [1, 3]
    assert kept_by(top_p_filter(logits, 0.75 - step)) == [1, 3]
    assert kept_by(top_p_filter(logits, 0.75)) == [1, 3]
    assert kept_by(top_p_filter(logits, 0.75 + step)) == [0, 1, 3]
    assert kept_by(top_p_filter(logits, 0.875)) == [0, 1, 3]
    assert kept_by(top_p_filter(logits, 0.875 + step)) == [0, 1, 2, 3, 4]  # the 4th token, and the one tied with it


def test_min_p_keeps_tokens_at_exactly_min_p_times_the_top():
    """min-p's bar is min_p x the largest probability, inclusive: a token exactly on it stays."""
    logits = exact_logits()
    step = 2.0**-20
    assert kept_by(min_p_filter(logits, 1.0)) == [1]  # only the most likely token
    assert kept_by(min_p_filter(logits, 0.5 + step)) == [1]
    assert kept_by(min_p_filter(logits, 0.5)) == [1, 3]  # 0.25 = 0.5 x 0.5
    assert kept_by(min_p_filter(logits, 0.25)) == [0, 1, 3]  # 0.125 = 0.25 x 0.5
    assert kept_by(min_p_filter(logits, 0.125 + step)) == [0, 1, 3]
    assert kept_by(min_p_filter(logits, 0.125)) == [0, 1, 2, 3, 4]
    assert kept_by(min_p_filter(logits, 0.0)) == [0, 1, 2, 3, 4]
    # rows are filtered independently, each against its own largest probability
    rows = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]]).log()
    assert torch.isfinite(min_p_filter(rows, 0.5)).tolist() == [[True, True, False], [False, True, True]]


def test_min_p_runs_after_temperature_and_top_p():
    """Hugging Face's order, temperature -> top-k -> top-p -> min-p. On probabilities (.4, .3, .2, .1) top-p
    0.75 keeps {0, 1, 2} and min-p 0.45 then keeps all three (0.2 >= 0.45 x 0.4); min-p first would keep
    {0, 1, 2}, renormalised to (.44, .33, .22), and top-p would then stop at {0, 1}."""
    draws = torch.from_numpy(uniforms(0, 4000))
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().expand(4000, 4)
    assert set(sample_next(logits, Sampling(top_p=0.75, min_p=0.45), draws).tolist()) == {0, 1, 2}
    assert set(sample_next(logits, Sampling(min_p=0.3), draws).tolist()) == {0, 1, 2}
    # temperature 2 before min-p: probabilities ~ (.33, .28, .23, .16), all above 0.3 x .33
    assert set(sample_next(logits, Sampling(temperature=2.0, min_p=0.3), draws).tolist()) == {0, 1, 2, 3}


def test_bad_sampling_values_are_errors_naming_the_key():
    for kwargs, key in [(dict(temperature=-0.1), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
                        (dict(top_p=1.5), "top_p"), (dict(min_p=-0.1), "min_p"), (dict(min_p=1.5), "min_p")]:
        with pytest.raises(UserError, match=f"config key '{key}'"):
            Sampling(**kwargs)
    assert Sampling(top_p=1.0, min_p=0.0, top_k=1) and GREEDY.temperature == 0


def test_sample_next_draws_only_from_the_filtered_set():
    logits = torch.tensor([0.0, 2.0, 1.0, 3.0, -1.0, 2.5]).expand(4000, 6)
    draws = torch.from_numpy(uniforms(0, 4000))
    assert set(sample_next(logits, Sampling(top_k=3), draws).tolist()) == {1, 3, 5}
    # probs ~ [.02,.16,.06,.44,.01,.27]: the nucleus for 0.75 is {3, 5, 1}, then top_k=2 leaves {3, 5}
    assert set(sample_next(logits, Sampling(top_p=0.75), draws).tolist()) == {1, 3, 5}
    assert set(sample_next(logits, Sampling(top_k=2, top_p=0.75), draws).tolist()) == {3, 5}
    assert set(sample_next(logits, GREEDY, None).tolist()) == {3}
    # a high temperature flattens the distribution before top-p: more tokens make the nucleus
    assert set(sample_next(logits, Sampling(temperature=100.0, top_p=0.75), draws).tolist()) == {0, 1, 2, 3, 5}
    # draws at the very ends of (0, 1) pick the first and the last token of positive probability
    edges = torch.tensor([2.0**-53, 1 - 2.0**-53], dtype=torch.float64)
    assert sample_next(logits[:2], Sampling(top_k=3), edges).tolist() == [1, 5]


def test_sampled_tokens_follow_the_softmax():
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, -3.0]).expand(200_000, 6)
    for temperature in (1.0, 0.5):
        tokens = sample_next(logits, Sampling(temperature=temperature), torch.from_numpy(uniforms(7, 200_000)))
        freq = torch.bincount(tokens, minlength=6) / 200_000
        # 5 standard deviations of a frequency estimated from 200k draws is at most 0.0056
        assert torch.allclose(freq, torch.softmax(logits[0] / temperature, -1), atol=0.0056)


def test_uniforms_are_a_pure_function_of_seed_and_index():
    a = uniforms(3, 1000)
    assert np.array_equal(a[:10], uniforms(3, 10)) and not np.array_equal(a, uniforms(4, 1000))
    assert 0 < a.min() and a.max() < 1 and abs(a.mean() - 0.5) < 0.03
    assert mix_seed(3, 0) != mix_seed(3, 1) and mix_seed(3, 1) == mix_seed(3, 1) and 0 <= mix_seed(-1, 2**70) < 2**63


def test_eos_cuts_each_row_and_stops_the_batch():
    model = tiny_model("llama")
    free = generate(model, PROMPTS[:2], 16, sampling=GREEDY)
    # an EOS that row 0 produces first at some step s >= 2 and row 1 later or never
    s, eos = next((s, t) for s, t in enumerate(free[0]) if s >= 2 and t not in free[0][:s] + free[1][:s + 2])
    out = generate(model, PROMPTS[:2], 16, sampling=GREEDY, eos_id=eos)
    assert out[0] == free[0][:s + 1]  # cut after the EOS, the EOS kept
    cut = free[1].index(eos) + 1 if eos in free[1] else 16
    assert out[1] == free[1][:cut]  # the other row goes on
    assert out == generate_ref(model, PROMPTS[:2], 16, eos_id=eos)

    # a list of EOS ids; once every row has one, the loop ends: count the decode steps
    eos_ids = [free[0][1], free[1][2]]
    calls = []
    hook = model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    out = generate(model, PROMPTS[:2], 16, sampling=GREEDY, eos_id=eos_ids)
    hook.remove()
    assert out[0] == free[0][:2] and out[1] == free[1][:free[1].index(free[1][2]) + 1]
    assert len(calls) == 2 + max(len(out[0]), len(out[1])) - 1  # a prefill per prompt, a step per further token


def test_max_length_respected():
    model = tiny_model("gpt2", block_size=32)
    prompts = [list(range(1, 21)), [3, 4, 5, 6, 7]]
    out = generate(model, prompts, 100, sampling=GREEDY)
    assert [len(r) for r in out] == [12, 27]  # prompt + new == block_size for each row
    assert out == [generate(model, [p], 100, sampling=GREEDY)[0] for p in prompts]
    assert out == generate_ref(model, prompts, 100)
    assert generate(model, prompts, 0) == [[], []]
    with pytest.raises(UserError, match="prompt 1 has 32 tokens"):
        generate(model, [[1], list(range(32))], 4)
    with pytest.raises(UserError, match="prompt 0 is empty"):
        generate(model, [[]], 4)


# ----------------------------------------------------------------------------------------------
# continuous batching


def random_prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (n,), generator=g).tolist()
    return [torch.randint(1, 97, (length,), generator=g).tolist() for length in lengths]


def static_steps(lengths: list[int], rows: int) -> int:
    """Decode steps of batches of `rows` prompts, each running until its longest answer ends."""
    return sum(max(lengths[i:i + rows]) - 1 for i in range(0, len(lengths), rows))


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_continuous_batching_greedy_equals_each_prompt_alone(model_type):
    model = tiny_model(model_type)
    prompts = random_prompts(11)
    free = [generate(model, [p], 20, sampling=GREEDY)[0] for p in prompts]
    eos = [free[0][3], free[1][9]]  # two stop tokens that end the rows at many different steps
    alone = [generate_ref(model, [p], 20, eos_id=eos)[0] for p in prompts]
    lengths = [len(a) for a in alone]
    assert len(set(lengths)) >= 4 and 20 in lengths and min(lengths) < 5
    for rows in (1, 3, 4, 11):
        steps = []
        out = generate(model, prompts, 20, sampling=GREEDY, eos_id=eos, batch_size=rows, on_step=steps.append)
        assert out == alone, f"batch_size={rows}"
        decode_steps = len(steps) - 1  # on_step also sees the first tokens, which come from the prefills
        lower_bound = max(max(lengths) - 1, -(-sum(n - 1 for n in lengths) // rows))
        assert lower_bound <= decode_steps <= static_steps(lengths, rows)
        if 1 < rows < len(prompts):  # a row that ends takes the next prompt: fewer steps than static batches
            assert decode_steps < static_steps(lengths, rows)
    assert model.kv_caches is None


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_every_step_attends_to_the_whole_cache_so_neighbours_change_no_bit(model_type, monkeypatch):
    """A step's width never depends on the other rows (a width cut to the live rows changed SDPA's last bits on
    AMD EPYC), so a prompt's sampled tokens and log-probs are the same bits beside any other prompts."""
    model = tiny_model(model_type)
    if model_type == "llama":
        model.config.sliding_window = 6  # the window's half of the mask too
    prompts = random_prompts(9, seed=3)
    free = [generate(model, [p], 40, sampling=GREEDY)[0] for p in prompts]
    eos = [free[0][4], free[2][11]]
    alone = [generate_ref(model, [p], 40, eos_id=eos)[0] for p in prompts]
    assert len({len(a) for a in alone}) >= 3
    widths = []
    mask_of = gen.attention_mask
    monkeypatch.setattr(gen, "attention_mask", lambda q, k, w=None: widths.append(len(k)) or mask_of(q, k, w))
    kwargs = dict(eos_id=eos, batch_size=3, max_len=60)
    assert generate(model, prompts, 40, sampling=GREEDY, **kwargs) == alone
    assert set(widths) == {59}
    sampled = generate(model, prompts, 40, seed=3, return_logprobs=True, **kwargs)
    for share in (prompts[::2], prompts[::-1], prompts[4:5]):  # other neighbours, other rows, other start steps
        at = [prompts.index(p) for p in share]
        want = ([sampled[0][i] for i in at], [sampled[1][i] for i in at])
        seeds = [gen.mix_seed(3, i) for i in at]
        assert generate(model, share, 40, seed=seeds, return_logprobs=True, **kwargs) == want


def test_checking_for_ended_rows_every_8_steps_as_on_a_gpu_changes_no_answer(monkeypatch):
    """On a GPU the loop reads which rows are done every 8 steps: a row found done late marks time, its next
    prompt starts late; none of that changes an answer."""
    model = tiny_model("llama")
    prompts = random_prompts(9, seed=3)
    free = [generate(model, [p], 40, sampling=GREEDY)[0] for p in prompts]
    eos = [free[0][4], free[2][11]]
    alone = [generate_ref(model, [p], 40, eos_id=eos)[0] for p in prompts]
    kwargs = dict(eos_id=eos, batch_size=3, max_len=60)
    sampled = generate(model, prompts, 40, seed=3, return_logprobs=True, **kwargs)
    steps = {}
    for every in (1, 8):
        monkeypatch.setattr(gen, "CHECK_EVERY", {"cpu": every, "default": every})
        counted = []
        assert generate(model, prompts, 40, sampling=GREEDY, on_step=counted.append, **kwargs) == alone
        assert generate(model, prompts, 40, seed=3, return_logprobs=True, **kwargs) == sampled
        steps[every] = len(counted)
    assert steps[8] > steps[1]  # rows really were found done late


def test_sampled_answers_depend_on_the_prompt_and_its_seed_only():
    model = tiny_model("llama")
    prompts = random_prompts(9, seed=1)
    seeds = [mix_seed(5, i) for i in range(9)]
    kwargs = dict(sampling=Sampling(top_k=40, top_p=0.95, min_p=0.05), eos_id=list(range(1, 97, 8)), batch_size=3,
                  max_len=40)
    a = generate(model, prompts, 16, seed=seeds, **kwargs)
    assert len({len(row) for row in a}) > 2  # answers of many lengths: rows were refilled at many steps
    assert a == generate(model, prompts, 16, seed=seeds, **kwargs)
    assert a == generate(model, prompts, 16, seed=5, **kwargs)  # an int seed gives prompt i mix_seed(seed, i)
    # any share of the prompts, in any order (one rank's in spin.rollout), gets the same answers
    assert generate(model, prompts[1::2], 16, seed=seeds[1::2], **kwargs) == a[1::2]
    assert generate(model, prompts[::-1], 16, seed=seeds[::-1], **kwargs) == a[::-1]
    assert a != generate(model, prompts, 16, seed=6, **kwargs)
    torch.manual_seed(0)  # seed None: the base seed comes from torch's global RNG
    b = generate(model, prompts, 16, **kwargs)
    torch.manual_seed(0)
    assert b == generate(model, prompts, 16, **kwargs) != a
    with pytest.raises(UserError, match="2 seeds for 9 prompts"):
        generate(model, prompts, 16, seed=[1, 2])


def test_stream_yields_answers_as_they_end_and_stops_when_closed():
    model = tiny_model("gpt2").train()
    prompts = random_prompts(6, seed=2)
    free = [generate(model, [p], 12, sampling=GREEDY)[0] for p in prompts]
    eos = free[2][1]
    ends = [i for i, _, _ in gen.generate_stream(model, prompts, 12, sampling=GREEDY, eos_id=eos, batch_size=6)]
    lengths = [len(generate(model, [p], 12, sampling=GREEDY, eos_id=eos)[0]) for p in prompts]
    assert sorted(ends) == list(range(6)) and [lengths[i] for i in ends] == sorted(lengths)
    stream = gen.generate_stream(model, prompts, 12, sampling=GREEDY, batch_size=2)
    next(stream)
    assert model.kv_caches is not None and not model.training
    stream.close()  # what a `break` out of the loop does
    assert model.kv_caches is None and model.training


def test_max_len_caps_each_row():
    model = tiny_model("gpt2", block_size=32)
    prompts = [list(range(1, 15)), [3, 4, 5]]
    assert [len(r) for r in generate(model, prompts, 100, sampling=GREEDY, max_len=20)] == [6, 17]
    assert generate(model, prompts, 4, sampling=GREEDY, max_len=20) == generate(model, prompts, 4, sampling=GREEDY)
    with pytest.raises(UserError, match="max_len=40 exceeds the model's block_size=32"):
        generate(model, prompts, 4, max_len=40)
    with pytest.raises(UserError, match="prompt 0 has 14 tokens, which leaves no room in max_len=14"):
        generate(model, prompts, 4, max_len=14)


def test_seed_reproducible():
    model = tiny_model("llama")
    kwargs = dict(sampling=Sampling(top_k=50, top_p=0.95))
    a = generate(model, PROMPTS, 16, seed=1, **kwargs)
    assert a == generate(model, PROMPTS, 16, seed=1, **kwargs)
    assert a != generate(model, PROMPTS, 16, seed=2, **kwargs)
    assert a != generate(model, PROMPTS, 16, sampling=GREEDY)


def test_logprobs_are_the_unmodified_model_logprobs():
    model = tiny_model("llama")
    out, logps = generate(model, PROMPTS, 12, sampling=Sampling(temperature=0.7, top_k=10), seed=0,
                          return_logprobs=True)
    for prompt, new, lp in zip(PROMPTS, out, logps):
        assert len(lp) == len(new) == 12
        seq = torch.tensor([prompt + new])
        with torch.no_grad():
            full = torch.log_softmax(model(seq)[0, len(prompt) - 1:-1], -1)  # (new, V)
        expected = full.gather(-1, torch.tensor(new)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(lp), expected, atol=1e-4)


def test_compiled_decode_step_matches():
    # the eager backend checks that the step is captured as one graph (fullgraph=True raises on a
    # break) without a C++ compile; on the GPU the same function runs with CUDA graphs
    gen.compiled_decode.cache_clear()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps them; count only this test's graphs
    model = tiny_model("llama")
    expected = generate(model, PROMPTS, 10, sampling=GREEDY)
    caches_in_use = []  # held, so a freed cache's memory cannot come back as a "reused" one

    def record_cache(token):
        caches_in_use.append(model.kv_caches[0])

    assert generate(model, PROMPTS, 10, sampling=GREEDY, compile="eager", on_step=record_cache) == expected
    assert model.kv_caches is None
    # a second call of the same shape runs on the same cache buffers (CUDA graphs need fixed addresses)
    others = [p[::-1] for p in PROMPTS]
    compiled = generate(model, others, 10, sampling=GREEDY, compile="eager", on_step=record_cache)
    assert compiled == generate(model, others, 10, sampling=GREEDY)
    assert all(cache is caches_in_use[0] for cache in caches_in_use)
    assert gen.compiled_decode.cache_info().currsize == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph for every step and call
    # continuous batching: 2 rows for 4 prompts, refilled between steps; the step keeps its static shapes
    assert generate(model, PROMPTS, 10, sampling=GREEDY, compile="eager", batch_size=2) == expected
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # one more for the 2-row shape
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# loading and the command line


def saved_chat_model(path) -> None:
    tok = load_tokenizer("bytes")
    model = tiny_model("llama", vocab_size=tok.n_vocab + 3, block_size=128)
    save_model_dir(str(path), model.state_dict(), model.config)
    tok.save(str(path))


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, os.path.join(REPO, "generate.py"), *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_cli(tmp_path, capsys, monkeypatch):
    import configurator

    saved_chat_model(tmp_path / "m")
    args = [f"--model={tmp_path / 'm'}", "--prompt=hello", "--max_new_tokens=8", "--seed=0", "--device=cpu",
            "--min_p=0.05"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n") and len(r.stdout) >= 1
    gen.main(args)  # in-process: the same seed prints the same answer
    assert capsys.readouterr().out == r.stdout
    # interactive (in-process, stdin replaced): two turns, then EOF
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nagain\n"))
    gen.main([f"--model={tmp_path / 'm'}", "--max_new_tokens=4", "--temperature=0"])
    assert capsys.readouterr().out.count("> ") == 3  # two answers, then the prompt that met EOF
    # errors: one line on stderr, exit code 2
    r = run_cli(f"--model={tmp_path / 'nope'}", "--prompt=hi")
    assert r.returncode == 2 and r.stderr.startswith("error: model path") and r.stderr.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:
        configurator.run_main(gen.main, [f"--model={tmp_path / 'm'}", "--prompt=" + "long " * 40])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "block_size=128" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:  # a bad sampling value is refused before any model is looked for
        configurator.run_main(gen.main, [f"--model={tmp_path / 'nope'}", "--prompt=hi", "--min_p=2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err == "error: config key 'min_p' must be in [0, 1] (None: no min-p filter), got 2.0\n"
