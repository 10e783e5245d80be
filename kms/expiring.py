"""A bounded map whose entries expire: the DEK cache and the verified-token cache are both one."""
import threading
from collections import OrderedDict


class ExpiringMap:
    """At most `size` entries, each until its own expiry (on whatever clock the caller gives
    times in); the least recently used goes first when it is full. Thread-safe."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, now: float):
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            value, expires = entry
            if expires <= now:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return value

    def put(self, key, value, expires: float):
        with self._lock:
            self._entries[key] = (value, expires)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
