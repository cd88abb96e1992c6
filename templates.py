"""Chat templates: a chat format stated as data, and how a conversation becomes token ids with it.

Design choices:
- A chat format is a ChatFormat: the text that starts and ends each role's turn, the special token that ends an
  assistant turn (its end-of-turn: the last token of every response, so loss and log-probs cover it), an optional
  BOS, default system prompt and stripping of content. The named templates are four instances of it; a config's
  `chat_template` may be a dict of the same fields, alone or over a named `base`.
- A template's own text is read with the tokenizer's special tokens as single ids ('{eos}' is the tokenizer's end of
  text); message content is encoded as text, so special-token text inside it never becomes a control token.
- A response is its content, the text the format puts before the end-of-turn, and the end-of-turn. Where
  assistant_end lacks the end-of-turn (NeMo's formats end a turn with the next turn's start), the response ends
  with it all the same, as NeMo's SPIN trains it.
- Markers a format must have as single tokens are its `new_tokens`: train.py adds those a tokenizer lacks (ChatML's
  on GPT-2) and grows the model's embeddings. Other marker text a tokenizer lacks stays text (zephyr's <|user|>).
- A model's Jinja template is recognised, not run: by its markers; a default system prompt is read from the Jinja
  string literal that holds a whole system turn (SmolLM2, Qwen2.5), never from computed text (Llama-3.1's date).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from configurator import UserError

if TYPE_CHECKING:  # tokenizer.py imports this file for recognise_template
    from tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
EOS = "{eos}"  # in a template's text: the tokenizer's end-of-text token, whatever its name


@dataclass(frozen=True)
class ChatFormat:
    """How turns are written. The text fields may hold special tokens (as their text) and '{eos}'."""
    name: str = "custom"  # for messages only
    bos: str = ""  # before the whole conversation
    system_start: str = ""
    system_end: str = ""
    user_start: str = ""
    user_end: str = ""
    assistant_start: str = ""  # a prompt ends with it: what the model answers after
    assistant_end: str = ""  # after an assistant turn in the conversation so far
    end_of_turn: str = EOS  # the special token that ends a response (and stops generation)
    system_prompt: str | None = None  # a system turn with this content when the conversation starts without one
    strip: bool = False  # content is stripped of surrounding whitespace (Llama-3)
    new_tokens: tuple[str, ...] = ()  # markers that must be single tokens: added where a tokenizer lacks them


def _each_role(start: str, end: str) -> dict[str, str]:
    return {f"{role}_{side}": text.replace("{role}", role) for role in ROLES
            for side, text in (("start", start), ("end", end))}


NAMED = {
    "chatml": ChatFormat("chatml", **_each_role("<|im_start|>{role}\n", "<|im_end|>\n"), end_of_turn="<|im_end|>",
                         new_tokens=("<|im_start|>", "<|im_end|>")),
    "llama3": ChatFormat("llama3", bos="<|begin_of_text|>",
                         **_each_role("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>"),
                         end_of_turn="<|eot_id|>", strip=True,
                         new_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "zephyr": ChatFormat("zephyr", **_each_role("<|{role}|>\n", EOS + "\n")),
    "plain": ChatFormat("plain", system_start="System: ", system_end="\n", user_start="User: ", user_end="\n",
                        assistant_start="Assistant: ", assistant_end=EOS + "\n"),
}
TEMPLATES = tuple(NAMED)
FIELDS = tuple(f.name for f in dataclasses.fields(ChatFormat))


# -----------------------------------------------------------------------------
# A config's chat_template: a name or a dict, validated with one-line errors


def chat_format(value, where: str = "config key 'chat_template'") -> ChatFormat:
    """The ChatFormat a config value states: a ChatFormat, a named template, or a dict of ChatFormat fields (with an
    optional 'base': a named template whose fields the dict overrides). `where` names the value in errors."""
    if isinstance(value, ChatFormat):
        return value
    if isinstance(value, str):
        if value not in NAMED:
            raise UserError(f"unknown chat_template '{value}' ({where}); use one of {', '.join(NAMED)}, "
                            f"'auto', or a dict of {', '.join(FIELDS[1:])}")
        return NAMED[value]
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a template name or a dict, got {type(value).__name__}")
    fields = dict(value)
    base = fields.pop("base", None)
    if base is not None and base not in NAMED:
        raise UserError(f"{where}: base '{base}' is not a named template; use one of {', '.join(NAMED)}")
    for name, field_value in fields.items():
        if name not in FIELDS:
            match = difflib.get_close_matches(str(name), FIELDS, n=1)
            hint = f" (did you mean '{match[0]}'?)" if match else f"; the fields are base, {', '.join(FIELDS)}"
            raise UserError(f"{where}: unknown field '{name}'{hint}")
        if (error := _field_error(name, field_value)) is not None:
            raise UserError(f"{where}: field '{name}' {error}")
    fields["new_tokens"] = tuple(fields.get("new_tokens", NAMED[base].new_tokens if base else ()))
    start = NAMED[base] if base else ChatFormat()
    fmt = dataclasses.replace(start, **fields)
    if not fmt.assistant_start:
        raise UserError(f"{where}: 'assistant_start' is empty; give the text that opens the assistant's "
                        f"turn (the model answers after it)")
    if not fmt.end_of_turn:
        raise UserError(f"{where}: 'end_of_turn' is empty; give the special token that ends an assistant "
                        f"turn, or '{EOS}'")
    return fmt


def _field_error(name: str, value) -> str | None:
    if name == "strip":
        return None if isinstance(value, bool) else f"must be True or False, got {value!r}"
    if name == "system_prompt":
        return None if value is None or isinstance(value, str) else f"must be a string or None, got {value!r}"
    if name == "new_tokens":
        ok = isinstance(value, (list, tuple)) and all(isinstance(t, str) and t for t in value)
        return None if ok else f"must be a list of non-empty strings, got {value!r}"
    return None if isinstance(value, str) else f"must be a string, got {value!r} ({type(value).__name__})"


def format_config(fmt: ChatFormat) -> str | dict:
    """What a config (or nanospin.json) holds for fmt: its name if it is a named template, else a dict."""
    if NAMED.get(fmt.name) == fmt:
        return fmt.name
    return {f: list(v) if isinstance(v, tuple) else v for f, v in dataclasses.asdict(fmt).items()}


# -----------------------------------------------------------------------------
# Rendering: a turn is a list of parts, text (str) or special-token ids (int); Tokenizer.encode_parts gives the ids
# Hugging Face gives the joined string (each text segment between specials encoded on its own, with its own
# SentencePiece dummy prefix), and a response is encoded as the text that follows its prompt's header.


def _parts(tok: Tokenizer, text: str) -> list[str | int]:
    """A template's own text as parts: its special tokens (and '{eos}') as ids."""
    parts: list[str | int] = []
    for i, piece in enumerate(text.split(EOS)):
        parts += ([tok.eos_id] if i else []) + tok.special_parts(piece)
    return parts


