"""The checkout works from its own root, and the package is one room per concern without cycles.

A folder of the repository that is importable as a top-level name shadows an installed package of
that name wherever the root is on sys.path (`python -m`, `torchrun -m`, a script that inserts its
parent folder): a top-level `kernels/` once shadowed Hugging Face's `kernels`, which transformers
(5.25 and later) imports at start, and `python -m fastsd.cli` failed from the root.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fastsd"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def test_only_fastsd_is_importable_from_the_root():
    importable = {p.stem for p in REPO.iterdir()
                  if (p.is_dir() and (p / "__init__.py").exists()) or (p.is_file() and p.suffix == ".py")}
    assert importable == {"fastsd"}


def test_kernels_resolves_past_the_checkout_from_its_root(tmp_path):
    """From the root, `import kernels` finds the installed package (here a stand-in on PYTHONPATH,
    which comes after the root on sys.path), never a folder of the checkout."""
    stub = tmp_path / "site" / "kernels"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("WHO = 'installed'\n")
    out = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.WHO)"], cwd=REPO,
                         env=_env(PYTHONPATH=str(tmp_path / "site")), capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "installed", out.stderr


def test_cli_runs_from_the_root_with_hugging_face_kernels_importable(tmp_path):
    """`python -m fastsd.cli --dry-run` and a two-process `torchrun -m fastsd.cli` started in the
    checkout's root, where `kernels` is Hugging Face's package when transformers depends on it
    (5.25 and later), and imports."""
    spec = importlib.util.find_spec("kernels")
    if spec is not None:  # whatever is installed must be what the root finds, and must import
        probe = "import kernels, sys; print(kernels.__file__)"
        out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=_env(), capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert Path(out.stdout.strip()).resolve() == Path(spec.origin).resolve()
    dry = subprocess.run([sys.executable, "-m", "fastsd.cli", "--dry-run"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "The student's prompt for the first training question" in dry.stdout
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fastsd.cli",
           "steps=1", "eval=off", "questions_per_step=4", f"run_dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "checkpoints" / "step_00000001" / "COMPLETE").exists()


# ---------------------------------------------------------------- rooms and imports

def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path) -> set[str]:
    """Every fastsd module `path` imports, at the top or inside a function (imports for type
    checking alone excluded): `from . import x` counts as the module x where x is one."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking_only(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.split(".")[0] == "fastsd")
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                if mod.split(".")[0] != "fastsd":
                    continue
                for a in child.names:
                    sub = f"{mod}.{a.name}"
                    is_module = (REPO / Path(*sub.split("."))).with_suffix(".py").exists() or (
                        REPO / Path(*sub.split(".")) / "__init__.py").exists()
                    found.add(sub if is_module else mod)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    found.discard(here)
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def dfs(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def _room(module: str) -> str:
    """fastsd.X for a subpackage X (its room), else the top-level module itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else module


def test_no_import_cycle_between_modules():
    assert _cycle(_graph()) is None


def test_no_import_cycle_between_rooms():
    """A room may use the rooms below it, never one that uses it (the package's own __init__,
    which re-exports the loss API, is left out: every module's import runs it first)."""
    rooms: dict[str, set[str]] = {}
    for mod, deps in _graph().items():
        if mod == "fastsd":
            continue
        rooms.setdefault(_room(mod), set()).update(_room(d) for d in deps if _room(d) not in ("fastsd", _room(mod)))
    assert _cycle(rooms) is None


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_each_room_lists_its_modules():
    """Each subpackage says what it holds: its __init__ docstring names each of its modules."""
    for room in (p for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        doc = ast.get_docstring(ast.parse((room / "__init__.py").read_text())) or ""
        assert doc, room
        for mod in room.glob("*.py"):
            if mod.name != "__init__.py" and not mod.name.startswith("_"):
                assert mod.name in doc, f"{room.name}/__init__.py does not name {mod.name}"


def test_the_gpu_session_names_real_paths():
    """bench/gpu_session.sh is run as it is on a lent GPU, where a missing path costs device time."""
    script = (REPO / "bench" / "gpu_session.sh").read_text()
    named = set(re.findall(r"\b((?:tests|bench|tools)/[\w/.-]+\.(?:py|sh))", script))
    assert {"tests/loss/test_loss.py", "bench/gpu_bench.py"} <= named
    assert not [p for p in named if not (REPO / p).is_file()]
    modules = set(re.findall(r"import (fastsd[\w.]*)", script))
    assert modules and all(importlib.util.find_spec(m) is not None for m in modules), modules
