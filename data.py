"""Data: tokenizers, chat templates, chat datasets, SPIN batches and the synthetic demo task.

Design choices:
- Every tokenizer is a tiktoken Encoding: 'bytes' (offline, 256 bytes + chat specials), tiktoken's
  named encodings, Hugging Face byte-level BPE (tokenizer.json converted: rank = id, regex from the
  pre-tokenizer; ids equal the `tokenizers` library's) and tiktoken BPE files (Llama-3 tokenizer.model).
- Special-token text inside content stays text: only the templates insert control tokens.
- A response ENDS WITH its end-of-turn token, so loss and log-probs cover it; collate's targets mask
  exactly the response tokens (end-of-turn included; prompt and padding are -100).
- Bad records raise UserError naming file:line; truncation and skips are counted, never silent.
- BatchOrder shards a global order that does not depend on world_size: 2 ranks == 1 rank x 2 batch.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import math
import os
import random
import re
import shutil
import unicodedata
from dataclasses import dataclass, field

import numpy as np
import tiktoken
import torch

from configurator import UserError

# -----------------------------------------------------------------------------
# Tokenizers

# Special tokens of every chat template, in id order after the 256 bytes of the 'bytes' tokenizer
# (and after the vocabulary of tiktoken's named encodings, for those they lack).
CHAT_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|system|>", "<|user|>",
    "<|assistant|>", "</s>",
)
# The files tiktoken downloads for its named encodings, for the error message when it cannot.
TIKTOKEN_URLS = {
    "gpt2": ["https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
             "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"],
    "r50k_base": ["https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"],
    "p50k_base": ["https://openaipublic.blob.core.windows.net/encodings/p50k_base.tiktoken"],
    "cl100k_base": ["https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"],
    "o200k_base": ["https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"],
}
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-2's pattern run on the pieces of a Digits(individual_digits) pre-tokenizer (SmolLM): a digit is
# a piece of its own, and whitespace before a digit ends its piece, so it must not wait for a non-space.
DIGITS_GPT2_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# Llama-3's tokenizer.model holds 128000 ranks; its 256 special tokens follow, named as Meta's code does.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
                   "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|reserved_special_token_4|>", "<|eot_id|>"] + [
                   f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>", "<|eot_id|>")
SAVED_TOKENIZER_FILE = "nanospin_tokenizer.json"
SAVED_RANKS_FILE = "tokenizer.tiktoken"
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@dataclass
class Tokenizer:
    enc: tiktoken.Encoding
    name: str  # what load_tokenizer was given
    eos_id: int
    specials: dict[str, int]  # special token text -> id
    chat_template: str | None = None  # the template recognised in a Hugging Face directory
    kind: str = "bpe"  # 'bytes' | 'tiktoken' (a named encoding) | 'bpe' (anything rebuilt from ranks)
    normalization: str | None = None  # 'NFC' when the Hugging Face tokenizer normalizes so
    added_text_tokens: frozenset = frozenset()  # HF added tokens that are not special: matched in text, as HF does
    source_files: tuple = ()  # Hugging Face files copied along by save()

    def encode(self, text: str) -> list[int]:
        if self.normalization:
            text = unicodedata.normalize(self.normalization, text)
        return self.enc.encode(text, allowed_special=self.added_text_tokens, disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        """Specials decode to their text; invalid UTF-8 and ids outside the vocabulary (a model whose
        vocab is padded past n_vocab can sample them) become U+FFFD."""
        ids = list(ids)
        try:
            return self.enc.decode(ids, errors="replace")
        except KeyError:
            pieces = []
            for i in ids:
                try:
                    pieces.append(self.enc.decode_single_token_bytes(i))
                except KeyError:
                    pieces.append("\ufffd".encode())
            return b"".join(pieces).decode("utf-8", errors="replace")

    @property
    def n_vocab(self) -> int:
        return self.enc.n_vocab

    def save(self, directory: str) -> None:
        """Write what load_tokenizer(directory) needs to rebuild this same tokenizer."""
        os.makedirs(directory, exist_ok=True)
        meta = {"format": "nanospin-tokenizer-1", "kind": self.kind, "name": self.name,
                "eos_id": self.eos_id, "chat_template": self.chat_template}
        if self.kind == "bpe":
            ranks = self.enc._mergeable_ranks  # tiktoken keeps no public accessor for these
            with open(os.path.join(directory, SAVED_RANKS_FILE), "wb") as f:
                for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
                    f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
            meta.update(pat_str=self.enc._pat_str, specials=self.specials, ranks_file=SAVED_RANKS_FILE,
                        normalization=self.normalization,
                        added_text_tokens=sorted(self.added_text_tokens))
            for src in self.source_files:
                dst = os.path.join(directory, os.path.basename(src))
                if os.path.isfile(src) and not (os.path.exists(dst) and os.path.samefile(src, dst)):
                    shutil.copyfile(src, dst)
        with open(os.path.join(directory, SAVED_TOKENIZER_FILE), "w") as f:
            json.dump(meta, f, indent=1, ensure_ascii=False)


def bytes_tokenizer() -> Tokenizer:
    """256 single-byte tokens then CHAT_SPECIALS: no merges, so any pattern covering all text works."""
    ranks = {bytes([b]): b for b in range(256)}
    specials = {s: 256 + i for i, s in enumerate(CHAT_SPECIALS)}
    enc = tiktoken.Encoding("nanospin_bytes", pat_str=r"[\s\S]{1,256}", mergeable_ranks=ranks,
                            special_tokens=specials)
    return Tokenizer(enc=enc, name="bytes", eos_id=specials["<|endoftext|>"], specials=specials,
                     kind="bytes")


def _tiktoken_cache_hint(name: str) -> str:
    urls = TIKTOKEN_URLS.get(name, [])
    files = ", ".join(f"{url} saved as {hashlib.sha1(url.encode()).hexdigest()}" for url in urls)
    where = f" ({files})" if files else ""
    return (f"download its file(s) on a machine with network{where} into a folder and set "
            f"TIKTOKEN_CACHE_DIR to that folder, or pass a Hugging Face tokenizer directory instead")


def named_tokenizer(name: str) -> Tokenizer:
    """tiktoken's named encoding, with the chat specials it lacks appended after its vocabulary."""
    try:
        base = tiktoken.get_encoding(name)
    except Exception as e:  # no network and no cache: requests/OSError/hash errors all end here
        raise UserError(f"tokenizer '{name}': tiktoken could not load it ({type(e).__name__}: "
                        f"{str(e)[:160]}); {_tiktoken_cache_hint(name)}") from None
    specials = dict(base._special_tokens)
    next_id = base.n_vocab
    for s in CHAT_SPECIALS:
        if s not in specials:
            specials[s] = next_id
            next_id += 1
    enc = tiktoken.Encoding(f"nanospin_{name}", pat_str=base._pat_str,
                            mergeable_ranks=base._mergeable_ranks, special_tokens=specials)
    return Tokenizer(enc=enc, name=name, eos_id=specials["<|endoftext|>"], specials=specials,
                     kind="tiktoken")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, as used in byte-level BPE vocab files."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _hf_pattern(pre: dict | None, where: str) -> str:
    """The one regex equivalent to a tokenizer.json pre-tokenizer (the forms GPT-2, Llama-3, Qwen2
    and SmolLM use)."""
    def bytelevel(p: dict) -> bool:
        if p.get("add_prefix_space"):
            raise UserError(f"{where}: ByteLevel pre-tokenizer with add_prefix_space=true is not "
                            f"supported; set it to false in tokenizer.json if the model allows")
        return p.get("use_regex", True)

    steps = [] if pre is None else (pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre])
    types = [s.get("type") for s in steps]
    if types == ["ByteLevel"] and bytelevel(steps[0]):
        return GPT2_PATTERN
    if types == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and bytelevel(steps[1]):
        return DIGITS_GPT2_PATTERN
    if types == ["Split", "ByteLevel"] and not bytelevel(steps[1]):
        split = steps[0]
        if split.get("behavior") != "Isolated" or split.get("invert"):
            raise UserError(f"{where}: Split pre-tokenizer with behavior={split.get('behavior')} "
                            f"invert={split.get('invert')} is not supported (only Isolated, not inverted)")
        pattern = split.get("pattern", {})
        return pattern["Regex"] if "Regex" in pattern else re.escape(pattern.get("String", ""))
    raise UserError(f"{where}: pre-tokenizer {types or None} is not a byte-level BPE form nanospin "
                    f"can convert (ByteLevel; Split+ByteLevel; Digits+ByteLevel); SentencePiece-style "
                    f"tokenizers are not supported")


