"""Tokenizers: every one is a tiktoken Encoding wrapped in a small Tokenizer dataclass.

Design choices:
- 'bytes' is offline: 256 single-byte tokens, then the chat specials. tiktoken's named encodings get the
  chat specials they lack appended after their vocabulary.
- Hugging Face byte-level BPE (tokenizer.json) is converted, not run: rank = id, the regex comes from the
  pre-tokenizer, and the ids equal the `tokenizers` library's. tiktoken BPE files (Llama-3's
  tokenizer.model) are read as ranks. SentencePiece-style tokenizers are refused with a clear error.
- Special-token text inside content stays text: only the chat templates (data.py) insert control tokens.
  A Hugging Face directory's Jinja chat template is recognised here (by its special tokens), rendered there.
- Tokenizer.save writes what load_tokenizer needs to rebuild the same ids, so a run directory is self-contained.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import unicodedata
from dataclasses import dataclass

import tiktoken

from configurator import UserError

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
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
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


# -----------------------------------------------------------------------------
# The Tokenizer, 'bytes' and tiktoken's named encodings


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


# -----------------------------------------------------------------------------
# Hugging Face byte-level BPE (tokenizer.json, tokenizer_config.json)


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


def _hf_files(directory: str) -> tuple[str, ...]:
    """The Hugging Face tokenizer files present in directory, which Tokenizer.save copies along."""
    return tuple(os.path.join(directory, f) for f in HF_FILES if os.path.isfile(os.path.join(directory, f)))


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


def _hf_ranks(path: str, model: dict, added_ids: dict[str, int]) -> dict[bytes, int]:
    """tiktoken ranks of a byte-level BPE model (the 256 bytes and every merge result, rank = id)."""
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
    return ranks


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
    ranks = _hf_ranks(path, model, added_ids)
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
    plain_added = frozenset(t["content"] for t in added if not t.get("special"))
    return Tokenizer(enc=enc, name=path, eos_id=added_ids[eos], specials=added_ids,
                     chat_template=_hf_chat_template(directory, config), normalization=normalization,
                     added_text_tokens=plain_added, source_files=_hf_files(directory))


# -----------------------------------------------------------------------------
# tiktoken BPE files, directories written by Tokenizer.save, and the one entry point


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
    return Tokenizer(enc=enc, name=directory, eos_id=int(meta["eos_id"]), specials=specials,
                     chat_template=meta.get("chat_template"), normalization=meta.get("normalization"),
                     added_text_tokens=frozenset(meta.get("added_text_tokens", [])), source_files=_hf_files(directory))


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
