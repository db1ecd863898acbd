"""Versioned, immutable PEFT adapter directories with an atomically switched CURRENT.

Layout under ``root``::

    v000001/            a complete PEFT adapter dir (adapter_config.json,
    v000002/            adapter_model.safetensors) plus sona_version.json
    CURRENT             "v000002\\n": the version replicas serve
    .lock               serialises publishers and CURRENT writers (flock)

Publishing writes into ``.tmp-<random>/``, fsyncs every file and directory, renames the
directory to the next free ``vNNNNNN``, fsyncs ``root``, and only then replaces CURRENT
(write ``CURRENT.tmp``, fsync, ``os.replace``, fsync ``root``). A crash at any point
therefore leaves CURRENT naming a complete version (or no CURRENT if nothing was ever
published): before the rename the new version does not exist; after it, it is complete
on disk before anything points at it. Version numbers only grow; an existing directory
is never written to, renamed over, or reused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidValue, StateError

try:
    import fcntl
except ImportError:  # not POSIX: publishers are not serialised across processes
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

VERSION_FILE = "sona_version.json"
CURRENT_FILE = "CURRENT"
_TMP_PREFIX = ".tmp-"
_LOCK_FILE = ".lock"
_VERSION_DIR = re.compile(r"^v(\d{6,})$")
_REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
_FORMAT = 1


def version_name(version: int) -> str:
    """The directory name of ``version``: ``v000042``."""
    return f"v{version:06d}"


@dataclass(frozen=True)
class AdapterVersion:
    """One published adapter version.

    ``path`` is a PEFT adapter directory: ``PeftModel.from_pretrained(base, path)`` loads
    it. ``parent`` is the version that was current when this one was published.
    """

    version: int
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    parent: int | None = None

    @property
    def name(self) -> str:
        """``v000042``: a stable adapter name for hot-swapping engines."""
        return version_name(self.version)


def _fsync_path(path: Path) -> None:
    flags = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if path.is_dir():  # directories cannot be opened on some platforms
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every directory (deepest first), then ``root`` itself."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        d = Path(dirpath)
        for name in filenames:
            _fsync_path(d / name)
        for name in dirnames:
            _fsync_path(d / name)
    _fsync_path(root)


class AdapterRegistry:
    """Immutable, numbered PEFT adapter versions under ``root`` and the one being served.

    Opening a registry creates ``root`` if needed and removes the ``.tmp-*`` directories
    of publishes that crashed (never those of a publish still running: that one holds
    the lock).

    Args:
        root: The directory holding the versions (local disk or shared storage).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale()

    # -- locking and cleanup ------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, blocking: bool = True) -> Iterator[bool]:
        if fcntl is None:
            yield True
            return
        try:
            fd = os.open(self.root / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            if blocking:
                raise
            yield False  # e.g. a replica with read-only access: it only reads
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _remove_stale(self) -> None:
        with self._locked(blocking=False) as held:
            if not held:  # a publish is in progress; its tmp dir is not stale
                return
            for p in self.root.iterdir():
                if p.name.startswith(_TMP_PREFIX) and p.is_dir():
                    logger.info("removing %s left by an interrupted publish", p)
                    shutil.rmtree(p, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                (self.root / (CURRENT_FILE + ".tmp")).unlink()

    # -- reading ------------------------------------------------------------------------

    def _load(self, path: Path) -> AdapterVersion | None:
        m = _VERSION_DIR.match(path.name)
        if m is None or not path.is_dir():
            return None
        try:
            meta = json.loads((path / VERSION_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            logger.warning("ignoring %s: unreadable %s (%s)", path, VERSION_FILE, e)
            return None
        if not isinstance(meta, dict) or meta.get("version") != int(m.group(1)):
            logger.warning("ignoring %s: %s names another version", path, VERSION_FILE)
            return None
        return AdapterVersion(version=meta["version"], path=path,
                              metadata=meta.get("metadata") or {},
                              created_at=float(meta.get("created_at", 0.0)),
                              parent=meta.get("parent"))

    def _numbers_taken(self) -> list[int]:
        return [int(m.group(1)) for p in self.root.iterdir()
                if (m := _VERSION_DIR.match(p.name))]

    def versions(self) -> list[AdapterVersion]:
        """Every complete version, oldest first (dirs without sona_version.json skipped)."""
        found = (self._load(p) for p in self.root.iterdir())
        return sorted((v for v in found if v is not None), key=lambda v: v.version)

    def latest(self) -> AdapterVersion | None:
        """The newest complete version (published, not necessarily current), or None."""
        vs = self.versions()
        return vs[-1] if vs else None

    def get(self, version: int) -> AdapterVersion:
        """The complete version numbered ``version``.

        Raises:
            InvalidValue: No complete version has that number.
        """
        v = None
        if isinstance(version, int) and not isinstance(version, bool) and version > 0:
            v = self._load(self.root / version_name(version))
        if v is None:
            available = [x.version for x in self.versions()]
            raise InvalidValue(f"adapter version {version!r} not found in {self.root}; "
                               f"available: {available}")
        return v

    def current_version(self) -> int | None:
        """The number CURRENT names (a cheap read for polling), or None."""
        try:
            text = (self.root / CURRENT_FILE).read_text().strip()
        except FileNotFoundError:
            return None
        m = _VERSION_DIR.match(text)
        if m is None:
            raise StateError(f"{self.root / CURRENT_FILE} must name a version like v000001, "
                             f"got {text!r}")
        return int(m.group(1))

    def current(self) -> AdapterVersion | None:
        """The version being served, or None if nothing was ever published.

        Raises:
            StateError: CURRENT names a version that is missing or incomplete.
        """
        n = self.current_version()
        if n is None:
            return None
        v = self._load(self.root / version_name(n))
        if v is None:
            raise StateError(f"{self.root / CURRENT_FILE} names {version_name(n)}, which is "
                             f"missing or incomplete")
        return v

    # -- writing ------------------------------------------------------------------------

    def _write_current(self, version: int) -> None:
        tmp = self.root / (CURRENT_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(version_name(version) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / CURRENT_FILE)
        _fsync_path(self.root)

    def publish(self, write: Callable[[Path], None], metadata: dict[str, Any] | None = None,
                *, make_current: bool = True) -> AdapterVersion:
        """Publish a new adapter version, atomically.

        Args:
            write: Writes a PEFT adapter into the directory it is given (e.g.
                ``lambda d: peft_model.save_pretrained(d)``): at least
                ``adapter_config.json`` and ``adapter_model.safetensors``.
            metadata: JSON-serialisable facts about the version (metrics, step, ...).
            make_current: Point CURRENT at the new version once it is on disk.

        Returns:
            The new version; its number is one past every number ever taken in ``root``.

        Raises:
            InvalidValue: ``metadata`` is not JSON-serialisable, or ``write`` did not
                produce the adapter files. Nothing is published; CURRENT is unchanged.
        """
        metadata = {} if metadata is None else metadata
        try:
            json.dumps(metadata, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidValue(f"metadata must be JSON-serialisable, got {metadata!r}: "
                               f"{e}") from e
        with self._locked():
            tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.root))
            try:
                write(tmp)
                missing = [f for f in _REQUIRED_FILES if not (tmp / f).is_file()]
                if missing:
                    raise InvalidValue(f"the adapter writer must produce {list(_REQUIRED_FILES)}"
                                       f", missing {missing}")
                parent = self.current_version()
                taken = self._numbers_taken()
                version = max([*taken, parent or 0, 0]) + 1
                created_at = time.time()
                info = {"format": _FORMAT, "version": version, "metadata": metadata,
                        "created_at": created_at, "parent": parent}
                (tmp / VERSION_FILE).write_text(json.dumps(info, indent=2, allow_nan=False))
                _fsync_tree(tmp)
                final = self.root / version_name(version)
                if final.exists():  # cannot happen under the lock; never rename over it
                    raise StateError(f"{final} appeared while publishing; not overwriting it")
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _fsync_path(self.root)
            if make_current:
                self._write_current(version)
            logger.info("published adapter %s (parent %s)%s", version_name(version), parent,
                        " and made it current" if make_current else "")
            return AdapterVersion(version=version, path=final, metadata=metadata,
                                  created_at=created_at, parent=parent)

    def set_current(self, version: int) -> AdapterVersion:
        """Serve ``version`` (roll back or forward); atomic like :meth:`publish`.

        Raises:
            InvalidValue: No complete version has that number; the message lists those
                that exist.
        """
        with self._locked():
            v = self.get(version)
            self._write_current(v.version)
        logger.info("CURRENT set to %s", v.name)
        return v

    def __repr__(self) -> str:
        return f"AdapterRegistry({str(self.root)!r})"
