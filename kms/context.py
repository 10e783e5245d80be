"""What a service call needs to know about who asks and from where; built by the web or CLI layer."""
import uuid
from dataclasses import dataclass
from functools import cached_property
from typing import Any


@dataclass(frozen=True)
class TokenClaims:
    """The verified claims of a bearer token; still to be checked against its session row."""
    client_id: uuid.UUID
    jti: uuid.UUID

    # Claims are cached with their token (kms.auth.tokencache), so these are formatted once per
    # token rather than on every request.
    @cached_property
    def client_id_text(self) -> str:
        return str(self.client_id)

    @cached_property
    def jti_text(self) -> str:
        return str(self.jti)


@dataclass(frozen=True)
class Caller:
    """An authenticated client, as its database row says (its MAC checked)."""
    id: uuid.UUID
    role: str
    session: tuple = ()  # (jti, client id, expires at, epoch, revision) of the session it called with

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class Context:
    kms: Any  # kms.runtime.Kms
    conn: Any
    request_id: str | None = None
    source_ip: str | None = None
    claims: TokenClaims | None = None
    origin: str = "api"  # "api" or "cli"

    @property
    def actor(self) -> str:
        if self.origin == "cli":
            return "cli"
        return self.claims.client_id_text if self.claims else "anonymous"
