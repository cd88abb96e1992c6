"""model.py: causality, Hugging Face parity in both directions, and checkpoint errors."""

import json
import os

import pytest
import torch

from configurator import UserError
from model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def hf_model(kind: str, tie: bool = False, **extra):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **extra)
        return transformers.GPT2LMHeadModel(cfg)
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, rope_theta=500.0,
                  **extra)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    if kind == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=None, **common))
    raise ValueError(kind)


def randomize(model):
    # HF initialises norms to 1 and biases to 0: perturb everything so a swapped tensor shows up
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


CASES = [("gpt2", True, {}), ("llama", False, {}), ("llama", True, {}), ("qwen2", False, {}),
         ("mistral", False, {}),
         ("llama", False, {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}})]


@pytest.mark.parametrize("kind,tie,extra", CASES, ids=[f"{k}-tie{t}-{i}" for i, (k, t, _) in enumerate(CASES)])
@pytest.mark.parametrize("sharded", [False, True])
def test_hf_parity_both_directions(tmp_path, kind, tie, extra, sharded):
    ref = randomize(hf_model(kind, tie, **extra)).eval()
    ref.save_pretrained(tmp_path / "hf", max_shard_size="20KB" if sharded else "5GB")
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors.index.json") == sharded
    model = GPT.from_pretrained(str(tmp_path / "hf")).eval()
    idx = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        expected = ref(idx).logits
        ours = model(idx)
    assert (ours - expected).abs().max().item() <= 1e-4

    model.save_pretrained(str(tmp_path / "ours"), max_shard_bytes=20_000 if sharded else 4 << 30)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    assert type(back) is type(ref)
    with torch.no_grad():
        assert (back(idx).logits - expected).abs().max().item() <= 1e-4


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
            model.setup_kv_cache(2, 16)
            causal = torch.ones(16, 16, dtype=torch.bool).tril()
            slots = torch.arange(8)
            first = model(idx[:, :8], slots=slots, mask=causal[None, None, :8].expand(2, 1, 8, 16))
            steps = [model(idx[:, t:t + 1], pos=torch.full((2, 1), t), slots=torch.tensor([t]),
                           mask=causal[None, None, t:t + 1].expand(2, 1, 1, 16)) for t in range(8, 12)]
            model.clear_kv_cache()
        assert torch.allclose(torch.cat([first] + steps, 1), full, atol=1e-5)


def test_param_count_and_flops():
    model = GPT(GPTConfig(model_type="gpt2", vocab_size=100, block_size=16, n_layer=2, n_head=2, n_kv_head=2, n_embd=16))
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - 100 * 16 - 16 * 16
    assert model.flops_per_token(16) == 6 * model.num_params() + 12 * 2 * 2 * 8 * 16


def test_unsupported_and_broken_checkpoints(tmp_path):
    ref = hf_model("llama")
    ref.save_pretrained(tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    good = json.loads(cfg_path.read_text())

    cfg_path.write_text(json.dumps({**good, "model_type": "bert"}))
    with pytest.raises(UserError, match="model_type 'bert' is not supported"):
        GPT.from_pretrained(str(tmp_path / "m"))

    cfg_path.write_text(json.dumps({k: v for k, v in good.items() if k != "hidden_size"}))
    with pytest.raises(UserError, match="'hidden_size' is missing"):
        GPT.from_pretrained(str(tmp_path / "m"))

    cfg_path.write_text(json.dumps({**good, "intermediate_size": 40}))
    with pytest.raises(UserError, match=r"tensor 'model.layers.0.mlp.up_proj.weight' .* has shape"):
        GPT.from_pretrained(str(tmp_path / "m"))

    cfg_path.write_text(json.dumps({**good, "num_hidden_layers": 3}))
    with pytest.raises(UserError, match=r"tensor 'model.layers.2.input_layernorm.weight' is missing"):
        GPT.from_pretrained(str(tmp_path / "m"))

    cfg_path.write_text(json.dumps({**good, "model_type": "mistral", "sliding_window": 16}))
    with pytest.raises(UserError, match="sliding_window=16 is smaller than the context"):
        GPT.from_pretrained(str(tmp_path / "m"))

    os.remove(tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"not loaded")
    cfg_path.write_text(json.dumps(good))
    with pytest.raises(UserError, match="pickled .bin weights are never loaded"):
        GPT.from_pretrained(str(tmp_path / "m"))

    with pytest.raises(UserError, match="does not exist"):
        GPT.from_pretrained(str(tmp_path / "nope"))


@pytest.mark.triton
def test_triton_attention_path_matches_sdpa(monkeypatch):
    """model.py's attention='triton' under the interpreter: the same logits and gradients as SDPA,
    and the Triton kernels really ran (SDPA is made to fail for the triton model)."""
    import kernels.attention as ka
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
