"""model.py: causality, log-probs == logits, KV cache == full forward, parameter and FLOP counts, and the
Triton attention path (Hugging Face format and parity: test_checkpoint.py)."""

import pytest
import torch

from model import GPT, GPTConfig


def test_causality():
    torch.manual_seed(0)
    for model_type in ("gpt2", "llama"):
        model = GPT(GPTConfig(model_type=model_type, vocab_size=50, block_size=32, n_layer=2, n_head=4,
                              n_kv_head=2 if model_type == "llama" else 4, n_embd=32)).eval()
        idx = torch.randint(0, 50, (1, 20))
        changed = idx.clone()
        changed[0, 11] = (idx[0, 11] + 1) % 50
        with torch.no_grad():
            a, b = model(idx), model(changed)
        assert torch.equal(a[:, :11], b[:, :11])
        assert not torch.allclose(a[:, 11:], b[:, 11:])


def test_token_logprobs_match_the_logits():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    idx = torch.randint(0, 61, (3, 17))
    targets = torch.randint(0, 61, (3, 17))
    targets[0, :5] = -100
    logps = model.token_logprobs(idx, targets)
    assert logps.shape == (3, 17) and logps.dtype == torch.float32 and torch.all(logps[0, :5] == 0)
    gathered = torch.log_softmax(model(idx), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    assert torch.allclose(logps[targets != -100], gathered[targets != -100], atol=1e-5)


def test_kv_cache_forward_matches_full_forward():
    torch.manual_seed(0)
    for model_type in ("gpt2", "llama"):
        model = GPT(GPTConfig(model_type=model_type, vocab_size=50, block_size=32, n_layer=2, n_head=4,
                              n_kv_head=2 if model_type == "llama" else 4, n_embd=32)).eval()
        idx = torch.randint(0, 50, (2, 12))
        with torch.no_grad():
            full = model(idx)
            model.setup_kv_cache(3, 16)  # rows 2 and 0 of a 3-row cache; row 1 stays empty
            keys = torch.arange(16)
            pos = torch.arange(8)[None].expand(2, 8)
            causal = (keys[:8] <= pos[..., None])[:, None]  # (2, 1, 8, 8): a prefill sees its own keys only
            first = model(idx[:, :8], pos=pos, slots=(torch.tensor([2, 0]), pos), mask=causal)
            steps = []
            for t in range(8, 12):
                # a step of every row: row 1 marks time at position 0, the others go on at position t
                step_pos = torch.tensor([[t], [0], [t]])
                step_idx = torch.stack([idx[1, t:t + 1], idx[0, t:t + 1], idx[0, t:t + 1]])
                logits = model(step_idx, pos=step_pos, slots=(None, step_pos),
                               mask=(keys <= step_pos[..., None])[:, None])
                steps.append(logits[[2, 0]])
            model.clear_kv_cache()
        assert torch.allclose(torch.cat([first] + steps, 1), full, atol=1e-5)


def test_param_count_and_flops():
    model = GPT(GPTConfig(model_type="gpt2", vocab_size=100, block_size=16, n_layer=2, n_head=2, n_kv_head=2,
                          n_embd=16))
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - 100 * 16 - 16 * 16
    assert model.flops_per_token(16) == 6 * model.num_params() + 12 * 2 * 2 * 8 * 16


@pytest.mark.triton
def test_triton_attention_path_matches_sdpa(monkeypatch):
    """model.py's attention='triton' under the interpreter: the same logits and gradients as SDPA,
    and the Triton kernels really ran (SDPA is made to fail for the triton model)."""
    import spin_kernels.attention as ka
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=61, block_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    ref = GPT(cfg)
    fast = GPT(GPTConfig(**{**cfg.__dict__, "attention": "triton"}))
    fast.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 61, (2, 33))
    expected = ref(idx)
    expected.square().mean().backward()
    assert ka.uses_triton(torch.zeros(1, 1, 1, 16))

    def no_sdpa(*args, **kwargs):
        raise AssertionError("SDPA ran: the Triton path fell back")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_sdpa)
    got = fast(idx)
    got.square().mean().backward()
    assert (got - expected).abs().max().item() < 1e-4
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-3), name
