"""Tokenizers: Hugging Face's files run by the `tokenizers` library, the rest by tiktoken.

Design choices:
- A model's tokenizer.json is run by `tokenizers` itself, so ids equal Hugging Face's by construction. A GPT-2 or
  Qwen2 vocab.json + merges.txt becomes the pipeline transformers builds for that class; a bare SentencePiece
  tokenizer.model is refused with the command that converts it.
- tiktoken runs the offline 'bytes' tokenizer, tiktoken's named encodings and tiktoken BPE files (with their split
  regex, `tokenizer_pattern`); these get the chat special tokens they lack after their vocabulary.
- encode(text) takes all of its input as text (special-token text inside a message stays text); encode(text,
  special=True) matches the added tokens, as a template's own text needs (templates.py).
- save() copies the Hugging Face files byte for byte; tokenizer.json is rewritten only to hold markers that
  add_special_tokens put after the vocabulary (ChatML's on GPT-2).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from dataclasses import dataclass, field, replace

import tiktoken
import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers

from configurator import UserError
from templates import ChatFormat, chat_format

# Special tokens of every named chat template, in id order after the 256 bytes of the 'bytes' tokenizer
# (and after the vocabulary of tiktoken's named encodings and BPE files, for those they lack).
CHAT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|system|>", "<|user|>", "<|assistant|>",
                 "</s>")
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")  # transformers' Qwen2Tokenizer splits text with this first
TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>", "<|eot_id|>")
SAVED_TOKENIZER_FILE = "nanospin_tokenizer.json"
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.json", "merges.txt",
            "special_tokens_map.json", "added_tokens.json", "tokenizer.model")  # what save() copies along
TOKENIZER_HELP = ("give 'bytes', a tiktoken encoding name, a Hugging Face tokenizer directory (tokenizer.json, or a "
                  "GPT-2/Qwen2 vocab.json + merges.txt) or a tiktoken BPE file with tokenizer_pattern")


@dataclass(eq=False)  # hashed by identity: templates.py caches what it learns about a tokenizer
class Tokenizer:
    name: str  # what load_tokenizer was given
    eos_id: int
    specials: dict[str, int]  # added token text -> id: a template's text may write them, a message's text may not
    enc: tiktoken.Encoding | None = None  # 'bytes', tiktoken's named encodings and tiktoken BPE files
    hf: tokenizers.Tokenizer | None = None  # a Hugging Face tokenizer, run by the library
    chat_template: ChatFormat | None = None  # the model's own (Jinja, from its files)
    token_strings: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ...: a template's variables
    text_tokens: frozenset[str] = frozenset()  # added tokens that are not special
    source: str | None = None  # the Hugging Face directory or tiktoken BPE file that save() copies
    added_specials: tuple[str, ...] = ()  # markers add_special_tokens put after the vocabulary

    def encode(self, text: str, special: bool = False) -> list[int]:
        """Ids of text: the library's normalizer, pre-tokenizer and model with no added token (special=False), or
        with the added tokens matched, as `encode(text, add_special_tokens=False)` (special=True)."""
        if self.enc is not None:
            return self.enc.encode(text, allowed_special="all") if special else self.enc.encode_ordinary(text)
        if special:
            return self.hf.encode(text, add_special_tokens=False).ids
        text = self.hf.normalizer.normalize_str(text) if self.hf.normalizer else text
        words = [w for w, _ in self.hf.pre_tokenizer.pre_tokenize_str(text)] if self.hf.pre_tokenizer else [text]
        return [t.id for w in words for t in self.hf.model.tokenize(w)]

    def decode(self, ids) -> str:
        """Special tokens decode to their text, invalid UTF-8 to U+FFFD; ids past the vocabulary (a model whose vocab
        is padded for speed can sample them) are left out."""
        ids = [i for i in ids if 0 <= i < self.n_vocab]
        return self.hf.decode(ids, skip_special_tokens=False) if self.hf else self.enc.decode(ids, errors="replace")

    @property
    def n_vocab(self) -> int:
        if self.enc is not None:
            return self.enc.n_vocab
        return max(self.hf.get_vocab_size(with_added_tokens=True), max(self.specials.values(), default=-1) + 1)

    def save(self, directory: str) -> None:
        """Write what load_tokenizer(directory) needs to rebuild this tokenizer."""
        os.makedirs(directory, exist_ok=True)
        kind = "hf" if self.hf else "file" if self.source else "bytes" if self.name == "bytes" else "tiktoken"
        copies = {f: os.path.join(self.source, f) for f in HF_FILES} if kind == "hf" else {}
        meta = {"kind": kind, "name": self.name, "added_specials": list(self.added_specials)}
        if kind == "file":  # tiktoken keeps no public accessor for the split regex and specials
            copies = {"tokenizer.tiktoken": self.source}
            meta.update(pattern=self.enc._pat_str, specials={s: i for s, i in self.specials.items()
                                                              if s not in self.added_specials})
        for name, src in copies.items():
            dst = os.path.join(directory, name)
            if os.path.isfile(src) and not (os.path.exists(dst) and os.path.samefile(src, dst)):
                shutil.copyfile(src, dst)
        config = _read_json(directory, "tokenizer_config.json") if kind == "hf" and self.added_specials else {}
        if kind == "hf" and self.added_specials:  # transformers reads added tokens from both files
            with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
                f.write(self.hf.to_str())
        if isinstance(config.get("added_tokens_decoder"), dict):
            config["added_tokens_decoder"].update({str(self.specials[s]): {"content": s, "special": True, **dict.fromkeys(
                ("lstrip", "normalized", "rstrip", "single_word"), False)} for s in self.added_specials})
            with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, ensure_ascii=False)
        with open(os.path.join(directory, SAVED_TOKENIZER_FILE), "w") as f:
            json.dump(meta, f, indent=1, ensure_ascii=False)


def add_special_tokens(tok: Tokenizer, contents) -> Tokenizer:
    """tok with the `contents` it lacks as special tokens after its vocabulary (ids n_vocab, n_vocab + 1, ...): chat
    markers a model's tokenizer lacks, for which the model's embeddings must grow."""
    new = [c for c in dict.fromkeys(contents) if c not in tok.specials]
    ids = {c: tok.n_vocab + i for i, c in enumerate(new)}
    enc, hf = tok.enc, tok.hf
    if new and hf:  # the library numbers them after the vocabulary too
        hf = tokenizers.Tokenizer.from_str(hf.to_str())
        hf.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in new])
        ids = {c: hf.token_to_id(c) for c in new}
    elif new:
        enc = tiktoken.Encoding(enc.name, pat_str=enc._pat_str, mergeable_ranks=enc._mergeable_ranks,
                                special_tokens={**enc._special_tokens, **ids})
    return replace(tok, enc=enc, hf=hf, specials={**tok.specials, **ids}, added_specials=tok.added_specials + tuple(new))


# -----------------------------------------------------------------------------
# tiktoken: 'bytes', named encodings, tiktoken BPE files


def _tiktoken(name: str, pattern: str, ranks: dict[bytes, int], specials: dict[str, int], **fields) -> Tokenizer:
    """A tiktoken tokenizer with the CHAT_SPECIALS that `specials` lack after its vocabulary."""
    missing = [s for s in CHAT_SPECIALS if s not in specials]
    first_free = max([*ranks.values(), *specials.values()]) + 1
    specials = {**specials, **{s: first_free + i for i, s in enumerate(missing)}}
    try:
        enc = tiktoken.Encoding(f"nanospin_{os.path.basename(name)}", pat_str=pattern, mergeable_ranks=ranks,
                                special_tokens=specials)
    except Exception as e:  # the regex engines differ, and tiktoken checks the ranks: say what it refused
        raise UserError(f"tokenizer '{name}': tiktoken refuses it ({str(e)[:200]})") from None
    return Tokenizer(name=name, eos_id=specials["<|endoftext|>"], specials=specials, enc=enc,
                     token_strings={"eos_token": "<|endoftext|>"}, **fields)


def bytes_tokenizer() -> Tokenizer:
    """256 single-byte tokens then CHAT_SPECIALS: no merges, so any pattern covering all text works."""
    return _tiktoken("bytes", r"[\s\S]{1,256}", {bytes([b]): b for b in range(256)}, {})


def named_tokenizer(name: str) -> Tokenizer:
    """tiktoken's named encoding (its files come from the network or TIKTOKEN_CACHE_DIR)."""
    try:
        base = tiktoken.get_encoding(name)
    except Exception as e:  # no network and no cache: requests/OSError/hash errors all end here
        raise UserError(f"tokenizer '{name}': tiktoken could not load it ({type(e).__name__}: {str(e)[:160]}); "
                        f"put its file in a folder named by TIKTOKEN_CACHE_DIR, or use a Hugging Face directory") from None
    return _tiktoken(name, base._pat_str, base._mergeable_ranks, base._special_tokens)


