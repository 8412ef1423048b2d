"""Why the server refuses or loses a request through no fault of the request (the servicer maps each to a status)."""

from __future__ import annotations


class ServeError(Exception):
    """A request the server cannot take or finish, through no fault of the request itself."""


class CapacityError(ServeError):
    """Every running and waiting place is taken."""


class DrainingError(ServeError):
    """The server is shutting down."""


class EngineFailure(ServeError):
    """The engine raised on this request (its prefill or sampling), or in a decode step it shared; the
    server goes on with the others."""


class EngineDead(ServeError):
    """The engine thread has stopped for good: every request is refused until the server is restarted."""
