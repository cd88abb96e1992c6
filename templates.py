"""Chat templates: how a conversation becomes token ids, by a model's own Jinja template or a format stated as data.

Design choices:
- A model's own chat_template is rendered as transformers' apply_chat_template renders it: jinja2's sandbox with
  trim_blocks, lstrip_blocks and loop controls, raise_exception, strftime_now, a tojson that keeps non-ASCII,
  add_generation_prompt, and the tokenizer's named special tokens (bos_token, eos_token, ...) as variables. The
  named templates and dicts of ChatFormat fields (for models without one) are rendered from their fields.
- A prompt is the conversation rendered with the generation prompt; its response is the text the whole conversation
  adds after it, up to its end-of-turn: the special token the template writes right after the assistant's content
  (a format's `end_of_turn`), else the tokenizer's eos, appended. The response is encoded as text that continues
  its prompt (no SentencePiece dummy prefix): what the model sees when it generates after that prompt.
- Special-token text inside a message stays text: marked before rendering and encoded as text after, as
  apply_chat_template(sanitize_control_tokens=True) does. Only a template writes control tokens.
- A format's `new_tokens` are markers that must be single tokens: train.py adds those a tokenizer lacks.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import re
from datetime import datetime
from typing import TYPE_CHECKING

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from configurator import UserError

if TYPE_CHECKING:  # tokenizer.py imports this file
    from tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
EOS = "{eos}"  # in a format's text: the tokenizer's end-of-text token, whatever its name
MARK, END_MARK = "\U000f0000", "\U000f0001"  # private-use characters around special-token text inside a message
PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "nanospin probe reply"}]


@dataclasses.dataclass(frozen=True)
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
    jinja: str | None = None  # a Jinja chat template, rendered instead of the text fields


def _each_role(start: str, end: str) -> dict[str, str]:
    return {f"{role}_{side}": text.replace("{role}", role) for role in ROLES for side, text in (("start", start),
                                                                                                ("end", end))}


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


def chat_format(value, where: str = "config key 'chat_template'") -> ChatFormat:
    """The ChatFormat a config value states: a ChatFormat, a named template, or a dict of ChatFormat fields (with an
    optional 'base': a named template whose fields the dict overrides). `where` names the value in errors."""
    if isinstance(value, ChatFormat):
        return value
    if isinstance(value, str) and value not in NAMED:
        raise UserError(f"unknown chat_template '{value}' ({where}); use one of {', '.join(NAMED)}, 'auto', or a dict "
                        f"of {', '.join(FIELDS[1:])}")
    if not isinstance(value, (str, dict)):
        raise UserError(f"{where} must be a template name or a dict, got {type(value).__name__}")
    fields = {"base": value} if isinstance(value, str) else dict(value)
    base = fields.pop("base", None)
    if base is not None and base not in NAMED:
        raise UserError(f"{where}: base '{base}' is not a named template; use one of {', '.join(NAMED)}")
    for name, v in fields.items():
        if name not in FIELDS:
            match = difflib.get_close_matches(str(name), FIELDS, n=1)
            raise UserError(f"{where}: unknown field '{name}'" + (f" (did you mean '{match[0]}'?)" if match else
                                                                   f"; the fields are base, {', '.join(FIELDS)}"))
        ok, wanted = {"strip": (isinstance(v, bool), "True or False"),
                      "new_tokens": (isinstance(v, (list, tuple)) and all(isinstance(t, str) and t for t in v),
                                     "a list of non-empty strings")}.get(
            name, (isinstance(v, str) or v is None and name in ("system_prompt", "jinja"), "a string"))
        if not ok:
            raise UserError(f"{where}: field '{name}' must be {wanted}, got {v!r} ({type(v).__name__})")
    fmt = dataclasses.replace(NAMED[base] if base else ChatFormat(), **fields)
    fmt = dataclasses.replace(fmt, new_tokens=tuple(fmt.new_tokens))
    for name, what in (("assistant_start", "the text that opens the assistant's turn (the model answers after it)"),
                       ("end_of_turn", f"the special token that ends an assistant turn, or '{EOS}'")):
        if fmt.jinja is None and not getattr(fmt, name):
            raise UserError(f"{where}: '{name}' is empty; give {what}")
    return fmt


def format_config(fmt: ChatFormat) -> str | dict:
    """What a config (or nanospin.json) holds for fmt: its name if it is a named template, else a dict."""
    return fmt.name if NAMED.get(fmt.name) == fmt else {
        f: list(v) if isinstance(v, tuple) else v for f, v in dataclasses.asdict(fmt).items()}


def resolve_template(tok: Tokenizer, template) -> ChatFormat:
    """'auto' -> the tokenizer's own template, else chatml if it has its tokens, else plain."""
    if template != "auto":
        return chat_format(template)
    return tok.chat_template or NAMED["chatml" if not missing_tokens(tok, "chatml") else "plain"]


