"""checkpoint.py: Hugging Face parity in both directions, the one load and save path, broken model
directories as one-line errors, finding a model directory, nanospin.json, and one-process run
checkpoints without warnings."""

import json
import os
import warnings

import pytest
import torch

import checkpoint
from configurator import UserError
from tokenizer import load_tokenizer
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
        return transformers.MistralForCausalLM(transformers.MistralConfig(**{"sliding_window": None, **common}))
    raise ValueError(kind)


def randomize(model):
    # HF initialises norms to 1 and biases to 0: perturb everything so a swapped tensor shows up
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def tiny_gpt(tie: bool = True) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                         tie_embeddings=tie))


CASES = [("gpt2", True, {}), ("llama", False, {}), ("llama", True, {}), ("qwen2", False, {}),
         ("mistral", False, {}),
         # windows of 8 against 40-token sequences: both directions must honour (and keep) them
         ("mistral", False, {"sliding_window": 8}),
         ("qwen2", False, {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}),
         ("llama", False, {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}})]
CASE_IDS = [f"{k}-tie{t}-{i}" for i, (k, t, _) in enumerate(CASES)]
IDX = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind,tie,extra", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("sharded", [False, True])
def test_load_pretrained_gives_transformers_logits(tmp_path, kind, tie, extra, sharded):
    ref = randomize(hf_model(kind, tie, **extra)).eval()
    ref.save_pretrained(tmp_path / "hf", max_shard_size="20KB" if sharded else "5GB")
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors.index.json") == sharded
    model = checkpoint.load_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert (model(IDX) - ref(IDX).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind,tie,extra", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("sharded", [False, True])
def test_save_model_dir_loads_in_transformers_with_the_same_logits(tmp_path, kind, tie, extra, sharded):
    randomize(hf_model(kind, tie, **extra)).save_pretrained(tmp_path / "hf")
    model = checkpoint.load_pretrained(str(tmp_path / "hf")).eval()
    checkpoint.save_model_dir(str(tmp_path / "ours"), model.state_dict(), model.config,
                              max_shard_bytes=20_000 if sharded else 4 << 30)
    assert os.path.isfile(tmp_path / "ours" / "model.safetensors.index.json") == sharded
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    assert type(back).__name__.lower().startswith(kind)
    with torch.no_grad():
        assert (back(IDX).logits - model(IDX)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("tie", [True, False])
def test_model_from_state_builds_the_same_model_with_tied_embeddings_shared(tie):
    model = tiny_gpt(tie)
    state = {k: v for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
    copy = checkpoint.model_from_state(model.config, state)
    assert (copy.lm_head.weight is copy.wte.weight) == tie
    idx = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(copy(idx), model(idx))
    half = checkpoint.model_from_state(model.config, state, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in half.parameters())


def test_model_from_state_refuses_a_missing_tensor():
    model = tiny_gpt()
    state = {k: v for k, v in model.state_dict().items() if k != "norm_f.weight"}
    with pytest.raises(UserError, match="missing tensor 'norm_f.weight'"):
        checkpoint.model_from_state(model.config, state)


def test_load_weights_puts_a_directory_into_an_existing_model(tmp_path):
    saved = tiny_gpt()
    checkpoint.save_model_dir(str(tmp_path / "m"), saved.state_dict(), saved.config)
    torch.manual_seed(1)
    model = GPT(saved.config)
    checkpoint.load_weights(model, str(tmp_path / "m"))
    assert model.lm_head.weight is model.wte.weight
    for (name, got), want in zip(model.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(got, want), name


def test_save_model_dir_with_a_tokenizer_writes_the_chat_template(tmp_path):
    tok = load_tokenizer("bytes")
    model = tiny_gpt()
    checkpoint.save_model_dir(str(tmp_path / "m"), model.state_dict(), model.config, tok, "zephyr")
    assert checkpoint.read_chat_template(str(tmp_path / "m")) == "zephyr"
    assert load_tokenizer(str(tmp_path / "m")).encode("hi") == tok.encode("hi")


# ----------------------------------------------------------------------------------------------
# broken model directories


BROKEN_CONFIGS = {  # config.json change -> the error it must give
    "unsupported": ({"model_type": "bert"}, "model_type 'bert' is not supported"),
    "missing-key": ({"hidden_size": None}, "'hidden_size' is missing"),
    "wrong-shape": ({"intermediate_size": 40}, r"tensor 'model.layers.0.mlp.up_proj.weight' .* has shape"),
    "missing-tensor": ({"num_hidden_layers": 3}, r"tensor 'model.layers.2.input_layernorm.weight' is missing"),
    # Qwen2 windows the layers from max_window_layers on; nanospin windows all or none
    "window-on-some-layers": ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16,
                               "max_window_layers": 1}, "sliding_window=16 applies to 1 of 2 layers"),
}


@pytest.mark.parametrize("change,message", BROKEN_CONFIGS.values(), ids=BROKEN_CONFIGS.keys())
def test_a_broken_config_is_a_one_line_error(tmp_path, change, message):
    hf_model("llama").save_pretrained(tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    hf_config = {**json.loads(cfg_path.read_text()), **change}
    cfg_path.write_text(json.dumps({k: v for k, v in hf_config.items() if v is not None}))
    with pytest.raises(UserError, match=message):
        checkpoint.load_pretrained(str(tmp_path / "m"))


def test_pickled_weights_are_never_loaded(tmp_path):
    hf_model("llama").save_pretrained(tmp_path / "m")
    os.remove(tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match="pickled .bin weights are never loaded"):
        checkpoint.load_pretrained(str(tmp_path / "m"))


def test_a_missing_directory_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.load_pretrained(str(tmp_path / "nope"))


# ----------------------------------------------------------------------------------------------
# a model goes out as it came in


def bf16_mistral_dir(path) -> dict:
    """A bf16 Mistral-style directory with a long context, a sliding window, rope settings, token ids, a key
    nanospin does not know, and generation_config.json; returns its config.json."""
    cfg = transformers.MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                                     sliding_window=4096, rope_theta=1e6, bos_token_id=1, eos_token_id=2,
                                     tie_word_embeddings=False, custom_field_unknown_to_nanospin="kept")
    torch.manual_seed(0)
    randomize(transformers.MistralForCausalLM(cfg)).to(torch.bfloat16).save_pretrained(path)
    assert os.path.isfile(os.path.join(path, "generation_config.json"))
    return json.loads(open(os.path.join(path, "config.json")).read())


def test_read_model_source_reads_the_config_and_the_stored_dtype(tmp_path):
    hf_config = bf16_mistral_dir(tmp_path / "bf16")
    source = checkpoint.read_model_source(str(tmp_path / "bf16"))
    assert source.hf_config == hf_config and source.dtype == torch.bfloat16
    fp32 = tiny_gpt()
    checkpoint.save_model_dir(str(tmp_path / "fp32"), fp32.state_dict(), fp32.config)
    assert checkpoint.read_model_source(str(tmp_path / "fp32")).dtype == torch.float32
    scratch = checkpoint.read_model_source(None)
    assert scratch.dir is None and scratch.hf_config is None and scratch.dtype == torch.float32


def test_save_model_dir_keeps_the_source_config_and_files_in_the_dtype_asked(tmp_path):
    hf_config = bf16_mistral_dir(tmp_path / "src")
    source = checkpoint.read_model_source(str(tmp_path / "src"))
    model = checkpoint.load_pretrained(str(tmp_path / "src"), block_size=4096).eval()
    for dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float32, "float32")):
        out = tmp_path / name
        checkpoint.save_model_dir(str(out), model.state_dict(), model.config, dtype=dtype, source=source)
        assert json.loads((out / "config.json").read_text()) == {**hf_config, "dtype": name}
        generation_config = "generation_config.json"
        assert (out / generation_config).read_bytes() == (tmp_path / "src" / generation_config).read_bytes()
        assert {t.dtype for t in checkpoint.read_safetensors_dir(str(out)).values()} == {dtype}
        back = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        assert back.config.max_position_embeddings == 32768 and back.config.sliding_window == 4096
        with torch.no_grad():
            assert (back(IDX).logits - model(IDX)).abs().max().item() <= 1e-4