def _hf_config(directory: str) -> dict:
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: cannot read it ({e}); fix or remove the file") from None


def recognise_template(jinja: str | None) -> str | None:
    """Which of our templates a Hugging Face chat_template (Jinja text) renders, if recognisable."""
    if not jinja:
        return None
    if "<|im_start|>" in jinja:
        return "chatml"
    if "<|start_header_id|>" in jinja:
        return "llama3"
    if "<|user|>" in jinja and "<|assistant|>" in jinja:
        return "zephyr"
    return None


def _hf_chat_template(directory: str, config: dict) -> str | None:
    jinja = config.get("chat_template")
    if isinstance(jinja, list):  # named templates: [{"name": "default", "template": ...}, ...]
        jinja = next((t.get("template") for t in jinja if t.get("name") == "default"), None)
    path = os.path.join(directory, "chat_template.jinja")
    if not jinja and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            jinja = f.read()
    return recognise_template(jinja if isinstance(jinja, str) else None)


def hf_tokenizer(path: str) -> Tokenizer:
    """Convert a Hugging Face byte-level BPE tokenizer.json (and the tokenizer_config.json beside it)."""
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: cannot read tokenizer.json ({e})") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = model.get("type") if model.get("type") != "BPE" else "BPE with byte_fallback"
        raise UserError(f"{path}: a {kind} tokenizer (SentencePiece style) is not byte-level BPE; "
                        f"nanospin reads byte-level BPE tokenizers (GPT-2, Llama-3, Qwen2, SmolLM)")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise UserError(f"{path}: BPE with subword prefix/suffix is not byte-level BPE")
    pattern = _hf_pattern(spec.get("pre_tokenizer"), path)
    normalizer = spec.get("normalizer")
    normalization = None
    if normalizer is not None:
        if normalizer.get("type") != "NFC":
            raise UserError(f"{path}: normalizer {normalizer.get('type')} is not supported (only none or NFC)")
        normalization = "NFC"

    added = spec.get("added_tokens") or []
    added_ids = {t["content"]: t["id"] for t in added}
    byte_of = {c: b for b, c in bytes_to_unicode().items()}

    def as_bytes(text: str) -> bytes | None:
        return bytes(byte_of[c] for c in text) if all(c in byte_of for c in text) else None

    vocab: dict[bytes, int] = {}
    for text, token_id in model.get("vocab", {}).items():
        token = as_bytes(text)
        if token is None and added_ids.get(text) != token_id:
            raise UserError(f"{path}: vocab token {text!r} is not in byte-level form; nanospin reads "
                            f"byte-level BPE tokenizers only")
        if token is not None:
            vocab[token] = token_id
    missing = [b for b in range(256) if bytes([b]) not in vocab]
    if missing:
        raise UserError(f"{path}: the vocab lacks {len(missing)} of the 256 single-byte tokens "
                        f"(e.g. byte {missing[0]}); train it with the ByteLevel initial alphabet")

    # tiktoken merges by the rank of the merged token, HF by the merge's position: the two agree when
    # merge results have non-decreasing ids in merge order; the ranks are the bytes and merge results.
    ranks = {bytes([b]): vocab[bytes([b])] for b in range(256)}
    last_id = -1
    for i, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        result = as_bytes(left + right)
        if result not in vocab:
            raise UserError(f"{path}: merge {i} ({left!r} {right!r}) makes a token missing from the vocab")
        if vocab[result] < last_id:
            raise UserError(f"{path}: merge {i} ({left!r} {right!r}) makes id {vocab[result]} after a "
                            f"merge that made id {last_id}: ids are not in merge order, so this "
                            f"tokenizer cannot be run by tiktoken with ids equal to Hugging Face's")
        last_id = ranks[result] = vocab[result]
    special_ids = set(added_ids.values())
    unreachable = [t for t, i in vocab.items() if t not in ranks and i not in special_ids]
    if unreachable:
        raise UserError(f"{path}: {len(unreachable)} multi-byte vocab tokens (e.g. {unreachable[0]!r}) are "
                        f"made by no merge; this tokenizer is not plain byte-level BPE")
    try:
        enc = tiktoken.Encoding(f"nanospin_hf_{os.path.basename(os.path.dirname(os.path.abspath(path)))}",
                                pat_str=pattern, mergeable_ranks=ranks, special_tokens=added_ids)
    except Exception as e:  # the regex engines differ: say which pattern tiktoken refused
        raise UserError(f"{path}: tiktoken rejects the pre-tokenizer regex {pattern!r}: {e}") from None

    directory = os.path.dirname(os.path.abspath(path))
    config = _hf_config(directory)
    eos = config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos not in added_ids:
        eos = next((s for s in EOS_CANDIDATES if s in added_ids), None)
    if eos is None:
        raise UserError(f"{path}: cannot tell the end-of-text token; add \"eos_token\" to "
                        f"{os.path.join(directory, 'tokenizer_config.json')}")
    sources = tuple(os.path.join(directory, f) for f in HF_FILES if os.path.isfile(os.path.join(directory, f)))
    plain_added = frozenset(t["content"] for t in added if not t.get("special"))
    return Tokenizer(enc=enc, name=path, eos_id=added_ids[eos], specials=added_ids,
                     chat_template=_hf_chat_template(directory, config), normalization=normalization,
                     added_text_tokens=plain_added, source_files=sources)


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """A tiktoken BPE file: one 'base64(token) rank' per line."""
    with open(path, "rb") as f:
        data = f.read()
    ranks = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            hint = (" (this looks like a SentencePiece model, which nanospin does not read; use a "
                    "byte-level BPE tokenizer)" if b"\x00" in data[:4096] else "")
            raise UserError(f"{path}:{lineno}: not a tiktoken BPE file (expected 'base64 rank' "
                            f"lines){hint}") from None
    if not ranks:
        raise UserError(f"{path}: empty tiktoken BPE file")
    return ranks


