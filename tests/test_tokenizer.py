"""Tests for tokenizer.py: ids equal to the `tokenizers` library's for Hugging Face byte-level BPE and
SentencePiece-style BPE (every way real files state the dummy prefix; added tokens; the tiktoken path against the
plain merge loop), bare SentencePiece tokenizer.model files, decode(encode(s)) == s, the chat template and eos read
from tokenizer_config.json, tiktoken files and encodings, save/load round trips, one-line errors for every bad input,
and (where ../shared/real holds them) the real Llama-2 and GPT-2 tokenizers."""

import hashlib
import json
import os
import random
import re
import shutil
import unicodedata

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

import tokenizer
from configurator import UserError
from hf_tokenizers import (CHATML_JINJA, HELD_OUT, HF_SPECIALS, SP_STYLES, fuzz_texts, real_dir,
                           sentencepiece_hf_tokenizer, sentencepiece_pieces, train_hf_tokenizer, varied_texts,
                           write_sentencepiece_model)


def hf_ids(hf, text: str) -> list[int]:
    """The reference: `tokenizers` ids with special-token text kept as text, as nanospin keeps it."""
    hf.encode_special_tokens = True
    return hf.encode(text, add_special_tokens=False).ids


# -----------------------------------------------------------------------------
# Hugging Face byte-level BPE


@pytest.fixture(scope="module", params=["gpt2", "llama3", "digits"])
def trained(request, tmp_path_factory):
    """(style, the `tokenizers` tokenizer, ours read from its directory), trained once per style."""
    directory = tmp_path_factory.mktemp(request.param)
    hf = train_hf_tokenizer(directory, request.param)
    return request.param, hf, tokenizer.load_tokenizer(str(directory))


def test_hf_byte_level_bpe_ids_equal_tokenizers(trained):
    _, hf, tok = trained
    for text in varied_texts():
        assert tok.encode(text) == hf_ids(hf, text), repr(text)


def test_hf_decode_inverts_encode(trained):
    style, _, tok = trained
    for text in varied_texts():
        expected = unicodedata.normalize("NFC", text) if style == "llama3" else text  # its NFC normalizer
        assert tok.decode(tok.encode(text)) == expected, repr(text)


def test_hf_vocabulary_specials_and_eos_equal_tokenizers(trained):
    _, hf, tok = trained
    assert tok.n_vocab == hf.get_vocab_size()
    assert {s: tok.specials[s] for s in HF_SPECIALS} == {s: hf.token_to_id(s) for s in HF_SPECIALS}
    assert tok.eos_id == hf.token_to_id("<|endoftext|>")


def test_special_token_text_in_content_stays_text(trained):
    """Unlike Hugging Face's default: only the chat templates insert special tokens."""
    _, hf, tok = trained
    ids = tok.encode("say <|im_end|> now")
    assert hf.token_to_id("<|im_end|>") not in ids and tok.decode(ids) == "say <|im_end|> now"


def test_non_special_added_tokens_are_matched_in_text_as_hf_does(tmp_path):
    from tokenizers import AddedToken

    hf = train_hf_tokenizer(tmp_path, "gpt2")
    hf.add_tokens(["<think>", "ZZZ", AddedToken("<sw>", single_word=True), AddedToken("<ls>", lstrip=True)])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = tokenizer.load_tokenizer(str(tmp_path))
    for text in ["a <think> b", "<think>x</think>", "aZZZb", " ZZZ 12", "a<sw>b", "a <sw> b", "x   <ls>y"]:
        assert tok.encode(text) == hf_ids(hf, text), repr(text)
    assert hf.token_to_id("ZZZ") in tok.encode("aZZZb")
def test_hf_eos_comes_from_tokenizer_config(tmp_path):
    hf = train_hf_tokenizer(tmp_path, "gpt2", chat_template=CHATML_JINJA)
    assert tokenizer.load_tokenizer(str(tmp_path / "tokenizer.json")).eos_id == hf.token_to_id("<|im_end|>")


def test_hf_chat_template_is_recognised_from_tokenizer_config(tmp_path):
    train_hf_tokenizer(tmp_path, "gpt2", chat_template=CHATML_JINJA)
    assert tokenizer.load_tokenizer(str(tmp_path / "tokenizer.json")).chat_template == "chatml"


def test_hf_named_default_chat_template_is_recognised(tmp_path):
    train_hf_tokenizer(tmp_path, "gpt2")
    named = [{"name": "tool_use", "template": CHATML_JINJA}, {"name": "default", "template": "<|user|><|assistant|>"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert tokenizer.load_tokenizer(str(tmp_path)).chat_template == "zephyr"


def test_hf_chat_template_jinja_file_is_recognised(tmp_path):
    train_hf_tokenizer(tmp_path, "gpt2")
    (tmp_path / "chat_template.jinja").write_text("<|start_header_id|>{{ role }}<|end_header_id|>")
    assert tokenizer.load_tokenizer(str(tmp_path)).chat_template == "llama3"


@pytest.mark.parametrize("jinja, template", [
    (CHATML_JINJA, "chatml"),
    ("<|start_header_id|>{{ role }}<|end_header_id|>", "llama3"),
    ("<|user|>\n{{ x }}</s>\n<|assistant|>\n", "zephyr"),
    ("[INST] {{ x }} [/INST]", None),
    (None, None),
])
def test_recognise_template(jinja, template):
    assert tokenizer.recognise_template(jinja) == template


def test_merges_out_of_id_order_are_refused(tmp_path):
    train_hf_tokenizer(tmp_path, "gpt2")
    path = tmp_path / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    first, last = ("".join(m) if isinstance(m, list) else m.replace(" ", "") for m in (merges[0], merges[-1]))
    vocab[first], vocab[last] = vocab[last], vocab[first]
    path.write_text(json.dumps(spec))
    with pytest.raises(UserError, match="not in merge order"):
        tokenizer.load_tokenizer(str(path))


# -----------------------------------------------------------------------------
# 'bytes' and tiktoken's named encodings


def test_bytes_tokenizer_ids_are_the_utf8_bytes():
    tok = tokenizer.load_tokenizer("bytes")
    text = "héllo 😀 <|im_end|>\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text


def test_bytes_tokenizer_specials_follow_the_256_bytes():
    tok = tokenizer.load_tokenizer("bytes")
    assert tok.n_vocab == 256 + len(tokenizer.CHAT_SPECIALS)
    assert sorted(tok.specials.values()) == list(range(256, tok.n_vocab))
    assert tok.eos_id == tok.specials["<|endoftext|>"]


def test_decode_writes_specials_as_text_and_invalid_utf8_as_replacement():
    tok = tokenizer.load_tokenizer("bytes")
    assert tok.decode([tok.specials["<|im_start|>"], 104, 0xFF]) == "<|im_start|>h\ufffd"


def test_decode_replaces_ids_past_the_vocabulary():
    tok = tokenizer.load_tokenizer("bytes")
    assert tok.decode([104, tok.n_vocab + 7, 105]) == "h\ufffdi"  # a padded-vocab id from a sampler


def test_named_encoding_without_network_says_how_to_provide_it(tmp_path, monkeypatch):
    def no_network(blobpath):
        raise ConnectionError(f"no network for {blobpath}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)  # never wait on the network here
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    with pytest.raises(UserError) as err:
        tokenizer.load_tokenizer("cl100k_base")
    message = str(err.value)
    url = tokenizer.TIKTOKEN_URLS["cl100k_base"][0]
    assert "TIKTOKEN_CACHE_DIR" in message and url in message
    assert hashlib.sha1(url.encode()).hexdigest() in message


def test_named_encoding_gets_the_chat_specials_it_lacks(monkeypatch):
    base = tiktoken.Encoding("fake", pat_str=r"[\s\S]+", mergeable_ranks={bytes([b]): b for b in range(256)},
                             special_tokens={"<|endoftext|>": 256, "<|endofprompt|>": 257})
    monkeypatch.setattr(tokenizer.tiktoken, "get_encoding", lambda name: base)
    tok = tokenizer.load_tokenizer("cl100k_base")
    assert tok.eos_id == 256 and tok.specials["<|endofprompt|>"] == 257
    assert tok.specials["<|im_start|>"] == 258  # appended after the vocabulary, in CHAT_SPECIALS order
    assert tok.n_vocab == 258 + len(tokenizer.CHAT_SPECIALS) - 1
    assert tok.kind == "tiktoken" and tok.name == "cl100k_base"


def test_unknown_tokenizer_name():
    with pytest.raises(UserError, match="neither a file"):
        tokenizer.load_tokenizer("no-such-tokenizer")


# -----------------------------------------------------------------------------
# SentencePiece-style BPE (byte_fallback)

SP_ADDED = [{"content": "<think>"}, {"content": "ZZ", "normalized": False}, {"content": "<sw>", "single_word": True},
            {"content": "<r>", "special": True, "lstrip": True, "rstrip": True}]
ADDED_TEXTS = ["a <think> b", "a<think>b", "<think>", "xZZy", " ZZ ", "ZZ", "a<sw>b", "a <sw> b", "a <r>  b"]


@pytest.fixture(scope="module", params=[(style, merges) for style in SP_STYLES for merges in ("trained", "spm")]
                + [("prepend", "crossing"), ("first", "crossing")], ids=lambda p: "-".join(p))
def sp_trained(request, tmp_path_factory):
    """(style, merges, the `tokenizers` tokenizer, ours), for every way files state the dummy prefix, with merges
    as a trainer makes them, as transformers converts a SentencePiece model, and crossing word boundaries."""
    style, merges = request.param
    directory = tmp_path_factory.mktemp(f"sp-{style}-{merges}")
    hf = sentencepiece_hf_tokenizer(directory, style, merges, added=SP_ADDED)
    return style, merges, hf, tokenizer.load_tokenizer(str(directory))


def test_sentencepiece_ids_equal_tokenizers(sp_trained):
    *_, hf, tok = sp_trained
    assert tok.kind == "sentencepiece"
    for text in varied_texts() + ADDED_TEXTS:
        assert tok.encode(text) == hf_ids(hf, text), repr(text)


def test_sentencepiece_vocabulary_and_specials_equal_tokenizers(sp_trained):
    *_, hf, tok = sp_trained
    assert tok.n_vocab == hf.get_vocab_size()
    assert tok.eos_id == hf.token_to_id("</s>") and tok.specials["<s>"] == hf.token_to_id("<s>")


def test_sentencepiece_tokenizer_json_of_another_name_saves_and_reloads(tmp_path):
    sentencepiece_hf_tokenizer(tmp_path / "hf", "first")
    os.rename(tmp_path / "hf" / "tokenizer.json", tmp_path / "hf" / "mine.json")
    tok = tokenizer.load_tokenizer(str(tmp_path / "hf" / "mine.json"))
    tok.save(str(tmp_path / "saved"))
    assert tokenizer.load_tokenizer(str(tmp_path / "saved")).encode(HELD_OUT[1]) == tok.encode(HELD_OUT[1])


def metaspace_prefix(style: str) -> bool:
    """Whether the style's Metaspace pre-tokenizer adds a dummy prefix (only where the text has no leading space)."""
    pre = SP_STYLES[style][1]
    return bool(pre) and pre["type"] == "Metaspace" and pre.get("prepend_scheme", "always") != "never"


def test_sentencepiece_decode_inverts_encode(sp_trained):
    """Exact, except for a literal '▁' (it decodes to a space) and Metaspace's missing prefix before a leading
    space (encode(' a') == encode('a'), so decode gives 'a')."""
    style, *_, tok = sp_trained
    for text in [t for t in varied_texts() if "▁" not in t]:
        expected = text[1:] if metaspace_prefix(style) and text.startswith(" ") else text
        assert tok.decode(tok.encode(text)) == expected, repr(text)


def hf_words(style: str, text: str) -> list[str]:
    """The words the library's BPE sees for a text without added tokens, by how the style adds the dummy prefix."""
    word = text.replace(" ", "▁")
    if style == "prepend" or (metaspace_prefix(style) and not word.startswith("▁")):
        word = "▁" + word
    if metaspace_prefix(style) and SP_STYLES[style][1].get("split", True):  # each '▁' starts a word of its own
        return re.findall("▁[^▁]*|[^▁]+", word)
    return [word]


def test_sentencepiece_tiktoken_path_equals_the_plain_merge_loop(sp_trained):
    """The fast path (tiktoken, our rank order, the split regex) against sentencepiece_bpe_ref."""
    style, _, hf, tok = sp_trained
    spec = json.loads(hf.to_str())
    merge_rank = {}
    for i, merge in enumerate(spec["model"]["merges"]):
        merge_rank.setdefault(tuple(merge.split(" ") if isinstance(merge, str) else merge), i)
    for text in [t for t in varied_texts() if t]:
        words = hf_words(style, text)
        expected = [i for w in words for i in tokenizer.sentencepiece_bpe_ref(w, spec["model"]["vocab"], merge_rank)]
        assert tok.encode(text) == expected, repr(text)


def test_sentencepiece_split_pattern_cuts_short_pieces_unless_a_merge_crosses_a_space():
    """The regex keeps tiktoken's pieces short (a word, or a run of spaces and a word); only merges that put a
    space after another character force the slow pattern of whole runs of merged characters."""
    split = tokenizer.sentencepiece_split_pattern(["▁a", "ab"], "▁", split=True)
    runs = tokenizer.sentencepiece_split_pattern(["▁a", "ab", "▁▁"], "▁", split=False)
    crossing = tokenizer.sentencepiece_split_pattern(["▁a", "ab", "a▁"], "▁", split=False)
    assert split.startswith(r"\x{2581}[") and runs.startswith(r"\x{2581}+[") and crossing.startswith("[")
    for pattern, text, pieces in ((split, "▁ab▁▁a", ["▁ab", "▁", "▁a"]), (runs, "▁ab▁▁a", ["▁ab", "▁▁a"]),
                                  (crossing, "▁ab▁▁a", ["▁ab▁▁a"])):
        assert tiktoken_pieces(pattern, text) == pieces


def tiktoken_pieces(pattern: str, text: str) -> list[str]:
    """The pieces tiktoken's split regex cuts `text` into (its hex escapes spelled for Python's re)."""
    python_pattern = re.sub(r"\\x\{([0-9a-f]+)\}", lambda m: re.escape(chr(int(m.group(1), 16))), pattern)
    return re.findall(python_pattern, text)


def test_sentencepiece_ignore_merges_emits_whole_words(tmp_path):
    sentencepiece_hf_tokenizer(tmp_path, "always-split", "spm")
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["model"]["ignore_merges"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    from tokenizers import Tokenizer as HFTokenizer

    hf, tok = HFTokenizer.from_file(str(tmp_path / "tokenizer.json")), tokenizer.load_tokenizer(str(tmp_path))
    for text in varied_texts():
        assert tok.encode(text) == hf_ids(hf, text), repr(text)


def test_sentencepiece_chars_outside_the_vocabulary_fall_back_to_bytes(sp_trained):
    *_, hf, tok = sp_trained
    text = "🦙 ж"  # left out of the alphabet: the 4 and 2 bytes each become <0xXX>
    ids = tok.encode(text)
    assert [hf.id_to_token(i) for i in ids if hf.id_to_token(i).startswith("<0x")] == [
        f"<0x{b:02X}>" for b in "🦙ж".encode()]
    assert tok.decode(ids) == text


def test_encode_parts_equals_tokenizers_on_the_joined_string(sp_trained):
    """Text and special ids (an lstrip/rstrip one among them) give the ids of the joined string."""
    *_, hf, tok = sp_trained
    rng = random.Random(3)
    names = {tok.specials[s]: s for s in ("</s>", "<s>", "<r>")}
    texts = [t.replace("</s>", "").replace("<s>", "") for t in fuzz_texts(200, seed=5)]
    hf.encode_special_tokens = False
    for _ in range(150):
        parts = [rng.choice(list(names)) if rng.random() < 0.3 else rng.choice(texts) for _ in range(rng.randint(1, 6))]
        joined = "".join(names[p] if isinstance(p, int) else p for p in parts)
        assert tok.encode_parts(parts) == hf.encode(joined, add_special_tokens=False).ids, repr(parts)


def test_text_after_a_special_or_after_text_of_its_segment(sp_trained):
    """`after` a special, text gets the dummy prefix of a new segment; after text, none (and decode keeps it)."""
    *_, hf, tok = sp_trained
    head = ["<|user|>\n", tok.specials["</s>"]]
    hf.encode_special_tokens = False
    for text in ["Hi there", " two", "x\ny", "日本語 ok"]:
        whole = hf.encode("<|user|>\n</s>" + text, add_special_tokens=False).ids
        assert tok.encode_parts(head) + tok.encode(text, after=head) == whole
        continued = tok.encode(text, after=["Question:\n"])
        assert tok.decode(continued, after=["Question:\n"]) == text


def test_sentencepiece_save_then_load_rebuilds_the_same_tokenizer(sp_trained, tmp_path):
    *_, tok = sp_trained
    tok.save(str(tmp_path / "saved"))
    again = tokenizer.load_tokenizer(str(tmp_path / "saved"))
    assert again.kind == "sentencepiece" and (again.eos_id, again.specials) == (tok.eos_id, tok.specials)
    for text in HELD_OUT:
        assert again.encode(text) == tok.encode(text)


# -----------------------------------------------------------------------------
# A bare SentencePiece tokenizer.model


def spm_dir(tmp_path, style: str, config: dict | None, **model) -> tuple:
    """A directory with only a tokenizer.model (and tokenizer_config.json), and the `tokenizers` tokenizer that
    transformers builds for it: vocab, its generated merges, the normalizer of `style`."""
    hf = sentencepiece_hf_tokenizer(tmp_path / "hf", style, "spm")
    vocab = json.loads(hf.to_str())["model"]["vocab"]
    os.makedirs(tmp_path / "spm")
    write_sentencepiece_model(tmp_path / "spm" / "tokenizer.model", sentencepiece_pieces(vocab), **model)
    if config is not None:
        (tmp_path / "spm" / "tokenizer_config.json").write_text(json.dumps(config))
    return hf, str(tmp_path / "spm")


@pytest.mark.parametrize("config, style", [(None, "prepend"), ({"legacy": True}, "prepend"),
                                           ({"legacy": False}, "first")])
def test_sentencepiece_model_file_ids_equal_its_conversion(tmp_path, config, style):
    """transformers' conversion: Prepend per segment when legacy (the default), else Metaspace 'first'."""
    hf, directory = spm_dir(tmp_path, style, config)
    tok = tokenizer.load_tokenizer(directory)
    assert tok.kind == "sentencepiece" and tok.eos_id == 2 and tok.specials == {"<unk>": 0, "<s>": 1, "</s>": 2}
    for text in varied_texts():
        assert tok.encode(text) == hf_ids(hf, text), repr(text)
    tok.save(str(tmp_path / "saved"))
    assert tokenizer.load_tokenizer(str(tmp_path / "saved")).encode(HELD_OUT[0]) == tok.encode(HELD_OUT[0])


def test_sentencepiece_model_removes_extra_whitespace_as_sentencepiece_does(tmp_path):
    hf, directory = spm_dir(tmp_path, "prepend", None, remove_extra_whitespaces=True)
    tok = tokenizer.load_tokenizer(directory)
    assert tok.encode("  a   b  ") == hf_ids(hf, "a b")


@pytest.mark.parametrize("model, message", [
    ({"model_type": 1}, "SentencePiece Unigram model"),
    ({"byte_fallback": False}, "without byte_fallback"),
])
def test_sentencepiece_models_nanospin_does_not_read_are_refused(tmp_path, model, message):
    _, directory = spm_dir(tmp_path, "prepend", None, **model)
    with pytest.raises(UserError, match=message):
        tokenizer.load_tokenizer(directory)


def test_sentencepiece_model_with_user_defined_pieces_asks_for_tokenizer_json(tmp_path):
    write_sentencepiece_model(tmp_path / "tokenizer.model", [("<unk>", 0.0, 2), ("<tool>", 0.0, 4), ("a", -1.0, 1)])
    with pytest.raises(UserError, match="user-defined pieces .* provide the model's tokenizer.json"):
        tokenizer.load_tokenizer(str(tmp_path))


# -----------------------------------------------------------------------------
# The real Llama-2 and GPT-2 tokenizers (../shared/real), and llama.cpp-style edge cases


def real_texts() -> list[str]:
    texts = varied_texts(seed=7)
    chat = os.path.join(os.path.dirname(real_dir("llama2_hf")), "chat_data", "nemo_aligner_dummy-sft.jsonl")
    if os.path.isfile(chat):
        with open(chat, encoding="utf-8") as f:
            texts += [turn["value"] for line in f for turn in json.loads(line)["conversations"]][:120]
    return texts + [" Hello world", "    Hello\n    Hello", "3333333", "🚀 (normal) 😶\u200d🌫️ ✅", "Cửa Việt",
                    " discards", "\t\n", "' era", "ied 4 ½ months", "Führer", "កាន់តែពិសេសអាចខលចេញ"]


@pytest.fixture(scope="module")
def real_llama2():
    from tokenizers import Tokenizer as HFTokenizer

    directory = real_dir("llama2_hf")
    hf = HFTokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    return directory, hf, tokenizer.load_tokenizer(directory)


def test_real_llama2_tokenizer_json_ids_equal_tokenizers(real_llama2):
    _, hf, tok = real_llama2
    texts = real_texts()
    assert len(texts) >= 300
    for text in texts:
        assert tok.encode(text) == hf_ids(hf, text), repr(text)
        if "▁" not in text:
            assert tok.decode(tok.encode(text)) == text
    assert tok.enc._pat_str.startswith(r"\x{2581}+[")  # Llama-2 keeps the short pieces, not the slow pattern


def test_real_llama2_tokenizer_model_equals_its_tokenizer_json(real_llama2, tmp_path):
    """Read without its legacy=false tokenizer_config.json (which asks for Metaspace 'first'): the tokenizer.json
    beside it is the legacy conversion."""
    directory, hf, _ = real_llama2
    shutil.copy(os.path.join(directory, "tokenizer.model"), tmp_path / "tokenizer.model")
    tok = tokenizer.load_tokenizer(str(tmp_path))
    for text in real_texts()[:200]:
        assert tok.encode(text) == hf_ids(hf, text), repr(text)


def test_real_gpt2_tokenizer_json_and_vocab_merges_equal_tokenizers(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    directory = real_dir("gpt2_hf")
    hf = HFTokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    hf.no_truncation()  # this copy sets truncation at 50 tokens
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(directory, name), tmp_path / name)
    pair, full = tokenizer.load_tokenizer(str(tmp_path)), tokenizer.load_tokenizer(directory)
    assert pair.eos_id == full.eos_id == 50256 and pair.n_vocab == full.n_vocab == 50257
    for text in real_texts():
        assert pair.encode(text) == full.encode(text) == hf_ids(hf, text), repr(text)


# -----------------------------------------------------------------------------
# tiktoken BPE files, and saving


def tiktoken_file_of(tmp_path) -> tuple[tokenizer.Tokenizer, str]:
    """(a converted Hugging Face tokenizer, a tiktoken BPE file holding its ranks)."""
    train_hf_tokenizer(tmp_path / "hf", "gpt2")
    source = tokenizer.load_tokenizer(str(tmp_path / "hf"))
    source.save(str(tmp_path / "saved"))
    path = tmp_path / "my.tiktoken"
    path.write_bytes((tmp_path / "saved" / tokenizer.SAVED_RANKS_FILE).read_bytes())
    return source, str(path)


def test_tiktoken_file_of_no_known_encoding_asks_for_tokenizer_pattern(tmp_path):
    _, path = tiktoken_file_of(tmp_path)
    with pytest.raises(UserError, match="set tokenizer_pattern to the regex it was made with"):
        tokenizer.load_tokenizer(path)


def test_tiktoken_bpe_file_holds_the_same_merges(tmp_path):
    source, path = tiktoken_file_of(tmp_path)
    tok = tokenizer.load_tokenizer(path, pattern=tokenizer.GPT2_PATTERN)
    assert tok.enc._mergeable_ranks == source.enc._mergeable_ranks
    assert tok.decode(tok.encode(HELD_OUT[0])) == HELD_OUT[0]
    assert len(tok.encode(HELD_OUT[0])) < len(HELD_OUT[0].encode())  # merges are used


def test_tiktoken_bpe_file_gets_the_chat_specials_after_its_ranks(tmp_path):
    source, path = tiktoken_file_of(tmp_path)
    tok = tokenizer.load_tokenizer(path, pattern=tokenizer.GPT2_PATTERN)
    first = max(source.enc._mergeable_ranks.values()) + 1
    assert tok.specials == {s: first + i for i, s in enumerate(tokenizer.CHAT_SPECIALS)}
    assert tok.eos_id == tok.specials["<|endoftext|>"]


def test_tiktoken_file_of_a_known_encoding_gets_its_regex_and_specials(tmp_path, monkeypatch):
    """Known by its sha256; here our test file stands in for one, registered under its own hash."""
    _, path = tiktoken_file_of(tmp_path)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    known = ("test", tokenizer.LLAMA3_PATTERN, {"<|endoftext|>": 900})
    monkeypatch.setitem(tokenizer.KNOWN_TIKTOKEN_FILES, digest, known)
    tok = tokenizer.load_tokenizer(path)
    assert tok.enc._pat_str == tokenizer.LLAMA3_PATTERN and tok.eos_id == 900 and tok.specials["<|im_start|>"] == 901


def test_real_gpt2_ranks_as_a_tiktoken_file_are_r50k_base(tmp_path):
    """GPT-2's ranks written as a .tiktoken file are byte-identical to r50k_base: GPT-2's regex, not Llama-3's."""
    gpt2 = tokenizer.load_tokenizer(real_dir("gpt2_hf"))
    gpt2.save(str(tmp_path))
    os.rename(tmp_path / tokenizer.SAVED_RANKS_FILE, tmp_path / "gpt2.tiktoken")
    tok = tokenizer.load_tokenizer(str(tmp_path / "gpt2.tiktoken"))
    assert tok.enc._pat_str == tokenizer.GPT2_PATTERN and tok.eos_id == 50256
    assert tok.encode("3333") == [24840] and tok.encode("a\n\nb") == gpt2.encode("a\n\nb")


def hf_tokenizer_with_template(tmp_path) -> tokenizer.Tokenizer:
    train_hf_tokenizer(tmp_path / "hf", "llama3", chat_template="<|im_start|>{{ role }}")
    return tokenizer.load_tokenizer(str(tmp_path / "hf"))


@pytest.mark.parametrize("source", ["bytes", "hf", "file"])
def test_save_then_load_rebuilds_the_same_tokenizer(tmp_path, source):
    if source == "bytes":
        tok = tokenizer.load_tokenizer("bytes")
    else:
        tok = hf_tokenizer_with_template(tmp_path)
        if source == "file":
            tok.save(str(tmp_path / "tmp"))
            tok = tokenizer.load_tokenizer(str(tmp_path / "tmp" / tokenizer.SAVED_RANKS_FILE),
                                           pattern=tokenizer.LLAMA3_PATTERN)
    tok.save(str(tmp_path / "final"))
    again = tokenizer.load_tokenizer(str(tmp_path / "final"))
    for text in HELD_OUT + fuzz_texts(50, seed=2):
        assert again.encode(text) == tok.encode(text)
    assert (again.specials, again.eos_id, again.chat_template, again.n_vocab) == (
        tok.specials, tok.eos_id, tok.chat_template, tok.n_vocab)


def test_saved_hf_tokenizer_carries_its_hugging_face_files(tmp_path):
    hf_tokenizer_with_template(tmp_path).save(str(tmp_path / "final"))
    assert (tmp_path / "final" / "tokenizer.json").is_file()  # for other tools
    assert (tmp_path / "final" / "tokenizer_config.json").is_file()


def test_saving_a_tokenizer_onto_its_own_directory_keeps_it(tmp_path):
    tok = hf_tokenizer_with_template(tmp_path)
    tok.save(str(tmp_path / "final"))
    again = tokenizer.load_tokenizer(str(tmp_path / "final"))
    again.save(str(tmp_path / "final"))  # its Hugging Face files are already there
    assert tokenizer.load_tokenizer(str(tmp_path / "final")).encode("ok 12") == tok.encode("ok 12")


def test_saved_byte_level_tokenizer_keeps_added_token_rules(tmp_path):
    from tokenizers import AddedToken

    hf = train_hf_tokenizer(tmp_path / "hf", "llama3")
    hf.add_tokens([AddedToken("<ls>", lstrip=True), AddedToken("<sw>", single_word=True)])
    hf.save(str(tmp_path / "hf" / "tokenizer.json"))
    tokenizer.load_tokenizer(str(tmp_path / "hf")).save(str(tmp_path / "saved"))
    again = tokenizer.load_tokenizer(str(tmp_path / "saved"))
    for text in ["x   <ls>y", "a<sw>b", "a <sw> b", "Å"]:
        assert again.encode(text) == hf_ids(hf, text)


# -----------------------------------------------------------------------------
# Bad inputs: one-line errors that name the file and say what to give instead


def test_a_path_to_vocab_json_or_merges_txt_names_the_directory_to_give(tmp_path):
    train_hf_tokenizer(tmp_path, "gpt2")
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    for name in ("vocab.json", "merges.txt"):
        with pytest.raises(UserError, match=f"{name}: one half of a GPT-2-style vocab.json \\+ merges.txt pair; "
                                            "pass the directory holding both"):
            tokenizer.load_tokenizer(str(tmp_path / name))


def test_a_renamed_vocab_json_is_told_apart_from_a_tokenizer_json(tmp_path):
    (tmp_path / "my-vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    with pytest.raises(UserError, match="this is a vocab.json .token -> id., not a tokenizer.json"):
        tokenizer.load_tokenizer(str(tmp_path / "my-vocab.json"))


def test_a_directory_of_vocab_json_and_merges_txt_is_gpt2_byte_level_bpe(tmp_path):
    hf = train_hf_tokenizer(tmp_path / "hf", "gpt2")
    model = json.loads(hf.to_str())["model"]
    os.makedirs(tmp_path / "pair")
    (tmp_path / "pair" / "vocab.json").write_text(json.dumps({**model["vocab"], "<|endoftext|>": 0}))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (tmp_path / "pair" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = tokenizer.load_tokenizer(str(tmp_path / "pair"))
    assert tok.eos_id == 0 and tok.specials == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for text in varied_texts():
        assert tok.encode(text) == hf_ids(hf, text), repr(text)
    tok.save(str(tmp_path / "saved"))  # an export carries the files Hugging Face reads, byte for byte
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "saved" / name).read_bytes() == (tmp_path / "pair" / name).read_bytes()


@pytest.mark.parametrize("files, message", [
    ({"vocab.json": "{}"}, "has only one of vocab.json and merges.txt"),
    ({"merges.txt": "a b"}, "has only one of vocab.json and merges.txt"),
    ({"vocab.json": '{"a": 0}', "merges.txt": "a b c\n"}, r"merges.txt:1: expected two tokens"),
    ({"vocab.json": '{"a": 0, "b": 1, "ab": 2}', "merges.txt": "a b\n",
      "tokenizer_config.json": '{"tokenizer_class": "Qwen2Tokenizer"}'}, "Qwen2Tokenizer, whose split regex"),
    ({"special_tokens_map.json": "{}"}, "has no tokenizer.json, tokenizer.model, vocab.json"),
    ({"tokenizer.json": ""}, "tokenizer.json: cannot read tokenizer.json"),
    ({"tokenizer.json": '{"model": {"type": "BPE", "vocab": {"a": 0}, "merg'}, "cannot read tokenizer.json"),
    ({"tokenizer.json": "[1, 2]"}, "not a Hugging Face tokenizer.json"),
    ({"tokenizer.model": ""}, "tokenizer.model: empty file"),
    ({"tokenizer.model": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"}, "neither a tiktoken BPE file nor a SentencePiece"),
])
def test_directories_with_partial_or_broken_files(tmp_path, files, message):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError, match=message):
        tokenizer.load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("model, message", [
    ({"type": "WordPiece", "vocab": {"a": 0}, "unk_token": "[UNK]"},
     "a WordPiece tokenizer .BERT style.; nanospin reads BPE"),
    ({"type": "Unigram", "vocab": [["<unk>", 0.0]]}, "a Unigram tokenizer .SentencePiece Unigram"),
    ({"type": "WordLevel", "vocab": {"a": 0}}, "a WordLevel tokenizer; nanospin reads BPE"),
    ({"type": "BPE", "vocab": {"a": 0}, "merges": []}, "BPE with neither a ByteLevel pre-tokenizer nor byte_fallback"),
    ({"type": "BPE", "vocab": {"a": 0}, "merges": [], "byte_fallback": True}, "byte_fallback needs the 256 tokens"),
    ({"type": "BPE", "vocab": {"a": 0}, "merges": [], "dropout": 0.1}, "dropout 0.1 makes its ids random"),
])
def test_tokenizer_types_nanospin_does_not_run_are_refused(tmp_path, model, message):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": model}))
    with pytest.raises(UserError, match=message):
        tokenizer.load_tokenizer(str(tmp_path / "tokenizer.json"))


@pytest.mark.parametrize("name", ["bytes", "byte-level", "sentencepiece"])
def test_tokenizer_pattern_is_refused_where_the_tokenizer_has_its_own(tmp_path, name):
    path = "bytes" if name == "bytes" else str(tmp_path)
    if name == "byte-level":
        train_hf_tokenizer(tmp_path, "gpt2")
    if name == "sentencepiece":
        sentencepiece_hf_tokenizer(tmp_path)
    with pytest.raises(UserError, match="tokenizer_pattern is set, but tokenizer .* has its own split rules"):
        tokenizer.load_tokenizer(path, pattern=r"\S+|\s+")


def corruptions(data: bytes, seed: int) -> list[bytes]:
    """Truncations at many points, and copies with random bytes overwritten."""
    rng = random.Random(seed)
    cuts = [data[: rng.randrange(len(data))] for _ in range(25)]
    flips = []
    for _ in range(25):
        copy = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            copy[rng.randrange(len(copy))] = rng.randrange(256)
        flips.append(bytes(copy))
    return [data, b"", b"\x00" * 7, bytes(rng.randrange(256) for _ in range(300))] + cuts + flips


def test_no_tokenizer_input_crashes_with_a_traceback(tmp_path):
    """Junk, truncated and bit-flipped tokenizer.json, tokenizer.model, tiktoken, vocab/merges files load or give a
    one-line UserError, never another exception."""
    sentencepiece_hf_tokenizer(tmp_path / "sp", "prepend", "spm")
    small = json.loads((tmp_path / "sp" / "tokenizer.json").read_text())
    small["model"]["merges"] = small["model"]["merges"][:40]
    sources = {"tokenizer.json": json.dumps(small, ensure_ascii=False).encode()}
    pieces = [("<unk>", 0.0, 2), ("a", -1.0, 1), ("b", -2.0, 1), ("ab", -3.0, 1)]
    write_sentencepiece_model(tmp_path / "sp.model", pieces + [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)])
    sources["tokenizer.model"] = (tmp_path / "sp.model").read_bytes()
    sources["my.tiktoken"] = b"".join(base64_line(bytes([b]), b) for b in range(256))
    sources["vocab.json"] = json.dumps({"a": 0, "b": 1, "ab": 2}).encode()
    sources["merges.txt"] = b"#version: 0.2\na b\n"
    outcomes = {"loaded": 0, "refused": 0}
    for name, data in sources.items():
        for i, junk in enumerate(corruptions(data, seed=len(name))):
            directory = tmp_path / f"{name}-{i}"
            os.makedirs(directory)
            (directory / name).write_bytes(junk)
            if name == "vocab.json":
                (directory / "merges.txt").write_bytes(sources["merges.txt"])
            for path in (directory, directory / name):
                try:
                    tok = tokenizer.load_tokenizer(str(path))
                    tok.decode(tok.encode("Hello, wörld 日本 😀"))
                    outcomes["loaded"] += 1
                except UserError as e:
                    assert "\n" not in str(e), str(e)
                    outcomes["refused"] += 1
    assert outcomes["refused"] > 100 and outcomes["loaded"] > 0


def base64_line(token: bytes, rank: int) -> bytes:
    import base64

    return base64.b64encode(token) + b" " + str(rank).encode() + b"\n"
