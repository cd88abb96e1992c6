"""Tests for tokenizer.py: Hugging Face tokenizers give the `tokenizers` library's ids (trained here in the styles real
models ship, the real files of ../shared/real where present, the real SmolLM2 where it can be had, a Qwen2 vocab.json
+ merges.txt against transformers), what tokenizer_config.json says (eos, chat template), the byte tokenizer,
tiktoken's encodings and BPE files, save/load, and one-line errors for every bad input."""

import json
import os
import shutil

import pytest
import tiktoken
from tokenizers import Tokenizer as HFTokenizer

from configurator import UserError
from hf_tokenizers import (CHATML_JINJA, HF_SPECIALS, SP_STYLES, TRAIN_CORPUS, real_dir, sentencepiece_hf_tokenizer,
                           train_hf_tokenizer, varied_texts, write_tiktoken_file)
from tokenizer import CHAT_SPECIALS, SAVED_TOKENIZER_FILE, Tokenizer, add_special_tokens, load_tokenizer

TEXTS = varied_texts()


def as_text(hf: HFTokenizer) -> HFTokenizer:
    """The reference for encode(text): the same tokenizer with its special tokens encoded as text."""
    copy = HFTokenizer.from_str(hf.to_str())
    copy.encode_special_tokens = True
    return copy


def assert_ids_equal(tok: Tokenizer, hf: HFTokenizer) -> None:
    plain = as_text(hf)
    for text in TEXTS:
        assert tok.encode(text, special=True) == hf.encode(text, add_special_tokens=False).ids, text
        assert tok.encode(text) == plain.encode(text, add_special_tokens=False).ids, text


# -----------------------------------------------------------------------------
# Hugging Face tokenizers: ids are the library's


@pytest.mark.parametrize("style", ["gpt2", "llama3", "qwen2", "digits"])
def test_byte_level_ids_equal_tokenizers_and_decode_inverts_encode(tmp_path, style):
    hf = train_hf_tokenizer(tmp_path, style, chat_template=CHATML_JINJA)
    tok = load_tokenizer(str(tmp_path))
    assert_ids_equal(tok, hf)
    assert all(tok.decode(tok.encode(t)) == (t if style in ("gpt2", "digits") else hf.normalizer.normalize_str(t))
               for t in TEXTS)
    assert tok.specials == {s: hf.token_to_id(s) for s in HF_SPECIALS} and tok.n_vocab == hf.get_vocab_size()
    assert tok.eos_id == hf.token_to_id("<|im_end|>")


@pytest.mark.parametrize("style", sorted(SP_STYLES))
def test_sentencepiece_style_ids_equal_tokenizers(tmp_path, style):
    hf = sentencepiece_hf_tokenizer(tmp_path, style, "spm")
    tok = load_tokenizer(str(tmp_path))
    assert_ids_equal(tok, hf)
    assert tok.eos_id == hf.token_to_id("</s>") and tok.n_vocab == hf.get_vocab_size()


def test_other_model_types_run_through_the_library(tmp_path):
    """WordPiece and Unigram, which a hand-written BPE could not run, are the library's to run."""
    from tokenizers import models, pre_tokenizers, trainers

    for name, model, trainer in [
            ("wordpiece", models.WordPiece(unk_token="[UNK]"), trainers.WordPieceTrainer(
                vocab_size=300, special_tokens=["[UNK]", "</s>"], show_progress=False)),
            ("unigram", models.Unigram(), trainers.UnigramTrainer(
                vocab_size=300, special_tokens=["<unk>", "</s>"], unk_token="<unk>", show_progress=False))]:
        hf = HFTokenizer(model)
        hf.pre_tokenizer = pre_tokenizers.Whitespace()
        hf.train_from_iterator(TRAIN_CORPUS, trainer)
        (tmp_path / name).mkdir()
        hf.save(str(tmp_path / name / "tokenizer.json"))
        (tmp_path / name / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
        tok = load_tokenizer(str(tmp_path / name))
        assert_ids_equal(tok, hf)
        assert tok.eos_id == hf.token_to_id("</s>")


def test_non_special_added_tokens_are_matched_as_the_library_matches_them(tmp_path):
    added = [{"content": "<tool>", "lstrip": True}, {"content": "ing", "single_word": True}, {"content": "Café"}]
    hf = sentencepiece_hf_tokenizer(tmp_path, "prepend", "spm", added=added)
    tok = load_tokenizer(str(tmp_path))
    assert {"<tool>", "ing", "Café"} <= set(tok.specials)
    for text in ["a <tool>b", "sing ing x", "Café <tool>", "  <tool>  "]:
        assert tok.encode(text, special=True) == hf.encode(text, add_special_tokens=False).ids


def test_real_tokenizer_files_give_the_librarys_ids():
    for name in ("llama2_hf", "gpt2_hf"):
        path = os.path.join(real_dir(name), "tokenizer.json")
        hf = HFTokenizer.from_file(path)
        hf.no_truncation()  # the GPT-2 copy sets a truncation of 50 tokens that save_pretrained kept
        assert_ids_equal(load_tokenizer(os.path.dirname(path)), hf)
        assert_ids_equal(load_tokenizer(path), hf)


def test_real_gpt2_vocab_and_merges_equal_its_tokenizer_json_and_transformers(tmp_path):
    from transformers import AutoTokenizer

    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(real_dir("gpt2_hf"), name), tmp_path / name)
    tok, reference = load_tokenizer(str(tmp_path)), load_tokenizer(real_dir("gpt2_hf"))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (tok.eos_id, tok.n_vocab, tok.specials) == (reference.eos_id, reference.n_vocab, reference.specials)
    for text in TEXTS:
        assert tok.encode(text, True) == reference.encode(text, True) == theirs.encode(text, add_special_tokens=False)


def qwen2_files(directory) -> None:
    """A Qwen2-Instruct layout: vocab.json + merges.txt (no specials in them), its specials and eos in
    tokenizer_config.json, as Qwen2's repositories ship them."""
    hf = train_hf_tokenizer(directory, "qwen2", specials=[])
    hf.model.save(str(directory))
    os.remove(directory / "tokenizer.json")
    n = hf.get_vocab_size()
    added = {str(n + i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                          "special": True} for i, s in enumerate(HF_SPECIALS)}
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": added, "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "tokenizer_class": "Qwen2Tokenizer", "chat_template": CHATML_JINJA}))


def test_qwen2_vocab_and_merges_load_with_the_eos_of_tokenizer_config(tmp_path):
    from transformers import AutoTokenizer

    qwen2_files(tmp_path)
    tok, theirs = load_tokenizer(str(tmp_path)), AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.eos_id == theirs.eos_token_id == theirs.convert_tokens_to_ids("<|im_end|>")
    assert tok.chat_template.jinja == CHATML_JINJA
    for text in TEXTS:
        assert tok.encode(text, True) == theirs.encode(text, add_special_tokens=False), text


def test_real_smollm2_tokenizer_gives_the_librarys_ids(smollm2_dir):
    hf = HFTokenizer.from_file(os.path.join(smollm2_dir, "tokenizer.json"))
    tok = load_tokenizer(smollm2_dir)
    assert_ids_equal(tok, hf)
    assert (tok.eos_id, tok.n_vocab) == (hf.token_to_id("<|im_end|>"), 49152)
    assert "You are a helpful AI assistant named SmolLM" in tok.chat_template.jinja


# -----------------------------------------------------------------------------
# What tokenizer_config.json says: eos and the chat template


@pytest.mark.parametrize("files, eos", [
    ({"tokenizer_config.json": {"eos_token": "<|im_start|>"}}, "<|im_start|>"),
    ({"tokenizer_config.json": {"eos_token": {"content": "<|im_end|>", "lstrip": False}}}, "<|im_end|>"),
    ({"special_tokens_map.json": {"eos_token": {"content": "<|im_end|>"}}}, "<|im_end|>"),
    ({"special_tokens_map.json": {"eos_token": "<|im_end|>"}, "tokenizer_config.json": {"eos_token": "<|im_start|>"}},
     "<|im_start|>"),
    ({}, "<|endoftext|>"),  # none named: the usual end-of-text token
])
def test_eos_comes_from_tokenizer_config_then_special_tokens_map(tmp_path, files, eos):
    hf = train_hf_tokenizer(tmp_path, "gpt2")
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    assert load_tokenizer(str(tmp_path)).eos_id == hf.token_to_id(eos)


def test_chat_template_comes_from_its_file_then_tokenizer_config(tmp_path):
    train_hf_tokenizer(tmp_path, "gpt2", chat_template=[{"name": "tool_use", "template": "x"},
                                                        {"name": "default", "template": CHATML_JINJA}])
    tok = load_tokenizer(str(tmp_path))
    assert tok.chat_template.jinja == CHATML_JINJA and tok.chat_template.name.endswith("tokenizer_config.json")
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    tok = load_tokenizer(str(tmp_path))
    assert tok.chat_template.jinja == "{{ messages[0]['content'] }}"
    assert tok.chat_template.name.endswith("chat_template.jinja")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    os.remove(tmp_path / "chat_template.jinja")
    assert load_tokenizer(str(tmp_path)).chat_template is None


# -----------------------------------------------------------------------------
# tiktoken: bytes, named encodings, BPE files


def test_bytes_tokenizer_ids_are_the_utf8_bytes_then_the_chat_specials():
    tok = load_tokenizer("bytes")
    assert tok.encode("é<|im_end|>") == list("é<|im_end|>".encode())
    assert tok.encode("<|im_end|>", special=True) == [258]
    assert tok.specials == {s: 256 + i for i, s in enumerate(CHAT_SPECIALS)} and tok.n_vocab == 268
    assert tok.eos_id == 256


def test_decode_writes_specials_as_text_and_leaves_out_ids_past_the_vocabulary():
    tok = load_tokenizer("bytes")
    assert tok.decode([104, 258, 0xC3, 105, 5000]) == "h<|im_end|>\ufffdi"


def test_named_encoding_without_network_says_how_to_provide_it(monkeypatch):
    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(UserError, match="tokenizer 'cl100k_base': cannot read it .ConnectionError.*TIKTOKEN_CACHE_DIR"):
        load_tokenizer("cl100k_base")


def test_named_encoding_gets_the_chat_specials_it_lacks(monkeypatch):
    base = tiktoken.Encoding("toy", pat_str=r"\S+|\s+", mergeable_ranks={bytes([b]): b for b in range(256)},
                             special_tokens={"<|endoftext|>": 256, "<|fim_prefix|>": 257})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: base)
    tok = load_tokenizer("r50k_base")
    assert tok.specials["<|endoftext|>"] == tok.eos_id == 256 and tok.specials["<|im_start|>"] == 258
    assert tok.n_vocab == 258 + len(CHAT_SPECIALS) - 1


def test_tiktoken_bpe_file_needs_its_split_regex(tmp_path):
    path = tmp_path / "mine.tiktoken"
    write_tiktoken_file(path, [bytes([b]) for b in range(256)] + [b"ab", b"abab"])
    with pytest.raises(UserError, match="258 ranks.*set tokenizer_pattern"):
        load_tokenizer(str(path))
    tok = load_tokenizer(str(path), r"[a-z]+|[^a-z]")
    assert tok.encode("abab ab") == [257, ord(" "), 256] and tok.specials["<|endoftext|>"] == 258


def test_tokenizer_pattern_is_refused_where_the_tokenizer_has_its_own(tmp_path):
    train_hf_tokenizer(tmp_path, "gpt2")
    for name in ("bytes", str(tmp_path)):
        with pytest.raises(UserError, match="tokenizer_pattern is set"):
            load_tokenizer(name, r"\S+")


# -----------------------------------------------------------------------------
# save and load


def saved_and_loaded(tok: Tokenizer, directory) -> Tokenizer:
    tok.save(str(directory))
    return load_tokenizer(str(directory))


@pytest.mark.parametrize("source", ["bytes", "hf", "vocab-merges", "tiktoken-file"])
def test_save_then_load_rebuilds_the_same_tokenizer_with_its_added_markers(tmp_path, source):
    if source == "hf":
        sentencepiece_hf_tokenizer(tmp_path / "src", "prepend", "spm")
    elif source == "vocab-merges":
        (tmp_path / "src").mkdir()
        qwen2_files(tmp_path / "src")
    elif source == "tiktoken-file":
        (tmp_path / "src").mkdir()
        write_tiktoken_file(tmp_path / "src" / "t.tiktoken", [bytes([b]) for b in range(256)] + [b"ab"])
    name = {"bytes": "bytes", "tiktoken-file": str(tmp_path / "src" / "t.tiktoken")}.get(source, str(tmp_path / "src"))
    tok = add_special_tokens(load_tokenizer(name, r"\S+|\s+" if source == "tiktoken-file" else None), ["<a>", "<b>"])
    assert [tok.specials["<a>"], tok.specials["<b>"]] == [tok.n_vocab - 2, tok.n_vocab - 1]
    again = saved_and_loaded(tok, tmp_path / "saved")
    assert (again.specials, again.eos_id, again.n_vocab, again.added_specials) == (
        tok.specials, tok.eos_id, tok.n_vocab, ("<a>", "<b>"))
    for text in TEXTS[:40] + ["x<a>y<|im_end|>"]:
        assert again.encode(text, True) == tok.encode(text, True) and again.encode(text) == tok.encode(text)
    assert saved_and_loaded(again, tmp_path / "twice").specials == tok.specials


def test_saved_hugging_face_files_are_byte_for_byte_and_transformers_reads_added_markers(tmp_path):
    from transformers import AutoTokenizer

    shutil.copytree(real_dir("gpt2_hf"), tmp_path / "gpt2")
    tok = load_tokenizer(str(tmp_path / "gpt2"))
    tok.save(str(tmp_path / "plain"))
    for name in os.listdir(tmp_path / "gpt2"):
        if name != "SOURCE.txt" and name != "config.json":
            assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "gpt2" / name).read_bytes(), name
    grown = add_special_tokens(tok, ["<|im_start|>", "<|im_end|>"])
    grown.save(str(tmp_path / "grown"))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "grown"))
    assert theirs.encode("<|im_start|>hi<|im_end|>", add_special_tokens=False) == [50257, 5303, 50258]
    assert (tmp_path / "grown" / "merges.txt").read_bytes() == (tmp_path / "gpt2" / "merges.txt").read_bytes()


