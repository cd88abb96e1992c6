"""The recipes in config/ run a shrunk SPIN iteration on the CPU against directories laid out like the real models:
the tokenizer files as the models ship them (../shared/real where present, else built here with `tokenizers`) and a
tiny random model of the same vocabulary and config fields, made with transformers; config/smollm.py also runs on the
real SmolLM2-135M-Instruct (tests/conftest.py's smollm2_dir). Also: markers a tokenizer lacks (GPT-2 with ChatML) grow
the model's embeddings and the export reloads; SPIN's own data files give iteration 0's y'."""

import json
import math
import os
import shutil

import pytest
import torch

import templates
from hf_tokenizers import SMOL_STYLE_JINJA, ZEPHYR_JINJA, real_dir, tiktoken_encoding_of, train_hf_tokenizer
from tokenizer import load_tokenizer
from train_runs import REPO, metrics, rollouts, run_in_process

SHRINK = ["--max_iterations=1", "--max_epochs=1", "--prompts_per_iteration=4", "--batch_size=2", "--grad_accum=1",
          "--rollout_batch_size=4", "--max_new_tokens=4", "--max_len=96", "--max_prompt_len=64", "--eval_samples=0",
          "--val_data=", "--log_interval=1", "--device=cpu"]
CHATS = [[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"},
          {"role": "assistant", "content": f"It is {2 * i}."}] for i in range(8)]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def run_recipe(recipe: str, *overrides: str) -> None:
    code = run_in_process(str(REPO / "config" / recipe), *SHRINK, *overrides)
    assert code == 0, f"{recipe} exited with {code}"


def copy_tokenizer_files(src, dst, names) -> None:
    for name in names:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def gpt2_model_dir(directory, tokenizer_dir, vocab_size: int) -> str:
    """GPT-2's tokenizer files beside a tiny GPT-2 of that vocabulary (GPT-2 124M's config fields, smaller)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=1024, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)).save_pretrained(directory)
    copy_tokenizer_files(tokenizer_dir, directory, ["tokenizer.json", "vocab.json", "merges.txt",
                                                    "tokenizer_config.json", "special_tokens_map.json"])
    return str(directory)


def gpt2_tokenizer_dir(tmp_path, source: str) -> tuple[str, int]:
    """(directory, vocabulary size): the real GPT-2 tokenizer files, or a GPT-2-style one built here."""
    if source == "real":
        return real_dir("gpt2_hf"), 50257
    hf = train_hf_tokenizer(tmp_path / "gpt2-style", "gpt2", specials=["<|endoftext|>"])
    (tmp_path / "gpt2-style" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return str(tmp_path / "gpt2-style"), hf.get_vocab_size()


# -----------------------------------------------------------------------------
# config/gpt2_chat.py: ChatML's markers are new tokens, the embeddings grow, the export reloads


@pytest.mark.parametrize("source", ["real", "built"])
def test_gpt2_chat_recipe_grows_the_model_for_chatml_and_exports_it(tmp_path, source, capsys):
    from checkpoint import load_for_chat, read_hf_config

    tokenizer_dir, vocab = gpt2_tokenizer_dir(tmp_path, source)
    model_dir = gpt2_model_dir(tmp_path / "gpt2", tokenizer_dir, vocab)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat} for chat in CHATS])
    out_dir = tmp_path / "out"
    run_recipe("gpt2_chat.py", f"--init_from={model_dir}", f"--train_data={data}", f"--out_dir={out_dir}")
    assert f"2 new embedding rows for chat template 'chatml' ({vocab} -> {vocab + 2})" in capsys.readouterr().out
    assert read_hf_config(str(out_dir / "final"))["vocab_size"] == vocab + 2
    model, tok, template = load_for_chat(str(out_dir / "final"))
    assert template.name == "chatml" and model.config.vocab_size == vocab + 2
    assert (tok.specials["<|im_start|>"], tok.specials["<|im_end|>"]) == (vocab, vocab + 1)
    pairs = rollouts(out_dir, 0)
    assert len(pairs) == 4 and all(p["prompt_ids"][0] == vocab for p in pairs)  # <|im_start|>
    assert pairs[0]["real"] in {chat[1]["content"] for chat in CHATS}  # response text, without <|im_end|>
    assert next(r for r in metrics(out_dir) if "loss" in r)["loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_grown_rows_are_the_mean_embedding():
    from model import GPT, GPTConfig

    for tie in (True, False):
        model = GPT(GPTConfig(model_type="llama", vocab_size=50, block_size=16, n_layer=1, n_head=2, n_kv_head=1,
                              n_embd=16, tie_embeddings=tie))
        wte, head = model.wte.weight.detach().clone(), model.lm_head.weight.detach().clone()
        model.grow_vocab(53)
        assert model.config.vocab_size == 53 and model.wte.weight.shape == (53, 16)
        assert torch.equal(model.wte.weight[:50], wte) and torch.equal(model.lm_head.weight[:50], head)
        assert torch.allclose(model.wte.weight[50:], wte.mean(0).expand(3, 16))
        assert torch.allclose(model.lm_head.weight[50:], head.mean(0).expand(3, 16))
        assert (model.lm_head.weight is model.wte.weight) == tie
        assert model(torch.tensor([[52, 1]])).shape == (1, 2, 53)


@pytest.mark.parametrize("source", ["real", "built"])
def test_named_gpt2_tokenizer_grows_only_the_rows_the_template_uses(tmp_path, source, monkeypatch):
    """tokenizer='gpt2' appends 11 chat specials after GPT-2's 50257; ChatML uses two of them."""
    import tiktoken

    import train

    tokenizer_dir, vocab = gpt2_tokenizer_dir(tmp_path, source)
    model_dir = gpt2_model_dir(tmp_path / "gpt2", tokenizer_dir, vocab)
    base = tiktoken_encoding_of(tokenizer_dir)  # what tiktoken's 'gpt2' is (no network here)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: base)
    cfg = train.TrainConfig(init_from=model_dir, tokenizer="gpt2", chat_template="chatml")
    tok = load_tokenizer("gpt2")
    assert tok.n_vocab == vocab + 11
    model = train.build_model(cfg, tok, templates.chat_format("chatml"))
    assert model.config.vocab_size == vocab + 2
    assert train.build_model(train.TrainConfig(init_from=model_dir, tokenizer="gpt2"), tok,
                             templates.chat_format("plain")).config.vocab_size == vocab


