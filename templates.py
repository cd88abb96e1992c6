"""Chat templates: a conversation to token ids, by a model's own Jinja template or by a format stated as data.

- A model's chat_template renders as in transformers' apply_chat_template (jinja2 sandbox, trim_blocks, lstrip_blocks,
  its helpers, bos_token/eos_token/... as variables); named templates and dicts of ChatFormat fields render from fields.
- A response is what the conversation adds to its prompt (rendered with the generation prompt) up to the end-of-turn
  (the special token written right after the assistant's content, else the eos, appended), encoded as text continuing
  the prompt. Special-token text in a message stays text (as transformers' sanitize_control_tokens keeps it)."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from datetime import datetime
from typing import TYPE_CHECKING

import jinja2.sandbox

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
    new_tokens: tuple[str, ...] = ()  # markers that must be single tokens: train.py adds those a tokenizer lacks
    jinja: str | None = None  # a Jinja chat template, rendered instead of the text fields


def _each_role(start: str, end: str) -> dict[str, str]:
    return {f"{r}_{side}": text.replace("{role}", r) for r in ROLES for side, text in (("start", start), ("end", end))}


NAMED = {
    "chatml": ChatFormat("chatml", **_each_role("<|im_start|>{role}\n", "<|im_end|>\n"), end_of_turn="<|im_end|>",
                         new_tokens=("<|im_start|>", "<|im_end|>")),
    "llama3": ChatFormat("llama3", bos="<|begin_of_text|>", end_of_turn="<|eot_id|>", strip=True,
                         **_each_role("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>"),
                         new_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "zephyr": ChatFormat("zephyr", **_each_role("<|{role}|>\n", EOS + "\n")),
    "plain": ChatFormat("plain", system_start="System: ", system_end="\n", user_start="User: ", user_end="\n",
                        assistant_start="Assistant: ", assistant_end=EOS + "\n"),
}
FIELDS = tuple(f.name for f in dataclasses.fields(ChatFormat))
TYPES = {"strip": (bool, "True or False"), "new_tokens": ((list, tuple), "a list of non-empty strings"),
         **dict.fromkeys(("system_prompt", "jinja"), ((str, type(None)), "a string or None"))}


def chat_format(value, where: str = "config key 'chat_template'") -> ChatFormat:
    """A named template, or a dict of ChatFormat fields over an optional 'base' one; `where` names it in errors."""
    if isinstance(value, ChatFormat):
        return value
    if not isinstance(value, (str, dict)):
        raise UserError(f"{where} must be a template name or a dict, got {type(value).__name__}")
    fields = {"base": value} if isinstance(value, str) else dict(value)
    if (base := fields.pop("base", None)) is not None and base not in NAMED:
        raise UserError(f"unknown chat_template '{base}' ({where}); use one of {', '.join(NAMED)}, 'auto', or a dict "
                        f"of {', '.join(FIELDS[1:])}")
    for name, v in fields.items():
        if name not in FIELDS:
            raise UserError(f"{where}: unknown field '{name}'; the fields are base, {', '.join(FIELDS)}")
        types, wanted = TYPES.get(name, (str, "a string"))
        if not isinstance(v, types) or name == "new_tokens" and not all(isinstance(t, str) and t for t in v):
            raise UserError(f"{where}: field '{name}' must be {wanted}, got {v!r} ({type(v).__name__})")
    fmt = dataclasses.replace(NAMED[base] if base else ChatFormat(), **fields)
    if fmt.jinja is None and not (fmt.assistant_start and fmt.end_of_turn):
        raise UserError(f"{where}: 'assistant_start' (what the model answers after) and 'end_of_turn' (the special "
                        f"token that ends its turn, or '{EOS}') must not be empty")
    return dataclasses.replace(fmt, new_tokens=tuple(fmt.new_tokens))


def format_config(fmt: ChatFormat) -> str | dict:
    """What a config (or nanospin.json) holds for fmt: its name if it is a named template, else a dict."""
    return fmt.name if NAMED.get(fmt.name) == fmt else {
        f: list(v) if isinstance(v, tuple) else v for f, v in dataclasses.asdict(fmt).items()}


def resolve_template(tok: Tokenizer, template) -> ChatFormat:
    """'auto' -> the tokenizer's own template, else chatml if it has its tokens, else plain."""
    auto = tok.chat_template or NAMED["chatml" if not missing_tokens(tok, "chatml") else "plain"]
    return auto if template == "auto" else chat_format(template)


@functools.lru_cache(maxsize=32)
def _compiled(source: str, name: str) -> jinja2.Template:
    def raise_exception(message):
        raise jinja2.TemplateError(message)
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, **options: json.dumps(x, **{"ensure_ascii": False, **options})  # Jinja's: HTML
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"chat template '{name}': line {e.lineno}: {e.message}; fix the template") from None


@functools.lru_cache(maxsize=32)
def _control(tok: Tokenizer) -> re.Pattern:
    """The added tokens a message may not write: all but whitespace ones, which templates hold as ordinary text."""
    tokens = sorted((t for t in tok.specials if not t.isspace()), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens)) or "(?!)")


