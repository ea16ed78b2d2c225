"""The project's import graph: no cycle, and no project module imported inside a function.

Read from the source with `ast` (nothing is imported): the modules are the top-level *.py files and
bench/*.py (the benchmarks import each other by bare name); tests/*.py only import, so they are
checked for in-function imports of the library below them but are no node of the graph. An import
under `if __name__ == "__main__":` runs only when the file is a script, never on import, so it is no
edge. Optional packages (pyarrow, matplotlib, wandb, gguf, tensorboard, transformers' own modules)
may be imported lazily: they are not project modules.
"""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# In-function imports of project modules that are there on purpose, with the reason; nothing else.
LAZY_ON_PURPOSE = {
    ("data.py", "rollout"): "data.py imports neither torch nor transformers (test_data checks it); only a "
                            "Parquet file with a `prompt` column needs rollout's prompt template",
    ("bench/bench_retriever.py", "demo"): "--index-scale's child process measures its memory without torch",
}


def project_files() -> dict[str, str]:
    """{module name: path relative to the repository} of every module in the graph."""
    paths = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "bench", "*.py")))
    return {os.path.splitext(os.path.basename(p))[0]: os.path.relpath(p, ROOT) for p in paths}


def is_main_guard(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and
            isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def imported_names(node: ast.AST) -> list[str]:
    """The top-level module names an import statement loads (`from a.b import c` -> ["a"])."""
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module.split(".")[0]]
    return []


def imports_of(path: str, modules: set[str]) -> tuple[set[str], list[tuple[int, str]]]:
    """(project modules imported at module level, [(line, module) of project imports inside a
    function or class body])."""
    tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read(), filename=path)
    top, nested = set(), []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if is_main_guard(child) and not in_function:
                continue
            for name in imported_names(child):
                if name in modules:
                    (nested.append((child.lineno, name)) if in_function else top.add(name))
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
            visit(child, inner)

    visit(tree, False)
    return top, nested


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state, stack = {}, []

    def dfs(node: str) -> list[str] | None:
        state[node] = "grey"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "grey":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "black"
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_the_import_graph_of_the_project_has_no_cycle():
    files = project_files()
    graph = {name: imports_of(path, set(files))[0] - {name} for name, path in files.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(f"{m} ({files[m]})" for m in cycle)


def test_no_project_module_is_imported_inside_a_function():
    files = project_files()
    checked = list(files.values()) + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "*.py")))
    found = [f"{path}:{line}: imports {name} inside a function"
             for path in checked for line, name in imports_of(path, set(files))[1]
             if (path, name) not in LAZY_ON_PURPOSE]
    assert not found, "\n".join(found)


def test_the_checker_finds_a_cycle_and_an_import_inside_a_function(tmp_path, monkeypatch):
    # the two checks above would pass vacuously if the parser missed imports: a made-up project proves they bite
    (tmp_path / "bench").mkdir()
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("from c import x\n\nif __name__ == '__main__':\n    import a\n")
    (tmp_path / "c.py").write_text("import os\n\n\ndef f():\n    import a\n    return a\n\nimport a as again\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
    files = project_files()
    assert set(files) == {"a", "b", "c"}
    graph = {name: imports_of(path, set(files))[0] - {name} for name, path in files.items()}
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}}          # b's __main__ import is no edge
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert imports_of("c.py", set(files))[1] == [(5, "a")]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