def test_export_config_from_scratch_describes_the_model(tmp_path):
    """From scratch, config.json is nanospin's description of the model: read back, the same GPTConfig. From a
    source directory (here one whose config.json names the older 'torch_dtype'), the source's own fields with
    only the dtype key it uses rewritten."""
    model = tiny_gpt()
    exported = checkpoint.export_hf_config(model.config, torch.float32, checkpoint.read_model_source(None))
    assert checkpoint.hf_config_to_gpt_config(exported) == model.config
    source_dir = tmp_path / "src"
    checkpoint.save_model_dir(str(source_dir), model.state_dict(), model.config)
    config = json.loads((source_dir / "config.json").read_text())
    config["torch_dtype"] = config.pop("dtype")
    (source_dir / "config.json").write_text(json.dumps(config))
    source = checkpoint.read_model_source(str(source_dir))
    assert checkpoint.export_hf_config(model.config, torch.bfloat16, source) == {**config, "torch_dtype": "bfloat16"}


# every exported field away from its default, so a field written from the wrong attribute (or a constant) shows
EXPORT_CASES = [
    GPTConfig(model_type="llama", vocab_size=301, block_size=80, n_layer=3, n_head=6, n_kv_head=2, n_embd=48,
              head_dim=16, intermediate_size=100, norm_eps=3e-6, rope_theta=123456.0, tie_embeddings=False,
              qkv_bias=True, attn_out_bias=True, mlp_bias=True, bos_token_id=7, eos_token_id=[8, 9],
              rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                            "original_max_position_embeddings": 40}),
    GPTConfig(model_type="qwen2", vocab_size=303, block_size=72, n_layer=2, n_head=4, n_kv_head=1, n_embd=40,
              intermediate_size=88, norm_eps=2e-6, rope_theta=1e6, tie_embeddings=True, qkv_bias=True,
              sliding_window=24, bos_token_id=None, eos_token_id=5),
    GPTConfig(model_type="mistral", vocab_size=305, block_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
              intermediate_size=72, norm_eps=4e-6, rope_theta=2e5, tie_embeddings=False, sliding_window=32,
              bos_token_id=1, eos_token_id=2),
    GPTConfig(model_type="gpt2", vocab_size=307, block_size=48, n_layer=3, n_head=2, n_kv_head=2, n_embd=24,
              intermediate_size=56, norm_eps=3e-5, tie_embeddings=True, bos_token_id=3, eos_token_id=4),
]


