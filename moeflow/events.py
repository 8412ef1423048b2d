"""Typed listener lists: how one layer tells the layers above it what happened, without knowing them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

E = TypeVar("E")


class Subscription:
    """A listener's registration; `close()` (or leaving the `with` block) removes it."""

    def __init__(self, remove: Callable[[], None]) -> None:
        self._remove: Callable[[], None] | None = remove

    def close(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Listeners(Generic[E]):
    """Callbacks of one kind, called in subscription order. Copy-on-write: subscribing or leaving from
    another thread never disturbs a call in progress, which sees the list as it was when it began."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: tuple[Callable[[E], None], ...] = ()

    def subscribe(self, listener: Callable[[E], None]) -> Subscription:
        with self._lock:
            self._listeners = (*self._listeners, listener)

        def remove() -> None:
            with self._lock:
                i = self._listeners.index(listener)
                self._listeners = self._listeners[:i] + self._listeners[i + 1 :]

        return Subscription(remove)

    def publish(self, event: E) -> None:
        for listener in self._listeners:
            listener(event)

    def __bool__(self) -> bool:
        return bool(self._listeners)
