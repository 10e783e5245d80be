"""Which KEK versions the running servers hold, so that KEK changes are safe in any order.

Every serving process publishes, in `kek_holders`, the KEK versions it holds, each with its key
check value (kms.keyproviders: a fingerprint that reveals nothing of the key), refreshes the row
every PUBLISH_INTERVAL_S and removes it when it stops; a row not refreshed for LIVE_FOR_S is a
process that died without saying so, and counts no more. From the rows of the live processes:
- new DEK versions (generate, rotate, the cron, an import) are wrapped under the newest KEK
  version, up to KEK_ACTIVE, that every live server holds with the same check value: a server
  started with KEK_2 keeps wrapping under KEK 1 while another live server lacks KEK_2, and moves
  to KEK_2 within one interval of the last one restarting with it;
- `kms kek rewrap` refuses, naming the processes (host, pid), while any live one lacks the target.
A process that meets a DEK under a version it does not hold answers 503 kek_unavailable
(kms.keys.service); a version that no process of this deployment ever held (none has recorded its
check value in secret_checks) cannot have been written by the KMS, so its rows count as damaged.
"""
import logging
import os
import socket
import threading
from typing import NamedTuple

from kms import db
from kms.ids import random_uuid

log = logging.getLogger("kms.keys")

PUBLISH_INTERVAL_S = 5.0
LIVE_FOR_S = 20.0  # four intervals: a slow refresh is not taken for a death


class Holder(NamedTuple):
    host: str
    pid: int  # the `kms serve` process: the one to restart
    worker_pid: int
    keks: dict  # KEK version -> key check value

    def describe(self) -> str:
        worker = "" if self.worker_pid == self.pid else f" (worker {self.worker_pid})"
        return f"{self.host} pid {self.pid}{worker}"


def held_check_values(keyring) -> dict:
    """KEK version -> key check value, for the versions this process holds (a token KEK's check
    value is a seal in the token: work it out once per process)."""
    return {version: keyring.kek(version).check_value() for version in keyring.kek_versions}


def live_holders(cur) -> list[Holder]:
    cur.execute(db.sql.live_kek_holders)
    return [Holder(row.host, row.pid, row.worker_pid,
                   {version: bytes(value) for version, value in zip(row.kek_versions, row.check_values)})
            for row in cur.fetchall()]


def known_kek_versions(cur) -> frozenset:
    """Every KEK version some process of this deployment was ever configured with."""
    cur.execute(db.sql.known_kek_versions)
    return frozenset(row.kek_version for row in cur.fetchall())


def lacking(holders: list[Holder], version: int, check_value: bytes) -> list[Holder]:
    """The live processes that do not hold `version` (or hold another key under that number)."""
    return [holder for holder in holders if holder.keks.get(version) != check_value]


def wrap_version(keyring, mine: dict, holders: list[Holder]) -> int:
    """The newest version up to KEK_ACTIVE that this process and every live one hold alike
    (KEK_ACTIVE when no live process is known, as for a command run alone)."""
    for version in sorted((v for v in mine if v <= keyring.kek_active), reverse=True):
        if not lacking(holders, version, mine[version]):
            return version
    return keyring.kek_active  # no version in common: every choice leaves a server unable to read


def refresh(cur, keyring, mine: dict) -> list[Holder]:
    """Bring the keyring's wrap version and known versions up to date with the database; the live
    holders, as read."""
    holders = live_holders(cur)
    keyring.known_kek_versions = known_kek_versions(cur) | set(mine)
    chosen = wrap_version(keyring, mine, holders)
    if chosen != keyring.kek_wrap:
        if chosen < keyring.kek_active:
            behind = lacking(holders, keyring.kek_active, mine.get(keyring.kek_active, b""))
            log.warning("new DEKs are wrapped under an older KEK version: a live server lacks the active one",
                        extra={"kekVersion": chosen, "kekActive": keyring.kek_active,
                               "lacking": ", ".join(holder.describe() for holder in behind)})
        else:
            log.info("new DEKs are wrapped under the active KEK version", extra={"kekVersion": chosen})
        keyring.kek_wrap = chosen
    return holders


class KekPublisher:
    """A serving process's row in kek_holders: published before it serves, refreshed while it
    runs (keeping its keyring's wrap version current), removed when it stops."""

    def __init__(self, kms, server_pid: int | None = None):
        self.kms = kms
        self.process_id = random_uuid()
        self.params = {"process_id": self.process_id, "host": socket.gethostname(),
                       "pid": server_pid or os.getpid(), "worker_pid": os.getpid(),
                       "live_for": int(LIVE_FOR_S * 1000)}
        self.mine = held_check_values(kms.keyring)
        self.params["kek_versions"] = sorted(self.mine)
        self.params["check_values"] = [self.mine[version] for version in sorted(self.mine)]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kek-publisher", daemon=True)
        self._failing = False

    def start(self):
        self.publish()
        self._thread.start()

    def publish(self):
        try:
            with self.kms.pool.connection() as conn, db.transaction(conn) as cur:
                cur.execute(db.sql.publish_kek_holder, self.params)
                refresh(cur, self.kms.keyring, self.mine)
            self._failing = False
        except Exception as error:  # noqa: BLE001 - the database may be away: serving decides about that
            if not self._failing:
                log.warning("could not publish the KEK versions this process holds; will retry",
                            extra={"error_code": type(error).__name__})
            self._failing = True

    def _run(self):
        while not self._stopping.wait(PUBLISH_INTERVAL_S):
            self.publish()

    def stop(self):
        self._stopping.set()
        self._thread.join(timeout=PUBLISH_INTERVAL_S + 5)
        try:
            with self.kms.pool.connection() as conn, db.transaction(conn) as cur:
                cur.execute(db.sql.forget_kek_holder, {"process_id": self.process_id})
        except Exception as error:  # noqa: BLE001 - its row ages out instead
            log.warning("could not remove this process's KEK holder row", extra={"error_code": type(error).__name__})
