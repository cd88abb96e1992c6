"""The repository's own import names: none may shadow an installed package.

Whatever runs from the repository root (pytest, `python train.py`, a user's script beside ours) has the root first
on sys.path, so a top-level module or package of ours named like an installed one is imported instead of it:
transformers 5.25 imports Hugging Face's `kernels`, which our former `kernels/` package shadowed.
"""

import importlib.metadata
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def top_level_import_names(root: str) -> set[str]:
    """The names `import NAME` finds at the repository root: modules (NAME.py) and packages (NAME/__init__.py)."""
    names = set()
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if entry.endswith(".py"):
            names.add(entry[:-3])
        elif os.path.isfile(os.path.join(path, "__init__.py")):
            names.add(entry)
    return names


def test_the_helper_sees_our_modules_and_packages():
    names = top_level_import_names(REPO)
    assert {"model", "train", "spin", "spin_kernels"} <= names, names  # a helper that sees nothing would pass below


def test_no_top_level_name_of_ours_is_an_installed_package():
    installed = importlib.metadata.packages_distributions()  # import name -> distributions providing it
    clashes = {name: installed[name] for name in top_level_import_names(REPO) if name in installed}
    assert not clashes, (f"these import names of the repository shadow installed packages when run from its root: "
                         f"{clashes}; rename ours")


def test_a_clash_would_be_seen(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "pytest.py").write_text("")
    names = top_level_import_names(str(tmp_path))
    installed = importlib.metadata.packages_distributions()
    assert "pytest" in names & set(installed)  # pytest is installed wherever this runs
