"""The layout's rules, checked on the source: no import cycles, the service free of
torch and of the pipeline, the bundle contract self-contained, short modules."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGES = ("pipeline", "serving", "ops", "textops")
MAX_LINES = 300
# What the service image must never import: training frameworks and the code that
# trains (serving/ holds exactly what the image ships).
NOT_IN_SERVING = ("torch", "pytorch_lightning", "lightning", "torchmetrics", "pipeline", "ops",
                  "textops")
# The bundle contract: what both sides load bundles with.
CONTRACT_THIRD_PARTY = ("numpy", "onnxruntime", "tokenizers", "PIL")  # PIL: image bundles
# The registered MLflow model wraps the contract, so it needs MLflow and pandas too; a
# registry URI is fetched with MLflow, imported only for such URIs.
# A signed bundle's signature is OpenSSF model signing's, checked with its package
# (on cryptography), imported only to sign or verify.
CONTRACT_EXTRAS = {"serving.bundle.pyfunc": ("mlflow", "pandas"),
                   "serving.bundle.signature": ("model_signing", "cryptography")}


def product_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imports(path: Path) -> list[str]:
    """Every module `path` imports, at the top or inside functions; `from a import b`
    names both a and a.b (b may be a module)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return found


def graph() -> dict[str, set[str]]:
    modules = product_modules()
    return {name: {i for i in imports(path) if i in modules and i != name}
            for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    assert cycles(graph()) == []


def package_of(module: str) -> str:
    """The folder a module belongs to (pipeline.stages.train: pipeline.stages); a module
    at a package's top (pipeline.config) stands for itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_no_cycles_between_folders():
    """The folders form layers: a newcomer reads each one knowing only those below."""
    folders: dict[str, set[str]] = {}
    for module, imported in graph().items():
        edges = folders.setdefault(package_of(module), set())
        edges |= {package_of(i) for i in imported} - {package_of(module)}
    for edges in folders.values():
        for target in edges:
            folders.setdefault(target, set())
    assert cycles(folders) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_service_imports_neither_torch_nor_the_pipeline():
    for name, path in product_modules().items():
        if name.split(".")[0] != "serving":
            continue
        bad = [i for i in imports(path) if i.split(".")[0] in NOT_IN_SERVING]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_bundle_contract_stands_alone():
    """serving/bundle/ is what the pipeline writes and the service reads: it imports
    nothing else of the product, and of the rest only what a bundle needs."""
    for name, path in product_modules().items():
        if not name.startswith("serving.bundle"):
            continue
        allowed = CONTRACT_THIRD_PARTY + CONTRACT_EXTRAS.get(name, ())
        for imported in imports(path):
            top = imported.split(".")[0]
            if top in PACKAGES:
                assert imported.startswith("serving.bundle"), f"{name} imports {imported}"
            else:
                assert top in allowed or top in sys.stdlib_module_names or top == "__future__", \
                    f"{name} imports {imported}"


def test_the_command_runs_deploy_tooling_only_as_a_process():
    """textops/ is installed; ops/ is not (it would shadow PyPI's `ops`): the command
    runs `python -m ops....` in the project's root instead of importing it."""
    for name, path in product_modules().items():
        if name.split(".")[0] == "textops":
            bad = [i for i in imports(path) if i.split(".")[0] == "ops"]
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_is_too_long_to_hold_in_your_head(package):
    long = {str(path.relative_to(ROOT)): n for name, path in product_modules().items()
            if name.split(".")[0] == package
            and (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"