def missing_tokens(tok: Tokenizer, template) -> list[str]:
    """The format's new_tokens that tok lacks (train.py adds them and grows the model's embeddings)."""
    return [t for t in chat_format(template).new_tokens if t not in tok.specials]


def end_of_turn_id(tok: Tokenizer, template) -> int:
    """The id that ends a response; every marker the format needs must be a token of tok."""
    fmt = chat_format(template)
    missing = missing_tokens(tok, fmt)
    if missing:
        raise UserError(f"chat_template '{fmt.name}' needs special tokens {missing} that tokenizer '{tok.name}' lacks; "
                        f"train.py adds them (growing the model's embeddings), or choose a template it has (e.g. "
                        f"'plain')")
    if fmt.end_of_turn == EOS:
        return tok.eos_id
    if fmt.end_of_turn not in tok.specials:
        raise UserError(f"chat_template '{fmt.name}': end_of_turn {fmt.end_of_turn!r} is not a special token of "
                        f"tokenizer '{tok.name}'; name one of its special tokens, '{EOS}', or list it in new_tokens "
                        f"to add it")
    return tok.specials[fmt.end_of_turn]


def _response_end(tok: Tokenizer, fmt: ChatFormat) -> list[str | int]:
    """What follows a response's content: assistant_end up to its end-of-turn, or all of it and the end-of-turn."""
    eot = end_of_turn_id(tok, fmt)
    end = _parts(tok, fmt.assistant_end)
    return end[: end.index(eot) + 1] if eot in end else end + [eot]


def message_error(m, where: str) -> str | None:
    """Why m is not a chat message {'role': one of ROLES, 'content': str}, or None if it is one."""
    if not isinstance(m, dict):
        return f"{where} must be an object with 'role' and 'content'"
    if m.get("role") not in ROLES:
        return f"{where}: unknown role {m.get('role')!r} (use {', '.join(ROLES)})"
    if not isinstance(m.get("content"), str):
        return f"{where}: content must be a string, got {type(m.get('content')).__name__}"
    return None


