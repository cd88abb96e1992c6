"""The real SmolLM2-135M-Instruct (tests/conftest.py's `smollm2_dir`, bench/real_model.py) against transformers.

- Logits: equal to transformers' in fp32 (measured 0.0 max abs: the same ops in the same order). Under bf16 autocast
  ours equal transformers' under the same autocast (measured 0.0: a bf16 rounding we do differently, such as rotary
  tables in bf16, moves logits by ~1), and both move from the fp32 logits (max |logit| ~45) by at most 1.23 over ten
  sequences of 28-1024 tokens; BF16_FROM_FP32 bounds that with a margin. Measured on AMD EPYC (avx512_bf16).
- Greedy decoding: the KV-cached, continuously batched sampler gives transformers' `generate` token for token.
Prompts are token ids from transformers' own `apply_chat_template`: these tests need nothing of ours but the model
and the sampler. Each model loads once per module (~4 s).
"""

import json

import pytest
import torch

from train_runs import REPO

FP32_TOL = 1e-4
BF16_FROM_FP32 = 2.0  # measured <= 1.23
BF16_SAME_AUTOCAST = 0.05  # measured 0.0; one bf16 step rounded differently moves logits by ~0.5-1.25
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],  # answered in 8 tokens, ending at <|im_end|>
    [{"role": "system", "content": "You are a patient teacher."},
     {"role": "user", "content": "Explain what a hash table is."}],
    [{"role": "user", "content": "Write a short story about a robot who learns to paint."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help you today?"},
     {"role": "user", "content": "Describe how photosynthesis works, step by step."}],
]


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    import transformers

    transformers.utils.logging.disable_progress_bar()
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def our_model(smollm2_dir):
    from checkpoint import load_pretrained

    return load_pretrained(smollm2_dir).eval()


def chat_ids(hf_tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    return hf_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                            return_dict=False)


def sequences(hf_tokenizer) -> list[list[int]]:
    """The four chat prompts, and a long one: the shipped chat sample's conversations as one chat (1024 tokens)."""
    with open(REPO / "config" / "smollm_chat_sample.jsonl") as f:
        turns = [m for line in f for m in json.loads(line)["messages"]]
    long = chat_ids(hf_tokenizer, turns, add_generation_prompt=False)[:1024]
    assert len(long) == 1024
    return [chat_ids(hf_tokenizer, chat, add_generation_prompt=True) for chat in CHATS] + [long]


@torch.no_grad()
def test_logits_equal_transformers_in_fp32_and_bf16_autocast(our_model, hf_model, hf_tokenizer):
    for ids in sequences(hf_tokenizer):
        x = torch.tensor([ids])  # (1, T)
        reference = hf_model(x).logits  # (1, T, V)
        ours = our_model(x)
        assert ours.shape == reference.shape
        assert (ours - reference).abs().max().item() <= FP32_TOL, len(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours_bf16 = our_model(x).float()
            reference_bf16 = hf_model(x).logits.float()
        assert (ours_bf16 - reference_bf16).abs().max().item() <= BF16_SAME_AUTOCAST, len(ids)
        assert (ours_bf16 - reference).abs().max().item() <= BF16_FROM_FP32, len(ids)


def test_greedy_decoding_equals_transformers_generate(our_model, hf_model, hf_tokenizer):
    import generate

    prompts = [chat_ids(hf_tokenizer, chat, add_generation_prompt=True) for chat in CHATS]
    eos = hf_model.generation_config.eos_token_id  # <|im_end|>, which the chat template ends a turn with
    # two cache rows for four prompts: rows are refilled as answers end (continuous batching)
    ours = generate.generate(our_model, prompts, 64, temperature=0.0, eos_id=eos, batch_size=2)
    theirs = [hf_model.generate(torch.tensor([p]), max_new_tokens=64, do_sample=False)[0, len(p):].tolist()
              for p in prompts]
    for prompt, a, b in zip(prompts, ours, theirs):
        assert a == b, f"prompt {hf_tokenizer.decode(prompt)!r}: {hf_tokenizer.decode(a)!r} != {hf_tokenizer.decode(b)!r}"
    assert ours[0][-1] == eos and hf_tokenizer.decode(ours[0]).startswith("The capital of France is Paris.")
    assert sum(len(a) == 64 and eos not in a for a in ours) >= 2  # most answers run the full 64 tokens
