"""generate.py: cache == no cache, ragged batch == rows alone, parity with transformers' greedy
generate, the top-k/top-p token sets, EOS and length limits, seeds, log-probs, and the CLI."""

import io
import os
import subprocess
import sys

import pytest
import torch

import generate as gen
from configurator import UserError
from generate import generate, generate_ref, sample_next, top_k_filter, top_p_filter
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
    batch = generate(model, PROMPTS, 24, temperature=0)
    assert batch == generate_ref(model, PROMPTS, 24)
    assert batch == [generate(model, [p], 24, temperature=0)[0] for p in PROMPTS]
    assert all(len(row) == 24 for row in batch)
    assert len({tuple(row) for row in batch}) == len(PROMPTS)  # the rows really differ
    assert model.kv_caches is None


def test_model_state_restored():
    model = tiny_model("llama").train()
    generate(model, PROMPTS, 3, temperature=0)
    assert model.training and model.kv_caches is None
    model.eval()
    generate(model, PROMPTS, 3, temperature=0)
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
    model = GPT.from_pretrained(str(tmp_path))
    prompts = PROMPTS[:2]
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])  # left padding, as HF expects
    attention_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        # eos_token_id=None: HF never stops early, so both produce exactly 20 tokens
        expected = hf.generate(ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=20,
                               eos_token_id=None, pad_token_id=0)[:, P:].tolist()
    assert generate(model, prompts, 20, temperature=0) == expected


def test_top_k_filter_keeps_the_k_largest_and_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0]])

    def kept(k):
        return [torch.isfinite(row).nonzero().flatten().tolist() for row in top_k_filter(logits, k)]

    assert kept(1) == [[1, 3], [4]]  # the tie with the 1st-largest is kept
    assert kept(2) == [[1, 3], [3, 4]]
    assert kept(3) == [[1, 2, 3], [2, 3, 4]]
    assert kept(5) == kept(9) == [[0, 1, 2, 3, 4]] * 2
    assert torch.equal(top_k_filter(logits, 3)[0, [1, 2, 3]], logits[0, [1, 2, 3]])  # kept logits untouched


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


def test_sample_next_draws_only_from_the_filtered_set():
    logits = torch.tensor([0.0, 2.0, 1.0, 3.0, -1.0, 2.5]).expand(4000, 6)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, 3, None, g).tolist()) == {1, 3, 5}
    # probs ~ [.02,.16,.06,.44,.01,.27]: the nucleus for 0.75 is {3, 5, 1}, then top_k=2 leaves {3, 5}
    assert set(sample_next(logits, 1.0, None, 0.75, g).tolist()) == {1, 3, 5}
    assert set(sample_next(logits, 1.0, 2, 0.75, g).tolist()) == {3, 5}
    assert set(sample_next(logits, 0.0, None, None, g).tolist()) == {3}
    # a high temperature flattens the distribution before top-p: more tokens make the nucleus
    assert set(sample_next(logits, 100.0, None, 0.75, g).tolist()) == {0, 1, 2, 3, 5}


def test_eos_cuts_each_row_and_stops_the_batch():
    model = tiny_model("llama")
    free = generate(model, PROMPTS[:2], 16, temperature=0)
    # an EOS that row 0 produces first at some step s >= 2 and row 1 later or never
    s, eos = next((s, t) for s, t in enumerate(free[0]) if s >= 2 and t not in free[0][:s] + free[1][:s + 2])
    out = generate(model, PROMPTS[:2], 16, temperature=0, eos_id=eos)
    assert out[0] == free[0][:s + 1]  # cut after the EOS, the EOS kept
    cut = free[1].index(eos) + 1 if eos in free[1] else 16
    assert out[1] == free[1][:cut]  # the other row goes on
    assert out == generate_ref(model, PROMPTS[:2], 16, eos_id=eos)

    # a list of EOS ids; once every row has one, the loop ends: count the decode steps
    eos_ids = [free[0][1], free[1][2]]
    calls = []
    hook = model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    out = generate(model, PROMPTS[:2], 16, temperature=0, eos_id=eos_ids)
    hook.remove()
    assert out[0] == free[0][:2] and out[1] == free[1][:free[1].index(free[1][2]) + 1]
    assert len(calls) == max(len(out[0]), len(out[1]))  # prefill + one step per further token


def test_max_length_respected():
    model = tiny_model("gpt2", block_size=32)
    prompts = [list(range(1, 21)), [3, 4, 5, 6, 7]]
    out = generate(model, prompts, 100, temperature=0)
    assert [len(r) for r in out] == [12, 27]  # prompt + new == block_size for each row
    assert out == [generate(model, [p], 100, temperature=0)[0] for p in prompts]
    assert out == generate_ref(model, prompts, 100)
    assert generate(model, prompts, 0) == [[], []]
    with pytest.raises(UserError, match="prompt 1 has 32 tokens"):
        generate(model, [[1], list(range(32))], 4)
    with pytest.raises(UserError, match="prompt 0 is empty"):
        generate(model, [[]], 4)


def test_seed_reproducible():
    model = tiny_model("llama")
    kwargs = dict(temperature=1.0, top_k=50, top_p=0.95)
    a = generate(model, PROMPTS, 16, seed=1, **kwargs)
    assert a == generate(model, PROMPTS, 16, seed=1, **kwargs)
    assert a != generate(model, PROMPTS, 16, seed=2, **kwargs)
    assert a != generate(model, PROMPTS, 16, temperature=0)


def test_logprobs_are_the_unmodified_model_logprobs():
    model = tiny_model("llama")
    out, logps = generate(model, PROMPTS, 12, temperature=0.7, top_k=10, seed=0, return_logprobs=True)
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
    expected = generate(model, PROMPTS, 10, temperature=0)
    caches_in_use = []  # held, so a freed cache's memory cannot come back as a "reused" one

    def record_cache(token):
        caches_in_use.append(model.kv_caches[0])

    assert generate(model, PROMPTS, 10, temperature=0, compile="eager", on_step=record_cache) == expected
    assert model.kv_caches is None
    # a second call of the same shape runs on the same cache buffers (CUDA graphs need fixed addresses)
    others = [p[::-1] for p in PROMPTS]
    compiled = generate(model, others, 10, temperature=0, compile="eager", on_step=record_cache)
    assert compiled == generate(model, others, 10, temperature=0)
    assert all(cache is caches_in_use[0] for cache in caches_in_use)
    assert gen.compiled_decode.cache_info().currsize == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph for every step and call
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# loading and the command line


def saved_chat_model(path) -> None:
    tok = load_tokenizer("bytes")
    model = tiny_model("llama", vocab_size=tok.n_vocab + 3, block_size=128)
    model.save_pretrained(str(path))
    tok.save(str(path))


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, os.path.join(REPO, "generate.py"), *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_cli(tmp_path, capsys, monkeypatch):
    import configurator

    saved_chat_model(tmp_path / "m")
    args = [f"--model={tmp_path / 'm'}", "--prompt=hello", "--max_new_tokens=8", "--seed=0", "--device=cpu"]
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
