"""Tokenizers: tiktoken runs every BPE; a small Tokenizer dataclass does what Hugging Face does around it.

Design choices:
- Byte-level BPE (tokenizer.json, vocab.json + merges.txt) is converted with rank = id and the pre-tokenizer's regex.
  A tiktoken file's regex comes from the known encoding with its sha256, else from `pattern`.
- SentencePiece-style BPE (byte_fallback; tokenizer.json, or a tokenizer.model read by hand) runs in tiktoken with
  ranks of our own order -- bytes, byte prefixes of each vocabulary character, characters, merge results -- so
  characters form before any merge, as in HF; an array maps ranks to ids, an unfinished prefix to its <0xXX> ids.
  The split regex cuts only where no merge result can cross. sentencepiece_bpe_ref is the plain merge loop it is
  tested against.
- Around the BPE, the tokenizers library's steps are redone per segment: added tokens (lstrip/rstrip/single_word/
  normalized), normalizers, and the dummy prefix ('▁' per segment for Prepend; Metaspace: always/first/never).
  encode_parts encodes a chat rendering (text, special ids) as HF encodes the joined string.
- Special-token text inside content stays text: only the chat templates (templates.py) insert control tokens.
  'bytes' and tiktoken encodings get the chat specials they lack after their vocabulary; add_special_tokens appends
  markers a template needs to any tokenizer. A Hugging Face directory's Jinja chat template is recognised by
  templates.recognise_template and rendered there.
- decode(encode(s)) == s except where the model's pipeline loses it: its normalizer, a literal '▁' (a space once
  decoded), and a leading space under Metaspace, which then adds no prefix (encode(' a') == encode('a')).
- Tokenizer.save writes what load_tokenizer needs to rebuild the same ids, added specials included (also into the
  copied tokenizer.json), so a run directory is self-contained.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import struct
import unicodedata
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import tiktoken

from configurator import UserError
from templates import recognise_template

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
# Llama-3's split regex, which is also cl100k_base's.
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+""",
])
# Llama-3's tokenizer.model holds 128000 ranks; its 256 special tokens follow, named as Meta's code does.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
                   "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|reserved_special_token_4|>", "<|eot_id|>"] + [
                   f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]
# tiktoken BPE files recognised by the sha256 of their bytes (tiktoken_ext/openai_public.py records the first four;
# Llama-3's is the published hash of Meta's tokenizer.model): name, split regex, special tokens.
KNOWN_TIKTOKEN_FILES = {
    "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930":
        ("r50k_base", GPT2_PATTERN, {"<|endoftext|>": 50256}),
    "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069":
        ("p50k_base", GPT2_PATTERN, {"<|endoftext|>": 50256}),
    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7":
        ("cl100k_base", LLAMA3_PATTERN, {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                                         "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}),
    "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d":
        ("o200k_base", O200K_PATTERN, {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}),
    "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55":
        ("llama3", LLAMA3_PATTERN, {s: 128000 + i for i, s in enumerate(LLAMA3_SPECIALS)}),
}
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>", "<|eot_id|>")
SAVED_TOKENIZER_FILE = "nanospin_tokenizer.json"
SAVED_RANKS_FILE = "tokenizer.tiktoken"
# a Hugging Face tokenizer's files, which save() copies along byte for byte (the first that exists is the one read)
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model", "vocab.json",
            "merges.txt", "special_tokens_map.json", "added_tokens.json")
TOKENIZER_HELP = ("give 'bytes', a tiktoken encoding name, a Hugging Face tokenizer directory (tokenizer.json; or "
                  "vocab.json + merges.txt), a SentencePiece tokenizer.model or a tiktoken BPE file")


# -----------------------------------------------------------------------------
# The Tokenizer, and what Hugging Face does to text around its BPE


@dataclass(frozen=True)
class AddedToken:
    """A Hugging Face added token. Special ones are inserted only by the chat templates; the others are matched in
    text as the tokenizers library matches them (on the normalized text when `normalized`)."""
    content: str
    id: int
    special: bool = True
    lstrip: bool = False  # takes the whitespace before it
    rstrip: bool = False  # takes the whitespace after it
    single_word: bool = False  # matched only between non-word characters
    normalized: bool = False


@dataclass
class TextPipeline:
    """The tokenizers library's steps around the BPE model, in its order: non-normalized added tokens split the
    text into segments; each segment is normalized (Prepend adds its dummy prefix only there); normalized added
    tokens split it again; Metaspace turns spaces into its replacement and adds the dummy prefix per its scheme."""
    # steps: ("prepend", s) | ("replace", str or re.Pattern, s) | ("strip", left, right) | ("lowercase",) | ("NFC",)...
    normalizers: tuple = ()
    metaspace: str | None = None  # the Metaspace pre-tokenizer's replacement character
    prepend_scheme: str = "never"  # when Metaspace adds its dummy prefix: 'always' | 'first' | 'never'
    space_symbol: str | None = None  # what spaces become in vocabulary pieces ('▁'); decode turns it back
    added: tuple[AddedToken, ...] = ()

    @cached_property
    def by_id(self) -> dict[int, AddedToken]:
        return {t.id: t for t in self.added}

    @cached_property
    def by_content(self) -> dict[str, AddedToken]:
        return {t.content: t for t in self.added if not t.special and not t.normalized}

    @cached_property
    def raw_added(self) -> re.Pattern | None:
        """Non-special added tokens matched on the raw text, longest first as the library's trie matches."""
        return _alternation(self.by_content)

    @cached_property
    def normalized_added(self) -> tuple[re.Pattern | None, dict[str, AddedToken]]:
        tokens = {self.normalize(t.content, True): t for t in self.added if not t.special and t.normalized}
        return _alternation(tokens), tokens

    def normalize(self, text: str, starts_segment: bool) -> str:
        for kind, *args in self.normalizers:
            if kind == "prepend":
                text = args[0] + text if starts_segment and text else text
            elif kind == "replace":
                text = args[0].sub(args[1], text) if isinstance(args[0], re.Pattern) else text.replace(*args)
            elif kind == "strip":
                text = text.lstrip() if args[0] else text
                text = text.rstrip() if args[1] else text
            elif kind == "lowercase":
                text = text.lower()
            else:
                text = unicodedata.normalize(kind, text)
        return text

    def adds_prefix(self, prev: int | str | None) -> bool:
        """Whether a segment after `prev` (None: the string's start; an id: a special token; text: more of the same
        segment) gets a dummy prefix, which decode then removes."""
        if isinstance(prev, str):
            return False
        if any(kind == "prepend" for kind, *_ in self.normalizers):
            return True
        return self.metaspace is not None and (self.prepend_scheme == "always" or
                                               self.prepend_scheme == "first" and prev is None)


def _alternation(contents) -> re.Pattern | None:
    contents = sorted(set(contents), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, contents))) if contents else None


