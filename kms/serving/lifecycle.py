"""How a serving process starts and stops: the listening socket bound first, stop signals that
drain rather than kill, and children that die with their parent."""
import ctypes
import errno
import os
import signal
import socket
import threading

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PR_SET_NAME = 15


class PortTaken(OSError):
    """The listening address cannot be bound; the message says what to do."""


def bind_listener(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """Bind and listen before anything else happens, so a taken port fails in one line before a
    database is touched, a banner printed or a worker forked."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=backlog, reuse_port=False)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise PortTaken(f"{host}:{port} is already in use: stop what listens there or set SERVER_PORT") from None
        if error.errno == errno.EADDRNOTAVAIL:
            raise PortTaken(f"{host} is not an address of this machine: fix SERVER_HOST") from None
        if error.errno == errno.EACCES:
            raise PortTaken(f"not allowed to listen on {host}:{port}: use a port above 1023 or grant "
                            "CAP_NET_BIND_SERVICE") from None
        raise PortTaken(f"cannot listen on {host}:{port}: {error.strerror}") from None
    sock.set_inheritable(True)  # shared by forked workers
    return sock


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send `sig` to this process when its parent exits (however it exits, SIGKILL
    included). Returns False when the parent is already gone or the platform cannot do it."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return os.getppid() == parent and parent != 1


def stop_on_signals(stopping: threading.Event, signals=(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)):
    """SIGTERM (service managers), SIGINT (Ctrl-C, even when started with SIGINT ignored, as
    `nohup` and some shells do) and SIGHUP (the terminal closed) all mean: finish and stop."""
    def request_stop(_signum, _frame):
        stopping.set()

    for sig in signals:
        signal.signal(sig, request_stop)


def name_this_process(name: str):
    """What `ps -o comm`, top and /proc/PID/comm show (Linux; 15 bytes at most): kms-worker-0,
    kms-sealer, so ops can tell the processes of one server apart."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass
