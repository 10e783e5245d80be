"""What the audit chain must remember beyond its rows, in two places a database writer cannot both
reach: the `audit_chain_state` row (under its MAC and revision, kms.rows) and the head file
(AUDIT_HEAD_FILE, on the server's own disk).

- *Started*: set with the chain's first seal, so that a chain whose rows were all unchained later
  ("wiped") is not taken for a new database and chained again from its start.
- *Tampered*: a problem the sealer found. Sealing stays stopped, across restarts, until an operator
  runs `kms audit acknowledge --head POSITION:MAC` (itself audited), which also re-anchors the
  chain on a head the operator checked: after a restore from backup, for example.
"""
import os
import uuid
from dataclasses import dataclass

from kms import db
from kms.errors import IntegrityFailure
from kms.rows import AUDIT_CHAIN_STATE


class ChainTampered(Exception):
    """The chain in the database is not the one the sealers made: sealing stops."""

    def __init__(self, problem: str, seq: int | None = None):
        super().__init__(problem)
        self.problem, self.seq = problem, seq


class HeadFileUnreadable(Exception):
    """AUDIT_HEAD_FILE exists but does not hold a head: counted as tampering until acknowledged."""


@dataclass(frozen=True)
class ChainHead:
    position: int
    mac: bytes

    def __str__(self):  # as `audit verify --head` takes it
        return f"{self.position}:{self.mac.hex()}"

    @classmethod
    def parse(cls, text: str) -> "ChainHead":
        position, _, mac = text.strip().partition(":")
        if not (position.isdigit() and len(mac) == 64 and all(c in "0123456789abcdefABCDEF" for c in mac)):
            raise ValueError("a chain head is POSITION:MAC (64 hex digits)")
        return cls(int(position), bytes.fromhex(mac))


@dataclass(frozen=True)
class HeadFile:
    """What the head file holds: the newest head this host saw sealed, the chain it belongs to,
    and a tampering found."""
    head: ChainHead | None = None
    tampered: str | None = None
    chain_id: str | None = None


class HeadFileOfAnotherChain(Exception):
    """AUDIT_HEAD_FILE names another database's chain: a deployment's file shared by mistake."""


TAMPERED_PREFIX = "tampered: "
CHAIN_PREFIX = "chain: "


def read_head_file(path: str | None) -> HeadFile:
    """Nothing when unset or not written yet; HeadFileUnreadable when it holds anything else."""
    if not path:
        return HeadFile()
    try:
        with open(path) as file:
            lines = file.read().splitlines()
    except FileNotFoundError:
        return HeadFile()
    except (OSError, UnicodeDecodeError) as error:
        raise HeadFileUnreadable(f"AUDIT_HEAD_FILE {path} cannot be read ({type(error).__name__})") from None
    garbled = HeadFileUnreadable(f"AUDIT_HEAD_FILE {path} does not hold a chain head (empty or garbled)")
    if not lines or len(lines) > 3:
        raise garbled
    try:
        head = None if lines[0] == "none" else ChainHead.parse(lines[0])
    except ValueError:
        raise garbled from None
    tampered = chain_id = None
    for line in lines[1:]:
        if line.startswith(TAMPERED_PREFIX) and tampered is None:
            tampered = line[len(TAMPERED_PREFIX):] or "tampering found"
        elif line.startswith(CHAIN_PREFIX) and chain_id is None:
            chain_id = line[len(CHAIN_PREFIX):].strip()
        else:
            raise garbled
    return HeadFile(head, tampered, chain_id)


def write_head_file(path: str, content: HeadFile):
    """Replace the file's content atomically (a crash leaves the old content or the new), creating
    its directory (owner-only) when missing."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    temporary = f"{path}.tmp"
    text = f"{content.head or 'none'}\n"
    if content.chain_id:
        text += f"{CHAIN_PREFIX}{content.chain_id}\n"
    if content.tampered:
        text += f"{TAMPERED_PREFIX}{' '.join(content.tampered.split())}\n"
    with open(temporary, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


@dataclass(frozen=True)
class ChainState:
    chain_id: str
    started: bool
    tampered: str | None
    revision: int


def check_chain(recorded: HeadFile, state: ChainState):
    """A head file written for another database's chain is not this chain's record."""
    if recorded.chain_id is not None and recorded.chain_id != state.chain_id:
        raise HeadFileOfAnotherChain(f"AUDIT_HEAD_FILE belongs to another database's audit chain ({recorded.chain_id}, "
                                     f"not {state.chain_id}): give each deployment a head file of its own")


def chain_id_of(conn, kms) -> str:
    """This database's chain id (its state row, checked)."""
    with db.transaction(conn) as cur:
        return read_state(cur, kms, lock=False).chain_id


def read_state(cur, kms, *, lock: bool = True) -> ChainState:
    """The chain's state row (locked, for a sealer), believed only once its MAC and revision check
    out. A row never signed is signed here by a sealer if nothing was ever audited."""
    cur.execute(db.sql.lock_audit_chain_state if lock else db.sql.audit_chain_state)
    row = cur.fetchone()
    if row is None:
        raise ChainTampered("the chain's state record is gone (deleted in the database)")
    if row.row_mac is None:
        cur.execute(db.sql.audit_events_exist)
        if cur.fetchone().exist:
            raise ChainTampered("the chain's state record has no MAC (written in the database)")
        # A database migrated without the service's secrets, nothing audited yet: a sealer signs it.
        state = ChainState(str(row.chain_id), False, None, 0)
        return write_state(cur, kms, state) if lock else state
    try:
        AUDIT_CHAIN_STATE.check(kms, row)
    except IntegrityFailure as failure:
        raise ChainTampered("the chain's state record was put back from an older copy" if failure.rolled_back
                            else "the chain's state record was altered in the database") from None
    return ChainState(str(row.chain_id), row.started, row.tampered, row.revision)


def write_state(cur, kms, state: ChainState, **changes) -> ChainState:
    """The state at its next revision; past the first, the caller's audit event records it."""
    new = ChainState(**{**state.__dict__, **changes, "revision": state.revision + 1})
    cur.execute(db.sql.write_audit_chain_state, {
        "chain_id": new.chain_id, "started": new.started, "tampered": new.tampered, "revision": new.revision,
        "row_mac": AUDIT_CHAIN_STATE.sign(cur, kms, id=True, chain_id=uuid.UUID(new.chain_id), started=new.started,
                                          tampered=new.tampered, revision=new.revision)})
    return new
