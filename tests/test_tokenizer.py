"""Tests for tokenizer.py: Hugging Face byte-level BPE converted with ids equal to the `tokenizers` library's,
the chat template and eos read from tokenizer_config.json, the clear refusal of other tokenizer kinds, the
'bytes' and named tiktoken tokenizers, tiktoken BPE files, and save/load round trips."""

import hashlib
import json
import os
import random
import unicodedata

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

import tokenizer
from configurator import UserError

TRAIN_CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024, and we've got 1234567 reasons!",
    "Café naïve résumé über straße déjà vu — «quotes» and ‘single’ “double”.",
    "日本語のテキストです。中文文本也在这里。한국어 문장도 있습니다.",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧 🇫🇷 ❤️ ✓",
    "def f(x):\n    return x**2 + 3*x - 1  # comment\n\n\tif a != b: print(\"hi\")\n",
    "   leading spaces, trailing spaces   \n\n\n   multiple\r\n newlines \t tabs\t\t",
    "I'm, you're, he'll, they'd, she's, it's, we've, I'D, YOU'LL",
    "numbers 3.14159 2,718 10e-5 007 123456789 ١٢٣ ½",
    "<html><body class=\"x\">text &amp; more</body></html> {\"json\": [1, 2, 3]}",
] * 3
HELD_OUT = [
    "Held-out: Zürich's 42 cafés   served 3,000 crêpes!!\n\n  ok",
    "混合 text with 日本 and 😀 emoji ... and spaces      end  ",
    "x = [i for i in range(10)] ; y={'a':1}\n\t\treturn None\r\n",
    "They'll've DONE it's 99 problems 123456 7 89",
    "   \n \n  ", "a", "", "1 2 3  4   5", "ﬁ ligature Å (A+ring) Å e\u0301 ñ",
    "tabs\t\tand\u00a0nbsp\u2003em-space, zero\u200bwidth",
]
HF_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_JINJA = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def train_hf_tokenizer(directory, style: str, specials=HF_SPECIALS, chat_template=None):
    """A small byte-level BPE trained by `tokenizers`, saved as a Hugging Face directory."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.BPE())
    if style == "gpt2":  # GPT-2: the ByteLevel pre-tokenizer's own regex
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif style == "llama3":  # Llama-3 / Qwen2: a Split regex, ByteLevel without regex, (Qwen2) NFC
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(tokenizer.LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        hf.normalizer = normalizers.NFC()
    elif style == "digits":  # SmolLM: single digits, then GPT-2's regex
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(TRAIN_CORPUS, trainer)
    os.makedirs(directory, exist_ok=True)
    hf.save(os.path.join(directory, "tokenizer.json"))
    if chat_template is not None:
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump({"chat_template": chat_template, "eos_token": "<|im_end|>"}, f)
    return hf


def fuzz_texts(n: int, seed: int) -> list[str]:
    """Random strings mixing the pieces where pre-tokenizer regexes disagree most easily."""
    rng = random.Random(seed)
    alphabet = list("ab cd  \n\t\r0123 45'sltvemdr.,!?-_ÅéÜ日本😀\u0301")
    alphabet += ["'s", "'ll", "   ", "\n\n", " 1", "12"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(n)]


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
    for text in HELD_OUT + fuzz_texts(300, seed=1):
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids, repr(text)


def test_hf_decode_inverts_encode(trained):
    style, _, tok = trained
    for text in HELD_OUT + fuzz_texts(300, seed=1):
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
    hf = train_hf_tokenizer(tmp_path, "gpt2")
    hf.add_tokens(["<think>", "ZZZ"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = tokenizer.load_tokenizer(str(tmp_path))
    for text in ["a <think> b", "<think>x</think>", "aZZZb", " ZZZ 12"]:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids
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


def test_unigram_tokenizer_json_is_refused(tmp_path):
    unigram = tmp_path / "tokenizer.json"
    unigram.write_text(json.dumps({"model": {"type": "Unigram", "vocab": [["<unk>", 0.0]]}}))
    with pytest.raises(UserError, match="SentencePiece"):
        tokenizer.load_tokenizer(str(tmp_path))


def test_metaspace_pre_tokenizer_is_refused(tmp_path):
    metaspace = tmp_path / "metaspace.json"
    metaspace.write_text(json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []},
                                     "pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}))
    with pytest.raises(UserError, match="not a byte-level BPE form"):
        tokenizer.load_tokenizer(str(metaspace))


def test_sentencepiece_model_file_is_refused(tmp_path):
    spm = tmp_path / "tokenizer.model"
    spm.write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02\n\x0b")
    with pytest.raises(UserError, match="SentencePiece"):
        tokenizer.load_tokenizer(str(spm))


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
# tiktoken BPE files, and saving


def tiktoken_file_of(tmp_path) -> tuple[tokenizer.Tokenizer, str]:
    """(a converted Hugging Face tokenizer, a tiktoken BPE file holding its ranks)."""
    train_hf_tokenizer(tmp_path / "hf", "gpt2")
    source = tokenizer.load_tokenizer(str(tmp_path / "hf"))
    source.save(str(tmp_path / "saved"))
    path = tmp_path / "my.tiktoken"
    path.write_bytes((tmp_path / "saved" / tokenizer.SAVED_RANKS_FILE).read_bytes())
    return source, str(path)


def test_tiktoken_bpe_file_holds_the_same_merges(tmp_path):
    source, path = tiktoken_file_of(tmp_path)
    tok = tokenizer.load_tokenizer(path)
    assert tok.enc._mergeable_ranks == source.enc._mergeable_ranks
    assert tok.decode(tok.encode(HELD_OUT[0])) == HELD_OUT[0]
    assert len(tok.encode(HELD_OUT[0])) < len(HELD_OUT[0].encode())  # merges are used


def test_tiktoken_bpe_file_gets_the_chat_specials_after_its_ranks(tmp_path):
    source, path = tiktoken_file_of(tmp_path)
    tok = tokenizer.load_tokenizer(path)
    first = max(source.enc._mergeable_ranks.values()) + 1
    assert tok.specials == {s: first + i for i, s in enumerate(tokenizer.CHAT_SPECIALS)}
    assert tok.eos_id == tok.specials["<|endoftext|>"]


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
            tok = tokenizer.load_tokenizer(str(tmp_path / "tmp" / tokenizer.SAVED_RANKS_FILE))
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