# -----------------------------------------------------------------------------
# config/zephyr_7b.py: a SentencePiece-style tokenizer (Llama-2's files, zephyr's template), SPIN's data format


def zephyr_model_dir(directory, tokenizer_dir, vocab_size: int) -> str:
    """zephyr-7b-sft-full's layout: Llama-2-family tokenizer files with zephyr's chat template, and a tiny Mistral
    with its config fields (32000 tokens, a 4096 sliding window, 32768 positions, untied embeddings)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                                     sliding_window=4096, rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=1,
                                     eos_token_id=2, tie_word_embeddings=False)).save_pretrained(directory)
    copy_tokenizer_files(tokenizer_dir, directory, ["tokenizer.json", "tokenizer.model"])
    with open(os.path.join(tokenizer_dir, "tokenizer_config.json")) as f:
        config = json.load(f)
    config["chat_template"] = ZEPHYR_JINJA
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return str(directory)


def spin_records(generated: bool) -> list[dict]:
    """CHATS in the official SPIN format; with `generated`, a y' for every prompt."""
    return [{"real": chat, **({"generated": [chat[0], {"role": "assistant", "content": f"Maybe {i}?"}]}
                              if generated else {})} for i, chat in enumerate(CHATS)]


def test_zephyr_recipe_on_llama2_tokenizer_files_trains_on_spins_generated_responses(tmp_path, capsys):
    model_dir = zephyr_model_dir(tmp_path / "zephyr", real_dir("llama2_hf"), 32000)
    data = write_jsonl(tmp_path / "spin.jsonl", spin_records(generated=True))
    out_dir = tmp_path / "out"
    run_recipe("zephyr_7b.py", f"--init_from={model_dir}", f"--train_data={data}", f"--out_dir={out_dir}")
    assert "y' are the data's 'generated' responses" in capsys.readouterr().out
    pairs = rollouts(out_dir, 0)
    tok = load_tokenizer(model_dir)
    assert templates.resolve_template(tok, "auto").jinja == ZEPHYR_JINJA
    by_prompt = {chat[0]["content"]: f"Maybe {i}?" for i, chat in enumerate(CHATS)}
    for p in pairs:
        assert p["prompt"].startswith("<|user|>\nQuestion") and p["prompt"].endswith("<|assistant|>\n")
        question = p["prompt"].removeprefix("<|user|>\n").split("</s>")[0]
        assert p["generated"] == by_prompt[question] and p["eos"] and p["generated_ids"][-1] == tok.eos_id
        assert p["generated_ids"] == templates.render_response(tok, by_prompt[question], "zephyr")
        assert math.isfinite(p["opponent_generated_logp"]) and p["opponent_generated_logp"] < 0
    # the opponent's scores are the model's own at the iteration's start: the first loss is log 2
    assert next(r for r in metrics(out_dir) if "loss" in r)["loss"] == pytest.approx(math.log(2), abs=1e-4)
    # the chat command line prints a response as response_text decodes it (no SentencePiece dummy-prefix space)
    import generate
    from checkpoint import load_for_chat

    capsys.readouterr()
    generate.main([f"--model={out_dir / 'final'}", "--prompt=Question 1: what is 1 + 1?", "--max_new_tokens=6",
                   "--temperature=0", "--device=cpu"])
    model, tok, template = load_for_chat(str(out_dir / "final"))
    prompt = templates.render_prompt(tok, [{"role": "user", "content": "Question 1: what is 1 + 1?"}], template)
    new = generate.generate(model, [prompt], 6, sampling=generate.GREEDY, eos_id=templates.stop_ids(tok, template),
                            seed=0)[0]
    assert capsys.readouterr().out == templates.response_text(tok, new, template) + "\n"


