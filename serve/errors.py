"""Why the server refuses or loses a request through no fault of the request (the servicer maps each to a status)."""

from __future__ import annotations


class ServeError(Exception):
    """A request the server cannot take or finish, through no fault of the request itself."""


class CapacityError(ServeError):
    """Every running and waiting place is taken."""


class DrainingError(ServeError):
    """The server is shutting down."""


class EngineFailure(ServeError):
    """The engine raised during a decode step; the requests in that batch are lost."""