def tiktoken_file_tokenizer(path: str, pattern: str | None, specials: dict[str, int] | None = None) -> Tokenizer:
    """A tiktoken BPE file: 'base64(token) rank' lines, split by `pattern` (the file holds no regex)."""
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    ranks = {}
    for lineno, line in enumerate(lines, 1):
        try:
            token, rank = line.split() if line.strip() else (b"", b"-1")
            ranks.update({base64.b64decode(token, validate=True): int(rank)} if token else {})
        except ValueError:
            raise UserError(f"{path}:{lineno}: not a tiktoken BPE file ('base64 rank' lines); for a SentencePiece "
                            f"tokenizer.model, nanospin reads the model's tokenizer.json instead: {convert_hint(path)}"
                            ) from None
    if not ranks:
        raise UserError(f"{path}: an empty file; {TOKENIZER_HELP}")
    if pattern is None:
        raise UserError(f"{path}: a tiktoken BPE file ({len(ranks)} ranks), which holds no split regex; set "
                        f"tokenizer_pattern to the one it was made with")
    return _tiktoken(path, pattern, ranks, specials or {}, source=path)


def convert_hint(path: str) -> str:
    d = os.path.dirname(os.path.abspath(path))
    return (f"convert it once with transformers: python -c \"from transformers import AutoTokenizer; "
            f"AutoTokenizer.from_pretrained('{d}').save_pretrained('{d}')\"")


