"""Refusals the event loop answers itself, before any server thread, environ or Flask.

A flood is mostly requests whose answer is known before the application sees them: a login from
a source whose login flood the hasher's admission refuses (kms.auth.flood), a request without a
token over its source's rate (kms.web.limits), a bearer token this worker has already refused
(kms.auth.tokens remembers refused tokens as it remembers verified ones), a signup whose exact
body (its content type and bytes) this worker refused 401 for its token before (a signup token
refused as unknown, used, expired or forged never becomes usable, and the same bytes validate the
same; a refusal for a row that fails its integrity check is not remembered).
Handing each to a server thread cost a queue, a thread switch, a WSGI environ and the middleware
(and for the signup a database round trip), all under the GIL that key look-ups need; here the
event loop writes the answer (the same status, envelope and Retry-After the application would
give; counted in the metrics, summed up in the log and, for signups, counted for the audit like
the application's refusals) and holds the connection's reading as after any such answer.

What the application would answer differently is left to it: a route that does not exist or
takes no token (public routes ignore the Authorization header), audited work refused while sealing
is behind.
"""
import hashlib
import time
from typing import NamedTuple

from werkzeug.exceptions import HTTPException
from werkzeug.routing import RequestRedirect

from kms.auth.passwords import FLOOD_MESSAGE, FLOOD_RETRY_AFTER_S
from kms.auth.service import SIGNUP_TOKEN_REFUSED
from kms.expiring import ExpiringMap
from kms.web.limits import MESSAGE as RATE_MESSAGE, UnverifiedRate

HOLD_MAX_S = 1.0  # kms.serving.http.HOLD_AFTER_429_MAX_S
REFUSED_SIGNUP_MEMORY_S = 60.0  # how long a refused signup's exact request is answered 401 again


class Refusal(NamedTuple):
    status: str  # the status line, as the application writes it
    code: str  # the envelope's error code
    message: str
    retry_after: int | None
    endpoint: str | None  # the route it would have reached (the metrics' route), None: unmatched
    shed: str  # which of the observer's one-line-a-second summaries counts it
    hold_s: float  # how long the connection is not read after the answer


class EarlyRefusals:
    def __init__(self, app, kms, rate: UnverifiedRate | None, *, hold_unknown_refused: bool):
        self.kms = kms
        self.tokens = kms.verified_tokens
        self.passwords = kms.passwords
        self.rate = rate
        self.hold_unknown_refused = hold_unknown_refused
        self.observer = app.extensions["kms.observer"]
        self.public = app.extensions["kms.public_endpoints"]
        self.routes = app.url_map.bind("kms")
        login_rule = next(app.url_map.iter_rules("auth.login"))
        self.login_path, self.login_endpoint = login_rule.rule, login_rule.endpoint
        signup_rule = next(app.url_map.iter_rules("auth.signup"))
        self.signup_path, self.signup_endpoint = signup_rule.rule, signup_rule.endpoint
        self._refused_signups = ExpiringMap(4096)  # sha256 of content type and body -> True

    def refusal(self, request, source: str, authorization: str | None) -> Refusal | None:
        """The early answer to `request` (waitress's parsed request, from `source`), or None: the
        application decides. Asked on the event loop's thread for requests without a verified token."""
        if request.error is not None:  # not valid HTTP: waitress's own answer (kms.serving.http)
            return None
        method, path = request.command, request.path
        if path == self.login_path:
            if method == "POST" and self.passwords.refuse_if_flooded(source):
                return Refusal("429 TOO MANY REQUESTS", "too_many_requests", FLOOD_MESSAGE, FLOOD_RETRY_AFTER_S,
                               self.login_endpoint, "login", min(FLOOD_RETRY_AFTER_S, HOLD_MAX_S))
            return None
        if authorization:
            message = self.tokens.refused(authorization)
            if message is None or self.kms.audit_behind:
                return None
            endpoint = self._endpoint(path, method)
            if endpoint is None or endpoint in self.public:
                return None
            return Refusal("401 UNAUTHORIZED", "unauthorized", message, None, endpoint, "token",
                           HOLD_MAX_S if self.hold_unknown_refused else 0.0)
        if self.rate is not None and not self.rate.allow(source):
            return Refusal("429 TOO MANY REQUESTS", "too_many_requests", RATE_MESSAGE, 1, None, "unverified",
                           HOLD_MAX_S)
        if path == self.signup_path and method == "POST":
            key = request.kms_signup_key = self._signup_key(request)
            if self._refused_signups.get(key, time.monotonic()) and not self.kms.audit_behind:
                self.kms.refusals.count("signup", "denied", source)  # audited as the service's refusals are
                return Refusal("401 UNAUTHORIZED", "invalid_signup_token", SIGNUP_TOKEN_REFUSED, None,
                               self.signup_endpoint, "token", HOLD_MAX_S if self.hold_unknown_refused else 0.0)
        return None

    @staticmethod
    def _signup_key(request) -> bytes:
        body = request.body_rcv.getbuf().get(-1, skip=False) if request.body_rcv is not None else b""
        return hashlib.sha256(request.headers.get("CONTENT_TYPE", "").encode("latin-1") + b"\0" + body).digest()

    def signup_refused(self, request):
        """The application refused this signup for its token (kms.serving.http): its exact request
        is answered so again, here."""
        key = getattr(request, "kms_signup_key", None)
        if key is not None:
            self._refused_signups.put(key, True, time.monotonic() + REFUSED_SIGNUP_MEMORY_S)

    def _endpoint(self, path: str, method: str) -> str | None:
        try:
            endpoint, _arguments = self.routes.match(path, method)
        except (HTTPException, RequestRedirect):  # 404, 405, a redirect: the application answers
            return None
        return endpoint

    def answered(self, refusal: Refusal, method: str, started: float):
        """Count an early answer as the application counts its refusals."""
        self.observer.refused_before_app(refusal.endpoint, method, int(refusal.status[:3]),
                                         time.perf_counter() - started, refusal.shed)