def split_added(text: str, pattern: re.Pattern | None, tokens: dict[str, AddedToken]) -> list[str | int]:
    """text cut at added tokens as the tokenizers library cuts it: token ids between the text pieces; lstrip and
    rstrip tokens take the whitespace beside them, single_word ones match only between non-word characters."""
    if pattern is None:
        return [text]
    parts: list[str | int] = []
    done = 0  # text before this is already in parts
    for match in pattern.finditer(text):
        token, start, stop = tokens[match.group()], match.start(), match.end()
        if token.single_word and (_is_word_char(text[start - 1: start]) or _is_word_char(text[stop: stop + 1])):
            continue
        if token.lstrip:
            start = max(done, len(text[:start].rstrip()))
        if token.rstrip:
            stop = len(text) - len(text[stop:].lstrip())
        if start > done:
            parts.append(text[done:start])
        parts.append(token.id)
        done = stop
    if done < len(text):
        parts.append(text[done:])
    return parts


def _is_word_char(c: str) -> bool:
    return bool(c) and (c.isalnum() or c == "_")


@dataclass
class RankIds:
    """For tokenizers whose ids are not tiktoken's merge order (SentencePiece style): rank -> model id."""
    id_of_rank: np.ndarray  # (n_ranks,) int64; -1 for the byte prefix of an unfinished character
    byte_ids: list[int]  # (256,) the <0xXX> byte-fallback id of each byte
    prefix_bytes: dict[int, bytes]  # rank -> bytes of each character prefix
    id_bytes: list[bytes]  # (n_vocab,) what each id decodes to
    whole_words: dict[str, int] | None = None  # ignore_merges: a word found in the vocabulary is one id
    words: re.Pattern | None = None  # with ignore_merges and Metaspace(split=True): the words it splits

    def encode(self, enc: tiktoken.Encoding, text: str) -> list[int]:
        if self.whole_words is None:
            return self.ids(enc.encode_to_numpy(text, disallowed_special=()))
        words = self.words.findall(text) if self.words else [text]
        return [i for word in words for i in ([self.whole_words[word]] if word in self.whole_words
                                              else self.ids(enc.encode_to_numpy(word, disallowed_special=())))]

    def ids(self, ranks: np.ndarray) -> list[int]:
        ids = self.id_of_rank[ranks]
        if not (ids < 0).any():
            return ids.tolist()
        out: list[int] = []
        for rank, token_id in zip(ranks.tolist(), ids.tolist()):
            out += [token_id] if token_id >= 0 else [self.byte_ids[b] for b in self.prefix_bytes[rank]]
        return out


@dataclass
class Tokenizer:
    enc: tiktoken.Encoding  # runs the BPE; its ranks are the ids unless rank_ids is set
    name: str  # what load_tokenizer was given
    eos_id: int
    specials: dict[str, int]  # special (and added) token text -> id
    chat_template: str | dict | None = None  # the template recognised in a Hugging Face directory (templates.py)
    kind: str = "bpe"  # 'bytes' | 'tiktoken' (a named encoding) | 'bpe' (byte-level, ranks = ids) | 'sentencepiece'
    pipeline: TextPipeline = field(default_factory=TextPipeline)
    rank_ids: RankIds | None = None
    source_files: tuple = ()  # files copied along by save() (a SentencePiece tokenizer is rebuilt from them)
    added_specials: tuple = ()  # specials add_special_tokens put after the vocabulary its files define

    def encode(self, text: str, after: list[str | int] | tuple = ()) -> list[int]:
        """Ids of text as the tokenizers library gives them (add_special_tokens=False), special-token text kept as
        text; `after` as in encode_parts."""
        return self.encode_parts([text], after)

    def encode_parts(self, parts: list[str | int], after: list[str | int] | tuple = ()) -> list[int]:
        """Ids of a rendered string given as text (str) and special-token ids (int): those of the joined string,
        the specials matched as added tokens. `after` holds the parts before these in the same string (a
        response's prompt): text that continues a segment gets no dummy prefix, text after a special does."""
        prev = self._last(after)
        ids: list[int] = []
        text = ""
        for part in [*parts, None]:
            if isinstance(part, str):
                text += part
                continue
            if isinstance(prev, int) and self._added(prev).rstrip:
                text = text.lstrip()
            if part is not None and self._added(part).lstrip:
                text = text.rstrip()
            if text:
                ids += self._encode_text(text, prev)
            if part is None:
                return ids
            ids.append(part)
            prev, text = part, ""

    def decode(self, ids: list[int], after: list[str | int] | tuple = ()) -> str:
        """Specials decode to their text; invalid UTF-8 and ids outside the vocabulary (a model whose vocab is
        padded past n_vocab can sample them) become U+FFFD. The dummy prefix encode adds after `after` is removed."""
        ids = list(ids)
        if self.rank_ids is not None:
            table = self.rank_ids.id_bytes
            data = b"".join(table[i] if 0 <= i < len(table) else "\ufffd".encode() for i in ids)
            text = data.decode("utf-8", errors="replace")
            return text[1:] if text.startswith(" ") and self.pipeline.adds_prefix(self._last(after)) else text
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

    def special_parts(self, text: str) -> list[str | int]:
        """A chat template's own text (never content) cut at this tokenizer's special tokens, their ids between the
        text pieces."""
        parts: list[str | int] = []
        done = 0
        for match in self._special_pattern.finditer(text) if self._special_pattern else ():
            parts += [text[done:match.start()]] if match.start() > done else []
            parts.append(self.specials[match.group()])
            done = match.end()
        return parts + ([text[done:]] if done < len(text) else [])

    @cached_property
    def _special_pattern(self) -> re.Pattern | None:
        return _alternation(self.specials)

    @property
    def n_vocab(self) -> int:
        return len(self.rank_ids.id_bytes) if self.rank_ids is not None else self.enc.n_vocab

    def _added(self, token_id: int) -> AddedToken:
        return self.pipeline.by_id.get(token_id) or AddedToken("", token_id)

    def _last(self, after) -> int | str | None:
        """What the next text follows: None (the string's start), a special token's id, or text of its segment."""
        prev, text = None, ""
        for part in after:
            prev, text = (part, "") if isinstance(part, int) else (prev, text + part)
        if isinstance(prev, int) and self._added(prev).rstrip:
            text = text.lstrip()
        return text or prev

    def _encode_text(self, text: str, prev: int | str | None) -> list[int]:
        """Text between two specials: cut at non-special added tokens, each piece a segment of its own."""
        ids: list[int] = []
        for piece in split_added(text, self.pipeline.raw_added, self.pipeline.by_content):
            if isinstance(piece, int):
                ids.append(piece)
            else:
                ids += self._encode_segment(piece, prev)
            prev = piece
        return ids

    def _encode_segment(self, text: str, prev: int | str | None) -> list[int]:
        continues = isinstance(prev, str)
        text = self.pipeline.normalize(text, starts_segment=not continues)
        pattern, tokens = self.pipeline.normalized_added
        ids: list[int] = []
        for i, piece in enumerate(split_added(text, pattern, tokens)):
            if isinstance(piece, int):
                ids.append(piece)
                continue
            # the library adds Metaspace's prefix to every piece (always) or to the string's first one (first)
            prefix = (not continues or i > 0) and (self.pipeline.prepend_scheme == "always" or
                                                   self.pipeline.prepend_scheme == "first" and prev is None and i == 0)
            ids += self._bpe(piece, prefix)
        return ids

    def _bpe(self, text: str, prefix: bool) -> list[int]:
        """One normalized piece: Metaspace's replacement and dummy prefix, then the BPE model."""
        if self.rank_ids is None:
            return self.enc.encode_ordinary(text)
        space = self.pipeline.metaspace
        if space is not None:
            text = text.replace(" ", space)
            text = space + text if prefix and not text.startswith(space) else text
        return self.rank_ids.encode(self.enc, text)

    def save(self, directory: str) -> None:
        """Write what load_tokenizer(directory) needs to rebuild this same tokenizer."""
        os.makedirs(directory, exist_ok=True)
        meta = {"format": "nanospin-tokenizer-1", "kind": self.kind, "name": self.name,
                "eos_id": self.eos_id, "chat_template": self.chat_template, "added_specials": list(self.added_specials)}
        if self.kind == "bpe":
            ranks = self.enc._mergeable_ranks  # tiktoken keeps no public accessor for these
            with open(os.path.join(directory, SAVED_RANKS_FILE), "wb") as f:
                for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
                    f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
            meta.update(pat_str=self.enc._pat_str, specials=self.specials, ranks_file=SAVED_RANKS_FILE,
                        normalizers=_steps_to_json(self.pipeline.normalizers),
                        added_tokens=[vars(t) for t in self.pipeline.added])
        if self.kind == "sentencepiece":
            meta["source"] = os.path.basename(self.source_files[0])
        for src in self.source_files:
            dst = os.path.join(directory, os.path.basename(src))
            if os.path.isfile(src) and not (os.path.exists(dst) and os.path.samefile(src, dst)):
                shutil.copyfile(src, dst)
        self._add_to_tokenizer_json(directory)
        with open(os.path.join(directory, SAVED_TOKENIZER_FILE), "w") as f:
            json.dump(meta, f, indent=1, ensure_ascii=False)

    def _add_to_tokenizer_json(self, directory: str) -> None:
        """The added specials also in the copied tokenizer.json and tokenizer_config.json, so that Hugging Face's
        tokenizer of the saved directory has them too (a SentencePiece tokenizer rebuilt from it finds them there)."""
        spec_path = os.path.join(directory, "tokenizer.json")
        config_path = os.path.join(directory, "tokenizer_config.json")
        entry = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        if self.added_specials and os.path.isfile(spec_path):
            spec = _read_json(spec_path, "tokenizer.json")
            present = {t.get("content") for t in spec.get("added_tokens") or []}
            spec["added_tokens"] = (spec.get("added_tokens") or []) + [
                {"id": self.specials[s], "content": s, **entry} for s in self.added_specials if s not in present]
            with open(spec_path, "w", encoding="utf-8") as f:
                json.dump(spec, f, ensure_ascii=False)
        config = _hf_config(directory) if self.added_specials else {}
        if isinstance(config.get("added_tokens_decoder"), dict):  # transformers reads added tokens from here first
            config["added_tokens_decoder"].update({str(self.specials[s]): {"content": s, **entry}
                                                   for s in self.added_specials})
            with open(config_path, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, ensure_ascii=False)