def _render(tok: Tokenizer, messages: list[dict], fmt: ChatFormat, generation_prompt: bool) -> str:
    messages = [{"role": m["role"], "content": _control(tok).sub(lambda t: MARK + t[0] + END_MARK, re.sub(
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
    turns = [text[m["role"] + "_start"] + (m["content"].strip() if fmt.strip else m["content"]) +
             text[m["role"] + "_end"] for m in messages]
    return text["bos"] + "".join(turns) + (text["assistant_start"] if generation_prompt else "")


def _encode(tok: Tokenizer, text: str, continues: bool = False) -> list[int]:
    """Ids of rendered text: the template's special tokens as single ids, marked text as text."""
    pieces = re.split(f"{MARK}({_control(tok).pattern}){END_MARK}|[{MARK}{END_MARK}]", text)
    return [i for k, p in enumerate(pieces) if p for i in _encode_piece(tok, p, k % 2 == 0, bool(continues or k))]


def _encode_piece(tok: Tokenizer, text: str, special: bool, continues: bool) -> list[int]:
    """Text continuing a string is encoded after a newline that is then dropped: SentencePiece adds no dummy prefix."""
    newline, ids = tok.encode("\n", special), tok.encode("\n" + text, special) if continues else []
    return ids[len(newline):] if continues and ids[:len(newline)] == newline else tok.encode(text, special)


def _tail(tok: Tokenizer, fmt: ChatFormat, messages: list[dict]) -> str:
    prompt, full = _render(tok, messages[:-1], fmt, True), _render(tok, messages, fmt, False)
    if not full.startswith(prompt):
        raise UserError(f"chat template '{fmt.name}': the prompt rendered with add_generation_prompt does not start "
                        f"the conversation rendered with its response; use another (e.g. chat_template='chatml')")
    return full[len(prompt):]


@functools.lru_cache(maxsize=32)
def _turn(tok: Tokenizer, fmt: ChatFormat) -> tuple[str, str, str]:
    """(end-of-turn token text, the text before a response's content, the text between it and the end-of-turn), read
    from a probe conversation; every marker the format needs must be a token of tok."""
    if missing := missing_tokens(tok, fmt):
        raise UserError(f"chat_template '{fmt.name}' needs special tokens {missing} that tokenizer '{tok.name}' lacks; "
                        f"train.py adds them (growing the model's embeddings), or choose a template it has ('plain')")
    if fmt.jinja is None and fmt.end_of_turn != EOS and fmt.end_of_turn not in tok.specials:
        raise UserError(f"chat_template '{fmt.name}': end_of_turn {fmt.end_of_turn!r} is not a special token of "
                        f"tokenizer '{tok.name}'; name one, '{EOS}', or list it in new_tokens to add it")
    before, content, after = _tail(tok, fmt, PROBE).partition(PROBE[-1]["content"])
    if not content:
        raise UserError(f"chat template '{fmt.name}' does not write the assistant's message after its generation "
                        f"prompt; use one that does (e.g. chat_template='chatml')")
    eos = tok.token_strings["eos_token"]
    eot = fmt.end_of_turn.replace(EOS, eos) if fmt.jinja is None else next(
        (t for t in sorted(tok.specials, key=len, reverse=True) if after.lstrip().startswith(t)), eos)
    return eot, before, after.partition(eot)[0]


def missing_tokens(tok: Tokenizer, template) -> list[str]:
    """The format's new_tokens that tok lacks (train.py adds them and grows the model's embeddings)."""
    return [t for t in chat_format(template).new_tokens if t not in tok.specials]


def end_of_turn_id(tok: Tokenizer, template) -> int:
    """The id that ends a response."""
    return tok.specials.get(_turn(tok, chat_format(template))[0], tok.eos_id)


def render_prompt(tok: Tokenizer, messages: list[dict], template) -> list[int]:
    """The conversation so far with the generation prompt: what the model answers after. data.py checks messages."""
    fmt = chat_format(template)
    _turn(tok, fmt)  # a template the tokenizer cannot render fails here
    return _encode(tok, _render(tok, messages, fmt, True))


def render_example(tok: Tokenizer, messages: list[dict], template) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids, ending with the end-of-turn) of a conversation ending with the assistant's turn."""
    fmt = chat_format(template)
    eot, tail = _turn(tok, fmt)[0], _tail(tok, fmt, messages)
    end = re.search(f"(?<!{MARK}){re.escape(eot)}", tail)  # the first not inside a message
    response = _encode(tok, tail[: end.end()] if end else tail, True) + ([] if end else [end_of_turn_id(tok, fmt)])
    return render_prompt(tok, messages[:-1], fmt), response


def render_response(tok: Tokenizer, text: str, template, prompt: list[dict] | None = None) -> list[int]:
    """The response ids of `text` answering `prompt` (by default one user turn)."""
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
    text = tok.decode(kept).removeprefix(before)
    return text.removesuffix(between) if len(kept) < len(ids) else text  # it ended: the format's text is no content
