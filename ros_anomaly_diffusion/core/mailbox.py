"""The runtime's inbox: one slot per frame source, so a slow model never builds a backlog."""
from __future__ import annotations

import threading
from typing import Any


class Mailbox:
    """One slot per source (camera): put() replaces that source's unconsumed item (counted in
    `replaced`); take() hands over every source's item at once."""

    def __init__(self):
        self._cv = threading.Condition()
        self._items: dict[Any, Any] = {}
        self._closed = False
        self._poked = False
        self.replaced = 0

    def put(self, item, source: Any = 0) -> None:
        with self._cv:
            if source in self._items:
                self.replaced += 1
            self._items[source] = item
            self._cv.notify()

    def poke(self) -> None:
        """Wake the consumer without an item (e.g. to apply new settings)."""
        with self._cv:
            self._poked = True
            self._cv.notify()

    def take(self, timeout: float) -> dict[Any, Any]:
        """{source: item} of every source with a waiting item (empty on timeout or a poke)."""
        with self._cv:
            self._cv.wait_for(lambda: self._items or self._closed or self._poked, timeout)
            items, self._items, self._poked = self._items, {}, False
            return items

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def reopen(self) -> None:
        """Accept items again after close(); items left over count as replaced."""
        with self._cv:
            self.replaced += len(self._items)
            self._items, self._closed, self._poked = {}, False, False