# -----------------------------------------------------------------------------
# config/smollm.py: a Llama-family model with a byte-level tokenizer and a default system prompt


def smol_style_model_dir(model_dir) -> str:
    """A byte-level tokenizer with SmolLM2's template style beside a tiny Llama of SmolLM2's config fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = train_hf_tokenizer(model_dir, "digits", specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                            chat_template=SMOL_STYLE_JINJA)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=hf.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                                 tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)).save_pretrained(model_dir)
    return str(model_dir)


def test_smollm_recipe_on_a_byte_level_llama_dir_keeps_the_default_system_prompt(tmp_path):
    model_dir = smol_style_model_dir(tmp_path / "smollm")
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat} for chat in CHATS])
    out_dir = tmp_path / "out"
    run_recipe("smollm.py", f"--init_from={model_dir}", f"--train_data={data}", f"--out_dir={out_dir}",
               "--max_len=256", "--max_prompt_len=192")  # room for the whole prompt on this small vocabulary
    pairs = rollouts(out_dir, 0)
    assert len(pairs) == 4
    for p in pairs:
        assert p["prompt"].startswith("<|im_start|>system\nYou are Tiny, a helpful model.<|im_end|>\n<|im_start|>user")


def test_smollm_recipe_on_the_real_smollm2(smollm2_dir, tmp_path):
    """The recipe as written, shrunk, on the real SmolLM2-135M-Instruct: its prompts are the token ids transformers'
    apply_chat_template gives (the model's default system prompt included), its rollouts end at the template's
    end of turn, and the opponent scores them as training does (first loss log 2)."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(smollm2_dir)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat} for chat in CHATS])
    out_dir = tmp_path / "out"
    run_recipe("smollm.py", f"--init_from={smollm2_dir}", f"--train_data={data}", f"--out_dir={out_dir}",
               "--prompts_per_iteration=2", "--batch_size=1", "--rollout_batch_size=2", "--plot=False")
    eos = hf.convert_tokens_to_ids("<|im_end|>")
    pairs = rollouts(out_dir, 0)
    assert len(pairs) == 2
    for p in pairs:
        chat = CHATS[int(p["source"].rsplit(":", 1)[1]) - 1]
        prompt = hf.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=True, return_dict=False)
        full = hf.apply_chat_template(chat, tokenize=True, return_dict=False)
        assert p["prompt_ids"] == prompt
        assert p["prompt"].startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
        # the real response: what the conversation adds to the prompt, to the end of its turn (or past it)
        assert eos in p["real_ids"] and p["real_ids"] == full[len(prompt):len(prompt) + len(p["real_ids"])]
        assert p["eos"] == (p["generated_ids"][-1] == eos)
    assert next(r for r in metrics(out_dir) if "loss" in r)["loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_smollm_task_recipe_runs_sft_spin_and_the_baseline_and_scores_final_numbers(tmp_path):
    """config/smollm_task.py as written (its shipped arithmetic files, checker 'final_number'), shrunk: every phase
    ends with held-out accuracies at T=1 and greedy, and the continued-SFT baseline runs as many steps as SPIN."""
    out_dir = tmp_path / "out"
    run_recipe("smollm_task.py", f"--init_from={smol_style_model_dir(tmp_path / 'smollm')}", f"--out_dir={out_dir}",
               "--sft_steps=2", "--val_data=experiments/arith_val.jsonl", "--eval_samples=4", "--plot=False")
    ends = [r for r in metrics(out_dir) if "eval/valid_greedy" in r]
    assert [r["phase"] for r in ends] == ["sft", "spin", "baseline"]
    assert all(0 <= r["eval/valid_sampled"] <= 1 and len(r["per_prompt/valid_greedy"]) == 4 for r in ends)
    steps = [r for r in metrics(out_dir) if "loss" in r]
    assert sum(r["phase"] == "spin" for r in steps) == sum(r["phase"] == "baseline" for r in steps) == 2


# -----------------------------------------------------------------------------
# SPIN's 'generated': regenerated on request; given for some records only, refused


def quick_spin(tmp_path, data: str, *overrides: str) -> int:
    return run_in_process(str(REPO / "config" / "quick.py"), "--stage=spin", "--baseline_sft=False", "--n_layer=1",
                          "--n_head=2", "--n_kv_head=1", "--n_embd=32", f"--train_data={data}", *SHRINK,
                          f"--out_dir={tmp_path / 'out'}", *overrides)


def test_iteration_0_trains_on_the_datas_generated_responses_scored_by_the_opponent(tmp_path, capsys):
    """Without real tokenizer files (the zephyr test above needs them): SPIN's 'generated' are iteration 0's
    y', written to iter_0/rollouts.jsonl like a rollout's, scored by the opponent (first loss log 2)."""
    data = write_jsonl(tmp_path / "spin.jsonl", spin_records(generated=True))
    assert quick_spin(tmp_path, data) == 0
    assert "y' are the data's 'generated' responses" in capsys.readouterr().out
    given = {f"Maybe {i}?" for i in range(len(CHATS))}
    pairs = rollouts(tmp_path / "out", 0)
    assert len(pairs) == 4 and all(p["generated"] in given and p["eos"] for p in pairs)
    assert all(math.isfinite(p["opponent_generated_logp"]) and p["opponent_generated_logp"] < 0 for p in pairs)
    assert next(r for r in metrics(tmp_path / "out") if "loss" in r)["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_regenerate_iteration_0_samples_instead_of_the_data(tmp_path):
    data = write_jsonl(tmp_path / "spin.jsonl", spin_records(generated=True))
    assert quick_spin(tmp_path, data, "--regenerate_iteration_0=True") == 0
    given = {f"Maybe {i}?" for i in range(len(CHATS))}
    assert not any(p["generated"] in given for p in rollouts(tmp_path / "out", 0))


def test_generated_responses_for_some_records_only_are_refused(tmp_path, capsys):
    records = spin_records(generated=True)[:4] + spin_records(generated=False)[4:]
    data = write_jsonl(tmp_path / "spin.jsonl", records)
    assert quick_spin(tmp_path, data, "--prompts_per_iteration=0", "--batch_size=4") == 2
    assert "4 of 8 examples have SPIN's 'generated' response" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# train.py's tokenizer_pattern: the split regex of a tiktoken BPE file that is no known encoding


def test_tokenizer_pattern_reaches_the_tokenizer(tmp_path):
    import base64

    import train
    from configurator import UserError

    ranks = [bytes([b]) for b in range(256)] + [b"ab", b"abab"]
    path = tmp_path / "mine.tiktoken"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(ranks)))
    cfg = train.TrainConfig(tokenizer=str(path), chat_template="plain", synthetic_train=8, synthetic_val=4,
                            eval_samples=4, max_len=64, max_prompt_len=48)
    with pytest.raises(UserError, match="set tokenizer_pattern"):
        train.prepare_data(cfg)
    data = train.prepare_data(train.TrainConfig(**{**cfg.__dict__, "tokenizer_pattern": r"[a-z]+|[^a-z]"}))
    assert data.tok.encode("abab ab") == [257, ord(" "), 256]