def _steps_to_json(steps: tuple) -> list:
    return [[{"regex": a.pattern} if isinstance(a, re.Pattern) else a for a in step] for step in steps]


def _steps_from_json(steps: list) -> tuple:
    return tuple(tuple(re.compile(a["regex"]) if isinstance(a, dict) else a for a in step) for step in steps)


def add_special_tokens(tok: Tokenizer, contents) -> Tokenizer:
    """tok with the `contents` it lacks as special tokens after its vocabulary (ids n_vocab, n_vocab + 1, ...): chat
    markers a model's tokenizer lacks (ChatML's on GPT-2), for which the model's embeddings must grow."""
    new = [c for c in dict.fromkeys(contents) if c not in tok.specials]
    if not new:
        return tok
    ids = {c: tok.n_vocab + i for i, c in enumerate(new)}
    pipeline = replace(tok.pipeline, added=tok.pipeline.added + tuple(AddedToken(c, i) for c, i in ids.items()))
    enc, rank_ids = tok.enc, tok.rank_ids
    if rank_ids is not None:  # SentencePiece style: tiktoken never sees specials; decode reads id_bytes
        rank_ids = replace(rank_ids, id_bytes=rank_ids.id_bytes + [c.encode() for c in new])
    else:
        enc = tiktoken.Encoding(enc.name, pat_str=enc._pat_str, mergeable_ranks=enc._mergeable_ranks,
                                special_tokens={**enc._special_tokens, **ids})
    return replace(tok, enc=enc, specials={**tok.specials, **ids}, pipeline=pipeline, rank_ids=rank_ids,
                   added_specials=tok.added_specials + tuple(new))


# -----------------------------------------------------------------------------
# 'bytes' and tiktoken's named encodings


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


def _with_chat_specials(specials: dict[str, int], first_free: int) -> dict[str, int]:
    """specials plus the CHAT_SPECIALS they lack, numbered from first_free in CHAT_SPECIALS order."""
    specials = dict(specials)
    for s in CHAT_SPECIALS:
        if s not in specials:
            specials[s] = first_free
            first_free += 1
    return specials


def named_tokenizer(name: str) -> Tokenizer:
    """tiktoken's named encoding, with the chat specials it lacks appended after its vocabulary."""
    try:
        base = tiktoken.get_encoding(name)
    except Exception as e:  # no network and no cache: requests/OSError/hash errors all end here
        raise UserError(f"tokenizer '{name}': tiktoken could not load it ({type(e).__name__}: "
                        f"{str(e)[:160]}); {_tiktoken_cache_hint(name)}") from None
    specials = _with_chat_specials(base._special_tokens, base.n_vocab)
    enc = tiktoken.Encoding(f"nanospin_{name}", pat_str=base._pat_str,
                            mergeable_ranks=base._mergeable_ranks, special_tokens=specials)
    return Tokenizer(enc=enc, name=name, eos_id=specials["<|endoftext|>"], specials=specials,
                     kind="tiktoken")


# -----------------------------------------------------------------------------
# Hugging Face tokenizer.json: what both BPE kinds share (model, added tokens, normalizers, config)


def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, OSError) as e:  # UnicodeDecodeError is a ValueError
        raise UserError(f"{path}: cannot read {what} ({type(e).__name__}: {str(e)[:160]})") from None


def _check_bpe_model(model: dict, path: str) -> None:
    kind = model.get("type", "BPE" if "merges" in model else None)
    if kind != "BPE":
        what = {"WordPiece": "a WordPiece tokenizer (BERT style)", "WordLevel": "a WordLevel tokenizer",
                "Unigram": "a Unigram tokenizer (SentencePiece Unigram: T5, ALBERT, XLM-R)"}.get(
            kind, f"model type {kind!r}")
        raise UserError(f"{path}: {what}; nanospin reads BPE tokenizers: byte-level (GPT-2, Llama-3, Qwen2) or "
                        f"SentencePiece-style with byte_fallback (Llama-2, Mistral, Gemma)")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise UserError(f"{path}: BPE with a subword prefix/suffix (WordPiece-like) is not supported")
    if model.get("dropout"):
        raise UserError(f"{path}: BPE dropout {model['dropout']} makes its ids random; set \"dropout\": null")