@pytest.mark.parametrize("cfg", EXPORT_CASES, ids=[c.model_type for c in EXPORT_CASES])
def test_every_exported_config_field_reads_back(cfg):
    """config.json from scratch, read back: the same GPTConfig, with each field set off its default; and the
    fields transformers reads from it are the model's."""
    exported = checkpoint.gpt_config_to_hf_config(cfg, torch.bfloat16)
    assert checkpoint.hf_config_to_gpt_config(exported) == cfg
    assert exported["dtype"] == "bfloat16" and exported["vocab_size"] == cfg.vocab_size
    if cfg.model_type != "gpt2":
        hf = transformers.AutoConfig.for_model(**exported)
        assert (hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim, hf.intermediate_size,
                hf.max_position_embeddings, hf.rms_norm_eps) == (cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim,
                                                                 cfg.intermediate_size, cfg.block_size, cfg.norm_eps)


# ----------------------------------------------------------------------------------------------
# finding a model directory, nanospin.json


def test_resolve_model_dir(tmp_path):
    def model_dir(sub):
        os.makedirs(tmp_path / sub)
        (tmp_path / sub / "config.json").write_text("{}")
        (tmp_path / sub / "model.safetensors").write_text("")

    for sub in ("hf", "ckpt/model", "out/final", "run/checkpoints/step_00000002/model",
                "run/checkpoints/step_00000010/model"):
        model_dir(sub)
    (tmp_path / "out" / "config.json").write_text("{}")  # a run's own config, not a model
    (tmp_path / "run" / "config.json").write_text("{}")
    assert checkpoint.resolve_model_dir(str(tmp_path / "hf")) == str(tmp_path / "hf")
    assert checkpoint.resolve_model_dir(str(tmp_path / "ckpt")) == str(tmp_path / "ckpt" / "model")
    assert checkpoint.resolve_model_dir(str(tmp_path / "out")) == str(tmp_path / "out" / "final")
    assert checkpoint.resolve_model_dir(str(tmp_path / "run")) == str(tmp_path / "run/checkpoints/step_00000010/model")
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.resolve_model_dir(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="holds no model"):
        checkpoint.resolve_model_dir(str(tmp_path))


def test_read_chat_template(tmp_path):
    assert checkpoint.read_chat_template(str(tmp_path)) is None
    (tmp_path / "nanospin.json").write_text(json.dumps({"chat_template": "llama3", "tokenizer": "bytes"}))
    assert checkpoint.read_chat_template(str(tmp_path)) == "llama3"


