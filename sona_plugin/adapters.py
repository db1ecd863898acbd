"""Versioned, immutable PEFT adapter directories with an atomically switched CURRENT.

Layout under ``root``::

    v000001/            a complete PEFT adapter dir (adapter_config.json,
    v000002/            adapter_model.safetensors) plus sona_version.json
    CURRENT             "v000002\\n": the version replicas serve
    HIGH_WATER          "2\\n": the highest number ever given to a version
    .lock               serialises publishers, CURRENT writers and pruning (flock)

Publishing writes into ``.tmp-<random>/``, fsyncs every file and directory, renames the
directory to the next free ``vNNNNNN``, fsyncs ``root``, and only then replaces CURRENT
(write ``CURRENT.tmp``, fsync, ``os.replace``, fsync ``root``). A crash at any point
therefore leaves CURRENT naming a complete version (or no CURRENT if nothing was ever
published): before the rename the new version does not exist; after it, it is complete
on disk before anything points at it. Version numbers only grow; an existing directory
is never written to, renamed over, or reused.

Numbers are never reused even after a version's directory is deleted (by :meth:`prune` or
an operator): HIGH_WATER is written (atomically, like CURRENT) before the new directory is
renamed into place, and the next number is one past the highest of HIGH_WATER, the
directories and CURRENT. Engines cache adapters by name, so a reused ``v000003`` would
serve the old weights. A registry written before HIGH_WATER existed works as before.

A version directory whose weights are missing or unreadable (``adapter_config.json`` or
``adapter_model.safetensors`` gone, the safetensors file empty or truncated) is not
listed: :meth:`~AdapterRegistry.versions`, ``latest`` and ``get`` skip it with a warning,
and :meth:`~AdapterRegistry.servable` falls back from it.
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
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidValue, StateError, UnknownAdapterVersion
from .faults import failpoint

try:
    import fcntl
except ImportError:  # not POSIX: publishers are not serialised across processes
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

VERSION_FILE = "sona_version.json"
CURRENT_FILE = "CURRENT"
HIGH_WATER_FILE = "HIGH_WATER"
_TMP_PREFIX = ".tmp-"
_LOCK_FILE = ".lock"
_VERSION_DIR = re.compile(r"^v(\d{6,})$")
_CONFIG_FILE = "adapter_config.json"
_WEIGHTS_FILE = "adapter_model.safetensors"
_REQUIRED_FILES = (_CONFIG_FILE, _WEIGHTS_FILE)
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


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a file is replaced or rewritten: a cache entry's validity key."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _read_info(path: Path) -> Any:
    """The parsed ``sona_version.json`` at ``path`` (raises what reading/parsing raises)."""
    return json.loads(path.read_text())


def _safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file at ``path`` cannot be loaded, or None if its header reads.

    ``safe_open`` memory-maps the file and parses only the header, and it checks that the
    header's tensors cover the file exactly, so a truncated file is caught without
    reading any tensor data.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except Exception as e:  # safetensors raises its own error types
        return f"{path.name} is unreadable ({e})"
    return None


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
        # Version dirs are immutable, so what was read from them is kept, keyed by dir
        # name and checked against the file's stat: a listing costs a few stats per
        # version, not a JSON parse and a safetensors header read.
        self._info_cache: dict[str, tuple[tuple[int, int, int, int], AdapterVersion]] = {}
        self._weights_cache: dict[str, tuple[tuple[int, int, int, int], str | None]] = {}
        self._warned: set[tuple[str, str]] = set()
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
            for name in (CURRENT_FILE, HIGH_WATER_FILE):
                with contextlib.suppress(FileNotFoundError):
                    (self.root / (name + ".tmp")).unlink()

    # -- reading ------------------------------------------------------------------------

    def _forget(self, name: str) -> None:
        self._info_cache.pop(name, None)
        self._weights_cache.pop(name, None)

    def _warn_once(self, path: Path, reason: str) -> None:
        # A stats route polls versions(); one warning per bad directory is enough.
        if (str(path), reason) not in self._warned:
            self._warned.add((str(path), reason))
            logger.warning("ignoring %s: %s", path, reason)

    def _weights_problem(self, path: Path) -> str | None:
        """Why the adapter files in version dir ``path`` cannot be loaded, or None."""
        if not (path / _CONFIG_FILE).is_file():
            return f"{_CONFIG_FILE} is missing"
        try:
            st = os.stat(path / _WEIGHTS_FILE)
        except (FileNotFoundError, NotADirectoryError):
            return f"{_WEIGHTS_FILE} is missing"
        except OSError as e:
            return f"{_WEIGHTS_FILE} is unreadable ({e})"
        if st.st_size == 0:
            return f"{_WEIGHTS_FILE} is empty"
        key = _stat_key(st)
        cached = self._weights_cache.get(path.name)
        if cached is not None and cached[0] == key:
            return cached[1]
        problem = _safetensors_problem(path / _WEIGHTS_FILE)
        self._weights_cache[path.name] = (key, problem)
        return problem

    def _inspect(self, path: Path) -> tuple[AdapterVersion | None, str | None]:
        """What ``path`` holds: a complete version, a broken one, or no version at all.

        Returns:
            ``(version, None)`` for a complete version; ``(None, why)`` for a version dir
            that cannot be served; ``(None, None)`` for anything else (another name, or
            a directory without sona_version.json, e.g. a foreign one).
        """
        m = _VERSION_DIR.match(path.name)
        if m is None:
            return None, None
        info_path = path / VERSION_FILE
        try:
            st = os.stat(info_path)
        except (FileNotFoundError, NotADirectoryError):
            self._forget(path.name)
            return None, None
        except OSError as e:
            return None, f"unreadable {VERSION_FILE} ({e})"
        key = _stat_key(st)
        cached = self._info_cache.get(path.name)
        if cached is not None and cached[0] == key:
            v = cached[1]
        else:
            try:
                meta = _read_info(info_path)
            except FileNotFoundError:
                self._forget(path.name)
                return None, None
            except (OSError, ValueError) as e:
                return None, f"unreadable {VERSION_FILE} ({e})"
            if not isinstance(meta, dict) or meta.get("version") != int(m.group(1)):
                return None, f"{VERSION_FILE} names another version"
            v = AdapterVersion(
                version=meta["version"],
                path=path,
                metadata=meta.get("metadata") or {},
                created_at=float(meta.get("created_at", 0.0)),
                parent=meta.get("parent"),
            )
            self._info_cache[path.name] = (key, v)
        problem = self._weights_problem(path)
        if problem is not None:
            return None, problem
        return v, None

    def _load(self, path: Path) -> AdapterVersion | None:
        v, problem = self._inspect(path)
        if problem is not None:
            self._warn_once(path, problem)
        return v

    def _numbers_taken(self) -> list[int]:
        return [int(m.group(1)) for p in self.root.iterdir() if (m := _VERSION_DIR.match(p.name))]

    def _high_water(self) -> int:
        """The number HIGH_WATER holds, or 0 if there is none (a registry from before it).

        Raises:
            StateError: HIGH_WATER holds something other than a number.
        """
        path = self.root / HIGH_WATER_FILE
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return 0
        if re.fullmatch(r"[0-9]+", text) is None:
            raise StateError(f"{path} must hold a version number like 42, got {text!r}")
        return int(text)

    def versions(self) -> list[AdapterVersion]:
        """Every complete version, oldest first.

        Directories without sona_version.json are skipped silently (not versions); those
        whose adapter files are missing, empty or truncated are skipped with a warning
        (logged once per directory).
        """
        paths = list(self.root.iterdir())
        names = {p.name for p in paths}
        # a snapshot: another thread may be filling the caches (hosts list from a route)
        for gone in {*self._info_cache, *self._weights_cache} - names:
            self._forget(gone)
        found = (self._load(p) for p in paths)
        return sorted((v for v in found if v is not None), key=lambda v: v.version)

    def latest(self) -> AdapterVersion | None:
        """The newest complete version (published, not necessarily current), or None."""
        vs = self.versions()
        return vs[-1] if vs else None

    def get(self, version: int) -> AdapterVersion:
        """The complete version numbered ``version``.

        Raises:
            UnknownAdapterVersion: No complete version has that number (the message says
                why when its directory exists but is incomplete).
        """
        v, problem = None, None
        if isinstance(version, int) and not isinstance(version, bool) and version > 0:
            path = self.root / version_name(version)
            v, problem = self._inspect(path)
            if problem is not None:
                self._warn_once(path, problem)
        if v is None:
            why = f" ({version_name(version)} is incomplete: {problem})" if problem else ""
            available = [x.version for x in self.versions()]
            raise UnknownAdapterVersion(
                f"adapter version {version!r} not found in {self.root}{why}; available: {available}"
            )
        return v

    def current_version(self) -> int | None:
        """The number CURRENT names (a cheap read for polling), or None."""
        try:
            text = (self.root / CURRENT_FILE).read_text().strip()
        except FileNotFoundError:
            return None
        m = _VERSION_DIR.match(text)
        if m is None:
            raise StateError(
                f"{self.root / CURRENT_FILE} must name a version like v000001, got {text!r}"
            )
        return int(m.group(1))

    def current(self) -> AdapterVersion | None:
        """The version being served, or None if nothing was ever published.

        Raises:
            StateError: CURRENT names a version that is missing or incomplete.
        """
        n = self.current_version()
        if n is None:
            return None
        v, problem = self._inspect(self.root / version_name(n))
        if v is None:
            why = f"incomplete ({problem})" if problem else "missing"
            raise StateError(f"{self.root / CURRENT_FILE} names {version_name(n)}, which is {why}")
        return v

    def servable(self) -> AdapterVersion | None:
        """The version to serve: the current one, or the best stand-in if it is broken.

        When CURRENT names a complete version that is returned (as :meth:`current`).
        When it names a version that is missing or incomplete (its directory deleted, its
        weights truncated), or is unreadable, a warning names it and the newest complete
        version is returned instead, older or newer than the one named. CURRENT is not
        rewritten: the caller decides (a host calls :meth:`set_current` once it has
        loaded the stand-in). Note the stand-in may be a version published with
        ``make_current=False`` that was never served.

        Returns:
            The version to serve; None if nothing was ever made current or no complete
            version exists.
        """
        try:
            n = self.current_version()
        except StateError as e:
            named, problem = CURRENT_FILE, str(e)
        else:
            if n is None:
                return None
            v, problem = self._inspect(self.root / version_name(n))
            if v is not None:
                return v
            named, problem = version_name(n), problem or "its directory is missing"
        vs = self.versions()
        fallback = vs[-1] if vs else None
        reason = f"{self.root / CURRENT_FILE} names {named}, which cannot be served ({problem}); "
        self._warn_once(
            self.root / CURRENT_FILE,
            reason
            + (
                f"the newest complete version is {fallback.name}"
                if fallback
                else "no complete version exists"
            ),
        )
        return fallback

    # -- writing ------------------------------------------------------------------------

    def _write_atomic(self, name: str, text: str) -> None:
        """Replace ``root/name`` with ``text``: write ``name.tmp``, fsync, rename, fsync."""
        tmp = self.root / (name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / name)
        _fsync_path(self.root)

    def _write_current(self, version: int) -> None:
        self._write_atomic(CURRENT_FILE, version_name(version) + "\n")

    def publish(
        self,
        write: Callable[[Path], None],
        metadata: dict[str, Any] | None = None,
        *,
        make_current: bool = True,
    ) -> AdapterVersion:
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
                produce the adapter files (or left the safetensors file empty or
                unreadable). Nothing is published; CURRENT is unchanged.
            StateError: CURRENT or HIGH_WATER holds something unreadable.
        """
        metadata = {} if metadata is None else metadata
        try:
            json.dumps(metadata, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidValue(f"metadata must be JSON-serialisable, got {metadata!r}: {e}") from e
        with self._locked():
            tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.root))
            try:
                write(tmp)
                missing = [f for f in _REQUIRED_FILES if not (tmp / f).is_file()]
                if missing:
                    raise InvalidValue(
                        f"the adapter writer must produce {list(_REQUIRED_FILES)}"
                        f", missing {missing}"
                    )
                # the same rule _load applies, so CURRENT never names a version it skips
                try:
                    problem = self._weights_problem(tmp)
                finally:
                    self._weights_cache.pop(tmp.name, None)
                if problem is not None:
                    raise InvalidValue(f"the adapter writer produced a bad adapter: {problem}")
                parent = self.current_version()
                taken = self._numbers_taken()
                version = max([*taken, parent or 0, self._high_water()]) + 1
                created_at = time.time()
                info = {
                    "format": _FORMAT,
                    "version": version,
                    "metadata": metadata,
                    "created_at": created_at,
                    "parent": parent,
                }
                (tmp / VERSION_FILE).write_text(json.dumps(info, indent=2, allow_nan=False))
                _fsync_tree(tmp)
                final = self.root / version_name(version)
                if final.exists():  # cannot happen under the lock; never rename over it
                    raise StateError(f"{final} appeared while publishing; not overwriting it")
                # Before the rename: a crash between the two leaves a gap, never a reuse.
                self._write_atomic(HIGH_WATER_FILE, f"{version}\n")
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _fsync_path(self.root)
            failpoint("publish.renamed")
            if make_current:
                self._write_current(version)
            logger.info(
                "published adapter %s (parent %s)%s",
                version_name(version),
                parent,
                " and made it current" if make_current else "",
            )
            return AdapterVersion(
                version=version, path=final, metadata=metadata, created_at=created_at, parent=parent
            )

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

    def prune(self, keep: int, protect: Iterable[int] = ()) -> list[int]:
        """Delete the oldest complete versions, keeping the newest ``keep``.

        Never deletes the version CURRENT names nor any in ``protect`` (e.g. versions a
        replica may still be loading), and leaves incomplete directories alone. Each
        directory is first renamed to a ``.tmp-`` name and then removed, so a crash
        leaves either the whole version or a temp dir that the next open of the registry
        removes. HIGH_WATER is brought up to date first, so the deleted numbers are never
        given out again, even in a registry from before HIGH_WATER existed.

        Args:
            keep: How many of the newest complete versions to keep (>= 1).
            protect: Version numbers never to delete.

        Returns:
            The numbers of the deleted versions, oldest first.

        Raises:
            InvalidValue: ``keep`` is not an int >= 1, or ``protect`` holds a non-int.
            StateError: CURRENT or HIGH_WATER is unreadable (nothing is deleted when it is
                unclear what is being served).
        """
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise InvalidValue(f"keep must be an int >= 1, got {keep!r}")
        protected = set(protect)
        bad = [n for n in protected if not isinstance(n, int) or isinstance(n, bool)]
        if bad:
            raise InvalidValue(f"protect must hold version numbers (ints), got {bad!r}")
        with self._locked():
            current = self.current_version()
            high_water = self._high_water()
            doomed = [
                v
                for v in self.versions()[:-keep]
                if v.version != current and v.version not in protected
            ]
            if not doomed:
                return []
            top = max([*self._numbers_taken(), current or 0, high_water])
            if top > high_water:
                self._write_atomic(HIGH_WATER_FILE, f"{top}\n")
            removed = []
            for v in doomed:
                trash = self.root / f"{_TMP_PREFIX}pruned-{v.name}-{uuid.uuid4().hex[:8]}"
                os.rename(v.path, trash)
                _fsync_path(self.root)
                self._forget(v.name)
                removed.append(v.version)
                try:
                    shutil.rmtree(trash)
                except OSError as e:
                    logger.warning(
                        "pruned %s but could not delete %s (%s); it is removed "
                        "when the registry is next opened",
                        v.name,
                        trash,
                        e,
                    )
        logger.info(
            "pruned adapter versions %s (keep %d, current %s, protected %s)",
            [version_name(n) for n in removed],
            keep,
            version_name(current) if current else None,
            sorted(protected),
        )
        return removed

    def __repr__(self) -> str:
        return f"AdapterRegistry({str(self.root)!r})"
