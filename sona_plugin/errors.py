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


class DuplicateFeedback(InvalidValue):
    """Feedback for this response (and choice) was already given: one per response."""
