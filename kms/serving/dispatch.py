"""Which request a free server thread takes next: callers this process already knows first.

waitress hands every complete request to one first-in, first-out queue of its server threads. A
flood of requests nobody can vouch for (bad signup tokens, bad or unknown bearer tokens, probes,
logins) then queues ahead of every key look-up, and a few hundred cheap requests take key access
from every caller. Here a request is *known* when its bearer token is one this process has
already verified (kms.auth.tokens' cache: a dictionary look-up, no signature check), and known
requests are taken first. Everything else is *unverified*: at most `unverified_limit` server
threads (and so database connections) work on it at once, whatever waits, so the others are
always free for known callers; and among unverified requests each source address takes its
turn (round robin), so one source flooding does not stop another's login or signup.

Decided before Flask and before any parsing of the body, from the request's headers alone.
"""
import threading
from collections import OrderedDict, deque

from waitress.task import ThreadedTaskDispatcher

from kms.web import caller_address


class PriorityDispatcher(ThreadedTaskDispatcher):
    """waitress's dispatcher, with two queues instead of one (see the module's docstring).
    `classify(channel) -> (known, source, refusal)` is asked once per request; a request with a
    refusal is answered at once by the channel itself (kms.serving.early), taking no thread."""

    def __init__(self, classify, unverified_limit: int):
        super().__init__()
        self.classify = classify
        self.unverified_limit = unverified_limit
        self.known: deque = deque()
        self.unverified: OrderedDict = OrderedDict()  # source -> deque of channels, in turn order
        self.unverified_waiting = 0
        self.unverified_running = 0

    def add_task(self, task):
        """`task`: a channel whose first request is complete (waitress calls this holding the
        channel's requests_lock, from the event loop, or from a server thread for the request
        behind the one it served)."""
        while True:
            known, source, refusal = self.classify(task)
            if refusal is None:
                break
            task.answer_early(refusal)  # the event loop answers it (kms.serving.early): no thread
            if not task.requests:
                return
        with self.lock:
            if known:
                self.known.append(task)
            else:
                self.unverified.setdefault(source, deque()).append(task)
                self.unverified_waiting += 1
            self.queue_cv.notify()

    def _take(self):
        """(the next task, whether it is unverified), or (None, False): called holding the lock."""
        if self.known:
            return self.known.popleft(), False
        if self.unverified and self.unverified_running < self.unverified_limit:
            source, waiting = next(iter(self.unverified.items()))
            task = waiting.popleft()
            if waiting:
                self.unverified.move_to_end(source)  # its next request waits for the other sources' turns
            else:
                del self.unverified[source]
            self.unverified_waiting -= 1
            self.unverified_running += 1
            return task, True
        return None, False

    def handler_thread(self, thread_no):
        """waitress's loop, taking tasks with _take()."""
        while True:
            with self.lock:
                while True:
                    if self.stop_count > 0:
                        self.active_count -= 1
                        self.stop_count -= 1
                        self.threads.discard(thread_no)
                        self.thread_exit_cv.notify()
                        return
                    task, unverified = self._take()
                    if task is not None:
                        break
                    self.active_count -= 1
                    self.queue_cv.wait()
                    self.active_count += 1
            try:
                task.service()
            except BaseException:
                self.logger.exception("Exception when servicing %r", task)
            finally:
                if unverified:
                    with self.lock:
                        self.unverified_running -= 1
                        if self.unverified:
                            self.queue_cv.notify()  # a thread may be waiting for this place

    def shutdown(self, cancel_pending=True, timeout=5):
        with self.lock:  # what still waits is cancelled as waitress cancels its queue
            self.queue.extend(self.known)
            for waiting in self.unverified.values():
                self.queue.extend(waiting)
            self.known.clear()
            self.unverified.clear()
            self.unverified_waiting = 0
        return super().shutdown(cancel_pending, timeout)

    @property
    def pending(self) -> int:
        with self.lock:
            return len(self.known) + self.unverified_waiting


def request_classifier(kms, trusted_proxy_hops: int, early=None):
    """classify(channel) -> (known, source, refusal) for PriorityDispatcher: known when the
    request's bearer token is in this process's verified-token cache; the source is the address
    the application will see (the peer's, or with TRUSTED_PROXY_HOPS the one X-Forwarded-For
    names, as werkzeug's ProxyFix reads it); the refusal, of an unverified request, the answer
    the event loop gives itself (`early`: kms.serving.early.EarlyRefusals), or None."""
    tokens = kms.verified_tokens

    def classify(channel):
        request = channel.requests[0]
        headers = request.headers
        authorization = headers.get("AUTHORIZATION")
        if authorization:
            claims = tokens.get(authorization)
            if claims is not None:
                request.kms_claims = claims  # handed to the app (kms.serving.http): not looked up twice
                return True, None, None
        source = request.kms_unverified_source = source_of(channel, headers, trusted_proxy_hops)
        return False, source, early.refusal(request, source, authorization) if early is not None else None

    return classify


def source_of(channel, headers: dict, trusted_proxy_hops: int) -> str:
    peer = channel.addr[0] if isinstance(channel.addr, tuple) else str(channel.addr)
    return caller_address(peer, headers.get("X_FORWARDED_FOR"), trusted_proxy_hops)


class SourceCounts:
    """Open connections per source address, for the per-source connection limit."""

    def __init__(self):
        self._lock = threading.Lock()
        self.open: dict[str, int] = {}

    def opened(self, source: str) -> int:
        with self._lock:
            count = self.open[source] = self.open.get(source, 0) + 1
        return count

    def closed(self, source: str):
        with self._lock:
            left = self.open.get(source, 1) - 1
            if left > 0:
                self.open[source] = left
            else:
                self.open.pop(source, None)
