"""What every `kms` command shares: its errors and exit codes, the one way a command opens the
KMS it works on, durations with units, and progress on a terminal. Each domain's commands
(kms/<domain>/cli.py) build on this; kms/cli.py gathers them.

Exit codes (docs/OPERATIONS.md): 0 done; 1 the command's own failure (a broken audit chain, no
such client); 2 usage or configuration; 3 something needed is unreachable or taken (the database,
the listening port); 4 stored data failed an integrity check.
"""
import re
import sys
import time
from contextlib import contextmanager

import click
from flask import current_app

from kms.context import Context

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTEGRITY = 1, 2, 3, 4

DURATION_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


class OneLineError(click.ClickException):
    """What went wrong and what to do, on one line of stderr, without click's `Error:` prefix."""

    def show(self, file=None):
        click.echo(self.format_message(), err=True, file=file)


class OneLineFailure(OneLineError):
    """The command's own failure (no such client, a name taken): exit 1."""
    exit_code = EXIT_FAILED


class Unreachable(OneLineError):
    exit_code = EXIT_UNREACHABLE


class IntegrityProblem(OneLineError):
    exit_code = EXIT_INTEGRITY


def parse_duration_ms(text: str) -> int:
    """`24h`, `30m`, `7d`, `90s`, `1500ms`. A bare number is refused: `--ttl 10` would be read as
    10 ms by some and 10 s or 10 h by others."""
    match = re.fullmatch(r"\s*(\d+)\s*(ms|s|m|h|d)\s*", text)
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration: give a number with a unit, such as 90s, 30m, 24h "
                                 "or 7d")
    return int(match.group(1)) * DURATION_UNITS[match.group(2)]


def print_table(header: list[str], rows: list[list]):
    """Rows as columns aligned under a header; None shows as -, datetimes to the second."""
    def text(value) -> str:
        if value is None:
            return "-"
        if hasattr(value, "isoformat"):
            return value.isoformat(timespec="seconds")
        return str(value)

    cells = [header, *[[text(value) for value in row] for row in rows]]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    for row in cells:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


OPENER = "kms.open"  # the command line app's extension: (check: bool) -> a running KMS (kms.cli)


def open_kms(*, check: bool = True):
    """The KMS a command works on (kms.runtime.Kms): the app's own when it has one (dev mode,
    tests), else the one the command line's app opens now, from the environment, with a single
    connection, closed with the command. `check`: the schema is current and the secrets fit the
    stored data (every command but `migrate`, which is how a schema becomes current)."""
    app = current_app
    kms = app.extensions.get("kms")
    if kms is None:
        kms = app.extensions["kms"] = app.extensions[OPENER](check)
        click.get_current_context().call_on_close(kms.close)
    return kms


@contextmanager
def cli_context():
    """A service call's context for a command: host access is the authority, audited as `cli`."""
    kms = open_kms()
    with kms.pool.connection() as conn:
        yield Context(kms=kms, conn=conn, source_ip="local", origin="cli")


class Progress:
    """done/total and a rate on a terminal, redrawn at most every half second; nothing until the
    summary line otherwise (cron mail, logs)."""

    def __init__(self, what: str, stream=None):
        self.what = what
        self.stream = stream or sys.stderr
        self.total: int | None = None
        self.done = 0
        self.started = time.monotonic()
        self._drawn = 0.0
        self.live = self.stream.isatty()

    def update(self, done: int):
        self.done = done
        now = time.monotonic()
        if self.live and (now - self._drawn >= 0.5 or done == self.total):
            self._drawn = now
            total = f"/{self.total}" if self.total is not None else ""
            self.stream.write(f"\r{self.what}: {done}{total} ({self.rate():.0f}/s)  ")
            self.stream.flush()

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-6)

    def finish(self) -> str:
        """The summary's timing part; ends the live line."""
        if self.live and self._drawn:
            self.stream.write("\n")
        return f"in {time.monotonic() - self.started:.1f} s, {self.rate():.0f}/s"
