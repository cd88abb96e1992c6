"""Configuration: a dataclass of defaults, then a config file, then --key=value overrides.

Design choices:
- Config files are Python files of bare assignments (nanoGPT style) that may import each other, run in a
  namespace of their own; every name is checked against the dataclass, so a typo is an error naming file:line
  and the closest valid key, never a silently new variable.
- Types come from the dataclass annotations; command-line values are parsed by the type they must have
  (`--lr=1` is a float, `--out_dir=1` a string).
- Errors meant for people, and the disk's own (full, read-only, no permission), are one line and exit code 2.
- `--help` reads the dataclass from its file's source (fields, defaults, comments) instead of importing it,
  so it answers before torch's seconds of imports.
- What a run says about itself is written here too: a few lines of plan, and a time estimate per phase.
"""

from __future__ import annotations

import ast
import atexit
import dataclasses
import difflib
import errno
import io
import os
import re
import runpy
import shutil
import sys
import textwrap
import tokenize
import types
import typing
from typing import Any


class UserError(Exception):
    """A mistake in the user's input (config, data, paths): printed as one line, exit code 2."""


# what a disk says when it cannot take a write (or give a read): the user's to fix, not a bug
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


def disk_error(e: OSError) -> str:
    """One line for a disk's OSError: the path, the errno's words ("No space left on device"), what to do."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space on that disk or use another directory"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "make it writable (check its permissions) or use another directory"
    else:
        fix = "check that disk"
    words = e.strerror or os.strerror(e.errno or 0)
    return f"'{e.filename}': {words}; {fix}" if e.filename else f"{words}; {fix}"


def run_main(main, *args) -> None:
    """Run a script's main(); a UserError or a disk error becomes one line on stderr and exit code 2. Under
    torchrun (RANK set) the rank then leaves through `leave_without_teardown`."""
    if "RANK" not in os.environ:
        return _run_main(main, *args)
    try:
        _run_main(main, *args)
        code = 0
    except SystemExit as e:
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)  # what Python prints for sys.exit("...")
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    leave_without_teardown(code)


def _run_main(main, *args) -> None:
    try:
        main(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        print(f"error: {disk_error(e)}", file=sys.stderr)
        sys.exit(2)


def leave_without_teardown(code: int) -> None:
    """End a torchrun rank with `code` once its exit handlers ran, skipping the interpreter's teardown. A gloo
    worker thread drops its reference to a collective's tensors only after the rank has the result; when that is
    the last reference, dropping it takes the GIL, and if the interpreter is being torn down by then Python ends
    that thread mid-destructor and the process aborts ("terminate called without an active exception", exit -6):
    a finished run reports failure. Seen on a busy 2-core machine in 5 of 26 runs of a 2-rank sampler script and
    1 of 19 one-step 2-rank train.py runs (cores: ProcessGroupGloo::runLoop -> ~AsyncAllreduceWork -> take_gil ->
    PyThread_exit_thread -> std::terminate); destroy_process_group does not prevent it."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _closest(name: str, keys) -> str:
    """' (did you mean ...?)' for a key close to `name` (difflib's 0.6 cut-off), else where the keys are listed."""
    match = difflib.get_close_matches(name, list(keys), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else " (--help lists the keys)"


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_value(key: str, value: Any, tp) -> Any:
    """Return `value` converted to the annotation `tp` (int -> float only), or raise UserError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return check_value(key, value, arm)
            except UserError:
                pass
        raise UserError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise UserError(f"config key '{key}' must be None, got {value!r}")
    if tp is Any:
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}' must be a list, got {value!r}")
        return [check_value(key, v, item_tp) for v in value]
    if tp is dict or origin is dict:  # a dict-valued key (chat_template) checks its own fields
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise UserError(f"config key '{key}' must be a dict with string keys, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise UserError(f"config key '{key}' must be int, got {value!r}")
    if not isinstance(value, tp):
        raise UserError(f"config key '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _where(path: str, name: str, seen: set | None = None) -> str:
    """'file:line' of the assignment to `name` in config file `path` or the config files it imports, else `path`."""
    seen = set() if seen is None else seen
    if path in seen or not os.path.isfile(path):
        return path
    seen.add(path)
    try:
        tree = ast.parse(open(path).read())
    except (OSError, SyntaxError):
        return path
    root, imported = os.path.dirname(os.path.dirname(os.path.abspath(path))), []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        if any(isinstance(n, ast.Name) and n.id == name for t in targets for n in ast.walk(t)):
            return f"{path}:{node.lineno}"
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.append(os.path.join(root, *node.module.split(".")) + ".py")
    for module in imported:
        if (found := _where(module, name, seen)) != module:
            return found
    return path


def read_config_file(path: str, fields: dict) -> dict:
    """Run a config file in its own namespace and return its validated {key: value} settings."""
    if not os.path.isfile(path):
        raise UserError(f"config file '{path}' not found (pass a path such as config/quick.py)")
    # `from config.base import *` must work from any working directory: put the folder that holds
    # config/ first on the path while the file runs.
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    sys.path.insert(0, root)
    # a base config imported earlier (another config folder, or an edited file) must not be reused
    for name in [m for m in sys.modules if m == "config" or m.startswith("config.")]:
        del sys.modules[name]
    try:
        namespace = runpy.run_path(path, run_name="__config__")
    except SyntaxError as e:
        raise UserError(f"{e.filename}:{e.lineno}: syntax error in config file: {e.msg}") from None
    except Exception as e:  # a config file that raises is the user's to fix, say where
        tb = e.__traceback__
        line = "?"
        while tb is not None:
            if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
                line = tb.tb_lineno
            tb = tb.tb_next
        raise UserError(f"{path}:{line}: config file raised {type(e).__name__}: {e}") from None
    finally:
        sys.path.remove(root)
    settings = {}
    for name, value in namespace.items():
        if name.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
            continue
        if name not in fields:
            raise UserError(f"{_where(path, name)}: unknown config key '{name}'{_closest(name, fields)}")
        try:
            settings[name] = check_value(name, value, fields[name])
        except UserError as e:
            raise UserError(f"{_where(path, name)}: {e}") from None
    return settings


def parse_override(arg: str, fields: dict) -> tuple[str, Any]:
    """'--key=value' -> (key, typed value)."""
    if not arg.startswith("--") or "=" not in arg:
        raise UserError(f"command-line argument '{arg}' is not of the form --key=value (or a config file path)")
    key, text = arg[2:].split("=", 1)
    if key not in fields:
        raise UserError(f"unknown config key '{key}' on the command line{_closest(key, fields)}")
    tp = fields[key]
    arms = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if text == "None" and type(None) in arms:
        return key, None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word: a string such as --out_dir=out-run2
    if str in arms and not isinstance(value, str):
        try:
            return key, check_value(key, value, tp)
        except UserError:
            value = text  # --init_from=123 is the string '123' when a string is allowed
    return key, check_value(key, value, tp)


def load_config(cls, argv: list[str]):
    """A `cls` dataclass from defaults, an optional config file (first), then --key=value overrides."""
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    fields = {name: hints[name] for name in fields}
    settings: dict[str, Any] = {}
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            if i != 0:
                raise UserError(f"the config file '{arg}' must come before the --key=value overrides")
            settings.update(read_config_file(arg, fields))
        else:
            key, value = parse_override(arg, fields)
            settings[key] = value
    return cls(**settings)


# ------------------------------------------------------------------------------------------------
# --help: the keys with their defaults and comments, read from the dataclass's source

_SECTION_RULE = re.compile(r"^-{2,}\s*(.*?)\s*-*$")  # '# --- I/O -------' starts the section 'I/O'


@dataclasses.dataclass
class KeyDoc:
    """One config key as its dataclass's source writes it."""
    section: str  # the '# --- name ---' rule above it ('' before the first)
    name: str
    default: str  # as it would be typed after --name=
    comment: str  # the comment lines right above it, then the one on its line


def _comments(lines: list[str], first: int) -> dict[int, tuple[str, bool]]:
    """{line number: (comment text, whether alone on its line)} in `lines`, which start at line `first` of the file."""
    found = {}
    for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        if tok.type == tokenize.COMMENT:
            found[first + tok.start[0] - 1] = (tok.string.lstrip("#").strip(), not tok.line[:tok.start[1]].strip())
    return found


def _typed_default(lines: list[str], value: ast.expr | None) -> str:
    """A default as typed after --key=: a string bare unless empty or padded, anything else as its source writes it."""
    if value is None:
        return "(required)"
    if isinstance(value, ast.Constant) and isinstance(value.value, str):
        return value.value if value.value.strip() == value.value and value.value else repr(value.value)
    if value.lineno != value.end_lineno:
        return ast.unparse(value)
    return lines[value.lineno - 1].encode()[value.col_offset:value.end_col_offset].decode()  # offsets count bytes


def dataclass_keys(source: str, tree: ast.Module, class_name: str) -> list[KeyDoc]:
    """The fields of the top-level dataclass `class_name` in the module `tree` parsed from `source` (not imported)."""
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    if cls is None:
        raise ValueError(f"no class {class_name} at the top level of the module")
    lines = source.splitlines(keepends=True)
    comments = _comments(lines[cls.lineno - 1:cls.end_lineno], cls.lineno)
    keys, section = [], ""
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line in comments and comments[line][1]:
            above.insert(0, comments[line][0])
            line -= 1
        text = []
        for comment in above:
            rule = _SECTION_RULE.match(comment)
            if rule:
                section, text = rule.group(1), []
            else:
                text.append(comment)
        beside = comments.get(node.end_lineno, ("", True))
        if not beside[1]:
            text.append(beside[0])
        keys.append(KeyDoc(section, node.target.id, _typed_default(lines, node.value), " ".join(text)))
    return keys


def help_text(path: str, class_name: str, usage: str, more: str, summary: str | None = None) -> str:
    """Usage, the summary (default: `path`'s docstring's first line), every key of `class_name` in `path` with its
    default and comment by section, and where to read more."""
    source = open(path).read()
    tree = ast.parse(source)
    summary = summary or (ast.get_docstring(tree) or "").split("\n")[0]
    width = max(80, min(shutil.get_terminal_size((100, 24)).columns, 120))
    keys = dataclass_keys(source, tree, class_name)
    heads = {k.name: f"  --{k.name}={k.default}" for k in keys}
    column = min(max(map(len, heads.values())) + 2, 30)  # a longer head has its comment on the lines below
    usage_lines = usage.strip().splitlines()
    lines = ["usage: " + usage_lines[0], *("       " + u for u in usage_lines[1:]), "", summary, "",
             *textwrap.wrap("Keys and their defaults. A config file sets them as bare assignments (key = value); "
                            "--key=value on the command line overrides the file.", width)]
    section = None
    for key in keys:
        if key.section != section:
            section = key.section
            lines += ["", section] if section else [""]
        head = heads[key.name]
        described = textwrap.wrap(key.comment, width - column)
        if len(head) > column - 2 or not described:
            lines.append(head)
        else:
            lines.append(head.ljust(column) + described.pop(0))
        lines += [" " * column + text for text in described]
    return "\n".join([*lines, "", *textwrap.wrap(more, width)]).rstrip() + "\n"


def help_if_asked(argv: list[str], path: str, class_name: str, usage: str, more: str, summary: str | None = None):
    """With -h or --help in `argv`: print `help_text` and exit 0 (scripts call it before their heavy imports)."""
    if "-h" in argv or "--help" in argv:
        sys.stdout.write(help_text(path, class_name, usage, more, summary))
        sys.exit(0)


# ------------------------------------------------------------------------------------------------
# what a run says about itself: its plan at the start, a time estimate per phase


def duration(seconds: float) -> str:
    """'45s', '3m05s', '2h10m'."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def run_plan(cfg, phases: list[tuple[str, int]], n_train: int, world_size: int, device: str, dtype: str) -> str:
    """A few lines saying what a train.py run will do: its phases and their optimizer steps, the model, the data,
    where it runs and writes. `phases` as train_config.phases_of gives them."""
    global_batch = cfg.batch_size * cfg.grad_accum * world_size
    prompts = min(cfg.prompts_per_iteration or n_train, n_train)
    spin_steps = [cfg.max_epochs * ((1 + min(cfg.mix_previous_rollouts, t)) * prompts // global_batch)
                  for t in range(cfg.max_iterations)]
    lines, total = [], 0
    for kind, title in (("sft", "SFT"), ("spin", "SPIN"), ("baseline", "continued SFT (the comparison)")):
        steps = [cfg.sft_steps if kind == "sft" else spin_steps[t] for k, t in phases if k == kind]
        if not steps:
            continue
        total += sum(steps)
        count = f"{steps[0]}" if len(set(steps)) == 1 else "/".join(map(str, steps))
        if kind == "sft":
            lines.append(f"  {title}: {count} steps")
        elif kind == "spin":
            rollout = prompts * (cfg.max_epochs if cfg.regenerate_per_epoch else 1)
            lines.append(f"  {title}: {len(steps)} iteration{'s' * (len(steps) > 1)}, each a rollout of {rollout} "
                         f"prompts (≤ {cfg.max_new_tokens} new tokens) then {count} steps")
        else:
            lines.append(f"  {title}: {len(steps)} × {count} steps")
    model = (f"from scratch ({cfg.model_type}, {cfg.n_layer} layers × {cfg.n_embd})" if cfg.init_from == "scratch"
             else cfg.init_from)
    data = "the synthetic task" if cfg.train_data == "synthetic" else cfg.train_data
    return "\n".join([
        f"plan: {total} optimizer steps of {global_batch} examples (SFT) or pairs (SPIN) on {world_size} × {device}, "
        f"{dtype}", *lines,
        f"  model {model}; data {data} ({n_train} training examples)",
        f"  out_dir {cfg.out_dir} (its config.json: every setting); each phase estimates its time after a few steps"])


def time_left(name: str, total_steps: int, done: int, seconds_per_step: float) -> str:
    """'sft: 500 steps, ~1m12s left (0.145 s/step)'."""
    left = duration((total_steps - done) * seconds_per_step)
    return f"{name}: {total_steps} steps, ~{left} left ({seconds_per_step:.3g} s/step)"
