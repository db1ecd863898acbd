"""Errors raised by sona_plugin, all catchable as :class:`SonaError`.

Messages say what was wrong, what was expected and the value seen, e.g.
``hidden_dim must be > 0, got -1``.
"""

from __future__ import annotations


class SonaError(Exception):
    """Base class of every error sona_plugin raises on purpose."""


class ConfigError(SonaError, ValueError):
    """A configuration field is missing, of the wrong type, or out of range."""


class DimensionMismatch(SonaError, ValueError):
    """A vector or matrix has a shape other than the one the engine was built for."""

    def __init__(self, message: str, expected: int | None = None, actual: int | None = None):
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class InvalidValue(SonaError, ValueError):
    """A value is NaN, infinite, empty, or outside its allowed range."""


class UnknownTrajectory(SonaError, KeyError):
    """A trajectory id was never started, or has already ended."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class StateError(SonaError, RuntimeError):
    """Saved state on disk is missing, corrupt, or from an incompatible version."""


class SwapRefused(StateError):
    """The engine did not serve a version's weights after loading it (canary mismatch,
    or the engine refused the adapter); the swap was undone."""


class DuplicateFeedback(InvalidValue):
    """Feedback for this response (and choice) was already given: one per response."""


class UnknownResponse(UnknownTrajectory):
    """A feedback names a response id this server never answered (or has evicted)."""


class UnknownAdapterVersion(InvalidValue):
    """No complete published adapter version has that number."""


class UnknownRecord(InvalidValue):
    """No stored feedback record has that id."""


class TenantLimit(SonaError):
    """A request names a new tenant and the server holds ``max_tenants`` already."""


# HTTP status of each error class, for every route of both hosts (most specific first)
HTTP_STATUS: tuple[tuple[type[SonaError], int], ...] = (
    (UnknownResponse, 404),
    (UnknownTrajectory, 404),
    (UnknownAdapterVersion, 404),
    (UnknownRecord, 404),
    (DuplicateFeedback, 409),
    (TenantLimit, 403),
    (SonaError, 400),
)


def http_status(error: BaseException) -> int:
    """The HTTP status a route answers ``error`` with (500: not one of ours)."""
    for cls, status in HTTP_STATUS:
        if isinstance(error, cls):
            return status
    return 500
