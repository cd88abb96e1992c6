"""The repository's own import names: none may shadow an installed package; and their import graph: no circles.

Whatever runs from the repository root (pytest, `python train.py`, a user's script beside ours) has the root first
on sys.path, so a top-level module or package of ours named like an installed one is imported instead of it:
transformers 5.25 imports Hugging Face's `kernels`, which our former `kernels/` package shadowed.
"""

import ast
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


# ------------------------------------------------------------------------------------------------
# the import graph: no circles, and the low modules import nothing above them


def our_imports(root: str) -> dict[str, set[str]]:
    """{module: the modules of ours it imports} for the top-level modules and spin_kernels' files, from their
    source: every import statement, also those inside functions; not those under `if TYPE_CHECKING:`, which
    never run. spin_kernels' files are 'spin_kernels' (its __init__) and 'spin_kernels.attention' etc."""
    names = top_level_import_names(root)
    files = {entry[:-3]: os.path.join(root, entry) for entry in os.listdir(root) if entry.endswith(".py")}
    kernels = os.path.join(root, "spin_kernels")
    if os.path.isdir(kernels):
        for entry in os.listdir(kernels):
            if entry.endswith(".py"):
                name = "spin_kernels" if entry == "__init__.py" else f"spin_kernels.{entry[:-3]}"
                files[name] = os.path.join(kernels, entry)
    graph = {}
    for module, path in files.items():
        tree = ast.parse(open(path).read(), path)
        skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(
            node.test) for stmt in node.body for n in ast.walk(stmt)}
        imported = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[module] = {name for name in imported if name in files and name != module}
        graph[module] |= {name.split(".")[0] for name in imported if name.split(".")[0] in names} - {module}
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports (its modules in order, the first repeated at the end), or None."""
    state: dict[str, str] = {}  # 'open' while on the path, 'done' after

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for other in sorted(graph.get(module, ())):
            if state.get(other) == "open":
                return path[path.index(other):] + [other]
            if other not in state:
                found = visit(other, path + [other])
                if found:
                    return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_no_import_circles():
    cycle = import_cycle(our_imports(REPO))
    assert cycle is None, f"import circle: {' -> '.join(cycle)}; move what both need below both"


def test_the_low_modules_import_nothing_above_them():
    graph = our_imports(REPO)
    kernels = {m for m in graph if m.split(".")[0] == "spin_kernels"}
    assert graph["model"] <= {"configurator", "packing"} | kernels, graph["model"]
    for module in kernels:  # the kernels raise their own KernelError: not even configurator
        assert graph[module] <= {"packing"} | kernels, (module, graph[module])
    assert "memory_plan" not in graph["spin"] and "train" not in {m for deps in graph.values() for m in deps}


def test_a_circle_would_be_seen(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from c import x\n")  # an import inside a function counts
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import b\nimport a\n")
    graph = our_imports(str(tmp_path))
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert import_cycle(graph) == ["a", "b", "c", "a"]
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n")
    assert import_cycle(our_imports(str(tmp_path))) is None