# -----------------------------------------------------------------------------
# Hugging Face: tokenizer.json or vocab.json + merges.txt, and what tokenizer_config.json says around them


def _read_json(directory: str, name: str) -> dict:
    path = os.path.join(directory, name)
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        return {}
    except (ValueError, OSError) as e:  # UnicodeDecodeError is a ValueError
        raise UserError(f"{path}: cannot read it ({type(e).__name__}: {str(e)[:160]})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object; fix or remove the file")
    return value


def _text(value) -> str | None:
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


def hf_tokenizer(hf: tokenizers.Tokenizer, directory: str, name: str) -> Tokenizer:
    """A `tokenizers` tokenizer with what its directory's tokenizer_config.json (or special_tokens_map.json) says:
    the named special tokens (eos among them) and the chat template (chat_template.jinja first, as transformers)."""
    config = _read_json(directory, "tokenizer_config.json")
    strings = {k: _text(v) for c in (_read_json(directory, "special_tokens_map.json"), config)
               for k, v in c.items() if k in TOKEN_NAMES and _text(v)}
    eos = strings.get("eos_token") or next((s for s in EOS_CANDIDATES if hf.token_to_id(s) is not None), None)
    if eos is None or hf.token_to_id(eos) is None:
        raise UserError(f"{directory}: cannot tell the end-of-text token (eos_token {eos!r}); set \"eos_token\" in "
                        f"{os.path.join(directory, 'tokenizer_config.json')} to one of its tokens")
    hf.no_truncation()
    hf.no_padding()
    # as transformers: the named special tokens in the vocabulary are added tokens (a template's text writes them)
    named = {eos, *strings.values()} - {t.content for t in hf.get_added_tokens_decoder().values()}
    hf.add_special_tokens(sorted(s for s in named if hf.token_to_id(s) is not None))
    added = hf.get_added_tokens_decoder()
    jinja, where = config.get("chat_template"), os.path.join(directory, "chat_template.jinja")
    if isinstance(jinja, list):  # named templates: [{"name": "default", "template": ...}, ...]
        jinja = next((t.get("template") for t in jinja if isinstance(t, dict) and t.get("name") == "default"), None)
    if os.path.isfile(where):
        with open(where, encoding="utf-8", errors="replace") as f:
            jinja = f.read()
    else:
        where = os.path.join(directory, "tokenizer_config.json")
    return Tokenizer(name=name, eos_id=hf.token_to_id(eos), specials={t.content: i for i, t in added.items()}, hf=hf,
                     chat_template=chat_format({"name": where, "jinja": jinja}, where) if jinja else None,
                     token_strings={**strings, "eos_token": eos}, source=directory,
                     text_tokens=frozenset(t.content for t in added.values() if not t.special))


