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
    with pytest.raises(UserError, match=r"unknown config key '--lrr' \(did you mean 'lr'\?\)"):
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
    assert len(lines) == 1 and "unknown config key '--n_layers' (did you mean 'n_layer'?)" in lines[0]
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