def _hf_vocab_merges(model: dict, path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not all(isinstance(t, str) for t in vocab) or not all(
            isinstance(i, int) and 0 <= i < 1 << 24 for i in vocab.values()):
        raise UserError(f"{path}: model.vocab must map token strings to ids in [0, 2^24)")
    raw = model.get("merges") or []
    if not isinstance(raw, list):
        raise UserError(f"{path}: model.merges must be a list")
    merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in raw]  # "a b" (older files) or ["a", "b"]
    if set(map(len, merges)) - {2} or not all(isinstance(a, str) and isinstance(b, str) and a and b for a, b in merges):
        i = next(i for i, m in enumerate(merges) if len(m) != 2 or not all(isinstance(p, str) and p for p in m))
        raise UserError(f"{path}: model.merges[{i}] is not a pair of tokens: {raw[i]!r}")
    return vocab, merges


def _hf_added_tokens(entries, path: str) -> tuple[AddedToken, ...]:
    if not isinstance(entries, (list, type(None))):
        raise UserError(f"{path}: added_tokens must be a list")
    tokens = []
    for i, t in enumerate(entries or []):
        if not (isinstance(t, dict) and isinstance(t.get("content"), str) and t["content"]
                and isinstance(t.get("id"), int) and 0 <= t["id"] < 1 << 24):
            raise UserError(f"{path}: added_tokens[{i}] needs a non-empty string \"content\" and an id in [0, 2^24)")
        special = bool(t.get("special", False))
        tokens.append(AddedToken(t["content"], t["id"], special, bool(t.get("lstrip")), bool(t.get("rstrip")),
                                 bool(t.get("single_word")), bool(t.get("normalized", not special))))
    return tuple(tokens)


def _hf_normalizers(spec, path: str) -> tuple:
    """tokenizer.json's normalizer as TextPipeline steps."""
    if spec is None:
        return ()
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "Sequence":
        return tuple(step for s in spec.get("normalizers") or [] for step in _hf_normalizers(s, path))
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return ((kind,),)
    if kind == "Lowercase":
        return (("lowercase",),)
    if kind == "Strip":
        return (("strip", bool(spec.get("strip_left")), bool(spec.get("strip_right"))),)
    if kind == "Prepend" and isinstance(spec.get("prepend"), str):
        return (("prepend", spec["prepend"]),)
    pattern = spec.get("pattern") if kind == "Replace" else None
    if isinstance(pattern, dict) and isinstance(spec.get("content"), str):
        if isinstance(pattern.get("String"), str) and pattern["String"]:
            return (("replace", pattern["String"], spec["content"]),)
        try:  # the library's regexes are Rust's; the anchors are the one common difference
            return (("replace", re.compile(pattern["Regex"].replace(r"\z", r"\Z")), spec["content"]),)
        except (re.error, KeyError, TypeError, AttributeError):
            pass
    raise UserError(f"{path}: normalizer {json.dumps(spec)[:120]} is not supported (nanospin runs Sequence, "
                    f"Prepend, Replace, Strip, Lowercase and NFC/NFD/NFKC/NFKD)")


def _hf_files(directory: str) -> tuple[str, ...]:
    """The Hugging Face tokenizer files present in directory, which Tokenizer.save copies along."""
    return tuple(os.path.join(directory, f) for f in HF_FILES if os.path.isfile(os.path.join(directory, f)))


def _sources(path: str) -> tuple[str, ...]:
    """What save() copies for a tokenizer rebuilt from the file at path: that file first, then the others."""
    directory = os.path.dirname(os.path.abspath(path))
    return (path, *(f for f in _hf_files(directory) if os.path.basename(f) != os.path.basename(path)))


def _hf_config(directory: str) -> dict:
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    config = _read_json(path, "tokenizer_config.json")
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object; fix or remove the file")
    return config


def _hf_eos(path: str, config: dict, specials: dict[str, int]) -> int:
    eos = config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if not isinstance(eos, str) or eos not in specials:
        eos = next((s for s in EOS_CANDIDATES if s in specials), None)
    if eos is None:
        raise UserError(f"{path}: cannot tell the end-of-text token; add \"eos_token\" to "
                        f"{os.path.join(os.path.dirname(os.path.abspath(path)), 'tokenizer_config.json')}")
    return specials[eos]


def _hf_chat_template(directory: str, config: dict) -> str | None:
    jinja = config.get("chat_template")
    if isinstance(jinja, list):  # named templates: [{"name": "default", "template": ...}, ...]
        jinja = next((t.get("template") for t in jinja if isinstance(t, dict) and t.get("name") == "default"), None)
    path = os.path.join(directory, "chat_template.jinja")
    if not jinja and os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            jinja = f.read()
    return recognise_template(jinja if isinstance(jinja, str) else None)


def hf_tokenizer(path: str) -> Tokenizer:
    """A Hugging Face tokenizer.json (and the tokenizer_config.json beside it): byte-level or SentencePiece-style
    BPE."""
    spec = _read_json(path, "tokenizer.json")
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        if isinstance(spec, dict) and spec and all(isinstance(v, int) for v in spec.values()):
            raise UserError(f"{path}: this is a vocab.json (token -> id), not a tokenizer.json; pass the directory "
                            f"holding it and merges.txt, or the model's tokenizer.json")
        raise UserError(f"{path}: not a Hugging Face tokenizer.json (no \"model\" object); {TOKENIZER_HELP}")
    model = spec["model"]
    _check_bpe_model(model, path)
    directory = os.path.dirname(os.path.abspath(path))
    config = _hf_config(directory)
    added = _hf_added_tokens(spec.get("added_tokens"), path)
    normalizers = _hf_normalizers(spec.get("normalizer"), path)
    vocab, merges = _hf_vocab_merges(model, path)
    specials = {t.content: t.id for t in added}
    common = dict(name=path, specials=specials, chat_template=_hf_chat_template(directory, config))
    if _is_byte_level(spec.get("pre_tokenizer")):
        enc = byte_level_encoding(path, vocab, merges, _hf_pattern(spec.get("pre_tokenizer"), path), specials)
        return Tokenizer(enc=enc, eos_id=_hf_eos(path, config, specials), **common,
                         pipeline=TextPipeline(normalizers=normalizers, added=added), source_files=_hf_files(directory))
    if not model.get("byte_fallback"):
        raise UserError(f"{path}: BPE with neither a ByteLevel pre-tokenizer nor byte_fallback: characters outside "
                        f"its vocabulary would become <unk>; nanospin reads byte-level or byte_fallback BPE")
    metaspace, scheme, split = _hf_metaspace(spec.get("pre_tokenizer"), path, normalizers)
    space = metaspace or next((a[1] for kind, *a in normalizers if kind == "replace" and a[0] == " "), None)
    text = TextPipeline(normalizers, metaspace, scheme, space, added)
    enc, rank_ids = sentencepiece_encoding(path, vocab, merges, text, split, bool(model.get("ignore_merges")))
    return Tokenizer(enc=enc, eos_id=_hf_eos(path, config, specials), **common, kind="sentencepiece", pipeline=text,
                     rank_ids=rank_ids, source_files=_sources(path))


