"""A deployment of the original Go KMS as its code writes it (github.com/jeltjongsma/KMS), built in
Python since the tests cannot build Go: its schema, verbatim, and rows written the way its
signup, generate and rotate write them. Written from the original's source, not from
kms/importing, so that the import is tested against the original, not against itself.
"""
import base64
import hashlib
import hmac
import os
from pathlib import Path

import bcrypt
import psycopg2
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# database/migrations/00001_init_mg.up.sql, verbatim.
SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id SERIAL PRIMARY KEY,
    clientId INTEGER NOT NULL,
    keyReference VARCHAR(64) NOT NULL,
    version INTEGER NOT NULL,
    dek VARCHAR(80) NOT NULL,
    state VARCHAR(52) NOT NULL,
    encoding VARCHAR(64) NOT NULL,
    UNIQUE(clientId, keyReference, version)
);

CREATE TABLE IF NOT EXISTS clients (
    id SERIAL PRIMARY KEY,
    clientname VARCHAR(128) UNIQUE NOT NULL,
    hashedClientname VARCHAR(44) UNIQUE NOT NULL,
    password CHAR(60) NOT NULL,
    role VARCHAR(46) NOT NULL DEFAULT 'client'
);
"""
ENCODING = "base64url (RFC 4648)"  # internal/keys/service.go


def raw_url(raw: bytes) -> str:
    """Go's base64.RawURLEncoding.EncodeToString."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def seal(plaintext: bytes, key: bytes) -> str:
    """pkg/encryption/encryption.go Encrypt (nonce || Seal, no associated data), then base64url as
    internal/storage/encryption/context.go stores every encrypted field."""
    nonce = os.urandom(12)
    return raw_url(nonce + AESGCM(key).encrypt(nonce, plaintext, None))


def hs256_b64(plain: str, secret: bytes) -> str:
    """pkg/hashing/hashing.go HashHS256ToB64."""
    return raw_url(hmac.new(secret, plain.encode(), hashlib.sha256).digest())


class OriginalDeployment:
    """The original's database, and its .env. `deks` holds what its clients were served:
    (clientname, reference, version) -> DEK bytes."""

    def __init__(self, url: str):
        self.url = url
        self.secrets = {name: os.urandom(32) for name in
                        ("JWT_SECRET", "SIGNUP_SECRET", "KEK", "DB_SECRET", "KEY_REF_SECRET", "USERNAME_SECRET")}
        self.ids: dict[str, int] = {}
        self.deks: dict[tuple[str, str, int], bytes] = {}
        self.conn = psycopg2.connect(url)
        self.conn.autocommit = True
        with self.conn.cursor() as cur:
            cur.execute(SCHEMA)

    def close(self):
        self.conn.close()

    def write_env(self, path: Path, **changed: bytes) -> Path:
        """Its .env as .env.example lays it out, every value set (its LoadConfig refuses empty ones)."""
        secrets = {**self.secrets, **changed}
        lines = ["# Database config", "DB_HOST=localhost", "DB_NAME=kms", "DB_USER=kms", "DB_PASSWORD=kms",
                 "DB_PORT=5432", "DB_SSLMODE=disable", "", "SERVER_PORT=8443", "ENV=prod", "LOG_LEVEL=info",
                 "JWT_TTL=900000", "MASTER_ADMIN_USERNAME=admin", "MASTER_ADMIN_PASSWORD=Admin-passw0rd!",
                 "DEFAULT_ROLE=client", "", "# Application keys"]
        lines += [f"{name}={raw_url(value)}" for name, value in secrets.items()]
        path.write_text("\n".join(lines) + "\n")
        return path

    def sign_up(self, clientname: str, password: str, role: str = "client") -> int:
        """internal/auth/service.go Signup (and schema.go ensureMasterAdmin for an admin):
        bcrypt at cost 10 ($2a$, as golang.org/x/crypto/bcrypt writes), name and role sealed
        under DB_SECRET, the name HMAC'd under USERNAME_SECRET."""
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(10, prefix=b"2a")).decode()
        with self.conn.cursor() as cur:
            cur.execute("INSERT INTO clients (clientname, hashedClientname, password, role) VALUES (%s, %s, %s, %s) "
                        "RETURNING id", (seal(clientname.encode(), self.secrets["DB_SECRET"]),
                                         hs256_b64(clientname, self.secrets["USERNAME_SECRET"]), hashed,
                                         seal(role.encode(), self.secrets["DB_SECRET"])))
            self.ids[clientname] = cur.fetchone()[0]
        return self.ids[clientname]

    def _create_key(self, cur, clientname: str, reference: str, version: int) -> bytes:
        """internal/keys/service.go CreateKey: 32 random bytes, sealed under KEK; state and
        encoding sealed under DB_SECRET; the reference HMAC'd under KEY_REF_SECRET."""
        dek = os.urandom(32)
        cur.execute("INSERT INTO keys (clientId, keyReference, version, dek, state, encoding) "
                    "VALUES (%s, %s, %s, %s, %s, %s)",
                    (self.ids[clientname], hs256_b64(reference, self.secrets["KEY_REF_SECRET"]), version,
                     seal(dek, self.secrets["KEK"]), seal(b"in-use", self.secrets["DB_SECRET"]),
                     seal(ENCODING.encode(), self.secrets["DB_SECRET"])))
        self.deks[(clientname, reference, version)] = dek
        return dek

    def generate(self, clientname: str, reference: str) -> bytes:
        with self.conn.cursor() as cur:
            return self._create_key(cur, clientname, reference, 1)

    def rotate(self, clientname: str, reference: str) -> bytes:
        """internal/keys/service.go RotateKey: the latest version's state becomes deprecated
        (UpdateKey, sealed anew), and version + 1 is created."""
        latest = max(version for (name, ref, version) in self.deks if (name, ref) == (clientname, reference))
        with self.conn.cursor() as cur:
            cur.execute("UPDATE keys SET state = %s WHERE clientId = %s AND keyReference = %s AND version = %s",
                        (seal(b"deprecated", self.secrets["DB_SECRET"]), self.ids[clientname],
                         hs256_b64(reference, self.secrets["KEY_REF_SECRET"]), latest))
            return self._create_key(cur, clientname, reference, latest + 1)

    def execute(self, statement: str, params=()):
        with self.conn.cursor() as cur:
            cur.execute(statement, params)

    def checksum(self) -> str:
        """Of every stored row: the import must leave the source as it was."""
        with self.conn.cursor() as cur:
            cur.execute("SELECT md5(string_agg(t::text, '|' ORDER BY t::text)) FROM "
                        "(SELECT c::text AS t FROM clients c UNION ALL SELECT k::text FROM keys k) rows")
            return cur.fetchone()[0]
