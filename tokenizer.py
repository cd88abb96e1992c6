"""Tokenizers: Hugging Face's files run by the `tokenizers` library (ids equal by construction), the rest by tiktoken.

- A GPT-2 or Qwen2 vocab.json + merges.txt becomes the pipeline transformers builds; a bare tokenizer.model is refused.
- tiktoken runs 'bytes', its named encodings and tiktoken BPE files, which get the chat specials they lack.
- encode(text) takes all its input as text (special-token text in a message stays text); encode(text, special=True)
  matches added tokens, as a template's text needs. save() keeps Hugging Face files byte for byte but added markers.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import shutil
from dataclasses import dataclass, field, replace

import tiktoken
import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers

from configurator import UserError
from templates import ChatFormat, chat_format

# the named chat templates' special tokens, in id order after the vocabulary of a tiktoken tokenizer that lacks them
CHAT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|system|>", "<|user|>",
                 "<|assistant|>", "</s>")
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")  # transformers' Qwen2Tokenizer splits text with it first
SAVED_TOKENIZER_FILE = "nanospin_tokenizer.json"
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.json", "merges.txt",
            "special_tokens_map.json", "added_tokens.json", "tokenizer.model")  # what save() copies along
TOKENIZER_HELP = "give 'bytes', a tiktoken encoding (offline: TIKTOKEN_CACHE_DIR), a Hugging Face or tiktoken file"


@dataclass(eq=False)  # hashed by identity: templates.py caches what it learns about a tokenizer
class Tokenizer:
    name: str  # what load_tokenizer was given
    eos_id: int
    specials: dict[str, int]  # added token text -> id: a template's text may write them, a message's text may not
    enc: tiktoken.Encoding | None = None  # 'bytes', tiktoken's named encodings and tiktoken BPE files
    hf: tokenizers.Tokenizer | None = None  # a Hugging Face tokenizer, run by the library
    chat_template: ChatFormat | None = None  # the model's own (Jinja, from its files)
    token_strings: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ...: a template's variables
    source: str | None = None  # the Hugging Face directory whose files save() copies
    added_specials: tuple[str, ...] = ()  # markers add_special_tokens put after the vocabulary

    def encode(self, text: str, special: bool = False) -> list[int]:
        """Ids of text, with the added tokens matched (special=True) or not (the message's text: no control token)."""
        if self.enc is not None:
            return self.enc.encode(text, allowed_special="all") if special else self.enc.encode_ordinary(text)
        if special:
            return self.hf.encode(text, add_special_tokens=False).ids
        text = self.hf.normalizer.normalize_str(text) if self.hf.normalizer else text
        words = [w for w, _ in self.hf.pre_tokenizer.pre_tokenize_str(text)] if self.hf.pre_tokenizer else [text]
        return [t.id for w in words for t in self.hf.model.tokenize(w)]

    def decode(self, ids) -> str:
        """Specials decode to their text; ids past the vocabulary (sampled from a padded one) are left out."""
        ids = [i for i in ids if 0 <= i < self.n_vocab]
        return self.hf.decode(ids, skip_special_tokens=False) if self.hf else self.enc.decode(ids, errors="replace")

    @property
    def n_vocab(self) -> int:
        return self.enc.n_vocab if self.enc else self.hf.get_vocab_size(with_added_tokens=True)

    def save(self, directory: str) -> None:
        """Write what load_tokenizer(directory) needs to rebuild this tokenizer."""
        out = pathlib.Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"name": self.name, "added_specials": list(self.added_specials)}
        if self.enc is not None:  # tiktoken's ranks, split regex and specials (it has no public accessor for them)
            ranks = sorted(self.enc._mergeable_ranks.items(), key=lambda item: item[1])
            (out / "tokenizer.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks),
                                                    "utf-8")
            meta.update(pattern=self.enc._pat_str, specials=self.specials)
        for name in HF_FILES if self.hf else ():
            src = os.path.join(self.source, name)
            if os.path.isfile(src) and not ((out / name).exists() and (out / name).samefile(src)):
                shutil.copyfile(src, out / name)
        if self.hf and self.added_specials:  # transformers reads added tokens from both files
            (out / "tokenizer.json").write_text(self.hf.to_str(), encoding="utf-8")
            config = _read_json(directory, "tokenizer_config.json")
            for s in self.added_specials if isinstance(config.get("added_tokens_decoder"), dict) else ():
                config["added_tokens_decoder"][str(self.specials[s])] = {"content": s, "special": True, **dict.fromkeys(
                    ("lstrip", "normalized", "rstrip", "single_word"), False)}
            if config.get("added_tokens_decoder"):
                (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), "utf-8")
        (out / SAVED_TOKENIZER_FILE).write_text(json.dumps(meta, indent=1))