def render_prompt(tok: Tokenizer, messages: list[dict], template) -> list[int]:
    """The conversation so far (no final assistant turn), ending with the assistant header."""
    fmt = chat_format(template)
    end_of_turn_id(tok, fmt)
    for i, m in enumerate(messages):
        if (error := message_error(m, f"message {i}")) is not None:
            raise UserError(error)
    if fmt.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": fmt.system_prompt}, *messages]
    parts = _parts(tok, fmt.bos)
    for m in messages:
        content = m["content"].strip() if fmt.strip else m["content"]
        start, end = getattr(fmt, f"{m['role']}_start"), getattr(fmt, f"{m['role']}_end")
        parts += _parts(tok, start) + [content] + _parts(tok, end)
    return tok.encode_parts(parts + _parts(tok, fmt.assistant_start))


def render_response(tok: Tokenizer, text: str, template) -> list[int]:
    """The assistant's content followed by the end-of-turn token (part of what the model learns), encoded as
    the text that follows the assistant header (no SentencePiece dummy prefix when the header ends in text)."""
    fmt = chat_format(template)
    content = text.strip() if fmt.strip else text
    return tok.encode_parts([content, *_response_end(tok, fmt)], after=_parts(tok, fmt.assistant_start))


def response_text(tok: Tokenizer, ids: list[int], template) -> str:
    """The text of a response's ids, up to its first stop id: what render_response encodes back to them."""
    fmt = chat_format(template)
    before_stop = strip_stop(tok, ids, fmt)
    text = tok.decode(before_stop, after=_parts(tok, fmt.assistant_start))
    if len(before_stop) < len(ids):  # it ended: the text the format puts before its end-of-turn is no content
        text = text.removesuffix("".join(p for p in _response_end(tok, fmt) if isinstance(p, str)))
    return text


def stop_ids(tok: Tokenizer, template) -> list[int]:
    """Ids that end a generated turn: the template's end-of-turn and the tokenizer's eos."""
    return sorted({end_of_turn_id(tok, template), tok.eos_id})


def strip_stop(tok: Tokenizer, ids: list[int], template) -> list[int]:
    """The response ids before the first stop id (what follows a stop is not part of the turn)."""
    stops = set(stop_ids(tok, template))
    ids = list(ids)
    for i, token in enumerate(ids):
        if token in stops:
            return ids[:i]
    return ids


def resolve_template(tok: Tokenizer, template) -> ChatFormat:
    """'auto' -> the template recognised for the tokenizer, else chatml if it has its tokens, else plain."""
    if template != "auto":
        return chat_format(template)
    if tok.chat_template:
        return chat_format(tok.chat_template, f"tokenizer '{tok.name}'")
    return NAMED["chatml" if not missing_tokens(tok, "chatml") else "plain"]


# -----------------------------------------------------------------------------
# A model's own template, recognised from its Jinja text

JINJA_STRING = re.compile(r"""'((?:\\.|[^'\\])*)'|"((?:\\.|[^"\\])*)\"""", re.DOTALL)
JINJA_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}


def _jinja_strings(jinja: str) -> list[str]:
    """The string literals of a Jinja template, their escapes decoded."""
    return [re.sub(r"\\(.)", lambda m: JINJA_ESCAPES.get(m[1], m[1]), single or double, flags=re.DOTALL)
            for single, double in JINJA_STRING.findall(jinja)]


def default_system_prompt(jinja: str, fmt: ChatFormat) -> str | None:
    """The system prompt a template writes when the conversation has none: the content of a string literal that
    holds a whole system turn (system_start, content, the first marker of system_end)."""
    end = fmt.system_end.split(EOS)[0].strip("\n")
    if not fmt.system_start or not end:
        return None
    for literal in _jinja_strings(jinja):
        start = literal.find(fmt.system_start)
        stop = literal.find(end, start + len(fmt.system_start)) if start >= 0 else -1
        if stop > start + len(fmt.system_start):
            return literal[start + len(fmt.system_start): stop]
    return None


def recognise_template(jinja: str | None) -> str | dict | None:
    """Which named template a Hugging Face chat_template (Jinja text) renders, if recognisable: its name, or
    {'base': name, 'system_prompt': ...} when the template writes a default system prompt."""
    if not jinja:
        return None
    if "<|im_start|>" in jinja:
        name = "chatml"
    elif "<|start_header_id|>" in jinja:
        name = "llama3"
    elif "<|user|>" in jinja and "<|assistant|>" in jinja:
        name = "zephyr"
    else:
        return None
    system = default_system_prompt(jinja, NAMED[name])
    return name if system is None else {"base": name, "system_prompt": system}
