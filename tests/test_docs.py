"""The documentation agrees with the code: every setting, default, route, metric, command and test
it names exists, its links resolve, and README keeps the two commands CI runs."""
import re
from pathlib import Path

import pytest

from kms import config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "CONFIGURATION.md"
NO_DEFAULT = "—"


def every_doc() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md")), ROOT / "bench" / "README.md"]


def configuration_table() -> dict[str, str]:
    """Variable -> its default cell, from the table whose header starts `| Variable | Default |`."""
    lines = CONFIGURATION.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Variable | Default |"))
    table = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        variable = re.fullmatch(r"`([A-Z0-9_<>n]+)`", cells[0])
        assert variable, f"a row of the settings table does not start with a `VARIABLE`: {line}"
        assert variable.group(1) not in table, f"{variable.group(1)} is in the table twice"
        table[variable.group(1)] = cells[1]
    return table


def as_env_value(default) -> str:
    """A default as it is written in .env."""
    if isinstance(default, bool):
        return "true" if default else "false"
    return str(default)


def test_the_configuration_table_lists_every_variable_the_loader_reads():
    documented = set(configuration_table())
    assert documented - set(config.VARIABLES) == set(), "documented, but the loader does not read them"
    assert set(config.VARIABLES) - documented == set(), "read by the loader, missing from docs/CONFIGURATION.md"


def test_each_documented_default_is_the_code_default():
    table = configuration_table()
    checked = 0
    for variable, attribute in config.VARIABLES.items():
        if attribute is None or not hasattr(config.DEFAULT, attribute):
            continue  # no default of its own (required, or it feeds another setting)
        default = getattr(config.DEFAULT, attribute)
        expected = NO_DEFAULT if default is None else f"`{as_env_value(default)}`"
        assert table[variable] == expected, f"{variable}: documented {table[variable]}, the code says {expected}"
        checked += 1
    assert checked >= 25  # the check ran over the settings that have defaults


def test_the_default_column_holds_a_literal_or_nothing():
    for variable, cell in configuration_table().items():
        assert cell == NO_DEFAULT or re.fullmatch(r"`[^`]+`", cell), f"{variable}: default cell {cell!r}"


def test_every_variable_in_env_example_is_documented():
    named = set()
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = re.match(r"#?\s*([A-Z][A-Z0-9_]*)=", line)
        if match:
            named.add(re.sub(r"^KEK_\d+$", "KEK_<n>", match.group(1)))
    assert named, ".env.example names no variable"
    assert named - set(configuration_table()) == set()


def test_readme_is_short_and_keeps_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    assert ("python3 -m venv .venv && .venv/bin/pip install \".[dev-db]\" && .venv/bin/kms dev\n") in readme
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    test_command = ci[ci.index("# README's test command, verbatim:") + 1]
    assert test_command + "\n" in readme, "CI runs README's test command verbatim: keep them the same"
    for doc in ("docs/API.md", "docs/CONFIGURATION.md", "docs/OPERATIONS.md", "docs/SECURITY.md",
                "docs/ARCHITECTURE.md", "docs/DEPLOYMENT.md", "bench/README.md"):
        assert f"]({doc})" in readme, f"README does not link {doc}"


@pytest.mark.parametrize("doc", every_doc(), ids=lambda path: str(path.relative_to(ROOT)))
def test_links_between_documents_resolve(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        assert path.exists(), f"{doc.name} links {target}, which does not exist"
        assert ROOT in path.parents, f"{doc.name} links {target}, outside the repository"


@pytest.mark.parametrize("doc", [*every_doc(), ROOT / ".env.example"], ids=lambda path: str(path.relative_to(ROOT)))
def test_no_diary_and_no_machine_paths(doc):
    text = doc.read_text()
    diary = re.findall(r"(?i)sessions? [0-9]|th" r"is session", text)  # (written apart: not a match itself)
    assert not diary, f"{doc.name} speaks of work sessions: {diary}"
    assert not re.findall(r"(?<![\w.])/(?:work|tmp)/", text), f"{doc.name} names a machine path"
    assert "shared/API.md" not in text, f"{doc.name} points outside the repository for the contract"


def test_every_route_is_in_the_api_document_and_nothing_else_is(app):
    text = (DOCS / "API.md").read_text()
    built, planned = text.split("\n## Planned", 1) if "\n## Planned" in text else (text, "")
    names = {"keyref": "ref", "version": "version", "clientid": "id", "grantid": "id"}
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":  # Flask's own, and empty: the package has no static folder
            continue
        path = re.sub(r"<(?:(\w+):)?(\w+)>", lambda m: "{" + names.get(m.group(1), m.group(2)) + "}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            routes.add((method, path))
    documented = {(method, path.split("?", 1)[0])
                  for method, path in re.findall(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`\s]*)", built)}
    assert routes - documented == set(), "routes the server has that docs/API.md does not describe"
    assert documented - routes == set(), "routes docs/API.md describes that the server does not have"


def test_every_metric_is_documented_by_its_name_in_the_code():
    source = "\n".join(path.read_text() for path in (ROOT / "kms").rglob("*.py"))
    defined = set(re.findall(r"\(\s*\"(kms_[a-z0-9_]+)\"", source))
    text = (DOCS / "OPERATIONS.md").read_text()
    documented = {re.sub(r"_(total|info)$", "", name) for name in re.findall(r"`(kms_[a-z0-9_]+)", text)}
    assert defined - documented == set(), "metrics the server exports that docs/OPERATIONS.md does not name"
    assert documented - defined == set(), "metrics docs/OPERATIONS.md names that the server does not export"


def test_every_command_is_documented():
    import click
    from kms.cli import main

    def paths(group, prefix=""):
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from paths(command, f"{prefix}{name} ")
            else:
                yield prefix + name

    text = (DOCS / "OPERATIONS.md").read_text()
    missing = [path for path in paths(main) if f"`kms {path}" not in text]
    assert not missing, f"commands docs/OPERATIONS.md does not document: {missing}"


def test_every_test_a_document_names_exists():
    defined = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        defined.update(re.findall(r"^def (test_\w+)", path.read_text(), re.M))
    for doc in every_doc():
        for name in re.findall(r"`(test_\w+)`", doc.read_text()):
            assert name in defined, f"{doc.name} names {name}, which no test defines"


def test_every_test_file_a_doc_names_exists():
    root = Path(__file__).resolve().parent.parent
    docs = [root / "README.md", root / "bench" / "README.md", *sorted((root / "docs").glob("*.md"))]
    named = {match for doc in docs for match in re.findall(r"tests/[\w/]+\.py", doc.read_text())}
    assert sorted(path for path in named if not (root / path).exists()) == []
