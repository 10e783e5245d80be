"""The app factory: the one place that knows every domain. It builds the Flask app from the
settings and a running KMS, stacks the WSGI middleware, registers every blueprint and the error
envelope, and composes the domains' gauges into /metrics. Nothing happens at import time."""
import logging
import os
from datetime import timedelta

from flask import Flask, current_app, request
from flask_smorest import Api
from werkzeug.middleware.proxy_fix import ProxyFix

from kms import db
from kms.audit import service as audit_service
from kms.audit.integrity import report_integrity_failure
from kms.audit.routes import bp as audit_bp
from kms.auth.flood import LoginFloodShedder
from kms.auth.routes import bp as auth_bp
from kms.auth.tokens import init_jwt, verify_bearer_first
from kms.clients.routes import bp as clients_bp
from kms.config import Settings, load_settings
from kms.errors import ServiceUnavailable
from kms.grants.routes import bp as grants_bp
from kms.keys import service as keys_service
from kms.keys.routes import bp as keys_bp
from kms.observability.metrics import database_collector
from kms.observability.middleware import RequestObserver
from kms.observability.routes import bp as operations_bp
from kms.operations.routes import bp as key_operations_bp
from kms.runtime import Kms
from kms.web import envelope
from kms.web.routing import PATH_SEGMENTS, is_public
from schemas.common import ErrorSchema

log = logging.getLogger("kms")

BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
# Content-Type headers that are JSON without parsing them (request.is_json parses every time)
PLAIN_JSON = frozenset({"application/json", "application/json; charset=utf-8", "application/json;charset=utf-8"})
BLUEPRINTS = (auth_bp, keys_bp, key_operations_bp, grants_bp, clients_bp, audit_bp, operations_bp)


class KmsFlask(Flask):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sync_functions: dict = {}

    def ensure_sync(self, func):
        """Flask asks this of every hook and view on every request, and each answer costs an
        inspect.iscoroutinefunction(); the functions are few and fixed, so remember the answers."""
        sync = self._sync_functions.get(func)
        if sync is None:
            sync = self._sync_functions[func] = super().ensure_sync(func)
        return sync


class KmsApi(Api):
    ERROR_SCHEMA = ErrorSchema  # so /openapi.json documents the envelope we answer with

    def handle_http_exception(self, error):
        return envelope.handle_http_exception(error)


def create_app(env=None, *, settings: Settings | None = None, kms: Kms | None = None) -> Flask:
    """Build the app: validate settings, migrate the schema, check secrets against the stored
    data, open the connection pool and register the routes.

    `env` is a mapping of environment variables (default: os.environ). A server's worker process
    passes `kms`, opened after its parent prepared the database once for all workers.
    """
    settings = kms.settings if kms else settings or load_settings(env)
    app = KmsFlask(__name__)
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        API_TITLE="KMS",
        API_VERSION="1.0",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        JWT_SECRET_KEY=settings.jwt_secret,
        JWT_ALGORITHM="HS256",
        JWT_DECODE_ALGORITHMS=["HS256"],
        JWT_TOKEN_LOCATION=["headers"],
        JWT_ACCESS_TOKEN_EXPIRES=timedelta(milliseconds=settings.jwt_ttl_ms),
        JWT_IDENTITY_CLAIM="sub",
        PROVIDE_AUTOMATIC_OPTIONS=False,  # no CORS here: OPTIONS is a 405 like any unsupported method
    )
    kms = kms or Kms.start(settings)
    app.extensions["kms"] = kms
    envelope.register_error_handlers(app, report_integrity_failure)
    app.teardown_appcontext(db.close_db)
    _register_api(app)

    # WSGI middleware, innermost first: the proxy's headers read, then the flood shedder, and
    # outermost the observer, so that what the shedder refuses is logged and counted too.
    if settings.trusted_proxy_hops:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxy_hops, x_proto=settings.trusted_proxy_hops)
    login_rule = next(app.url_map.iter_rules("auth.login"))
    app.wsgi_app = LoginFloodShedder(app.wsgi_app, kms.passwords, login_rule, settings.trusted_proxy_hops)
    app.wsgi_app = RequestObserver(app.wsgi_app, kms.metrics, app.url_map, app.view_functions)
    app.extensions["kms.observer"] = app.wsgi_app  # (it counts the server's own refusals too: kms.serving.early)
    kms.metrics.add_collector(database_collector(lambda: _database_gauges(kms)))
    log.info("kms ready", extra={"pid": os.getpid(), "dbPool": kms.pool.size})
    return app


def _register_api(app):
    init_jwt(app)
    app.before_request(_check_request)
    api = KmsApi(app, spec_kwargs={"info": {"description": "Envelope-encryption key management service."},
                                    "security": [{"bearerAuth": []}]})
    api.spec.components.security_scheme("bearerAuth", {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"})
    for name, (converter, schema) in PATH_SEGMENTS.items():
        app.url_map.converters[name] = converter
        api.register_converter(converter, lambda _converter, schema=schema: schema)
    for blueprint in BLUEPRINTS:
        api.register_blueprint(blueprint)
    public = {endpoint for endpoint, view in app.view_functions.items() if is_public(view)}
    public.add("api-docs.openapi_json")  # flask-smorest's own route
    app.extensions["kms.public_endpoints"] = frozenset(public)
    return api


def _check_request():
    """Before any route: a bearer token where one is needed (401 before 400, so an anonymous
    caller learns nothing of what a route accepts), then a JSON body (415 otherwise); routes
    without a body accept an empty one."""
    app = current_app._get_current_object()
    kms = app.extensions["kms"]
    if kms.audit_behind and request.blueprint != operations_bp.name:
        # AUDIT_FAIL_CLOSED_AFTER: no audited work while sealing is that far behind (probes answer)
        raise ServiceUnavailable("Audit records cannot be sealed; retry later.", retry_after=10)
    if request.endpoint is not None and request.endpoint not in app.extensions["kms.public_endpoints"]:
        verify_bearer_first(kms, request._get_current_object())
    this_request = request._get_current_object()
    if (this_request.method in BODY_METHODS and this_request.environ.get("CONTENT_TYPE") not in PLAIN_JSON
            and (this_request.content_length or this_request.headers.get("Transfer-Encoding"))):
        if not this_request.is_json:
            return envelope.error_response(415, "unsupported_media_type", envelope.HTTP_MESSAGES[415])
    return None


def _database_gauges(kms) -> list:
    with kms.pool.connection() as conn:
        return keys_service.gauges(kms, conn) + audit_service.gauges(conn)