def _read_json(directory: str, name: str) -> dict:
    path = os.path.join(directory, name)
    try:
        value = json.loads(pathlib.Path(path).read_bytes()) if os.path.isfile(path) else {}
    except ValueError as e:  # UnicodeDecodeError is a ValueError
        raise UserError(f"{path}: cannot read it ({type(e).__name__}: {str(e)[:160]})") from None
    if isinstance(value, dict):
        return value
    raise UserError(f"{path}: expected a JSON object; fix or remove the file")


def add_special_tokens(tok: Tokenizer, contents) -> Tokenizer:
    """tok with the `contents` it lacks as specials after its vocabulary: markers the model's embeddings grow for."""
    new = [c for c in dict.fromkeys(contents) if c not in tok.specials]
    ids = {c: tok.n_vocab + i for i, c in enumerate(new)}
    enc, hf = tok.enc, tok.hf
    if new and hf:  # the library numbers them after the vocabulary too
        hf = tokenizers.Tokenizer.from_str(hf.to_str())
        hf.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in new])
    elif new:
        enc = tiktoken.Encoding(enc.name, pat_str=enc._pat_str, mergeable_ranks=enc._mergeable_ranks,
                                special_tokens={**enc._special_tokens, **ids})
    return replace(tok, enc=enc, hf=hf, specials={**tok.specials, **ids}, added_specials=(*tok.added_specials, *new))


def tiktoken_tokenizer(name: str, pattern: str | None = None, specials: dict[str, int] | None = None) -> Tokenizer:
    """'bytes' (256 bytes), a tiktoken encoding, or a tiktoken BPE file split by `pattern`; then the CHAT_SPECIALS."""
    ranks, base = {bytes([b]): b for b in range(256)}, {}
    if name != "bytes" and not os.path.isfile(name):
        enc = tiktoken.get_encoding(name)  # needs the network or TIKTOKEN_CACHE_DIR: TOKENIZER_HELP says so
        ranks, base, pattern = enc._mergeable_ranks, enc._special_tokens, enc._pat_str
    elif name != "bytes":
        lines = [line.split() for line in pathlib.Path(name).read_bytes().splitlines() if line.strip()]
        try:
            ranks, base = {base64.b64decode(t, validate=True): int(r) for t, r in lines}, specials or {}
        except ValueError:  # a SentencePiece model, or anything else that is not 'base64 rank' lines
            d = os.path.dirname(os.path.abspath(name))
            raise UserError(f"{name}: not a tiktoken BPE file; for a SentencePiece model, convert it to tokenizer.json "
                            f"once: python -c \"from transformers import AutoTokenizer as T; "
                            f"T.from_pretrained('{d}').save_pretrained('{d}')\"") from None
        if not ranks or pattern is None:
            raise UserError(f"{name}: a tiktoken BPE file of {len(ranks)} ranks, which hold no split regex; set "
                            f"tokenizer_pattern to the one it was made with" if ranks else f"{name}: an empty file")
    first_free = max([*ranks.values(), *base.values()]) + 1
    specials = {**base, **{s: first_free + i for i, s in enumerate(s for s in CHAT_SPECIALS if s not in base)}}
    enc = tiktoken.Encoding(f"nanospin_{os.path.basename(name)}", pat_str=pattern or r"[\s\S]{1,256}",
                            mergeable_ranks=ranks, special_tokens=specials)  # ValueError on a regex it cannot run
    return Tokenizer(name=name, eos_id=specials["<|endoftext|>"], specials=specials, enc=enc,
                     token_strings={"eos_token": "<|endoftext|>"})


def hf_tokenizer(directory: str, tokenizer_file: str | None = None) -> Tokenizer:
    """A directory's tokenizer with its tokenizer_config.json's (or special_tokens_map.json's) chat template and named
    special tokens, eos among them, which become added tokens (as transformers makes them) a template's text writes."""
    path = tokenizer_file or os.path.join(directory, "tokenizer.json")
    hf = tokenizers.Tokenizer.from_file(path) if os.path.isfile(path) else vocab_merges_tokenizer(directory)
    config = _read_json(directory, "tokenizer_config.json")
    strings = {k: t for c in (_read_json(directory, "special_tokens_map.json"), config) for k, v in c.items()
               if k.endswith("_token") and isinstance(t := v.get("content") if isinstance(v, dict) else v, str)}
    eos = strings.get("eos_token", "<|endoftext|>")  # transformers' GPT2Tokenizer's when none is named
    if hf.token_to_id(eos) is None:
        raise UserError(f"{directory}: eos_token {eos!r} is none of its tokens; set one in its tokenizer_config.json")
    hf.no_truncation()  # a saved truncation (GPT-2's copy in ../shared/real has one) would cut every encoding
    added = {t.content for t in hf.get_added_tokens_decoder().values()}
    hf.add_special_tokens(sorted(s for s in {eos, *strings.values()} - added if hf.token_to_id(s) is not None))
    jinja, where = config.get("chat_template"), os.path.join(directory, "chat_template.jinja")
    if isinstance(jinja, list):  # named templates: [{"name": "default", "template": ...}, ...]
        jinja = next((t.get("template") for t in jinja if isinstance(t, dict) and t.get("name") == "default"), None)
    jinja = pathlib.Path(where).read_text(encoding="utf-8") if os.path.isfile(where) else jinja  # transformers' order
    where = where if os.path.isfile(where) else os.path.join(directory, "tokenizer_config.json")
    return Tokenizer(name=tokenizer_file or directory, eos_id=hf.token_to_id(eos), hf=hf, source=directory,
                     specials={t.content: i for i, t in hf.get_added_tokens_decoder().items()},
                     chat_template=chat_format({"name": where, "jinja": jinja}, where) if jinja else None,
                     token_strings={**strings, "eos_token": eos})


