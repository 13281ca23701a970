"""The package's layout, read from its source (every import counts, also inside functions): no
import cycle; imports point down the layers; the page and the call's loop never reach torch; no
folder, class or function past its size."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "omni_demo"
# Sub-packages from the bottom up: a module imports only from its own layer or the ones below.
LAYERS = [
    {"config", "events", "errors", "flags"},  # the vocabulary every layer shares
    {"inputs", "models"},
    {"engine"},
    {"serve"},
    {"backends"},
    {"call"},
    {"app"},
    {"tools"},
    {"cli", "__main__", "bench", "memory"},  # entry points
]
TORCH_FREE = ["omni_demo.app", "omni_demo.call", "omni_demo.backends", "omni_demo.inputs.messages"]
TORCH_ALLOWED = {"omni_demo.call.vad"}  # the VAD model: given to the page by app.py, never imported by it
HEAVY = {"torch", "transformers", "torchvision", "torchaudio", "silero_vad"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it (relative imports resolved)."""
    name, found = module_name(path), set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} | {m for m in imports_of(path)
            if m.split(".")[0] in HEAVY} for name, path in modules.items()}


def inside(graph, name):
    return {m for m in graph[name] if m.startswith("omni_demo")}


def test_no_import_cycle(graph):
    state: dict[str, int] = {}

    def visit(name, trail):
        state[name] = 1
        for other in inside(graph, name):
            if state.get(other) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(other):] + [other]))
            if other not in state:
                visit(other, trail + [other])
        state[name] = 2

    sys.setrecursionlimit(10_000)
    for name in graph:
        if name not in state:
            visit(name, [name])


def layer(name: str) -> int:
    top = name.split(".")[1] if "." in name else name
    return next(index for index, members in enumerate(LAYERS) if top in members)


def test_imports_point_down_the_layers(graph):
    upward = [f"{name} -> {other}" for name in graph for other in inside(graph, name)
              if other != "omni_demo" and layer(other) > layer(name)]
    assert not upward, "imports that point up:\n" + "\n".join(sorted(upward))


def test_the_page_and_the_call_never_reach_torch(graph):
    for root in TORCH_FREE:
        seen, todo = set(), [m for m in graph if m == root or m.startswith(root + ".")]
        todo = [m for m in todo if m not in TORCH_ALLOWED]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            heavy = {m for m in graph[name] if m.split(".")[0] in HEAVY}
            assert not heavy, f"{root} reaches {sorted(heavy)} through {name}"
            todo += [m for m in inside(graph, name) if m not in TORCH_ALLOWED]


def test_folders_classes_and_functions_stay_small():
    folders = {path.parent for path in PACKAGE.rglob("*.py")}
    assert len(folders - {PACKAGE}) >= 4
    for folder in folders:
        assert len(list(folder.glob("*.py"))) <= 12, f"{folder} has over 12 modules"
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            length = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef):
                assert length <= 250, f"{path.name}: class {node.name} is {length} lines"
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert length <= 60, f"{path.name}: {node.name} is {length} lines"


@pytest.mark.parametrize("entry", [["app.py"], ["-m", "omni_demo"], ["-m", "omni_demo.serve"], ["-m", "omni_demo.bench"],
                                   ["-m", "omni_demo.models.tiny"], ["-m", "omni_demo.tools.spaces"]])
def test_every_entry_point_answers_help(entry):
    import subprocess

    result = subprocess.run([sys.executable, *entry, "--help"], cwd=PACKAGE.parent, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr[-2000:]


def test_serve_config_names_an_importable_application():
    import importlib

    import yaml

    config = yaml.safe_load((PACKAGE.parent / "serve_config.yaml").read_text())
    for app in config["applications"]:
        module, _, name = app["import_path"].partition(":")
        assert callable(getattr(importlib.import_module(module), name))
