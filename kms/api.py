"""Routes and the HTTP rules every route shares."""
import flask_jwt_extended.exceptions
import jwt.exceptions
from flask import current_app, jsonify, request
from flask_jwt_extended import JWTManager
from flask_smorest import Api

from kms import db, errors, web
from schemas.common import ErrorSchema

BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


class KmsApi(Api):
    ERROR_SCHEMA = ErrorSchema  # so /openapi.json documents the envelope we answer with

    def handle_http_exception(self, error):
        return errors.handle_http_exception(error)


def _unauthorized(*_args):
    return errors.error_response(401, "unauthorized", errors.Unauthorized.message)


def _register_jwt(app):
    """flask-jwt-extended answers token problems with its own bodies; make every one of them
    (missing, garbage, tampered, alg none, expired, wrong type) our 401 envelope."""
    manager = JWTManager(app)
    for loader in (manager.unauthorized_loader, manager.invalid_token_loader, manager.expired_token_loader,
                   manager.revoked_token_loader, manager.needs_fresh_token_loader,
                   manager.token_verification_failed_loader, manager.user_lookup_error_loader):
        loader(_unauthorized)
    handlers = app.error_handler_spec[None][None]
    for exception_class in list(handlers):
        if issubclass(exception_class, (flask_jwt_extended.exceptions.JWTExtendedException,
                                        jwt.exceptions.PyJWTError)):
            handlers[exception_class] = _unauthorized
    app.register_error_handler(jwt.exceptions.PyJWTError, _unauthorized)


# Endpoints anyone may call; every other route needs a valid bearer token before anything else.
PUBLIC_ENDPOINTS = frozenset({"auth.signup", "auth.login", "healthz", "readyz", "metrics", "api-docs.openapi_json"})


def _check_request():
    """Before any route: a bearer token where one is needed (401 before 400, so an anonymous
    caller learns nothing of what a route accepts), then a JSON body (415 otherwise); routes
    without a body accept an empty one."""
    if request.endpoint is not None and request.endpoint not in PUBLIC_ENDPOINTS:
        web.verify_bearer_first(current_app.extensions["kms"], request._get_current_object())
    if request.method in BODY_METHODS and (request.content_length or request.headers.get("Transfer-Encoding")):
        if not request.is_json:
            return errors.error_response(415, "unsupported_media_type", errors.HTTP_MESSAGES[415])
    return None


def healthz():
    return jsonify(status="ok")


def readyz():
    kms = current_app.extensions["kms"]
    try:
        with kms.pool.connection() as conn:
            current = db.schema_version(conn)
    except db.ReadOnlyDatabase:
        return errors.error_response(503, "not_ready", "Only a read-only standby answers; waiting for a primary.",
                                     headers={"Retry-After": "2"})
    except Exception:  # noqa: BLE001 - any failure here means "not ready"
        return errors.error_response(503, "not_ready", "The database does not answer.", headers={"Retry-After": "2"})
    expected = db.latest_schema_version()
    if current != expected:
        return errors.error_response(503, "not_ready", "The database schema is not current; run migrations.",
                                     headers={"Retry-After": "5"})
    return jsonify(status="ready", schemaVersion=current)


def register_api(app):
    _register_jwt(app)
    app.before_request(_check_request)
    api = KmsApi(app, spec_kwargs={"info": {"description": "Envelope-encryption key management service."},
                                    "security": [{"bearerAuth": []}]})
    api.spec.components.security_scheme("bearerAuth", {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"})

    for name, (converter, schema) in web.PATH_SEGMENTS.items():
        app.url_map.converters[name] = converter
        api.register_converter(converter, lambda _converter, schema=schema: schema)

    from kms.audit.routes import bp as audit_bp
    from kms.auth.routes import bp as auth_bp
    from kms.clients.routes import bp as clients_bp
    from kms.keys.routes import bp as keys_bp
    for blueprint in (auth_bp, keys_bp, clients_bp, audit_bp):
        api.register_blueprint(blueprint)
    app.add_url_rule("/healthz", "healthz", healthz, methods=["GET"])
    app.add_url_rule("/readyz", "readyz", readyz, methods=["GET"])
    _document_probes(app, api)
    return api


def _document_probes(app, api):
    """The probes and /metrics are plain Flask routes; describe them in /openapi.json too."""
    rules = {rule.rule: rule for rule in app.url_map.iter_rules()}
    anonymous = {"security": [], "tags": ["Operations"]}
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    api.spec.path(rule=rules["/healthz"], operations={"get": {
        **anonymous, "summary": "Liveness: the process answers (it does not touch the database)",
        "responses": {"200": {"description": "Alive", "content": {"application/json": {"schema": {
            "type": "object", "properties": {"status": {"type": "string", "enum": ["ok"]}}}}}}}}})
    api.spec.path(rule=rules["/readyz"], operations={"get": {
        **anonymous, "summary": "Readiness: the database answers and its schema is current",
        "responses": {
            "200": {"description": "Ready", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"status": {"type": "string", "enum": ["ready"]},
                                                 "schemaVersion": {"type": "integer"}}}}}},
            "503": {"description": "Not ready (database unreachable or schema not current); see Retry-After",
                    "content": error}}}})
    api.spec.path(rule=rules["/metrics"], operations={"get": {
        **anonymous, "summary": "Prometheus metrics of the whole server (all workers); keep it on the internal "
                                "network",
        "responses": {"200": {"description": "Prometheus text exposition format 0.0.4",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}}}})
