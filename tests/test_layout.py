"""The package's structure, read from its imports: no cycle, no floor importing a higher one, no
import hidden inside a function to dodge either, and pure modules that load no framework."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kms"

DOMAINS = ("kms.auth", "kms.keys", "kms.operations", "kms.grants", "kms.clients", "kms.audit", "kms.importing")
# Infrastructure: what every domain may use, and which may use no domain.
INFRASTRUCTURE = ("kms.access", "kms.ciphertext", "kms.config", "kms.context", "kms.crypto", "kms.db", "kms.errors", "kms.expiring",
                  "kms.failures",
                  "kms.ids", "kms.keyproviders", "kms.observability", "kms.rows", "kms.rules", "kms.timefmt",
                  "kms.web")
# Pure: importable anywhere (the SDK's tests, a script) without the server's frameworks.
PURE = ("kms.ciphertext", "kms.crypto", "kms.failures", "kms.rules", "kms.errors", "kms.context", "kms.ids", "kms.timefmt", "kms.expiring",
        "kms.keyproviders.base", "kms.keyproviders.environment", "kms.keyproviders.pkcs11")
FRAMEWORKS = ("flask", "werkzeug", "psycopg2", "prometheus_client", "waitress", "flask_smorest", "marshmallow")
# Imports inside a function, each keeping an optional dependency optional.
OPTIONAL_IMPORTS = {("kms.keyproviders.pkcs11", "pkcs11")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported(tree: ast.AST) -> list[tuple[str, bool]]:
    """(module, inside a function) for every import in a module."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, nested) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module, nested))
                found.extend((f"{child.module}.{alias.name}", nested) for alias in child.names)
            visit(child, nested)

    visit(tree, False)
    return found


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """kms module -> the kms modules it imports (a submodule's import runs its packages too), and
    the imports made inside functions."""
    known = modules()
    graph, in_functions = {name: set() for name in known}, []
    for name, path in known.items():
        for target, nested in imported(ast.parse(path.read_text())):
            if nested:
                in_functions.append((name, target))
            while target and target not in known:  # `from kms.web import routing` names a module
                target = target.rpartition(".")[0]
            while target:
                if target != name and target in known:
                    graph[name].add(target)
                target = target.rpartition(".")[0]
    return graph, in_functions


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def connect(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in graph:
        if node not in index:
            connect(node)
    return found


def under(name: str, prefixes) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def test_no_module_imports_itself_back_through_others():
    graph, _ = import_graph()
    assert cycles(graph) == []


def test_no_domain_package_imports_another_that_imports_it_back():
    graph, _ = import_graph()
    packages = {domain: set() for domain in DOMAINS}
    for name, targets in graph.items():
        for domain in DOMAINS:
            if under(name, [domain]):
                packages[domain] |= {other for other in DOMAINS if other != domain and under_any(targets, other)}
    assert cycles(packages) == []


def under_any(names, prefix) -> bool:
    return any(under(name, [prefix]) for name in names)


def test_infrastructure_never_imports_a_domain():
    graph, _ = import_graph()
    crossing = sorted((name, target) for name, targets in graph.items() if under(name, INFRASTRUCTURE)
                      for target in targets if under(target, DOMAINS))
    assert crossing == []


def test_imports_inside_functions_only_keep_an_optional_dependency_optional():
    _, in_functions = import_graph()
    assert sorted(set(in_functions)) == sorted(OPTIONAL_IMPORTS)


@pytest.mark.parametrize("module", PURE)
def test_a_pure_module_loads_no_framework(module):
    program = (f"import sys, {module}; "
               f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(FRAMEWORKS)!r}))")
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_importing_the_package_loads_nothing_else():
    program = "import sys, kms; print(sorted(m for m in sys.modules if m.startswith('kms.')))"
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_checks_above_see_a_cycle_and_a_hidden_import(tmp_path):
    """The graph is read right: a made-up pair of modules importing each other is a cycle."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    tree = ast.parse("import os\ndef f():\n    from kms import db\n")
    assert imported(tree) == [("os", False), ("kms", True), ("kms.db", True)]
