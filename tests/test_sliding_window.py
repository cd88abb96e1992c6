"""Sliding-window attention (Mistral): logits equal transformers' on sequences longer than the window with either
attention implementation, KV-cached greedy generation equals transformers' past the window, and generate.py
opens a Mistral-v0.1-style directory (32k positions, a 4096 window). The windowed kernels' gradients against the
reference: test_attention.py; packed rows with a window: test_packing.py."""

import os
import subprocess
import sys

import pytest
import torch

import spin_kernels.attention as attention_module
from checkpoint import load_pretrained
from generate import GREEDY, generate
from tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOW = 8


def mistral_dir(path, vocab_size: int = 97, max_positions: int = 64, window: int = WINDOW):
    """A tiny random Mistral (GQA 2:1, head dim 16) saved to path; returned in eval mode."""
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=max_positions, sliding_window=window, rope_theta=500.0))
    with torch.no_grad():  # larger weights: peaked logits, so greedy ties (a rounding coin flip) are rare
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.eval().save_pretrained(path)
    return hf


@pytest.mark.parametrize("attention", ["sdpa", pytest.param("triton", marks=pytest.mark.triton)])
def test_windowed_logits_equal_transformers_mistral(tmp_path, attention, monkeypatch):
    windowed_launches = []
    real_launch = attention_module.launch

    def counting_launch(kernel, *args, **meta):
        windowed_launches.append(meta.get("WINDOWED"))
        return real_launch(kernel, *args, **meta)

    monkeypatch.setattr(attention_module, "launch", counting_launch)
    hf = mistral_dir(tmp_path)
    model = load_pretrained(str(tmp_path), attention=attention).eval()
    assert model.config.sliding_window == WINDOW
    idx = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(idx).logits
        got = model(idx)
        unwindowed = load_pretrained(str(tmp_path)).eval()
        unwindowed.config.sliding_window = None
        full = unwindowed(idx)
    assert (got - want).abs().max().item() <= 1e-4
    assert (full[:, WINDOW:] - want[:, WINDOW:]).abs().max().item() > 1e-2  # the window really matters here
    # the Triton model ran the windowed kernel in every layer (no silent fall back to SDPA); SDPA launched none
    assert windowed_launches == ([True] * model.config.n_layer if attention == "triton" else [])


def test_kv_cached_greedy_generation_equals_transformers_past_the_window(tmp_path):
    hf = mistral_dir(tmp_path)
    model = load_pretrained(str(tmp_path)).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [1, 2, 3]]  # one prompt already longer than the window
    with torch.no_grad():  # each prompt alone: no padding for transformers to handle
        expected = [hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=30, eos_token_id=None,
                                pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    assert [generate(model, [p], 30, sampling=GREEDY)[0] for p in prompts] == expected
    assert generate(model, prompts, 30, sampling=GREEDY) == expected  # ragged: left-padded in one batch


def test_generate_cli_opens_a_mistral_v01_style_directory(tmp_path):
    tok = load_tokenizer("bytes")
    mistral_dir(tmp_path, vocab_size=tok.n_vocab + 3, max_positions=32768, window=4096)
    tok.save(str(tmp_path))
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, os.path.join(REPO, "generate.py"), f"--model={tmp_path}", "--prompt=hi",
                          "--max_new_tokens=4", "--seed=0", "--device=cpu"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    model = load_pretrained(str(tmp_path))
    assert (model.config.block_size, model.config.sliding_window) == (32768, 4096)