def tiktoken_file_tokenizer(path: str) -> Tokenizer:
    """A tiktoken BPE file. 128000 ranks is Llama-3's tokenizer.model (its regex and 256 specials);
    any other gets Llama-3's regex and the chat specials after its ranks."""
    ranks = read_tiktoken_ranks(path)
    first = max(ranks.values()) + 1
    names = LLAMA3_SPECIALS if len(ranks) == 128000 else list(CHAT_SPECIALS)
    specials = {s: first + i for i, s in enumerate(names)}
    enc = tiktoken.Encoding(f"nanospin_file_{os.path.basename(path)}", pat_str=LLAMA3_PATTERN,
                            mergeable_ranks=ranks, special_tokens=specials)
    eos = "<|end_of_text|>" if len(ranks) == 128000 else "<|endoftext|>"
    return Tokenizer(enc=enc, name=path, eos_id=specials[eos], specials=specials,
                     chat_template="llama3" if len(ranks) == 128000 else None)


def saved_tokenizer(directory: str) -> Tokenizer:
    """A directory written by Tokenizer.save."""
    path = os.path.join(directory, SAVED_TOKENIZER_FILE)
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("kind") == "bytes":
        return bytes_tokenizer()
    if meta.get("kind") == "tiktoken":
        return named_tokenizer(meta["name"])
    ranks = read_tiktoken_ranks(os.path.join(directory, meta["ranks_file"]))
    specials = {k: int(v) for k, v in meta["specials"].items()}
    enc = tiktoken.Encoding(f"nanospin_saved_{os.path.basename(os.path.abspath(directory))}",
                            pat_str=meta["pat_str"], mergeable_ranks=ranks, special_tokens=specials)
    sources = tuple(os.path.join(directory, f) for f in HF_FILES if os.path.isfile(os.path.join(directory, f)))
    return Tokenizer(enc=enc, name=directory, eos_id=int(meta["eos_id"]), specials=specials,
                     chat_template=meta.get("chat_template"), normalization=meta.get("normalization"),
                     added_text_tokens=frozenset(meta.get("added_text_tokens", [])), source_files=sources)


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """'bytes' | a tiktoken encoding name | a Hugging Face directory or tokenizer.json | a tiktoken BPE
    file | a directory written by Tokenizer.save."""
    if name_or_path == "bytes":
        return bytes_tokenizer()
    if not os.path.exists(name_or_path) and name_or_path in tiktoken.list_encoding_names():
        return named_tokenizer(name_or_path)
    if os.path.isdir(name_or_path):
        if os.path.isfile(os.path.join(name_or_path, SAVED_TOKENIZER_FILE)):
            return saved_tokenizer(name_or_path)
        if os.path.isfile(os.path.join(name_or_path, "tokenizer.json")):
            return hf_tokenizer(os.path.join(name_or_path, "tokenizer.json"))
        if os.path.isfile(os.path.join(name_or_path, "tokenizer.model")):
            return tiktoken_file_tokenizer(os.path.join(name_or_path, "tokenizer.model"))
        raise UserError(f"tokenizer directory '{name_or_path}' has no tokenizer.json, tokenizer.model "
                        f"or {SAVED_TOKENIZER_FILE}")
    if os.path.isfile(name_or_path):
        if name_or_path.endswith(".json"):
            return hf_tokenizer(name_or_path)
        return tiktoken_file_tokenizer(name_or_path)
    raise UserError(f"tokenizer '{name_or_path}' is neither a file, a directory, 'bytes' nor a tiktoken "
                    f"encoding ({', '.join(tiktoken.list_encoding_names())})")