# -----------------------------------------------------------------------------
# Rendering: messages -> text (special-token text inside messages marked) -> ids


@functools.lru_cache(maxsize=32)
def _compiled(source: str, name: str) -> jinja2.Template:
    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # Jinja's own escapes HTML
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    # transformers' {% generation %} block marks assistant text for its masks: here it renders its body
    source = re.sub(r"\{%(-?)\s*(end)?generation\s*(-?)%\}", lambda m: f"{{%{m[1]} {'endif' if m[2] else 'if 1'} {m[3]}%}}", source)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"chat template '{name}': line {e.lineno}: {e.message}; fix the template") from None


@functools.lru_cache(maxsize=32)
def _control(tok: Tokenizer, fmt: ChatFormat) -> re.Pattern:
    """The added tokens a message may not write (apply_chat_template's rule): every special one, and the others that
    the template's own text holds (whitespace tokens aside, which templates hold as ordinary text)."""
    literal = fmt.jinja or str(fmt)
    tokens = [t for t in tok.specials if t not in tok.text_tokens or (t in literal and not t.isspace())]
    return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) or "(?!)")


def _render(tok: Tokenizer, messages: list[dict], fmt: ChatFormat, generation_prompt: bool) -> str:
    control = _control(tok, fmt)
    messages = [{"role": m["role"], "content": control.sub(lambda t: MARK + t[0] + END_MARK, re.sub(
        f"[{MARK}{END_MARK}]", "", m["content"]))} for m in messages]
    if fmt.jinja is not None:
        template = _compiled(fmt.jinja, fmt.name)
        try:
            return template.render(messages=messages, add_generation_prompt=generation_prompt, tools=None,
                                   documents=None, **tok.token_strings)
        except Exception as e:  # raise_exception, undefined names, type errors: the template's own failures
            raise UserError(f"chat template '{fmt.name}' failed ({type(e).__name__}: {str(e)[:200]})") from None
    text = {f: v.replace(EOS, tok.token_strings["eos_token"]) for f, v in vars(fmt).items() if isinstance(v, str)}
    if fmt.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": fmt.system_prompt}, *messages]
    return text["bos"] + "".join(text[f"{m['role']}_start"] + (m["content"].strip() if fmt.strip else m["content"])
                                 + text[f"{m['role']}_end"] for m in messages) + \
        (text["assistant_start"] if generation_prompt else "")


def _encode(tok: Tokenizer, text: str, fmt: ChatFormat, continues: bool = False) -> list[int]:
    """Ids of rendered text: the template's special tokens as single ids, marked text as text."""
    pieces = re.split(f"{MARK}({_control(tok, fmt).pattern}){END_MARK}|[{MARK}{END_MARK}]", text)
    return [i for k, piece in enumerate(pieces) if piece
            for i in _encode_piece(tok, piece, special=k % 2 == 0, continues=continues or k > 0)]


def _encode_piece(tok: Tokenizer, text: str, special: bool, continues: bool) -> list[int]:
    """A piece that continues a string is encoded after a newline that is then dropped, so that SentencePiece adds no
    dummy prefix (as apply_chat_template encodes the pieces of a sanitized chat)."""
    if continues:
        newline, ids = tok.encode("\n", special), tok.encode("\n" + text, special)
        if ids[:len(newline)] == newline:
            return ids[len(newline):]
    return tok.encode(text, special)


def _decode_continuing(tok: Tokenizer, ids: list[int]) -> str:
    newline = tok.encode("\n", True)
    head, text = tok.decode(newline), tok.decode(newline + list(ids))
    return text[len(head):] if text.startswith(head) else tok.decode(ids)


def _tail(tok: Tokenizer, fmt: ChatFormat, messages: list[dict]) -> str:
    """What the whole conversation adds to its prompt rendered with the generation prompt."""
    prompt, full = _render(tok, messages[:-1], fmt, True), _render(tok, messages, fmt, False)
    if not full.startswith(prompt):
        raise UserError(f"chat template '{fmt.name}': the prompt rendered with add_generation_prompt is not the start "
                        f"of the conversation rendered with its response, so a response has no tokens of its own; use "
                        f"another template (e.g. chat_template='chatml')")
    return full[len(prompt):]