def vocab_merges_tokenizer(directory: str) -> tokenizers.Tokenizer:
    """vocab.json + merges.txt built as transformers builds GPT2Tokenizer (or Qwen2Tokenizer when
    tokenizer_config.json names it), with the added tokens tokenizer_config.json lists."""
    config = _read_json(directory, "tokenizer_config.json")
    kind = config.get("tokenizer_class", "GPT2Tokenizer")
    if kind not in ("GPT2Tokenizer", "GPT2TokenizerFast", "Qwen2Tokenizer", "Qwen2TokenizerFast"):
        raise UserError(f"{directory}: vocab.json + merges.txt of a {kind}, whose pipeline nanospin does not build "
                        f"(GPT-2's and Qwen2's only); {convert_hint(os.path.join(directory, 'vocab.json'))}")
    hf = tokenizers.Tokenizer(models.BPE.from_file(*(os.path.join(directory, f) for f in ("vocab.json", "merges.txt"))))
    hf.decoder = decoders.ByteLevel()
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space")))
    if kind.startswith("Qwen2"):
        hf.normalizer = normalizers.NFC()
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(tokenizers.Regex(QWEN2_PATTERN), "isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    listed = config.get("added_tokens_decoder") or {}
    for token_id, t in sorted(listed.items(), key=lambda item: int(item[0])):
        hf.add_tokens([AddedToken(t["content"], **{k: bool(t.get(k)) for k in ("special", "lstrip", "rstrip",
                                                                             "single_word", "normalized")})])
        if hf.token_to_id(t["content"]) != int(token_id):
            raise UserError(f"{directory}/tokenizer_config.json: added token {t['content']!r} is listed with id "
                            f"{token_id}, but follows the vocabulary as {hf.token_to_id(t['content'])}")
    return hf


# -----------------------------------------------------------------------------
# The one entry point


def _hf(directory: str, tokenizer_file: str | None = None) -> Tokenizer:
    """The Hugging Face tokenizer of a directory: its tokenizer.json (or tokenizer_file), else vocab.json +
    merges.txt."""
    path = tokenizer_file or os.path.join(directory, "tokenizer.json")
    try:
        hf = tokenizers.Tokenizer.from_file(path) if os.path.isfile(path) else vocab_merges_tokenizer(directory)
    except UserError:
        raise
    except Exception as e:  # the library raises plain Exceptions for what it cannot read
        raise UserError(f"{path if os.path.isfile(path) else directory}: the tokenizers library cannot read it "
                        f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}); {TOKENIZER_HELP}") from None
    return hf_tokenizer(hf, directory, tokenizer_file or directory)


def _load_tokenizer(path: str, pattern: str | None) -> Tokenizer:
    if path == "bytes" or (not os.path.exists(path) and path in tiktoken.list_encoding_names()):
        return bytes_tokenizer() if path == "bytes" else named_tokenizer(path)
    files = set(os.listdir(path)) if os.path.isdir(path) else set()
    if SAVED_TOKENIZER_FILE in files:
        meta = _read_json(path, SAVED_TOKENIZER_FILE)
        kind = meta.get("kind")
        tok = (_hf(path) if kind == "hf" else bytes_tokenizer() if kind == "bytes" else named_tokenizer(meta["name"])
               if kind == "tiktoken" else tiktoken_file_tokenizer(os.path.join(path, "tokenizer.tiktoken"),
                                                                  meta["pattern"], meta["specials"]))
        added = tuple(meta.get("added_specials", ()))
        return replace(add_special_tokens(tok, added), added_specials=added)
    if "tokenizer.json" in files or {"vocab.json", "merges.txt"} <= files:
        return _hf(path)
    if "tokenizer.model" in files:
        return tiktoken_file_tokenizer(os.path.join(path, "tokenizer.model"), pattern)
    if files or os.path.isdir(path):
        raise UserError(f"tokenizer directory '{path}' has no tokenizer.json, vocab.json + merges.txt, tokenizer.model "
                        f"or {SAVED_TOKENIZER_FILE}; {TOKENIZER_HELP}")
    if os.path.isfile(path) and os.path.basename(path) in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        raise UserError(f"{path}: not a tokenizer by itself; pass the directory that holds it")
    if os.path.isfile(path):
        return _hf(os.path.dirname(os.path.abspath(path)), path) if path.endswith(".json") else \
            tiktoken_file_tokenizer(path, pattern)
    raise UserError(f"tokenizer '{path}' is neither a file, a directory, 'bytes' nor a tiktoken encoding "
                    f"({', '.join(tiktoken.list_encoding_names())})")


def load_tokenizer(name_or_path: str, pattern: str | None = None) -> Tokenizer:
    """'bytes' | a tiktoken encoding name | a Hugging Face directory or tokenizer.json | a GPT-2/Qwen2 directory of
    vocab.json + merges.txt | a tiktoken BPE file, split by `pattern` | a directory written by Tokenizer.save.
    Every bad input is a one-line UserError."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise UserError(f"tokenizer must be a name or a path, got {name_or_path!r}; {TOKENIZER_HELP}")
    try:
        tok = _load_tokenizer(name_or_path, pattern)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise UserError(f"tokenizer '{name_or_path}': cannot read it ({type(e).__name__}: {str(e)[:160]}); "
                        f"{TOKENIZER_HELP}") from None
    if pattern is not None and not (tok.enc and tok.source):
        raise UserError(f"tokenizer_pattern is set, but tokenizer '{name_or_path}' has its own split rules (it applies "
                        f"to tiktoken BPE files only); remove tokenizer_pattern")
    return tok
