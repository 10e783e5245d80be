"""The database going away turns requests into 503s; its return heals the server, no restart."""
import json
import threading
import time

import pytest

from kms.app import create_app
from kms.db import LOOKUP_PATIENCE_S
from kms.serving.throwaway_postgres import ThrowawayPostgres
from tests.conftest import ADMIN_NAME, ADMIN_PASSWORD, AuthActions, HttpClient, bearer, serve_in_thread, stop_server


@pytest.fixture
def own_database():
    """A PostgreSQL server of this test's own, so it can really be stopped and started."""
    server = ThrowawayPostgres().start()
    yield server
    server.destroy()


def wait_for(check, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def test_database_outage_gives_503_then_recovers_without_restart(own_database, secrets_env, captured_logs):
    app = create_app({**secrets_env, "DATABASE_URL": own_database.dsn, "SERVER_THREADS": "4",
                      "MASTER_ADMIN_USERNAME": ADMIN_NAME, "MASTER_ADMIN_PASSWORD": ADMIN_PASSWORD})
    server, base_url = serve_in_thread(app, threads=4)
    try:
        with HttpClient(base_url) as client:
            token = AuthActions(client).new_client()
            assert client.post("/keys/actions/generate", json={"keyReference": "k"},
                               headers=bearer(token)).status_code == 200

            own_database.stop()
            for _ in range(6):  # every pooled connection is dead now, and no new one can be made
                response = client.get("/keys", headers=bearer(token))
                assert response.status_code == 503, response.text
                assert response.headers["Retry-After"].isdigit()
                assert response.json()["error"] == "service_unavailable"
            assert client.get("/readyz").status_code == 503
            assert client.get("/healthz").status_code == 200
            # each line says why, once per cause (libpq's first line: host and port, no credentials)
            down = [json.loads(line) for line in captured_logs.getvalue().splitlines()
                    if '"database unavailable"' in line]
            assert down and len(down) == len({line["cause"] for line in down}) < 6, down
            assert any("port" in line["cause"] for line in down), down
            # A look-up waits up to LOOKUP_PATIENCE_S for a database before its 503 ...
            started = time.monotonic()
            assert client.get("/keys/k", headers=bearer(token)).status_code == 503
            assert LOOKUP_PATIENCE_S - 1 <= time.monotonic() - started <= LOOKUP_PATIENCE_S + 5
            # ... so one made while the database restarts is answered once it is back
            answer = []
            waiting = threading.Thread(target=lambda: answer.append(client.get("/keys/k", headers=bearer(token))))
            waiting.start()
            time.sleep(1)
            own_database.start()
            own_database.wait_until_ready()
            waiting.join(30)
            assert answer[0].status_code == 200

            assert wait_for(lambda: client.get("/keys", headers=bearer(token)).status_code == 200)
            statuses = [client.get("/keys/k", headers=bearer(token)).status_code for _ in range(20)]
            assert statuses == [200] * 20
            assert client.get("/readyz").status_code == 200
    finally:
        stop_server(server)
        app.extensions["kms"].close()
