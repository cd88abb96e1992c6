"""The real SmolLM2-135M-Instruct (tests/conftest.py's `smollm2_dir`, bench/real_model.py) against transformers.

- Logits: equal to transformers' in fp32 (measured 0.0 max abs: the same ops in the same order). Under bf16 autocast
  ours equal transformers' under the same autocast (measured 0.0: a bf16 rounding we do differently, such as rotary
  tables in bf16, moves logits by ~1), and both move from the fp32 logits (max |logit| ~45) by at most 1.23 over ten
  sequences of 28-1024 tokens; BF16_FROM_FP32 bounds that with a margin. Measured on AMD EPYC (avx512_bf16).
- Greedy decoding: the KV-cached, continuously batched sampler gives transformers' `generate` token for token.
These two take their prompts' token ids from transformers' own `apply_chat_template`: they need nothing of ours but
the model and the sampler. The chat command line and a shrunk SFT -> SPIN run also use our tokenizer and the model's
chat template, and are checked against the ids and text transformers gives. Each model loads once per module.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from train_runs import REPO, metrics, rollouts, run_in_process

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
    ours = generate.generate(our_model, prompts, 64, sampling=generate.GREEDY, eos_id=eos, batch_size=2)
    theirs = [hf_model.generate(torch.tensor([p]), max_new_tokens=64, do_sample=False)[0, len(p):].tolist()
              for p in prompts]
    for prompt, a, b in zip(prompts, ours, theirs):
        assert a == b, f"{hf_tokenizer.decode(prompt)!r}: {hf_tokenizer.decode(a)!r} != {hf_tokenizer.decode(b)!r}"
    assert ours[0][-1] == eos and hf_tokenizer.decode(ours[0]).startswith("The capital of France is Paris.")
    assert sum(len(a) == 64 and eos not in a for a in ours) >= 2  # most answers run the full 64 tokens


# -----------------------------------------------------------------------------
# what needs our tokenizer and the model's chat template: the chat command line and a shrunk run


def test_chat_command_line_answers_as_transformers_does(smollm2_dir, hf_model, hf_tokenizer, capsys):
    """generate.py renders the prompt with the model's own template (its default system prompt included), decodes
    greedily and prints the answer's text: transformers' greedy answer to the same chat, special tokens dropped."""
    import generate

    question = "What is the capital of France?"
    prompt = chat_ids(hf_tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)
    theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):]
    capsys.readouterr()
    generate.main([f"--model={smollm2_dir}", f"--prompt={question}", "--max_new_tokens=24", "--temperature=0",
                   "--device=cpu"])
    assert capsys.readouterr().out == hf_tokenizer.decode(theirs, skip_special_tokens=True) + "\n"


def test_sft_then_spin_from_the_real_directory_exports_what_transformers_loads(smollm2_dir, hf_tokenizer, tmp_path):
    """config/smollm_demo.py shrunk to one SFT step and one SPIN iteration of two pairs: the prompts are
    transformers' chat ids, the opponent's scores give a first SPIN loss of log 2, and out_dir/final keeps the source's
    config.json, generation config, tokenizer files and template, holds trained weights, and loads in transformers
    with logits equal to ours."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from checkpoint import load_pretrained

    out_dir = tmp_path / "out"
    code = run_in_process(str(REPO / "config" / "smollm_demo.py"), f"--init_from={smollm2_dir}", f"--out_dir={out_dir}",
                          "--sft_steps=1", "--batch_size=1", "--prompts_per_iteration=2", "--rollout_batch_size=2",
                          "--max_new_tokens=4", "--val_data=", "--eval_samples=0", "--keep_checkpoints=1",
                          "--plot=False", "--sft_lr=1e-4")
    assert code == 0
    with open(REPO / "config" / "smollm_chat_sample.jsonl") as f:
        sample = [json.loads(line)["messages"] for line in f]
    eos = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    pairs = rollouts(out_dir, 0)
    assert len(pairs) == 2
    for p in pairs:
        messages = sample[int(p["source"].rsplit(":", 1)[1]) - 1]
        prompt = chat_ids(hf_tokenizer, messages[:-1], add_generation_prompt=True)
        full = chat_ids(hf_tokenizer, messages, add_generation_prompt=False)
        assert p["prompt_ids"] == prompt
        # the response is what the conversation adds to its prompt, up to the end of the turn (<|im_end|>) or past it
        assert eos in p["real_ids"] and p["real_ids"] == full[len(prompt):len(prompt) + len(p["real_ids"])]
    spin_losses = [r["loss"] for r in metrics(out_dir) if r.get("phase") == "spin" and "loss" in r]
    assert spin_losses and spin_losses[0] == pytest.approx(math.log(2), abs=1e-4)

    final, source_dir = out_dir / "final", Path(smollm2_dir)
    assert json.loads((final / "config.json").read_text()) == json.loads((source_dir / "config.json").read_text())
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (final / name).read_bytes() == (source_dir / name).read_bytes(), name
    trained, source = load_file(final / "model.safetensors"), load_file(source_dir / "model.safetensors")
    assert trained.keys() == source.keys() and all(t.dtype == torch.bfloat16 for t in trained.values())
    assert any(not torch.equal(trained[k], source[k]) for k in source)

    their_tokenizer = AutoTokenizer.from_pretrained(final)
    assert their_tokenizer.chat_template == hf_tokenizer.chat_template
    ids = torch.tensor([chat_ids(their_tokenizer, sample[0], add_generation_prompt=False)])  # (1, T)
    theirs = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (load_pretrained(str(final)).eval()(ids) - theirs(ids).logits).abs().max().item() <= FP32_TOL