def test_saving_a_tokenizer_onto_its_own_directory_keeps_it(tmp_path):
    train_hf_tokenizer(tmp_path, "gpt2", chat_template=CHATML_JINJA)
    before = (tmp_path / "tokenizer.json").read_bytes()
    saved_and_loaded(load_tokenizer(str(tmp_path)), tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == before and (tmp_path / SAVED_TOKENIZER_FILE).exists()


# -----------------------------------------------------------------------------
# Every bad input is a one-line error


def bad_inputs(tmp_path) -> dict[str, tuple[str, str]]:
    """name -> (what to load, a piece of the message it must give)."""
    good = tmp_path / "good"
    train_hf_tokenizer(good, "gpt2")
    spec = json.loads((good / "tokenizer.json").read_text())

    def directory(name: str, files: dict) -> str:
        (tmp_path / name).mkdir()
        for file, content in files.items():
            data = content if isinstance(content, bytes) else json.dumps(content).encode()
            (tmp_path / name / file).write_bytes(data)
        return str(tmp_path / name)

    return {
        "broken tokenizer.json": (directory("broken", {"tokenizer.json": b'{"model": {"type": "BPE", '}),
                                  "cannot read it (Exception: EOF"),
        "no model": (directory("nomodel", {"tokenizer.json": {"version": "1.0"}}), "cannot read it"),
        "unknown model": (directory("weird", {"tokenizer.json": {**spec, "model": {"type": "Magic"}}}),
                          "cannot read it"),
        "missing merges key": (directory("nomerges", {"tokenizer.json": {**spec, "model": {
            k: v for k, v in spec["model"].items() if k != "vocab"}}}), "cannot read it"),
        "renamed vocab.json": (directory("vocab", {"tokenizer.json": spec["model"]["vocab"]}), "cannot read it"),
        "not UTF-8": (directory("latin", {"tokenizer.json": b"\xff\xfe{}"}), "cannot read it"),
        "config not an object": (directory("cfg", {"tokenizer.json": spec, "tokenizer_config.json": [1]}),
                                 "expected a JSON object"),
        "broken config": (directory("cfg2", {"tokenizer.json": spec, "tokenizer_config.json": b"{"}),
                          "tokenizer_config.json: cannot read it"),
        "eos not a token": (directory("eos", {"tokenizer.json": spec, "tokenizer_config.json": {"eos_token": "<x>"}}),
                            "eos_token '<x>' is none of its tokens"),
        "bad chat template type": (directory("tpl", {"tokenizer.json": spec, "tokenizer_config.json": {
            "chat_template": 3}}), "field 'jinja' must be a string"),
        "SentencePiece tokenizer.model": (directory("sp", {"tokenizer.model": b"\n\x0b\n\x05<unk>\x15\x00\x00\x00"}),
                                          "save_pretrained"),
        "empty tokenizer.model": (directory("empty", {"tokenizer.model": b""}), "an empty file"),
        "half a pair": (directory("half", {"vocab.json": spec["model"]["vocab"]}), "nor a folder with tokenizer.json"),
        "broken merges": (directory("merges", {"vocab.json": {"a": 0}, "merges.txt": b"a b c\n"}),
                          "cannot read it"),
        "unknown tokenizer class": (directory("cls", {"vocab.json": {"a": 0}, "merges.txt": b"",
                                                      "tokenizer_config.json": {"tokenizer_class": "BertTokenizer"}}),
                                    "BertTokenizer"),
        "empty directory": (directory("nothing", {}), "nor a folder with tokenizer.json"),
        "a vocab.json path": (os.path.join(directory("pair", {"vocab.json": {}}), "vocab.json"), "cannot read it"),
        "unknown name": ("no-such-tokenizer", "is neither 'bytes', a tiktoken encoding (gpt2, "),
        "saved meta broken": (directory("meta", {SAVED_TOKENIZER_FILE: {"kind": "file"}}), "cannot read it"),
        "not a string": (3, "tokenizer '3' is neither"),
    }


def test_no_tokenizer_input_crashes_with_a_traceback(tmp_path):
    for case, (name, message) in bad_inputs(tmp_path).items():
        with pytest.raises(UserError) as error:
            load_tokenizer(name)
        assert message in str(error.value) and "\n" not in str(error.value), (case, str(error.value))
