"""Reading the original's .env and opening its rows, as its Go code writes them."""
import os
from types import SimpleNamespace

import pytest

from kms.importing import original
from tests.importing.original_format import hs256_b64, raw_url, seal

SECRETS = {name: os.urandom(32) for name in original.SECRET_NAMES}


def env_file(tmp_path, text):
    path = tmp_path / ".env"
    path.write_text(text)
    return path


def test_the_seed_env_is_read_as_the_originals_config_loader_reads_it(tmp_path):
    lines = ["# Application keys", "", "DB_HOST=", "  KEK = " + raw_url(SECRETS["KEK"]) + "  ",
             "not a setting"] + [f"{name}={raw_url(SECRETS[name])}" for name in original.SECRET_NAMES[1:]]
    secrets = original.read_seed_env(env_file(tmp_path, "\n".join(lines)))
    assert (secrets.kek, secrets.db_secret, secrets.key_ref_secret, secrets.username_secret) == \
        tuple(SECRETS[name] for name in original.SECRET_NAMES)
    assert "OriginalSecrets()" == repr(secrets)  # never its bytes


def test_every_problem_of_a_seed_env_is_named_without_its_value(tmp_path):
    padded = raw_url(SECRETS["DB_SECRET"]) + "="  # Go's RawURLEncoding refuses padding
    text = f"DB_SECRET={padded}\nKEK={raw_url(os.urandom(20))}\nKEY_REF_SECRET=\"{raw_url(os.urandom(32))}\"\n"
    with pytest.raises(original.SeedEnvProblem) as problem:
        original.read_seed_env(env_file(tmp_path, text))
    assert problem.value.problems == [
        "KEK: 20 bytes, not an AES key (16, 24 or 32 bytes)",
        "DB_SECRET: not unpadded base64url, which the original would not have started with",
        "KEY_REF_SECRET: not unpadded base64url, which the original would not have started with",
        "USERNAME_SECRET: not set in the original's .env"]
    assert padded not in str(problem.value)


def client_row(**changed):
    """billing-svc's row as the original writes it, with `changed` columns."""
    values = {"id": 7, "clientname": seal(b"billing-svc", SECRETS["DB_SECRET"]),
              "hashedclientname": hs256_b64("billing-svc", SECRETS["USERNAME_SECRET"]),
              "password": "$2a$10$" + "a" * 53, "role": seal(b"client", SECRETS["DB_SECRET"])}
    return SimpleNamespace(**{**values, **changed})


SEALED = original.OriginalSecrets(kek=SECRETS["KEK"], db_secret=SECRETS["DB_SECRET"],
                                  key_ref_secret=SECRETS["KEY_REF_SECRET"], username_secret=SECRETS["USERNAME_SECRET"])


def test_a_client_row_opens_to_its_name_role_and_bcrypt_hash():
    client = original.open_client(SEALED, client_row())
    assert (client.name, client.role, client.password_hash) == ("billing-svc", "client", "$2a$10$" + "a" * 53)


@pytest.mark.parametrize("changed,why", [
    ({"clientname": seal(b"billing-svc", os.urandom(32))}, "the name does not open under DB_SECRET"),
    ({"hashedclientname": hs256_b64("other-svc", SECRETS["USERNAME_SECRET"])},
     "hashedClientname is not the HMAC of its name under USERNAME_SECRET"),
    ({"role": "not sealed!"}, "the role is not base64url"),
    ({"password": "plain-text-password"}, "the password is not a bcrypt hash"),
])
def test_a_client_row_that_does_not_open_says_why_without_a_value(changed, why):
    with pytest.raises(original.Unreadable) as unreadable:
        original.open_client(SEALED, client_row(**changed))
    assert str(unreadable.value) == why


def test_a_key_row_opens_to_its_dek_and_state():
    dek = os.urandom(32)
    row = SimpleNamespace(id=3, version=2, dek=seal(dek, SECRETS["KEK"]),
                          state=seal(b"deprecated", SECRETS["DB_SECRET"]),
                          encoding=seal(b"base64url (RFC 4648)", SECRETS["DB_SECRET"]))
    version = original.open_key_version(SEALED, row)
    assert (version.version, version.state, version.dek) == (2, "deprecated", dek)
    assert raw_url(dek) not in repr(version)
    with pytest.raises(original.Unreadable, match="the DEK is 16 bytes, not 32"):
        original.open_key_version(SEALED, SimpleNamespace(**{**vars(row), "dek": seal(dek[:16], SECRETS["KEK"])}))
