"""The app factory (kms/app.py): what it builds beyond the routes' own behaviour."""
from kms.app import BLUEPRINTS


def test_ensure_sync_answers_each_function_once_and_still_runs_it(app):
    calls = []

    def view():
        calls.append(1)
        return "ran"

    first = app.ensure_sync(view)
    assert app.ensure_sync(view) is first  # remembered, not asked again
    assert first() == "ran" and calls == [1]


def test_public_routes_are_the_ones_their_blueprints_mark_public(app):
    public = {endpoint for endpoint in app.extensions["kms.public_endpoints"]}
    assert public == {"auth.signup", "auth.login", "Operations.healthz", "Operations.readyz", "Operations.metrics",
                      "api-docs.openapi_json"}
    assert {blueprint.name for blueprint in BLUEPRINTS} == {"auth", "keys", "key_operations", "grants", "clients", "audit",
                                                                "Operations"}


def test_openapi_marks_exactly_the_public_routes_as_needing_no_token(client):
    paths = client.get("/openapi.json").json()["paths"]
    anonymous = {(path, method) for path, operations in paths.items() for method, operation in operations.items()
                 if isinstance(operation, dict) and operation.get("security") == []}
    assert anonymous == {("/auth/signup", "post"), ("/auth/login", "post"), ("/healthz", "get"), ("/readyz", "get"),
                         ("/metrics", "get")}
