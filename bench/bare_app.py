"""The yardstick: a bare Flask + waitress + psycopg2 endpoint doing one SELECT per request."""
import os

import waitress
from flask import Flask, jsonify
from psycopg2.pool import ThreadedConnectionPool


def create_app():
    threads = int(os.environ["SERVER_THREADS"])
    pool = ThreadedConnectionPool(threads, threads, os.environ["DATABASE_URL"])  # min = max
    app = Flask(__name__)

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok")

    @app.get("/bare/<ref>")
    def lookup(ref):
        conn = pool.getconn()
        try:
            with conn, conn.cursor() as cur:
                cur.execute("SELECT version, wrapped_dek FROM key_versions WHERE key_id = 1 AND version = 1")
                version, wrapped = cur.fetchone()
        finally:
            pool.putconn(conn)
        return jsonify(ref=ref, version=version, size=len(wrapped))

    return app


if __name__ == "__main__":
    waitress.serve(create_app(), host="127.0.0.1", port=int(os.environ["SERVER_PORT"]),
                   threads=int(os.environ["SERVER_THREADS"]), _quiet=True)
