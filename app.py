"""Entry point.

  python app.py        serve with waitress (configuration from the environment or .env)
  python app.py dev    a throwaway KMS: embedded PostgreSQL, generated secrets, nothing to set up
  flask --app app kms  host-local administration (see README)
"""
import logging
import signal
import sys

import psycopg2
from dotenv import load_dotenv

from kms import create_app  # noqa: F401  (flask --app app finds the factory here)
from kms.config import ConfigError

log = logging.getLogger("kms")


def serve(app):
    """Serve with waitress until SIGTERM or Ctrl-C, then stop cleanly."""
    from kms.audit.sealer import start_sealer
    from kms.serving.http import create_server

    kms = app.extensions["kms"]
    settings = kms.settings
    server = create_server(app, settings)
    sealer = start_sealer(kms)

    def stop(signum, _frame):
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    log.info("serving", extra={"host": settings.server_host, "port": settings.server_port,
                               "threads": settings.server_threads})
    try:
        server.run()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.close()
        server.task_dispatcher.shutdown(timeout=5)
        if sealer:
            sealer.stop()
        kms.close()
        log.info("stopped")


def main(argv: list[str]) -> int:
    load_dotenv()
    from kms.observability import configure_logging
    log_writer = configure_logging()
    command = argv[1] if len(argv) > 1 else "serve"
    try:
        if command == "serve":
            app = create_app()
            logging.getLogger().setLevel(app.extensions["kms"].settings.log_level)
            serve(app)
        elif command == "dev":
            from kms.dev import run_dev
            run_dev(serve)
        elif command == "gen-secret":
            from kms.config import generate_secret
            print(generate_secret())
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except ConfigError as error:
        print(f"configuration error: {error.message}", file=sys.stderr)
        return 2
    except psycopg2.OperationalError as error:
        # libpq's message names host and port, never the password.
        print(f"database unavailable: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        return 3
    finally:
        log_writer.close()  # flush what is buffered
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
