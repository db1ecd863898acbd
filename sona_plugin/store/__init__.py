"""Trajectory stores: where user feedback on generated responses is kept durably."""

from __future__ import annotations

from pathlib import Path

from ..errors import InvalidValue, StateError
from .base import FeedbackRecord, TrajectoryStore
from .sqlite import SCHEMA_VERSION, SqliteStore

__all__ = ["SCHEMA_VERSION", "FeedbackRecord", "SqliteStore", "TrajectoryStore", "open_store"]


def open_store(url_or_path: str | Path) -> TrajectoryStore:
    """Open the trajectory store a URL or path names.

    Args:
        url_or_path: ``sqlite:///abs/path.db`` (the path is everything after
            ``sqlite://``, so ``sqlite:////abs/path.db`` works too), a plain file path,
            or ``postgresql://...`` for the shared multi-replica store.

    Raises:
        InvalidValue: An empty path or a URL scheme other than sqlite/postgresql.
        StateError: A PostgreSQL URL (not implemented yet), or a database file this code
            cannot read.
    """
    if isinstance(url_or_path, Path):
        return SqliteStore(url_or_path)
    if not isinstance(url_or_path, str) or not url_or_path:
        raise InvalidValue(f"store URL or path must be a non-empty str or Path, "
                           f"got {url_or_path!r}")
    scheme, sep, rest = url_or_path.partition("://")
    if not sep:
        return SqliteStore(url_or_path)
    scheme = scheme.lower()
    if scheme == "sqlite":
        if not rest:
            raise InvalidValue(f"sqlite URL names no file, got {url_or_path!r}; expected "
                               f"sqlite:///abs/path.db")
        path = rest[1:] if rest == "/:memory:" else rest
        return SqliteStore(path)
    if scheme in ("postgresql", "postgres") or scheme.startswith("postgresql+"):
        raise StateError("PostgreSQL store is not implemented yet; use sqlite:///path.db "
                         f"or a file path, got {url_or_path!r}")
    raise InvalidValue(f"store URL scheme must be sqlite or postgresql, got {scheme!r} "
                       f"in {url_or_path!r}")