# -----------------------------------------------------------------------------
# Hugging Face byte-level BPE: tiktoken runs it with rank = id


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


def _pre_tokenizer_steps(pre) -> list[dict]:
    steps = [] if pre is None else (pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre])
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        raise TypeError(f"pre_tokenizer steps must be objects, got {steps!r:.80}")
    return steps


def _is_byte_level(pre) -> bool:
    return any(s.get("type") == "ByteLevel" for s in _pre_tokenizer_steps(pre))


def _hf_pattern(pre: dict | None, where: str) -> str:
    """The one regex equivalent to a tokenizer.json pre-tokenizer (the forms GPT-2, Llama-3, Qwen2
    and SmolLM use)."""
    def bytelevel(p: dict) -> bool:
        if p.get("add_prefix_space"):
            raise UserError(f"{where}: ByteLevel pre-tokenizer with add_prefix_space=true is not "
                            f"supported; set it to false in tokenizer.json if the model allows")
        return p.get("use_regex", True)

    steps = _pre_tokenizer_steps(pre)
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
                    f"can convert (ByteLevel; Split+ByteLevel; Digits+ByteLevel)")


def _byte_level_ranks(path: str, vocab: dict[str, int], merges: list[tuple[str, str]],
                      added_ids: dict[str, int]) -> dict[bytes, int]:
    """tiktoken ranks of a byte-level BPE model (the 256 bytes and every merge result, rank = id)."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}

    def as_bytes(text: str) -> bytes | None:
        return bytes(byte_of[c] for c in text) if all(c in byte_of for c in text) else None

    tokens: dict[bytes, int] = {}
    for text, token_id in vocab.items():
        token = as_bytes(text)
        if token is None and added_ids.get(text) != token_id:
            raise UserError(f"{path}: vocab token {text!r} is not in byte-level form; nanospin reads "
                            f"byte-level BPE tokenizers only")
        if token is not None:
            tokens[token] = token_id
    missing = [b for b in range(256) if bytes([b]) not in tokens]
    if missing:
        raise UserError(f"{path}: the vocab lacks {len(missing)} of the 256 single-byte tokens "
                        f"(e.g. byte {missing[0]}); train it with the ByteLevel initial alphabet")

    # tiktoken merges by the rank of the merged token, HF by the merge's position: the two agree when
    # merge results have non-decreasing ids in merge order; the ranks are the bytes and merge results.
    ranks = {bytes([b]): tokens[bytes([b])] for b in range(256)}
    last_id = -1
    for i, (left, right) in enumerate(merges):
        result = as_bytes(left + right)
        if result not in tokens:
            raise UserError(f"{path}: merge {i} ({left!r} {right!r}) makes a token missing from the vocab")
        if tokens[result] < last_id:
            raise UserError(f"{path}: merge {i} ({left!r} {right!r}) makes id {tokens[result]} after a "
                            f"merge that made id {last_id}: ids are not in merge order, so this "
                            f"tokenizer cannot be run by tiktoken with ids equal to Hugging Face's")
        last_id = ranks[result] = tokens[result]
    special_ids = set(added_ids.values())
    unreachable = [t for t, i in tokens.items() if t not in ranks and i not in special_ids]
    if unreachable:
        raise UserError(f"{path}: {len(unreachable)} multi-byte vocab tokens (e.g. {unreachable[0]!r}) are "
                        f"made by no merge; this tokenizer is not plain byte-level BPE")
    return ranks


def _encoding(path: str, pattern: str, ranks: dict[bytes, int], specials: dict[str, int]) -> tiktoken.Encoding:
    if len(set(ranks.values())) < len(ranks) or set(ranks.values()) & set(specials.values()):
        raise UserError(f"{path}: two tokens share an id")
    try:
        return tiktoken.Encoding(f"nanospin_{os.path.basename(os.path.dirname(os.path.abspath(path)))}",
                                 pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    except Exception as e:  # the regex engines differ: say which pattern tiktoken refused
        raise UserError(f"{path}: tiktoken rejects the split regex {pattern[:200]!r}: {str(e)[:200]}") from None


def byte_level_encoding(path: str, vocab: dict[str, int], merges: list[tuple[str, str]], pattern: str,
                        specials: dict[str, int]) -> tiktoken.Encoding:
    return _encoding(path, pattern, _byte_level_ranks(path, vocab, merges, specials), specials)


# -----------------------------------------------------------------------------
# SentencePiece-style BPE (byte_fallback): tiktoken runs it with ranks of our own order, mapped to the model's ids


def _hf_metaspace(pre, path: str, normalizers: tuple) -> tuple[str | None, str, bool]:
    """(replacement, prepend_scheme, split) of a Metaspace pre-tokenizer; (None, 'never', False) without one.
    A Split on a string the normalizer replaces everywhere splits nothing (Gemma's on ' ', after ' ' -> '▁')."""
    def splits_nothing(step: dict) -> bool:
        s = (step.get("pattern") or {}).get("String") if step.get("type") == "Split" else None
        return isinstance(s, str) and bool(s) and s not in TextPipeline(normalizers).normalize(f"a{s}b{s}", True)

    steps = [step for step in _pre_tokenizer_steps(pre) if not splits_nothing(step)]
    if not steps:
        return None, "never", False
    if len(steps) == 1 and steps[0].get("type") == "Metaspace":
        spec = steps[0]
        # files older than `prepend_scheme` say add_prefix_space; `split` defaults to true in the library
        scheme = spec.get("prepend_scheme") or ("always" if spec.get("add_prefix_space", True) else "never")
        replacement = spec.get("replacement", "▁")
        if scheme in ("always", "first", "never") and isinstance(replacement, str) and len(replacement) == 1:
            return replacement, scheme, bool(spec.get("split", True))
    raise UserError(f"{path}: pre-tokenizer {json.dumps(pre)[:160]} is not one nanospin runs with byte_fallback BPE "
                    f"(none, or Metaspace with a one-character replacement and prepend_scheme always/first/never)")


def _char_class(chars) -> str:
    """The inside of a regex character class matching exactly `chars`, as ranges of \\x{...} escapes."""
    points = sorted(ord(c) for c in chars)
    ranges = []
    for i, point in enumerate(points):
        if i == 0 or points[i - 1] != point - 1:
            start = point
        if i + 1 == len(points) or points[i + 1] != point + 1:
            ranges.append(f"\\x{{{start:x}}}" + (f"-\\x{{{point:x}}}" if point != start else ""))
    return "".join(ranges)


def sentencepiece_split_pattern(results, space: str, split: bool) -> str:
    """A split regex that cuts only where the library cuts (before each `space` when Metaspace splits) or where no
    merge result can cross: around characters no merge uses, and before a run of `space` when no merge result
    has `space` after another character (SentencePiece's split_by_whitespace)."""
    merged = {c for token in results for c in token}
    letters = _char_class(merged - {space})
    s = _char_class({space})
    if not letters:
        return r"[\s\S]"
    if split:
        return f"{s}[{letters}]*|[{letters}]+|[^{letters}]"
    if not any(space in token.lstrip(space) for token in results):
        return f"{s}+[{letters}]*|[{letters}]+|[^{letters}]"
    return f"[{_char_class(merged)}]+|[^{_char_class(merged)}]"


def sentencepiece_encoding(path: str, vocab: dict[str, int], merges: list[tuple[str, str]], text: TextPipeline,
                           split: bool, ignore_merges: bool) -> tuple[tiktoken.Encoding, RankIds]:
    """tiktoken ranks for a byte_fallback BPE: the 256 bytes (an ASCII character's byte is that character), the
    byte prefixes of each multi-byte vocabulary character, those characters, then merge results in merge order."""
    byte_ids = [vocab.get(f"<0x{b:02X}>") for b in range(256)]
    if None in byte_ids:
        missing = [f"<0x{b:02X}>" for b in range(256) if byte_ids[b] is None]
        raise UserError(f"{path}: byte_fallback needs the 256 tokens <0x00>..<0xFF>; the vocab lacks {len(missing)} "
                        f"(e.g. {missing[0]})")
    added_ids = {t.id for t in text.added}
    chars = {t: i for t, i in vocab.items() if len(t) == 1 and i not in added_ids}
    ranks = {bytes([b]): b for b in range(256)}
    id_of_rank = [chars.get(chr(b), byte_ids[b]) if b < 128 else byte_ids[b] for b in range(256)]
    prefixes = sorted({c.encode()[:k] for c in chars for k in range(2, len(c.encode()))})
    prefix_bytes = {256 + k: prefix for k, prefix in enumerate(prefixes)}
    for rank, prefix in prefix_bytes.items():
        ranks[prefix] = rank
        id_of_rank.append(-1)
    for c in sorted(chars, key=chars.get):
        if len(c.encode()) > 1:
            ranks[c.encode()] = len(ranks)
            id_of_rank.append(chars[c])
    made = [left + right for left, right in merges]
    if not vocab.keys() >= {t for pair in merges for t in pair}.union(made):
        i, missing = next((i, t) for i, pair in enumerate(merges) for t in (*pair, made[i]) if t not in vocab)
        raise UserError(f"{path}: merge {i} {merges[i]} uses {missing!r}, which is not in the vocab")
    results = list(dict.fromkeys(made))  # each merge result once, in merge order
    first = len(ranks)
    ranks.update((t.encode(), first + k) for k, t in enumerate(results))
    id_of_rank += [vocab[t] for t in results]
    space = text.space_symbol or "▁"
    pattern = sentencepiece_split_pattern(results, space, split)
    enc = _encoding(path, pattern, ranks, {})
    id_bytes = ["\ufffd".encode()] * (max([*vocab.values(), *added_ids]) + 1)
    for token, token_id in vocab.items():
        id_bytes[token_id] = token.replace(text.space_symbol or " ", " ").encode()
    for b, token_id in enumerate(byte_ids):
        id_bytes[token_id] = bytes([b])
    for t in text.added:
        id_bytes[t.id] = t.content.encode()
    s = re.escape(space)
    words = re.compile(f"{s}[^{s}]*|[^{s}]+") if split else None  # the library's words: each '▁' starts one
    return enc, RankIds(np.array(id_of_rank, dtype=np.int64), byte_ids, prefix_bytes, id_bytes,
                        whole_words=dict(vocab) if ignore_merges else None, words=words)


def sentencepiece_bpe_ref(word: str, vocab: dict[str, int], merge_rank: dict[tuple[str, str], int]) -> list[int]:
    """The plain reference for the tiktoken path: Hugging Face's byte_fallback BPE on one word. Start from the
    characters (one outside the vocabulary becomes its <0xXX> byte tokens, which no merge uses), then merge the
    adjacent pair of lowest merge index, the leftmost of equals, until no pair is a merge."""
    symbols = []
    for c in word:
        symbols += [c] if c in vocab else [f"<0x{b:02X}>" for b in c.encode()]
    while len(symbols) > 1:
        pairs = [(merge_rank.get((a, b), len(merge_rank)), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(merge_rank):
            break
        symbols[i: i + 2] = [symbols[i] + symbols[i + 1]]
    return [vocab[s] for s in symbols]


# -----------------------------------------------------------------------------
# A bare SentencePiece tokenizer.model: the protobuf wire format read by hand

SP_MODEL_TYPES = {1: "Unigram", 2: "BPE", 3: "word", 4: "char"}
SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_USER_DEFINED = 1, 2, 3, 4  # sentencepiece_model.proto piece types


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]  # IndexError when the data is cut short
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError(f"varint longer than 10 bytes at byte {pos}")


def protobuf_fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message: varints as ints, length-delimited and fixed-width fields as
    their bytes. ValueError/IndexError on anything that is not the wire format."""
    fields, pos = [], 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0 or wire not in (0, 1, 2, 5):
            raise ValueError(f"field {number} of wire type {wire} at byte {pos}")
        if wire == 0:
            value, pos = _varint(data, pos)
        else:
            size, pos = (8, pos) if wire == 1 else (4, pos) if wire == 5 else _varint(data, pos)
            value, pos = data[pos: pos + size], pos + size
            if pos > len(data):
                raise ValueError(f"field {number} runs past the end of the data")
        fields.append((number, value))
    return fields


def read_sentencepiece_model(path: str) -> tuple[list[tuple[str, float, int]], dict, dict]:
    """(pieces as (text, score, type), trainer spec, normalizer spec) of a SentencePiece model file; the specs map
    sentencepiece_model.proto's field numbers to values (TrainerSpec: model_type 3, byte_fallback 35, eos_id 42;
    NormalizerSpec: precompiled_charsmap 2, add_dummy_prefix 3, remove_extra_whitespaces 4, escape_whitespaces 5)."""
    with open(path, "rb") as f:
        data = f.read()
    pieces, trainer, normalizer = [], {}, {}
    try:
        for number, value in protobuf_fields(data):
            if number == 1:
                piece = dict(protobuf_fields(value))
                score = struct.unpack("<f", piece.get(2, bytes(4)))[0]
                pieces.append((piece[1].decode("utf-8"), score, int(piece.get(3, SP_NORMAL))))
            elif number in (2, 3):
                (trainer if number == 2 else normalizer).update(protobuf_fields(value))
    except (ValueError, IndexError, KeyError, TypeError, AttributeError, struct.error) as e:
        raise UserError(f"{path}: neither a tiktoken BPE file nor a SentencePiece model ({type(e).__name__}: "
                        f"{str(e)[:120]}); {TOKENIZER_HELP}") from None
    if not pieces:
        raise UserError(f"{path}: a SentencePiece model with no pieces; {TOKENIZER_HELP}")
    return pieces, trainer, normalizer


def _sentencepiece_model_text(normalizer: dict, config: dict, specials: tuple[AddedToken, ...]) -> TextPipeline:
    """The pipeline transformers builds for a SentencePiece model without tokenizer.json: the dummy prefix as a
    Prepend to every segment when tokenizer_config.json's `legacy` is true (or absent), else Metaspace 'first'."""
    prefix = bool(normalizer.get(3, 1)) and config.get("add_prefix_space", True) is not False
    legacy = config.get("legacy", True) is not False
    steps: list[tuple] = []
    if normalizer.get(4, 1):  # remove_extra_whitespaces: SentencePiece trims and collapses spaces only
        steps += [("replace", re.compile(r"\A +| +\Z"), ""), ("replace", re.compile(" {2,}"), " ")]
    space = "▁" if normalizer.get(5, 1) else None
    if prefix and legacy:
        steps.append(("prepend", "▁"))
    if space and (legacy or not prefix):
        steps.append(("replace", " ", space))
    metaspace = space if prefix and not legacy else None
    return TextPipeline(tuple(steps), metaspace, "first" if metaspace else "never", space, specials)


def sentencepiece_model_tokenizer(path: str) -> Tokenizer:
    """A SentencePiece BPE tokenizer.model with byte_fallback, converted as transformers converts one: its merges are
    every split of a normal piece into two normal pieces, ordered by the piece's score; control and unknown pieces
    (<s>, </s>, <unk>) are the special tokens."""
    pieces, trainer, normalizer = read_sentencepiece_model(path)
    model_type = trainer.get(3, 1)
    if model_type != 2:
        raise UserError(f"{path}: a SentencePiece {SP_MODEL_TYPES.get(model_type, model_type)} model; nanospin reads "
                        f"SentencePiece BPE models with byte_fallback, and byte-level BPE")
    if not trainer.get(35):
        raise UserError(f"{path}: a SentencePiece BPE model without byte_fallback (characters outside its vocabulary "
                        f"would become <unk>); nanospin reads byte_fallback ones")
    if normalizer.get(2):
        raise UserError(f"{path}: its normalization rules (precompiled_charsmap) are not ones nanospin runs")
    user_defined = [p for p, _, kind in pieces if kind == SP_USER_DEFINED]
    if user_defined:
        raise UserError(f"{path}: {len(user_defined)} user-defined pieces (e.g. {user_defined[0]!r}) that nanospin "
                        f"does not read from tokenizer.model; provide the model's tokenizer.json")
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    normal = {p: (score, i) for i, (p, score, kind) in enumerate(pieces) if kind == SP_NORMAL}
    ranked = sorted((-score, i, p[:k], p[k:]) for p, (score, i) in normal.items()
                    for k in range(1, len(p)) if p[:k] in normal and p[k:] in normal)
    specials = tuple(AddedToken(p, i) for i, (p, _, kind) in enumerate(pieces) if kind in (SP_UNKNOWN, SP_CONTROL))
    directory = os.path.dirname(os.path.abspath(path))
    config = _hf_config(directory)
    text = _sentencepiece_model_text(normalizer, config, specials)
    enc, rank_ids = sentencepiece_encoding(path, vocab, [(left, right) for *_, left, right in ranked], text,
                                           split=False, ignore_merges=False)
    special_ids = {t.content: t.id for t in specials}
    eos_id = trainer.get(42, 2)
    if "eos_token" not in config and 0 <= eos_id < len(pieces):
        config = {**config, "eos_token": pieces[eos_id][0]}
    return Tokenizer(enc=enc, name=path, eos_id=_hf_eos(path, config, special_ids), specials=special_ids,
                     chat_template=_hf_chat_template(directory, config), kind="sentencepiece", pipeline=text,
                     rank_ids=rank_ids, source_files=_sources(path))


# -----------------------------------------------------------------------------
# tiktoken BPE files, vocab.json + merges.txt, directories written by Tokenizer.save, and the one entry point


def read_tiktoken_ranks(path: str, data: bytes | None = None) -> dict[bytes, int]:
    """A tiktoken BPE file: one 'base64(token) rank' per line."""
    if data is None:
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
            raise UserError(f"{path}:{lineno}: not a tiktoken BPE file (expected 'base64 rank' lines)") from None
    if not ranks:
        raise UserError(f"{path}: empty tiktoken BPE file")
    if not all(0 <= r < 1 << 24 for r in ranks.values()) or len(set(ranks.values())) < len(ranks):
        raise UserError(f"{path}: tiktoken ranks must be distinct and in [0, 2^24)")
    return ranks


def tiktoken_file_tokenizer(path: str, pattern: str | None = None) -> Tokenizer:
    """A tiktoken BPE file. The file holds no split regex: it comes from the known encoding whose sha256 the file
    has (KNOWN_TIKTOKEN_FILES), else from `pattern`. The chat specials it lacks follow its ranks."""
    with open(path, "rb") as f:
        data = f.read()
    ranks = read_tiktoken_ranks(path, data)
    digest = hashlib.sha256(data).hexdigest()
    name, known_pattern, specials = KNOWN_TIKTOKEN_FILES.get(digest, (None, None, {}))
    if pattern is None and known_pattern is None:
        raise UserError(f"{path}: a tiktoken BPE file ({len(ranks)} ranks, sha256 {digest[:16]}...) that is none of "
                        f"r50k_base, p50k_base, cl100k_base, o200k_base or Llama-3's tokenizer.model, and the file "
                        f"holds no split regex: set tokenizer_pattern to the regex it was made with")
    if name != "llama3":  # Llama-3 has its own chat specials
        specials = _with_chat_specials(specials, max([*ranks.values(), *specials.values()]) + 1)
    enc = _encoding(path, pattern or known_pattern, ranks, specials)
    eos = "<|end_of_text|>" if name == "llama3" else "<|endoftext|>"
    return Tokenizer(enc=enc, name=path, eos_id=specials[eos], specials=specials,
                     chat_template="llama3" if name == "llama3" else None)


def vocab_merges_tokenizer(directory: str, pattern: str | None = None) -> Tokenizer:
    """GPT-2's original pair of files, vocab.json and merges.txt: byte-level BPE with GPT-2's split regex (unless
    `pattern` or tokenizer_config.json's tokenizer_class says otherwise); tokens no merge makes are its specials."""
    vocab_path, merges_path = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    vocab, _ = _hf_vocab_merges({"vocab": _read_json(vocab_path, "vocab.json")}, vocab_path)
    merges = []
    with open(merges_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f.read().split("\n"), 1):
            if not line or (lineno == 1 and line.startswith("#version")):
                continue
            pair = line.split(" ")
            if len(pair) != 2 or not all(pair):
                raise UserError(f"{merges_path}:{lineno}: expected two tokens separated by one space, "
                                f"got {line[:60]!r}")
            merges.append((pair[0], pair[1]))
    config = _hf_config(directory)
    tokenizer_class = config.get("tokenizer_class")
    if pattern is None and tokenizer_class not in (None, "GPT2Tokenizer", "GPT2TokenizerFast"):
        raise UserError(f"{directory}: vocab.json + merges.txt of a {tokenizer_class}, whose split regex nanospin does "
                        f"not know; provide the model's tokenizer.json or set tokenizer_pattern")
    if config.get("add_prefix_space"):
        raise UserError(f"{directory}: tokenizer_config.json sets add_prefix_space, which nanospin does not support")
    results = {left + right for left, right in merges}
    byte_chars = set(bytes_to_unicode().values())
    specials = {t: i for t, i in vocab.items() if t not in results and t not in byte_chars}
    enc = byte_level_encoding(vocab_path, vocab, merges, pattern or GPT2_PATTERN, specials)
    return Tokenizer(enc=enc, name=directory, eos_id=_hf_eos(vocab_path, config, specials), specials=specials,
                     chat_template=_hf_chat_template(directory, config), source_files=_hf_files(directory))


def saved_tokenizer(directory: str) -> Tokenizer:
    """A directory written by Tokenizer.save."""
    meta = _read_json(os.path.join(directory, SAVED_TOKENIZER_FILE), SAVED_TOKENIZER_FILE)
    if meta.get("kind") == "bytes":
        tok = bytes_tokenizer()
    elif meta.get("kind") == "tiktoken":
        tok = named_tokenizer(meta["name"])
    elif meta.get("kind") == "sentencepiece":
        source = os.path.join(directory, meta["source"])
        tok = hf_tokenizer(source) if source.endswith(".json") else sentencepiece_model_tokenizer(source)
        tok.name, tok.eos_id, tok.chat_template = directory, int(meta["eos_id"]), meta.get("chat_template")
    else:
        ranks = read_tiktoken_ranks(os.path.join(directory, meta["ranks_file"]))
        specials = {k: int(v) for k, v in meta["specials"].items()}
        enc = _encoding(os.path.join(directory, SAVED_TOKENIZER_FILE), meta["pat_str"], ranks, specials)
        added = tuple(AddedToken(**t) for t in meta.get("added_tokens", ()))
        added += tuple(AddedToken(s, specials[s], special=False) for s in meta.get("added_text_tokens", ()))  # older
        normalizers = _steps_from_json(meta.get("normalizers", [["NFC"]] if meta.get("normalization") else []))
        tok = Tokenizer(enc=enc, name=directory, eos_id=int(meta["eos_id"]), specials=specials,
                        chat_template=meta.get("chat_template"), source_files=_hf_files(directory),
                        pipeline=TextPipeline(normalizers=normalizers, added=added))
    added_specials = tuple(meta.get("added_specials", ()))
    # kinds rebuilt from their files or names get them again, with the same ids
    return replace(add_special_tokens(tok, added_specials), added_specials=added_specials)


def _model_file_tokenizer(path: str, pattern: str | None) -> Tokenizer:
    """A tokenizer.model or other non-JSON file: a tiktoken BPE file (text lines) or a SentencePiece model."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head.strip():
        raise UserError(f"{path}: empty file; {TOKENIZER_HELP}")
    if re.match(rb"\s*[A-Za-z0-9+/]+=* \d+\r?\n", head):
        return tiktoken_file_tokenizer(path, pattern)
    _no_pattern(path, pattern)
    return sentencepiece_model_tokenizer(path)


def _no_pattern(name: str, pattern: str | None) -> None:
    if pattern is not None:
        raise UserError(f"tokenizer_pattern is set, but tokenizer '{name}' has its own split rules (it applies to "
                        f"tiktoken BPE files and vocab.json + merges.txt only); remove tokenizer_pattern")


def _load_tokenizer(name_or_path: str, pattern: str | None) -> Tokenizer:
    if name_or_path == "bytes" or (not os.path.exists(name_or_path)
                                   and name_or_path in tiktoken.list_encoding_names()):
        _no_pattern(name_or_path, pattern)
        return bytes_tokenizer() if name_or_path == "bytes" else named_tokenizer(name_or_path)
    if os.path.isdir(name_or_path):
        files = set(os.listdir(name_or_path))
        path = lambda name: os.path.join(name_or_path, name)  # noqa: E731
        if SAVED_TOKENIZER_FILE in files:
            return saved_tokenizer(name_or_path)
        if "tokenizer.json" in files:
            _no_pattern(name_or_path, pattern)
            return hf_tokenizer(path("tokenizer.json"))
        if "tokenizer.model" in files:
            return _model_file_tokenizer(path("tokenizer.model"), pattern)
        if {"vocab.json", "merges.txt"} <= files:
            return vocab_merges_tokenizer(name_or_path, pattern)
        half = (" (it has only one of vocab.json and merges.txt, which go together)"
                if {"vocab.json", "merges.txt"} & files else "")
        raise UserError(f"tokenizer directory '{name_or_path}' has no tokenizer.json, tokenizer.model, vocab.json + "
                        f"merges.txt or {SAVED_TOKENIZER_FILE}{half}; {TOKENIZER_HELP}")
    if os.path.isfile(name_or_path):
        base = os.path.basename(name_or_path)
        if base in ("vocab.json", "merges.txt"):
            raise UserError(f"{name_or_path}: one half of a GPT-2-style vocab.json + merges.txt pair; pass the "
                            f"directory holding both, or the model's tokenizer.json")
        if base in ("tokenizer_config.json", "special_tokens_map.json", "config.json", "generation_config.json"):
            raise UserError(f"{name_or_path}: a configuration file, not a tokenizer; pass the directory holding it "
                            f"and tokenizer.json")
        if base.endswith(".json"):
            _no_pattern(name_or_path, pattern)
            return hf_tokenizer(name_or_path)
        return _model_file_tokenizer(name_or_path, pattern)
    raise UserError(f"tokenizer '{name_or_path}' is neither a file, a directory, 'bytes' nor a tiktoken encoding "
                    f"({', '.join(tiktoken.list_encoding_names())})")


def load_tokenizer(name_or_path: str, pattern: str | None = None) -> Tokenizer:
    """'bytes' | a tiktoken encoding name | a Hugging Face directory or tokenizer.json (byte-level or SentencePiece-
    style BPE) | a directory of vocab.json + merges.txt | a SentencePiece BPE tokenizer.model | a tiktoken BPE file |
    a directory written by Tokenizer.save. `pattern`: the split regex of a tiktoken BPE file that is no known
    encoding (or of a vocab.json + merges.txt pair that is not GPT-2's). Every bad input is a one-line UserError."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise UserError(f"tokenizer must be a name or a path, got {name_or_path!r}; {TOKENIZER_HELP}")
    try:
        return _load_tokenizer(name_or_path, pattern)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError, RecursionError) as e:
        # the converters check what a real file gets wrong; this catches what junk gets wrong
        raise UserError(f"tokenizer '{name_or_path}': cannot read it ({type(e).__name__}: {str(e)[:160]}); "
                        f"{TOKENIZER_HELP}") from None