@functools.lru_cache(maxsize=32)
def _turn(tok: Tokenizer, fmt: ChatFormat) -> tuple[str, str, str]:
    """(end-of-turn token text, the template's text before a response's content, its text between the content and
    the end-of-turn), read from a probe conversation."""
    before, content, after = _tail(tok, fmt, PROBE).partition(PROBE[-1]["content"])
    if not content:
        raise UserError(f"chat template '{fmt.name}' does not write the assistant's message after its generation "
                        f"prompt, so a response has no tokens; use one that does (e.g. chat_template='chatml')")
    eos = tok.token_strings["eos_token"]
    eot = fmt.end_of_turn.replace(EOS, eos) if fmt.jinja is None else next(
        (t for t in sorted(tok.specials, key=len, reverse=True) if after.lstrip().startswith(t)), eos)
    return eot, before, after.partition(eot)[0]


# -----------------------------------------------------------------------------
# What data.py, train.py and generate.py call


def missing_tokens(tok: Tokenizer, template) -> list[str]:
    """The format's new_tokens that tok lacks (train.py adds them and grows the model's embeddings)."""
    return [t for t in chat_format(template).new_tokens if t not in tok.specials]


def end_of_turn_id(tok: Tokenizer, template) -> int:
    """The id that ends a response; every marker the format needs must be a token of tok."""
    fmt = chat_format(template)
    if missing := missing_tokens(tok, fmt):
        raise UserError(f"chat_template '{fmt.name}' needs special tokens {missing} that tokenizer '{tok.name}' lacks; "
                        f"train.py adds them (growing the model's embeddings), or choose a template it has (e.g. "
                        f"'plain')")
    if fmt.jinja is None and fmt.end_of_turn != EOS and fmt.end_of_turn not in tok.specials:
        raise UserError(f"chat_template '{fmt.name}': end_of_turn {fmt.end_of_turn!r} is not a special token of "
                        f"tokenizer '{tok.name}'; name one of its special tokens, '{EOS}', or list it in new_tokens "
                        f"to add it")
    return tok.specials.get(_turn(tok, fmt)[0], tok.eos_id)


def render_prompt(tok: Tokenizer, messages: list[dict], template) -> list[int]:
    """The conversation so far (no final assistant turn) with the generation prompt: what the model answers after.
    Messages are {'role': one of ROLES, 'content': str} (data.py checks them)."""
    fmt = chat_format(template)
    end_of_turn_id(tok, fmt)
    return _encode(tok, _render(tok, messages, fmt, True), fmt)


def render_example(tok: Tokenizer, messages: list[dict], template) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a conversation whose last message is the assistant's response; the response
    ends with the end-of-turn token (part of what the model learns)."""
    fmt = chat_format(template)
    eot_id, tail = end_of_turn_id(tok, fmt), _tail(tok, fmt, messages)
    end = re.search(f"(?<!{MARK}){re.escape(_turn(tok, fmt)[0])}", tail)
    response = _encode(tok, tail[: end.end()] if end else tail, fmt, continues=True) + ([] if end else [eot_id])
    return render_prompt(tok, messages[:-1], fmt), response


def render_response(tok: Tokenizer, text: str, template, prompt: list[dict] | None = None) -> list[int]:
    """The response ids of `text` answering `prompt` (by default a one-turn user prompt: only a template that writes
    a response differently after different prompts makes them differ)."""
    return render_example(tok, [*(prompt or PROBE[:1]), {"role": "assistant", "content": text}], template)[1]


def stop_ids(tok: Tokenizer, template) -> list[int]:
    """Ids that end a generated turn: the template's end-of-turn and the tokenizer's eos."""
    return sorted({end_of_turn_id(tok, template), tok.eos_id})


def strip_stop(tok: Tokenizer, ids: list[int], template) -> list[int]:
    """The response ids before the first stop id (what follows a stop is not part of the turn)."""
    stops = set(stop_ids(tok, template))
    return next((list(ids[:i]) for i, token in enumerate(ids) if token in stops), list(ids))


def response_text(tok: Tokenizer, ids: list[int], template) -> str:
    """The message of a response's ids up to its first stop id: the text render_response encodes to them."""
    _, before, between = _turn(tok, chat_format(template))
    kept = strip_stop(tok, ids, template)
    text = _decode_continuing(tok, kept).removeprefix(before)
    return text.removesuffix(between) if len(kept) < len(ids) else text  # it ended: the format's text is no content