# -----------------------------------------------------------------------------
# Chat templates: a turn is a list of parts, text (str) or special-token ids (int); adjacent texts are
# encoded together so BPE sees the same strings a Hugging Face template would give it.

TEMPLATES = ("chatml", "llama3", "zephyr", "plain")
ROLES = ("system", "user", "assistant")


def _check_template(tok: Tokenizer, template: str) -> None:
    if template not in TEMPLATES:
        raise UserError(f"unknown chat_template '{template}'; choose one of {', '.join(TEMPLATES)}")
    needs = {"chatml": ["<|im_start|>", "<|im_end|>"],
             "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    missing = [s for s in needs.get(template, []) if s not in tok.specials]
    if missing:
        raise UserError(f"chat_template '{template}' needs special tokens {missing} that tokenizer "
                        f"'{tok.name}' lacks; choose a template it supports (e.g. 'plain')")


def end_of_turn_id(tok: Tokenizer, template: str) -> int:
    _check_template(tok, template)
    name = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "zephyr": "</s>"}.get(template)
    return tok.specials.get(name, tok.eos_id) if name else tok.eos_id


def _header(tok: Tokenizer, template: str, role: str) -> list[str | int]:
    sp = tok.specials
    if template == "chatml":
        return [sp["<|im_start|>"], f"{role}\n"]
    if template == "llama3":
        return [sp["<|start_header_id|>"], role, sp["<|end_header_id|>"], "\n\n"]
    if template == "zephyr":  # role markers stay text for tokenizers that lack them, as in zephyr itself
        return [sp.get(f"<|{role}|>", f"<|{role}|>"), "\n"]
    return [f"{role.capitalize()}: "]


def _turn(tok: Tokenizer, template: str, role: str, content: str) -> list[str | int]:
    eot = end_of_turn_id(tok, template)
    if template == "llama3":  # Llama-3's own template trims every message
        return _header(tok, template, role) + [content.strip(), eot]
    if template == "plain" and role != "assistant":  # plain ends only assistant turns with eos
        return _header(tok, template, role) + [content + "\n"]
    return _header(tok, template, role) + [content, eot, "\n"]


def _encode_parts(tok: Tokenizer, parts: list[str | int]) -> list[int]:
    ids: list[int] = []
    text = ""
    for part in parts:
        if isinstance(part, int):
            ids += tok.encode(text) + [part]
            text = ""
        else:
            text += part
    return ids + tok.encode(text)


def _check_messages(messages: list[dict]) -> None:
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise UserError(f"message {i}: unknown role {m.get('role')!r} (use {', '.join(ROLES)})")
        if not isinstance(m.get("content"), str):
            raise UserError(f"message {i}: content must be a string")


def render_prompt(tok: Tokenizer, messages: list[dict], template: str) -> list[int]:
    """The conversation so far (no final assistant turn), ending with the assistant header."""
    _check_template(tok, template)
    _check_messages(messages)
    parts = [tok.specials["<|begin_of_text|>"]] if template == "llama3" else []
    for m in messages:
        parts += _turn(tok, template, m["role"], m["content"])
    return _encode_parts(tok, parts + _header(tok, template, "assistant"))


def render_response(tok: Tokenizer, text: str, template: str) -> list[int]:
    """The assistant's content followed by the end-of-turn token (part of what the model learns)."""
    content = text.strip() if template == "llama3" else text
    return tok.encode(content) + [end_of_turn_id(tok, template)]


def stop_ids(tok: Tokenizer, template: str) -> list[int]:
    """Ids that end a generated turn: the template's end-of-turn and the tokenizer's eos."""
    return sorted({end_of_turn_id(tok, template), tok.eos_id})


def strip_stop(tok: Tokenizer, ids: list[int], template: str) -> list[int]:
    """The response ids before the first stop id (what follows a stop is not part of the turn)."""
    stops = set(stop_ids(tok, template))
    ids = list(ids)
    for i, token in enumerate(ids):
        if token in stops:
            return ids[:i]
    return ids


def resolve_template(tok: Tokenizer, template: str) -> str:
    """'auto' -> the template recognised for the tokenizer, else chatml if it has its tokens, else plain."""
    if template != "auto":
        _check_template(tok, template)
        return template
    if tok.chat_template:
        return tok.chat_template
    return "chatml" if {"<|im_start|>", "<|im_end|>"} <= tok.specials.keys() else "plain"


# -----------------------------------------------------------------------------
# Datasets


@dataclass
class Example:
    prompt_ids: list[int]
    real_ids: list[int]  # ends with the end-of-turn token unless truncated
    source: str  # "file:line" or "synthetic:i"
    prompt_messages: list[dict]  # the conversation without the final assistant turn
    real_text: str
    generated_ids: list[int] | None = None  # from the official SPIN format, when present


@dataclass
class DataStats:
    n_read: int = 0  # records read, valid or not
    n_invalid_skipped: int = 0
    n_prompt_truncated: int = 0
    n_response_truncated: int = 0  # real responses cut (they lose their end-of-turn)
    n_dropped: int = 0  # prompt left no room for a response
    n_generated_truncated: int = 0  # SPIN-format generated responses cut
    source: str = ""
    skipped_reasons: list[str] = field(default_factory=list)  # the first few, for the log

    @property
    def n_examples(self) -> int:
        return self.n_read - self.n_invalid_skipped - self.n_dropped

    def summary(self) -> str:
        text = (f"{self.source}: {self.n_examples} examples from {self.n_read} records; "
                f"{self.n_invalid_skipped} invalid skipped, {self.n_prompt_truncated} prompts truncated "
                f"(kept their end), {self.n_response_truncated} responses truncated, "
                f"{self.n_dropped} dropped (no room for a response)")
        if self.n_generated_truncated:
            text += f", {self.n_generated_truncated} generated responses truncated"
        if self.skipped_reasons:
            text += f"; first skipped: {self.skipped_reasons[0]}"
        return text


class InvalidRecord(Exception):
    """A malformed record; becomes a UserError with file:line, or a skip with skip_invalid=True."""


def truncate(prompt_ids: list[int], response_ids: list[int], max_len: int,
             max_prompt_len: int) -> tuple[list[int], list[int]] | None:
    """The official SPIN collator's rule: keep the prompt's END up to max_prompt_len, cut the
    response to what is left of max_len; None when no response token fits."""
    prompt_ids = prompt_ids[-max_prompt_len:]
    room = max_len - len(prompt_ids)
    if room < 1:
        return None
    return prompt_ids, response_ids[:room]


