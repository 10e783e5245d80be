"""Settings are validated once; bad ones stop start-up with one line naming the variable."""
import os
import subprocess
import sys

import pytest

from kms.config import ConfigError, generate_secret, load_settings
from kms.runtime import StartupError
from tests.conftest import ROOT


def test_valid_settings_load(base_env):
    settings = load_settings(base_env)
    assert settings.server_host == "127.0.0.1" and settings.server_port == 8080
    assert settings.kek_active == 1
    assert "KEK" not in repr(settings) and base_env["KEK"] not in repr(settings)


@pytest.mark.parametrize("variable", ["KEK", "JWT_SECRET", "DB_SECRET", "SIGNUP_SECRET", "KEY_REF_SECRET",
                                      "USERNAME_SECRET"])
def test_missing_secret_names_the_variable(base_env, variable):
    env = dict(base_env)
    del env[variable]
    with pytest.raises(ConfigError) as error:
        load_settings(env)
    assert error.value.variable == variable
    assert str(error.value).startswith(f"{variable}: ")


@pytest.mark.parametrize("value", ["too-short", "!!!!" * 11, "A" * 44 + "AAAA", ""])
def test_malformed_kek_is_refused_without_echoing_it(base_env, value):
    with pytest.raises(ConfigError) as error:
        load_settings({**base_env, "KEK": value})
    assert error.value.variable == "KEK"
    if value:
        assert value not in str(error.value)


def test_padding_is_optional(base_env):
    unpadded = generate_secret()
    assert "=" not in unpadded
    assert load_settings({**base_env, "KEK": unpadded + "="}).keks[1] == load_settings(
        {**base_env, "KEK": unpadded}).keks[1]


def test_kek_active_must_name_a_configured_kek(base_env):
    with pytest.raises(ConfigError) as error:
        load_settings({**base_env, "KEK_ACTIVE": "3"})
    assert error.value.variable == "KEK_ACTIVE"


def test_further_kek_versions_and_active_default_to_the_highest(base_env):
    settings = load_settings({**base_env, "KEK_2": generate_secret()})
    assert sorted(settings.keks) == [1, 2] and settings.kek_active == 2


@pytest.mark.parametrize("variable,value", [("SERVER_PORT", "eighty"), ("JWT_TTL", "-5"), ("DEFAULT_ROLE", "root"),
                                            ("KEY_DELETION_WAIT", "soon"), ("DB_SSLMODE", "maybe")])
def test_malformed_plain_settings_name_the_variable(base_env, variable, value):
    env = {**base_env, variable: value}
    if variable == "DB_SSLMODE":
        env.pop("DATABASE_URL")
        env["DB_HOST"] = "localhost"
    with pytest.raises(ConfigError) as error:
        load_settings(env)
    assert error.value.variable == variable


def test_database_url_can_be_assembled_from_db_variables(base_env):
    env = {k: v for k, v in base_env.items() if k != "DATABASE_URL"}
    env.update(DB_HOST="db.internal", DB_PORT="6432", DB_NAME="kms", DB_USER="kms", DB_PASSWORD="p@ss word",
               DB_SSLMODE="require")
    assert load_settings(env).database_url == "postgresql://kms:p%40ss%20word@db.internal:6432/kms?sslmode=require"


def test_weak_master_admin_password_is_refused(base_env):
    with pytest.raises(ConfigError) as error:
        load_settings({**base_env, "MASTER_ADMIN_PASSWORD": "short"})
    assert error.value.variable == "MASTER_ADMIN_PASSWORD"
    assert "short" not in str(error.value)


def test_a_different_kek_than_the_stored_keys_stops_start_up(make_app, base_env):
    make_app()  # first start records the KEK's fingerprint
    with pytest.raises(StartupError) as error:
        make_app(KEK=generate_secret())
    assert error.value.variable == "KEK"


def test_removing_a_kek_that_still_wraps_keys_does_not_stop_start_up(make_app, auth_for):
    app = make_app(KEK_2=generate_secret())
    auth_for(app, lambda client, token: client.post("/keys/actions/generate", json={"keyReference": "k"},
                                                    headers={"Authorization": f"Bearer {token}"}))
    without = make_app()  # KEK_2 left out, but a DEK is wrapped with it (its look-ups: tests/keys/test_kek_order.py)
    keyring = without.extensions["kms"].keyring
    assert keyring.kek_versions == [1] and 2 in keyring.known_kek_versions


def test_server_start_with_a_bad_kek_prints_one_line_naming_it(base_env):
    short_key = "c2hvcnQ"  # base64url of 5 bytes
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("KEK", "DB_", "JWT"))},
           **base_env, "KEK": short_key}
    result = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["configuration error: KEK: must decode to 32 bytes"]


def test_server_start_without_a_database_says_so_in_one_line(base_env):
    from kms.serving.throwaway_postgres import _free_port
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("KEK", "DB_", "JWT"))},
           **base_env, "DATABASE_URL": f"postgresql://kms:Sekrit-pw@127.0.0.1:{_free_port()}/kms"}
    result = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("database unavailable: ")
    assert "Sekrit-pw" not in result.stderr
