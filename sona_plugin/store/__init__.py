"""Trajectory stores: where user feedback on generated responses is kept durably."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, InvalidValue
from .base import FeedbackRecord, TrajectoryStore
from .sqlite import SCHEMA_VERSION, SqliteStore

__all__ = ["SCHEMA_VERSION", "FeedbackRecord", "SqliteStore", "TrajectoryStore", "open_store"]


def open_store(url_or_path: str | Path) -> TrajectoryStore:
    """Open the trajectory store a URL or path names.

    Args:
        url_or_path: ``sqlite:///abs/path.db`` (the path is everything after
            ``sqlite://``, so ``sqlite:////abs/path.db`` works too), a plain file path,
            or ``postgresql://user:password@host/db`` (also ``postgres://``, or
            SQLAlchemy's ``postgresql+psycopg://``) for the shared multi-replica
            :class:`~sona_plugin.store.postgres.PostgresStore`.

    Raises:
        InvalidValue: An empty path or a URL scheme other than sqlite/postgresql.
        ConfigError: A PostgreSQL URL without the ``postgres`` extra installed.
        StateError: A database this code cannot reach or read.
    """
    if isinstance(url_or_path, Path):
        return SqliteStore(url_or_path)
    if not isinstance(url_or_path, str) or not url_or_path:
        raise InvalidValue(
            f"store URL or path must be a non-empty str or Path, got {url_or_path!r}"
        )
    scheme, sep, rest = url_or_path.partition("://")
    if not sep:
        return SqliteStore(url_or_path)
    scheme = scheme.lower()
    if scheme == "sqlite":
        if not rest:
            raise InvalidValue(
                f"sqlite URL names no file, got {url_or_path!r}; expected sqlite:///abs/path.db"
            )
        path = rest[1:] if rest == "/:memory:" else rest
        return SqliteStore(path)
    if scheme in ("postgresql", "postgres") or scheme.startswith("postgresql+"):
        try:  # psycopg is an optional extra: imported only when a URL asks for it
            from .postgres import PostgresStore
        except ImportError as e:
            if e.name not in ("psycopg", "psycopg_pool"):
                raise
            raise ConfigError(
                f"store URL scheme {scheme!r} needs the postgres extra: "
                f"pip install 'sona_plugin[postgres]' (missing module "
                f"{e.name!r})"
            ) from e
        # libpq reads only a lower-case postgresql:// or postgres://; a SQLAlchemy driver
        # tag (postgresql+psycopg://) is dropped
        return PostgresStore("postgresql://" + rest)
    raise InvalidValue(
        f"store URL scheme must be sqlite or postgresql, got {scheme!r} in {url_or_path!r}"
    )
