"""KMS: a key management service for one organisation's internal services."""
import logging
import os
from datetime import timedelta

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from kms import db, errors, observability
from kms.config import Settings, load_settings
from kms.runtime import Kms

log = logging.getLogger("kms")


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


def create_app(env=None, *, settings: Settings | None = None, kms: Kms | None = None) -> Flask:
    """Build the app: validate settings, migrate the schema, check secrets against the stored
    data, open the connection pool and register the routes. Nothing happens at import time.

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
    if settings.trusted_proxy_hops:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxy_hops, x_proto=settings.trusted_proxy_hops)

    kms = kms or Kms.start(settings)
    app.extensions["kms"] = kms

    from kms.auth.passwords import LoginFloodShedder
    app.wsgi_app = LoginFloodShedder(app.wsgi_app, kms.passwords)  # inside the observer: logged, counted
    observability.init_app(app, kms)
    errors.register_error_handlers(app)
    app.teardown_appcontext(db.close_db)

    from kms.api import register_api
    register_api(app)

    from kms.cli import kms_cli
    app.cli.add_command(kms_cli)
    log.info("kms ready", extra={"pid": os.getpid(), "dbPool": kms.pool.size})
    return app
