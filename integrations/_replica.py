"""One replica among several on a shared PostgreSQL store: its MicroLoRA follows the
instant log, it takes feedback forwarded to it, and it follows the published versions.

:class:`ReplicaSync` keeps the host's served MicroLoRA equal to the log's state
(``sona_plugin/store/replication.py``) at the ``seq`` it has read:

- A feedback this replica takes (its own, or one forwarded to it) runs the host's instant
  update as before; the change it made (``after - before``) is logged as a ``delta``, the
  MicroLoRA goes back to the log's state, and the log is read up to that entry. So the
  update reaches this replica's weights by the same path, in the same order, as every
  other replica's: once all have read the same ``seq`` their weights are bit-identical.
- A decay after a new BaseLoRA version is logged as a ``scale`` by the trainer; replicas
  that follow the version apply it from the log (not on their own).
- The MicroLoRA's norm bound, which the trainer's drift check sets, is the store's
  (``sona_micro_bound``): every replica reads it before an instant update and on every
  wake-up, so no replica grows the shared MicroLoRA past it.
- A thread wakes on ``NOTIFY`` (or every ``poll_s``), follows the registry's CURRENT,
  reads new log entries, and takes the forwarded feedback whose response it holds.
- A replica that starts (or restarts) begins at the newest snapshot in the log and
  applies what follows; the first replica of a deployment logs its MicroLoRA as the first
  snapshot. Every :data:`SNAPSHOT_EVERY` entries a replica that has read the whole log
  appends a snapshot, and entries older than the previous snapshot are deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from sona_plugin.errors import DuplicateFeedback, SonaError, StateError, UnknownResponse

logger = logging.getLogger(__name__)

T = TypeVar("T")

SNAPSHOT_EVERY = 256
# a forwarded feedback waits this long for the replica holding its response to claim it
# (NOTIFY wakes the holder at once; its poll every poll_s is the fallback), then this
# long more for the outcome once claimed (the holder stores the record and embeds it)
FORWARD_CLAIM_S = 3.0
FORWARD_DONE_S = 30.0


def micro_digest(A: np.ndarray, B: np.ndarray) -> str:
    """SHA-256 of the MicroLoRA's float32 bytes: equal digests, bit-identical weights."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(A, np.float32).tobytes())
    h.update(np.ascontiguousarray(B, np.float32).tobytes())
    return h.hexdigest()


