"""configurator.py: defaults < config file < --key=value, and one-line errors for bad input."""

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from configurator import UserError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Cfg:
    out_dir: str = "out"
    lr: float = 1e-4
    n_layer: int = 2
    compile: bool = False
    beta: float | list[float] = 0.1
    init_from: str = "scratch"
    max_iterations: int | None = None


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_precedence_and_types(tmp_path):
    path = write(tmp_path, "c.py", "# a recipe\nlr = 3e-4\nn_layer = 4\nbeta = [0.1, 0.2]\n")
    cfg = load_config(Cfg, [path, "--n_layer=6", "--lr=1", "--compile=True", "--out_dir=1", "--max_iterations=None"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # ints are accepted where floats are expected
    assert cfg.n_layer == 6 and cfg.compile is True and cfg.beta == [0.1, 0.2]
    assert cfg.out_dir == "1" and cfg.max_iterations is None
    assert load_config(Cfg, []) == Cfg()


def test_config_may_import_another(tmp_path):
    os.makedirs(tmp_path / "config")
    write(tmp_path / "config", "base.py", "lr = 2e-4\nn_layer = 3\n")
    path = write(tmp_path / "config", "child.py", "from config.base import *\nn_layer = 5\n")
    cfg = load_config(Cfg, [path])
    assert (cfg.lr, cfg.n_layer) == (2e-4, 5)


def test_unknown_key_in_file_names_line_and_closest(tmp_path):
    path = write(tmp_path, "c.py", "lr = 1e-3\n\nn_layers = 4\n")
    with pytest.raises(UserError, match=rf"{path}:3: unknown config key 'n_layers' \(did you mean 'n_layer'\?\)"):
        load_config(Cfg, [path])


def test_unknown_key_in_imported_base_names_base_file(tmp_path):
    os.makedirs(tmp_path / "config")
    base = write(tmp_path / "config", "base.py", "lr = 2e-4\ncompiled = True\n")
    path = write(tmp_path / "config", "child.py", "from config.base import *\n")
    with pytest.raises(UserError, match=rf"{base}:2: unknown config key 'compiled' \(did you mean 'compile'\?\)"):
        load_config(Cfg, [path])


def test_bad_types(tmp_path):
    with pytest.raises(UserError, match="'n_layer' must be int, got 2.5"):
        load_config(Cfg, ["--n_layer=2.5"])
    with pytest.raises(UserError, match="'compile' must be bool"):
        load_config(Cfg, ["--compile=yes"])
    with pytest.raises(UserError, match=r"unknown config key 'lrr' on the command line \(did you mean 'lr'\?\)"):
        load_config(Cfg, ["--lrr=1"])
    path = write(tmp_path, "c.py", "lr = 'fast'\n")
    with pytest.raises(UserError, match=rf"{path}:1: config key 'lr' must be float"):
        load_config(Cfg, [path])
    with pytest.raises(UserError, match="not found"):
        load_config(Cfg, [str(tmp_path / "missing.py")])
    with pytest.raises(UserError, match="--key=value"):
        load_config(Cfg, ["--lr"])
    broken = write(tmp_path, "broken.py", "lr = 1e-4\nn_layer = 1 +\n")
    with pytest.raises(UserError, match=rf"{broken}:2: syntax error"):
        load_config(Cfg, [broken])
    raising = write(tmp_path, "raising.py", "lr = 1e-4\nn_layer = 1 // 0\n")
    with pytest.raises(UserError, match=rf"{raising}:2: config file raised ZeroDivisionError"):
        load_config(Cfg, [raising])


def test_train_py_bad_key_exits_2_with_one_line(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "train.py", "config/quick.py", "--n_layers=2", f"--out_dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown config key 'n_layers' on the command line (did you mean 'n_layer'?)" in lines[0]
    assert not out.exists()


@dataclass
class WithDict:
    chat_template: str | dict = "auto"


def test_a_dict_valued_key_from_a_file_and_from_the_command_line(tmp_path):
    path = write(tmp_path, "c.py", 'chat_template = {"base": "chatml", "system_prompt": "Be brief."}\n')
    assert load_config(WithDict, [path]).chat_template == {"base": "chatml", "system_prompt": "Be brief."}
    assert load_config(WithDict, ["--chat_template={'base': 'plain'}"]).chat_template == {"base": "plain"}
    assert load_config(WithDict, ["--chat_template=zephyr"]).chat_template == "zephyr"
    bad = write(tmp_path, "bad.py", "\nchat_template = ['chatml']\n")
    with pytest.raises(UserError, match=r"bad.py:2: config key 'chat_template' must be str \| dict"):
        load_config(WithDict, [bad])


def test_unknown_keys_suggest_only_close_matches(tmp_path):
    for argv in (["--bogus_key=1"], [write(tmp_path, "c.py", "bogus_key = 1\n")]):
        with pytest.raises(UserError) as e:
            load_config(Cfg, argv)
        message = str(e.value)
        assert "unknown config key 'bogus_key'" in message and "--bogus_key" not in message
        assert "did you mean" not in message and "(--help lists the keys)" in message
    with pytest.raises(UserError, match=r"unknown config key 'compiled' on the command line \(did you mean 'compile'"):
        load_config(Cfg, ["--compiled=True"])


# ------------------------------------------------------------------------------------------------
# --help

HELP_SOURCE = '''"""A tool that does things."""
from dataclasses import dataclass


@dataclass
class ToolConfig:
    """Not a key."""
    # --- input -----------------------------------------
    path: str = "in.txt"  # where to read
    empty: str = ""
    # the first line of a long comment,
    # and its second
    rate: float = 5e-7  # beside
    # --- output ----------------------------------------
    count: int | None = None
'''


def test_dataclass_keys_read_from_source_without_importing_it(tmp_path):
    import ast

    from configurator import KeyDoc, dataclass_keys, help_text
    keys = dataclass_keys(HELP_SOURCE, ast.parse(HELP_SOURCE), "ToolConfig")
    assert keys == [KeyDoc("input", "path", "in.txt", "where to read"), KeyDoc("input", "empty", "''", ""),
                    KeyDoc("input", "rate", "5e-7", "the first line of a long comment, and its second beside"),
                    KeyDoc("output", "count", "None", "")]
    text = help_text(write(tmp_path, "tool.py", HELP_SOURCE), "ToolConfig", "python tool.py [--key=value ...]",
                     "More: the manual.")
    lines = text.splitlines()
    assert lines[0] == "usage: python tool.py [--key=value ...]" and "A tool that does things." in lines
    assert lines[lines.index("input") + 1].split() == ["--path=in.txt", "where", "to", "read"]
    assert lines[-1] == "More: the manual." and "Not a key." not in text


def _help(script: str, flag: str = "--help") -> subprocess.CompletedProcess:
    """`python -X importtime SCRIPT --help`: its stderr lists every module imported."""
    return subprocess.run([sys.executable, "-X", "importtime", script, flag], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "100"})


@pytest.mark.parametrize("script, flag, expected", [
    ("train.py", "--help", ["usage: python train.py [CONFIG.py] [--key=value ...]", "--beta=0.1",
                            "CONFIG.py [--key=value ...] Train: SFT, then SPIN iterations and a continued-SFT",
                            "--beta=0.1 a float, or one per iteration (the last repeats)",
                            "--init_from=scratch 'scratch', a Hugging Face model directory",
                            "--lr=5e-7", "More: README.md"]),
    ("train.py", "-h", ["usage: python train.py", "--val_data='' held-out file"]),
    ("generate.py", "--help", ["usage: python generate.py --model=DIR", "--temperature=0.7 0 = greedy",
                               "README.md (Chat with a model)"]),
    ("plot.py", "--help", ["usage: python plot.py OUT_DIR", "--out=FILE.png"]),
    ("seeds.py", "--help", ["usage: python seeds.py CONFIG --seeds=1,2,3", "python train.py --help lists the keys"]),
])
def test_help_answers_before_the_heavy_imports(script, flag, expected):
    proc = _help(script, flag)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = " ".join(proc.stdout.split())  # comments wrap: compare with single spaces
    for part in expected:
        assert part in text, part
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "configurator" in imported  # the list is read: an empty one would prove nothing
    assert not {"torch", "numpy", "matplotlib"} & imported, sorted({"torch", "numpy", "matplotlib"} & imported)


RANK_SCRIPT = """
import atexit, sys
from configurator import UserError, run_main

class Finalized:
    def __del__(self):
        print("torn down", flush=True)  # runs only if the interpreter tears its modules down

kept = Finalized()
atexit.register(lambda: print("exit handlers ran", flush=True))
def main(how):
    if how == "user":
        raise UserError("bad key")
    if how == "exit":
        sys.exit(3)
run_main(main, sys.argv[1])
"""


@pytest.mark.parametrize("how,code", [("ok", 0), ("user", 2), ("exit", 3)])
def test_a_torchrun_rank_keeps_its_exit_code_and_handlers_but_skips_interpreter_teardown(how, code):
    """Under torchrun (RANK set) run_main ends the rank with os._exit after the exit handlers: the interpreter's
    teardown can abort (exit -6) while a gloo thread still holds a collective's tensors (run_main's docstring)."""
    for rank in (None, "0"):
        env = {k: v for k, v in os.environ.items() if k != "RANK"} | ({"RANK": rank} if rank else {})
        proc = subprocess.run([sys.executable, "-c", RANK_SCRIPT, how], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == code, proc.stderr
        assert "exit handlers ran" in proc.stdout
        assert ("torn down" in proc.stdout) == (rank is None), proc.stdout
        assert ("error: bad key" in proc.stderr) == (how == "user")