def _messages(value, what: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise InvalidRecord(f"'{what}' must be a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise InvalidRecord(f"{what}[{i}] must be an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise InvalidRecord(f"{what}[{i}]: unknown role {m.get('role')!r} (use {', '.join(ROLES)})")
        if not isinstance(m.get("content"), str):
            raise InvalidRecord(f"{what}[{i}]: content must be a string, got {type(m.get('content')).__name__}")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRecord(f"{what}[{i}]: content is not valid Unicode (a lone surrogate escape)") from None
    if value[-1]["role"] != "assistant":
        raise InvalidRecord(f"'{what}' has no assistant turn at the end (last role is "
                            f"'{value[-1]['role']}'): the last message must be the response")
    if not any(m["role"] == "user" for m in value[:-1]):
        raise InvalidRecord(f"'{what}' has no user message before the assistant's response")
    return [{"role": m["role"], "content": m["content"]} for m in value]


NEMO_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


def record_conversation(record) -> tuple[list[dict], str | None]:
    """(messages ending with the real response, generated response text or None) of one record in
    any supported format; raises InvalidRecord."""
    if not isinstance(record, dict):
        raise InvalidRecord(f"a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages, generated = _messages(record["messages"], "messages"), None
    elif "real" in record:
        messages, generated = _messages(record["real"], "real"), None
        if record.get("generated") is not None:
            gen = record["generated"]
            if not isinstance(gen, list) or not gen or not isinstance(gen[-1], dict):
                raise InvalidRecord("'generated' must be a non-empty list of messages")
            if not isinstance(gen[-1].get("content"), str) or gen[-1].get("role") != "assistant":
                raise InvalidRecord("'generated' must end with an assistant message with string content")
            prompt = [{"role": m.get("role"), "content": m.get("content")} for m in gen[:-1] if isinstance(m, dict)]
            if prompt != messages[:-1]:
                raise InvalidRecord("'generated' has a different prompt from 'real'")
            generated = gen[-1]["content"]
    elif "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise InvalidRecord("'conversations' must be a list of {\"from\", \"value\"} objects")
        system = record.get("system")
        if system is not None and not isinstance(system, str):
            raise InvalidRecord(f"'system' must be a string, got {type(system).__name__}")
        converted = [{"role": "system", "content": system}] if system else []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or not isinstance(t.get("from"), str):
                raise InvalidRecord(f"conversations[{i}] must be an object with 'from' and 'value'")
            role = NEMO_ROLES.get(t["from"].lower())
            if role is None:
                raise InvalidRecord(f"conversations[{i}]: unknown speaker {t['from']!r} (use User, Assistant or System)")
            if not isinstance(t.get("value"), str):
                raise InvalidRecord(f"conversations[{i}]: value must be a string, got {type(t.get('value')).__name__}")
            converted.append({"role": role, "content": t["value"]})
        messages, generated = _messages(converted, "conversations"), None
    else:
        raise InvalidRecord(f"unrecognised record with keys {sorted(record)[:6]}: expected 'messages' "
                            f"(OpenAI/UltraChat), 'real' (SPIN) or 'conversations' (NeMo)")
    if not messages[-1]["content"].strip():
        raise InvalidRecord("empty assistant response")
    return messages, generated


def _jsonl_records(path: str, data: bytes):
    """(line, record or None, reason or None) per non-blank line."""
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, None, f"not valid UTF-8 (byte {e.start}); save the file as UTF-8"
            continue
        try:
            yield lineno, json.loads(text), None
        except ValueError as e:
            yield lineno, None, f"bad JSON ({e})"


def _json_list_records(path: str, data: bytes):
    """(line, record, None) per element of a .json list; a broken file cannot be skipped past."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8; save the file as UTF-8") from None
    decoder, pos = json.JSONDecoder(), 0
    ws = re.compile(r"\s*")

    def skip(p: int) -> int:
        return ws.match(text, p).end()

    def fail(p: int, reason: str):
        raise UserError(f"{path}:{text.count(chr(10), 0, p) + 1}: {reason}; a .json file must be one "
                        f"valid JSON list (use .jsonl to be able to skip bad lines)")

    pos = skip(pos)
    if not text.startswith("[", pos):
        fail(pos, "expected a JSON list of records")
    pos = skip(pos + 1)
    if text.startswith("]", pos):
        return
    while True:
        try:
            record, end = decoder.raw_decode(text, pos)
        except ValueError as e:
            fail(getattr(e, "pos", pos), f"bad JSON ({e})")
        yield text.count("\n", 0, pos) + 1, record, None
        pos = skip(end)
        if text.startswith("]", pos):
            return
        if not text.startswith(",", pos):
            fail(pos, "expected ',' or ']' between records")
        pos = skip(pos + 1)


def _tokenize(conversations, tok: Tokenizer, template: str, max_len: int, max_prompt_len: int,
              skip_invalid: bool, stats: DataStats) -> list[Example]:
    """Validate, render and truncate (source, record-or-messages, read-error) triples."""
    if max_len < 2 or max_prompt_len < 1:
        raise UserError(f"max_len ({max_len}) must be >= 2 and max_prompt_len ({max_prompt_len}) >= 1")
    _check_template(tok, template)
    examples = []
    for source, record, error in conversations:
        stats.n_read += 1
        try:
            if error is not None:
                raise InvalidRecord(error)
            messages, generated = record_conversation(record)
        except InvalidRecord as e:
            if not skip_invalid:
                raise UserError(f"{source}: {e}; fix the record or set skip_invalid=True to skip bad records") from None
            stats.n_invalid_skipped += 1
            if len(stats.skipped_reasons) < 5:
                stats.skipped_reasons.append(f"{source}: {e}")
            continue
        prompt_ids = render_prompt(tok, messages[:-1], template)
        real_ids = render_response(tok, messages[-1]["content"], template)
        cut = truncate(prompt_ids, real_ids, max_len, max_prompt_len)
        if cut is None:
            stats.n_dropped += 1
            continue
        stats.n_prompt_truncated += len(cut[0]) < len(prompt_ids)
        stats.n_response_truncated += len(cut[1]) < len(real_ids)
        generated_ids = None
        if generated is not None:
            full = render_response(tok, generated, template)
            generated_ids = full[: max_len - len(cut[0])]
            stats.n_generated_truncated += len(generated_ids) < len(full)
        examples.append(Example(prompt_ids=cut[0], real_ids=cut[1], source=source,
                                prompt_messages=messages[:-1], real_text=messages[-1]["content"],
                                generated_ids=generated_ids))
    return examples


def load_examples(path: str, tok: Tokenizer, template: str, max_len: int, max_prompt_len: int,
                  skip_invalid: bool = False) -> tuple[list[Example], DataStats]:
    """Read a .jsonl (or .json list) chat dataset into tokenized, truncated examples."""
    if not os.path.isfile(path):
        raise UserError(f"data file '{path}' not found (check the data path in your config)")
    with open(path, "rb") as f:
        data = f.read()
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data  # a UTF-8 byte-order mark is harmless
    reader = _json_list_records if path.endswith(".json") else _jsonl_records
    records = ((f"{path}:{line}", record, error) for line, record, error in reader(path, data))
    stats = DataStats(source=path)
    examples = _tokenize(records, tok, template, max_len, max_prompt_len, skip_invalid, stats)
    if not examples:
        raise UserError(f"{path}: no usable examples ({stats.summary()})")
    return examples, stats


def examples_from_messages(convs: list[list[dict]], tok: Tokenizer, template: str, max_len: int,
                           max_prompt_len: int, source: str = "synthetic") -> tuple[list[Example], DataStats]:
    """Conversations in memory (each a messages list ending with the assistant's response)."""
    records = ((f"{source}:{i}", {"messages": conv}, None) for i, conv in enumerate(convs))
    stats = DataStats(source=source)
    return _tokenize(records, tok, template, max_len, max_prompt_len, False, stats), stats


def write_jsonl(path: str, convs: list[list[dict]]) -> None:
    """Conversations as OpenAI-format .jsonl (e.g. the synthetic task under data/)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for conv in convs:
            f.write(json.dumps({"messages": conv}, ensure_ascii=False) + "\n")


# -----------------------------------------------------------------------------
# Batches


def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, targets), both (B, T) int64 with T = longest prompt+response - 1.
    targets are -100 except where the next token is a response token (end-of-turn included)."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"collate needs as many prompts as responses (got {len(prompts)}, {len(responses)})")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("collate: an empty prompt leaves nothing to predict the first response token from")
    T = max(len(p) + len(r) for p, r in zip(prompts, responses)) - 1
    input_ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)  # (B, T)
    targets = torch.full((len(prompts), T), -100, dtype=torch.long)  # (B, T)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        seq = torch.tensor(p + r, dtype=torch.long)
        input_ids[b, : len(seq) - 1] = seq[:-1]
        # position t predicts seq[t + 1]: response tokens are predicted from positions len(p)-1 on
        targets[b, len(p) - 1 : len(seq) - 1] = seq[len(p):]
    return input_ids, targets


@dataclass
class BatchOrder:
    """Indices of this rank's next batch. Global batch i of an epoch is permutation(seed, epoch)
    [i*G : (i+1)*G] with G = batch_size * world_size (wrapping to the start when drop_last is False);
    rank r takes its r-th contiguous slice, so the global stream does not depend on world_size."""
    n: int
    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    drop_last: bool = True
    epoch: int = 0
    position: int = 0  # batches already consumed in this epoch

    def __post_init__(self):
        if self.batch_size < 1 or self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise UserError(f"bad batch layout: batch_size={self.batch_size}, rank={self.rank}, "
                            f"world_size={self.world_size}")
        if self.n < 1 or self.batches_per_epoch() < 1:
            raise UserError(f"the dataset has {self.n} examples, fewer than one global batch "
                            f"(batch_size {self.batch_size} x {self.world_size} ranks); lower batch_size "
                            f"or use more data")
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.n // self.global_batch_size
        return math.ceil(self.n / self.global_batch_size)

    def permutation(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._cached[1]

    def global_batch(self, epoch: int, index: int) -> list[int]:
        """All ranks' indices of global batch `index` of `epoch`."""
        start = index * self.global_batch_size
        positions = (start + np.arange(self.global_batch_size)) % self.n  # (G,)
        return self.permutation(epoch)[positions].tolist()

    def next_batch(self) -> list[int]:
        if self.position >= self.batches_per_epoch():
            self.epoch, self.position = self.epoch + 1, 0
        batch = self.global_batch(self.epoch, self.position)
        self.position += 1
        return batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict:
        return {"n": self.n, "global_batch_size": self.global_batch_size, "seed": self.seed,
                "drop_last": self.drop_last, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("n", "global_batch_size", "seed", "drop_last"):
            if state[key] != mine[key]:
                raise UserError(f"cannot resume the data order: the checkpoint has {key}={state[key]} but "
                                f"this run has {mine[key]}; resume with the same data, seed and "
                                f"batch_size x world_size")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# -----------------------------------------------------------------------------
# Synthetic task: "5 distinct 2-digit numbers, digits 1479" -> "47 91 14 79 44". Each prompt has many
# valid answers (k-permutations of the 9 or 16 numbers its digits make) and the real answer is a
# uniform draw among them, so samples rarely equal it and the checker scores any sample. Using only
# the prompt's digits is copying, which a tiny transformer learns; distinctness needs it to look back
# at its own answer, which SFT leaves half-learned (repeats at temperature 1): room for SPIN.
# Measured on the quick demo's model (4x128 llama, bytes + chatml, batch 32, lr 2e-3, one seed): 750
# SFT steps gave 31% valid at temperature 1 (digits 68%, distinct 46%), 22% greedy, and no sample
# equal to its real answer; numeric ranges ("even numbers from 15 to 54", increasing or in any
# order) stayed at 1-6% valid after 500 steps: comparing numbers is learned slowly.

SYNTHETIC_COUNTS = (3, 4, 5, 6)
DIGIT_SET_SIZES = (3, 4)
PROMPT_RE = re.compile(r"(\d+) distinct 2-digit numbers, digits ([1-9]+)")
ANSWER_RE = re.compile(r"\d+( \d+)*")


def synthetic_specs() -> list[tuple[int, str]]:
    """Every (k, digits) prompt of the task, in a fixed order."""
    digit_sets = ["".join(c) for size in DIGIT_SET_SIZES for c in itertools.combinations("123456789", size)]
    return [(k, digits) for k in SYNTHETIC_COUNTS for digits in digit_sets]


def synthetic_prompt(spec: tuple[int, str]) -> str:
    k, digits = spec
    return f"{k} distinct 2-digit numbers, digits {digits}"


def _synthetic_answer(rng: random.Random, spec) -> str:
    k, digits = spec
    pool = [a + b for a in digits for b in digits]
    return " ".join(rng.sample(pool, k))


def _conversations(rng: random.Random, specs: list) -> list[list[dict]]:
    return [[{"role": "user", "content": synthetic_prompt(spec)},
             {"role": "assistant", "content": _synthetic_answer(rng, spec)}] for spec in specs]


def synthetic_conversations(n: int, seed: int) -> list[list[dict]]:
    """n [user, assistant] conversations (prompts drawn with repetition), the same for the same seed."""
    rng = random.Random(seed)
    specs = synthetic_specs()
    return _conversations(rng, [rng.choice(specs) for _ in range(n)])


def synthetic_split(seed: int, n_train: int, n_val: int) -> tuple[list[list[dict]], list[list[dict]]]:
    """Train and held-out conversations: the n_val held-out prompts are distinct and none is a train
    prompt (train prompts repeat, with different answers)."""
    specs = synthetic_specs()
    if not 0 <= n_val <= len(specs) // 2:
        raise UserError(f"synthetic_val={n_val}: the synthetic task has {len(specs)} distinct prompts; "
                        f"hold out at most {len(specs) // 2} so training keeps the rest")
    rng = random.Random(seed)
    rng.shuffle(specs)
    val_specs, train_specs = specs[:n_val], specs[n_val:]
    val = _conversations(rng, val_specs)
    train = _conversations(rng, [rng.choice(train_specs) for _ in range(n_train)])
    return train, val


def check_answer(prompt_text: str, answer_text: str) -> dict[str, float]:
    """Score an answer to a synthetic prompt (the user message, or any text containing it):
    'valid' is 1 only if every criterion holds; the others say which ones do."""
    matches = PROMPT_RE.findall(prompt_text)
    if not matches:
        raise ValueError(f"not a synthetic-task prompt: {prompt_text!r}")
    k, digits = int(matches[-1][0]), set(matches[-1][1])
    scores = {"format": 0.0, "count": 0.0, "digits": 0.0, "distinct": 0.0}
    if ANSWER_RE.fullmatch(answer_text):
        numbers = answer_text.split(" ")
        scores["format"] = 1.0
        scores["count"] = float(len(numbers) == k)
        scores["digits"] = float(all(len(x) == 2 and set(x) <= digits for x in numbers))
        scores["distinct"] = float(len(set(numbers)) == len(numbers))
    scores["valid"] = float(all(v == 1.0 for v in scores.values()))
    return scores
