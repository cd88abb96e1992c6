"""Configuration: a dataclass of defaults, then a config file, then --key=value overrides.

Design choices:
- Config files are plain Python files of bare assignments (nanoGPT style) and may import each
  other (`from config.base import *`), but they are run in a namespace of their own and every name
  they define is checked against the dataclass: a typo is an error naming the file:line and the
  closest valid key, never a silently new variable.
- Types come from the dataclass annotations; ints are accepted where floats are expected, and
  command-line values are parsed by the type they must have (`--lr=1` is a float, `--out_dir=1`
  a string).
- Errors meant for people are `UserError`s; the scripts print them as one line and exit with 2. So
  are the disk's own errors (full, read-only, no permission): the path, the errno's words, what to do.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import errno
import json
import os
import runpy
import sys
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
    """Run a script's main(); a UserError or a disk error becomes one line on stderr and exit code 2."""
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


def _closest(name: str, keys) -> str:
    match = difflib.get_close_matches(name, list(keys), n=1, cutoff=0.0)
    return f" (did you mean '{match[0]}'?)" if match else ""


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


def _assignment_line(path: str, name: str) -> str:
    """'file:line' of the assignment to `name` in the config file `path` (or just the file)."""
    try:
        tree = ast.parse(open(path).read())
    except (OSError, SyntaxError):
        return path
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for t in targets:
            for n in ast.walk(t):
                if isinstance(n, ast.Name) and n.id == name:
                    return f"{path}:{node.lineno}"
    return path


def _config_modules(path: str, seen=None) -> list[str]:
    """The file and the config files it star-imports, so an error can point at the right one."""
    seen = seen if seen is not None else []
    if path in seen or not os.path.isfile(path):
        return seen
    seen.append(path)
    try:
        tree = ast.parse(open(path).read())
    except SyntaxError:
        return seen
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            _config_modules(os.path.join(root, *node.module.split(".")) + ".py", seen)
    return seen


def _where(path: str, name: str) -> str:
    for p in _config_modules(path):
        loc = _assignment_line(p, name)
        if loc != p:
            return loc
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
        raise UserError(f"unknown config key '--{key}'{_closest(key, fields)}")
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
    """Build a `cls` dataclass from defaults, an optional config file (a path not starting with
    '--', first), and --key=value overrides, in that order."""
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


def config_to_json(cfg) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)