def test_a_bad_nanospin_json_is_a_one_line_error_naming_file_and_line(tmp_path):
    (tmp_path / "nanospin.json").write_text('{\n  "chat_template": "llama3",\n}\n')
    with pytest.raises(UserError, match=r"nanospin\.json:3: invalid JSON") as error:
        checkpoint.read_chat_template(str(tmp_path))
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------------------------
# run checkpoints


def test_a_one_process_checkpoint_saves_and_loads_without_warnings(tmp_path):
    model = tiny_gpt()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.token_logprobs(torch.randint(0, 300, (2, 8)), torch.randint(0, 300, (2, 8))).sum().backward()
    optimizer.step()
    tok = load_tokenizer("bytes")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = checkpoint.save_checkpoint(str(tmp_path), 3, model, optimizer, {"step": 3}, model.config, tok,
                                          "chatml", None, rank=0)
        torch.manual_seed(1)
        resumed = GPT(model.config)
        resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
        state = checkpoint.load_checkpoint(path, resumed, resumed_optimizer, resumed.config)
    assert [str(w.message) for w in caught] == []
    assert state["step"] == 3  # it did save and load
    exp_avg = [opt.state_dict()["state"][0]["exp_avg"] for opt in (optimizer, resumed_optimizer)]
    assert torch.equal(*exp_avg)


def test_a_resume_starts_from_the_latest_checkpoint_and_keep_prunes_the_oldest(tmp_path):
    """Checkpoints 3, 10 and 9 saved in that order with keep=2: the two highest steps stay (by step, not by the
    order they were written), and a resume starts from the latest of them."""
    model = tiny_gpt()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = str(tmp_path / "run")
    assert checkpoint.resume_point(out) is None
    for step in (3, 10, 9):
        checkpoint.save_checkpoint(out, step, model, optimizer, {}, model.config, None, None, None, rank=0, keep=2)
    names = lambda: [os.path.basename(p) for p in checkpoint.list_checkpoints(out)]  # noqa: E731
    assert names() == ["step_00000009", "step_00000010"]
    assert checkpoint.resume_point(out) == os.path.join(out, "checkpoints", "step_00000010")
    checkpoint.save_checkpoint(out, 11, model, optimizer, {}, model.config, None, None, None, rank=0, keep=1)
    assert names() == ["step_00000011"]


def test_a_loaded_checkpoint_restores_rng_optimizer_and_data_order_as_saved(tmp_path):
    """Right after load_checkpoint: the RNG states of torch, Python and NumPy (with their cached Gaussians), the
    optimizer's state and settings, and the data order are the ones saved, compared directly (nothing today
    draws from the RNGs between a resume and the next step, so a missing restore would show nowhere else)."""
    import random

    import numpy as np

    from data import BatchOrder
    model = tiny_gpt()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    for _ in range(2):
        model.token_logprobs(torch.randint(0, 300, (2, 8)), torch.randint(0, 300, (2, 8))).sum().backward()
        optimizer.step()
    order = BatchOrder(n=20, batch_size=4, seed=3)
    for _ in range(7):  # into the second epoch
        order.next_batch()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal(), torch.rand(5)  # states mid-stream, a Gaussian cached
    saved_rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    path = checkpoint.save_checkpoint(str(tmp_path), 7, model, optimizer, {"order": order.state_dict()}, model.config,
                                      None, None, None, rank=0)
    next_batches = [order.next_batch() for _ in range(6)]
    random.random(), np.random.standard_normal(), torch.rand(5)  # what a run would draw after the save

    resumed = tiny_gpt()
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=5e-2)
    state = checkpoint.load_checkpoint(path, resumed, resumed_optimizer, resumed.config)

    assert random.getstate() == saved_rng[0]
    for now, then in zip(np.random.get_state(), saved_rng[1]):
        assert np.array_equal(now, then)
    assert torch.equal(torch.get_rng_state(), saved_rng[2])
    saved_optimizer, loaded_optimizer = optimizer.state_dict(), resumed_optimizer.state_dict()
    assert saved_optimizer["param_groups"] == loaded_optimizer["param_groups"]  # lr, betas (a tuple again), ...
    assert saved_optimizer["state"].keys() == loaded_optimizer["state"].keys()
    for index, entries in saved_optimizer["state"].items():
        for name, value in entries.items():
            assert torch.equal(value, loaded_optimizer["state"][index][name]), (index, name)
    resumed_order = BatchOrder(n=20, batch_size=4, seed=3)
    resumed_order.load_state_dict(state["order"])
    assert [resumed_order.next_batch() for _ in range(6)] == next_batches