def vocab_merges_tokenizer(directory: str) -> tokenizers.Tokenizer:
    """vocab.json + merges.txt built as transformers builds a GPT2Tokenizer or Qwen2Tokenizer."""
    config = _read_json(directory, "tokenizer_config.json")
    kind = config.get("tokenizer_class", "GPT2Tokenizer")
    if kind not in ("GPT2Tokenizer", "GPT2TokenizerFast", "Qwen2Tokenizer", "Qwen2TokenizerFast"):
        raise UserError(f"{directory}: vocab.json + merges.txt of a {kind}, whose pipeline nanospin does not build "
                        f"(GPT-2's and Qwen2's only); give the model's tokenizer.json")
    hf = tokenizers.Tokenizer(models.BPE.from_file(f"{directory}/vocab.json", f"{directory}/merges.txt"))
    hf.decoder = decoders.ByteLevel()
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space")))
    if kind.startswith("Qwen2"):
        hf.normalizer = normalizers.NFC()
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(tokenizers.Regex(QWEN2_PATTERN), "isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    flags = ("special", "lstrip", "rstrip", "single_word", "normalized")  # ids follow the vocabulary, as listed
    for _, t in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda item: int(item[0])):
        hf.add_tokens([AddedToken(t["content"], **{k: bool(t.get(k)) for k in flags})])
    return hf


def load_tokenizer(name_or_path: str, pattern: str | None = None) -> Tokenizer:
    """'bytes' | a tiktoken encoding | a Hugging Face directory or tokenizer.json | a tiktoken BPE file, split by
    `pattern` | a directory Tokenizer.save wrote. Every bad input is a one-line UserError."""
    path = str(name_or_path)
    try:
        files = set(os.listdir(path)) if os.path.isdir(path) else {os.path.basename(path)}
        if path == "bytes" or (not os.path.exists(path) and path in tiktoken.list_encoding_names()):
            tok = tiktoken_tokenizer(path)
        elif SAVED_TOKENIZER_FILE in files:
            meta = _read_json(path, SAVED_TOKENIZER_FILE)
            tok = tiktoken_tokenizer(os.path.join(path, "tokenizer.tiktoken"), meta["pattern"], meta["specials"]) \
                if "pattern" in meta else hf_tokenizer(path)
            tok = replace(tok, added_specials=tuple(meta.get("added_specials", ())))
        elif os.path.isfile(path) and path.endswith(".json"):
            tok = hf_tokenizer(os.path.dirname(os.path.abspath(path)), path)
        elif "tokenizer.json" in files or {"vocab.json", "merges.txt"} <= files:
            tok = hf_tokenizer(path)
        elif os.path.isfile(path) or "tokenizer.model" in files:
            tok = tiktoken_tokenizer(path if os.path.isfile(path) else os.path.join(path, "tokenizer.model"), pattern)
        else:
            names = ", ".join(tiktoken.list_encoding_names())
            raise UserError(f"tokenizer '{path}' is neither 'bytes', a tiktoken encoding ({names}) nor a folder with "
                            f"tokenizer.json, vocab.json + merges.txt, tokenizer.model or {SAVED_TOKENIZER_FILE}")
    except UserError:
        raise
    except Exception as e:  # files the libraries cannot read (tokenizers raises plain Exceptions)
        reason = (str(e).splitlines() or [""])[0][:160]
        raise UserError(f"tokenizer '{name_or_path}': cannot read it ({type(e).__name__}: {reason}); {TOKENIZER_HELP}"
                        ) from None
    if pattern is not None and (tok.hf or not os.path.exists(path)):
        raise UserError(f"tokenizer_pattern is set, but tokenizer '{name_or_path}' has its own split rules (it applies "
                        f"to tiktoken BPE files only); remove tokenizer_pattern")
    return tok