class ReplicaSync:
    """Keeps one host in step with the deployment's instant log (module docstring).

    Args:
        host: A :class:`~integrations._host.LearningHost` (``_micro_arrays``,
            ``_set_micro_arrays``, ``_has_recording``, ``_take_forward``,
            ``follow_registry``).
        log: The deployment's :class:`~sona_plugin.store.replication.ReplicaLog`.
        poll_s: How often the thread looks without a notification.
    """

    def __init__(self, host: Any, log: Any, poll_s: float = 0.5) -> None:
        from sona_plugin.store.replication import Listener

        self.host = host
        self.log = log
        self.poll_s = float(poll_s)
        self.lock = threading.RLock()  # the log state and the served MicroLoRA move together
        self.applied = 0  # the last seq read
        self._last_snapshot = 0
        self._A, self._B = host._micro_arrays()
        self.norm_cap: float | None = None  # the deployment's bound, once one is set
        self.forwards_taken = 0
        self.forwards_sent = 0
        self.last_error: str | None = None
        self._listener = Listener(log.store)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        with self.lock:
            self.log.start(self._A, self._B)
            snap = self.log.latest_snapshot()
            self.applied = (snap or 1) - 1
            self._drain_locked()
            self._follow_cap_locked()

    # -- the log ----------------------------------------------------------------------------
    def _drain_locked(self) -> int:
        """Apply every entry after ``applied``; the host serves the result. Returns how many
        entries were applied."""
        n = 0
        A, B = self._A, self._B
        while True:
            entries = self.log.entries(self.applied)
            if not entries:
                break
            first = entries[0]
            if (
                first.seq != self.applied + 1  # a gap: pruned, or an insert rolled back
                and first.kind != "set"
                and self.log.catch_up_from(self.applied) != self.applied
            ):
                # entries this replica had not read were pruned: start at the newest snapshot
                self.applied = self.log.catch_up_from(self.applied)
                logger.warning(
                    "instant log pruned past this replica: from snapshot %d", self.applied + 1
                )
                continue
            for e in entries:
                A, B = e.apply(A, B)
                self.applied = e.seq
                if e.kind == "set":
                    self._last_snapshot = e.seq
            n += len(entries)
        if n:
            self._A, self._B = A, B
            self.host._set_micro_arrays(A, B)
        return n

    def drain(self) -> int:
        """Read the log to its end, and the norm bound (the thread does this on every
        wake-up)."""
        with self.lock:
            self._follow_cap_locked()
            return self._drain_locked()

    def _follow_cap_locked(self) -> None:
        cap = self.log.norm_cap()
        if cap is not None and cap != self.norm_cap:
            self.host._apply_norm_cap(cap)
            self.norm_cap = cap

    def set_norm_cap(self, cap: float, as_of: int) -> None:
        """Bound every replica's MicroLoRA by ``cap`` (through the store; ignored when the
        store's bound was set as of a later record)."""
        with self.lock:
            self.log.set_norm_cap(cap, as_of)
            self._follow_cap_locked()

    def instant(self, response_id: str, update: Callable[[], T]) -> T:
        """Run ``update`` (the host's instant update of one feedback, in place), log the
        change it made, and serve the log's state with it applied."""
        with self.lock:
            self._follow_cap_locked()  # the update is bounded as every replica's is
            self._drain_locked()  # the update sees the newest weights the log has
            try:
                out = update()
                A1, B1 = self.host._micro_arrays()
                dA, dB = A1 - self._A, B1 - self._B
                if dA.any() or dB.any():
                    self.log.append_delta(response_id, dA, dB)
            finally:
                self.host._set_micro_arrays(self._A, self._B)  # back to the log's state...
            self._drain_locked()  # ...and forward through it, own entry included
            return out

    def scale(self, factor: float) -> None:
        """Decay every replica's MicroLoRA by ``factor`` (through the log)."""
        with self.lock:
            self.log.append_scale(factor)
            self._drain_locked()

    def _snapshot_if_due(self) -> None:
        with self.lock:
            if self.applied - self._last_snapshot < SNAPSHOT_EVERY:
                return
            previous = self._last_snapshot
            seq = self.log.append_snapshot(self._A, self._B, at_head=self.applied)
            if seq is None:
                return  # the log moved on: a later wake-up tries again
            self.applied = self._last_snapshot = seq
            if previous:
                self.log.prune(previous)

    # -- forwarded feedback -------------------------------------------------------------------
    def forward(self, response_id: str, index: int, reward: float, store_id: str | None) -> dict:
        """Hand a feedback for a response this replica does not hold to the replica that
        does; returns its result (a FeedbackResult dict).

        Raises:
            UnknownResponse: no replica claimed it within :data:`FORWARD_CLAIM_S`.
            DuplicateFeedback: the response was judged already.
            StateError: the holder failed, or did not finish within :data:`FORWARD_DONE_S`.
        """
        fid = self.log.forward(response_id, index, reward, store_id)
        self.forwards_sent += 1
        state, result = self.log.await_outcome(fid, FORWARD_CLAIM_S, FORWARD_DONE_S)
        if state == "done":
            return json.loads(result)
        if state == "duplicate":
            raise DuplicateFeedback(result)
        if state == "cancelled":
            raise UnknownResponse(
                f"unknown response id {response_id!r} (index {index}): no replica of this "
                f"deployment holds its recording (never generated, or evicted)"
            )
        if state == "error":
            raise StateError(f"the replica holding response {response_id!r} failed: {result}")
        raise StateError(
            f"the replica holding response {response_id!r} claimed the feedback but gave no "
            f"answer within {FORWARD_DONE_S:g} s; it may still be stored"
        )

    def _take_forwards(self) -> None:
        for f in self.log.pending_forwards():
            if not self.host._has_recording(f.response_id, f.index) or not self.log.claim(f.id):
                continue
            try:
                result = self.host._take_forward(f)
            except DuplicateFeedback as e:
                self.log.finish(f.id, "duplicate", str(e))
            except Exception as e:  # noqa: BLE001 - reported to the requesting replica
                if not isinstance(e, SonaError):
                    logger.exception("forwarded feedback %s failed", f.id)
                self.log.finish(f.id, "error", f"{type(e).__name__}: {e}")
            else:
                self.forwards_taken += 1
                self.log.finish(f.id, "done", dict(result))

    # -- the thread -------------------------------------------------------------------------
    def wake(self) -> None:
        """One round: follow the registry, read the log, take forwarded feedback."""
        try:
            self.host.follow_registry(blocking=False)
            self.drain()
            self._take_forwards()
            self._snapshot_if_due()
            self.last_error = None
        except Exception as e:  # noqa: BLE001 - keep the thread alive; retried next wake-up
            if f"{type(e).__name__}: {e}" != self.last_error:
                logger.exception("replica sync failed; retrying every %.1f s", self.poll_s)
            self.last_error = f"{type(e).__name__}: {e}"

    def _loop(self) -> None:
        rounds = 0
        while not self._stop.is_set():
            self._listener.wait(self.poll_s)
            if self._stop.is_set():
                break
            self.wake()
            rounds += 1
            if rounds % 7200 == 0:  # about hourly at the default poll
                try:
                    self.log.prune_forwards()
                except Exception:  # noqa: BLE001
                    logger.exception("pruning forwarded feedback failed")

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="sona-replica", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None
        self._listener.close()

    def stats(self) -> dict:
        with self.lock:
            return {
                "name": self.log.name,
                "applied_seq": self.applied,
                "last_snapshot_seq": self._last_snapshot,
                "micro_lora_sha256": micro_digest(self._A, self._B),
                "micro_lora_norm_cap": self.norm_cap,
                "forwards_taken": self.forwards_taken,
                "forwards_sent": self.forwards_sent,
                "running": self._thread is not None and self._thread.is_alive(),
                "last_error": self.last_error,
                "checked_at": time.time(),
            }
