"""ReasoningBank: learned patterns from trajectory embeddings (k-means++), lookup, merge/decay/prune.

Trajectories wait in a bounded pending pool (embedding, quality, weight, route). A
background cycle (:meth:`ReasoningBank.extract_patterns`) clusters them with
quality-weighted k-means++ and folds every cluster into the bank as a
:class:`~sona_plugin.types.LearnedPattern`, merging it into an existing pattern when
their centroids are near-duplicates. Lookup is cosine top-k over a cached contiguous
float32 centroid matrix with precomputed norms; the cache is updated in place when a
pattern is added or merged and rebuilt only when patterns are removed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import numpy as np

from .config import SonaConfig
from .errors import DimensionMismatch, InvalidValue, StateError
from .kernels import cosine_topk, kmeans_assign
from .trajectory import as_vector
from .types import LearnedPattern, PatternType, check_unit

logger = logging.getLogger(__name__)

_FORMAT = "sona_plugin.reasoning_bank"
_VERSION = 1
# Two float32 points whose squared distance is below this fraction of their squared norms
# are treated as the same point by the seeding (float32 rounding of |x|^2 + |c|^2 - 2x.c).
_SAME_POINT_RTOL = 1e-5
_MIN_WEIGHT = 1e-3


def _weighted_kmeans(
    X: np.ndarray, w: np.ndarray, k: int, rng: np.random.Generator, max_iter: int, tol: float
) -> tuple[np.ndarray, np.ndarray]:
    """Quality-weighted k-means++ seeding followed by weighted Lloyd iterations.

    Seeding (Arthur & Vassilvitskii 2007, greedy variant as in scikit-learn): the first
    centre is drawn with probability ∝ w_i; each further centre is the best of ``t``
    candidates drawn with probability ∝ w_i·D_i² (D_i the distance to the nearest chosen
    centre), "best" meaning the lowest potential Σ w_i·min(D_i², d(x_i, c)²). Seeding
    stops early when the potential is zero, so at most as many centres as distinct points
    are chosen. Lloyd: assign each point to its nearest centre, move each centre to the
    weighted mean Σ w_i x_i / Σ w_i of its members; stop after ``max_iter`` iterations,
    when the assignment no longer changes, or when every centre moved less than ``tol``
    relative to its norm. A centre left without members keeps its position; it can win
    members back and otherwise yields no cluster.

    Args:
        X: (n, d) float32 C-contiguous points, n >= 1.
        w: (n,) positive float64 weights.
        k: number of centres wanted, >= 1.

    Returns:
        ``(C, labels)``: (k', d) float32 centres, k' <= k, and (n,) int64 labels; every
        non-empty cluster's centre is the weighted mean of the points labelled with it.
    """
    n = X.shape[0]
    k = min(k, n)
    xn = np.einsum("ij,ij->i", X, X)
    xtol = _SAME_POINT_RTOL * xn
    # Greedy trials (scikit-learn uses 2 + ln k) matter most when k is small: a cluster the
    # seeding misses cannot be recovered by Lloyd. Candidates cost one GEMM column each
    # over all of X, so their total is held near 128 columns (16 trials for k <= 8, 4 at
    # k = 32); below 4 trials a GEMM is no cheaper per column than separate passes, so
    # larger k use plain k-means++ (one draw per centre).
    trials = min(16, 128 // k)
    if trials < 4:
        trials = 1

    def sq_dist(c: int) -> np.ndarray:
        d = X @ X[c]
        d *= -2.0
        d += xn
        d += xn[c]
        d[d <= xtol + _SAME_POINT_RTOL * xn[c]] = 0.0
        return d

    cw = np.cumsum(w)
    first = min(int(cw.searchsorted(rng.random() * cw[-1], side="right")), n - 1)
    centres = [first]
    wd2 = w * sq_dist(first)
    for _ in range(1, k):
        cum = np.cumsum(wd2)
        total = float(cum[-1])
        if not total > 0.0:
            break
        if trials == 1:
            c = min(int(cum.searchsorted(rng.random() * total, side="right")), n - 1)
            np.minimum(wd2, w * sq_dist(c), out=wd2)
            centres.append(c)
            continue
        cand = np.minimum(cum.searchsorted(rng.random(trials) * total, side="right"), n - 1)
        dc = X @ X[cand].T
        dc *= -2.0
        dc += xn[:, None]
        dc += xn[cand]
        dc[dc <= xtol[:, None] + _SAME_POINT_RTOL * xn[cand]] = 0.0
        wdc = w[:, None] * dc
        np.minimum(wdc, wd2[:, None], out=wdc)
        best = int(np.argmin(wdc.sum(axis=0)))
        centres.append(int(cand[best]))
        wd2 = np.ascontiguousarray(wdc[:, best])

    C = X[centres]
    k = C.shape[0]
    w32 = w.astype(np.float32)
    rows = np.arange(n)
    onehot = np.zeros((k, n), dtype=np.float32)
    prev = None
    for _ in range(max(1, max_iter)):
        labels, _ = kmeans_assign(X, C)
        if prev is not None and np.array_equal(labels, prev):
            break  # C already holds the weighted means of these labels
        onehot[:] = 0.0
        onehot[labels, rows] = w32
        sums = onehot @ X
        wsum = np.bincount(labels, weights=w, minlength=k)
        live = wsum > 0
        new = C.copy()
        new[live] = sums[live] / wsum[live, None].astype(np.float32)
        diff = new - C
        shift = np.sqrt(
            np.einsum("ij,ij->i", diff, diff) / np.maximum(np.einsum("ij,ij->i", C, C), 1e-30)
        )
        C, prev = new, labels
        if float(shift.max()) < tol:
            break
    return C, labels


class ReasoningBank:
    """Pending trajectory summaries and the learned patterns distilled from them.

    Args:
        config: uses ``embed_dim``, ``trajectory_capacity`` (bound of the pending pool),
            the ``pattern_*`` fields, ``max_patterns`` and ``seed``.

    Not thread-safe: the coordinator runs all bank work on its one background worker.
    Returned patterns are the bank's live objects; do not modify their centroids.
    """

    def __init__(self, config: SonaConfig):
        self.config = config
        self._dim = int(config.embed_dim)
        self._cap = int(config.trajectory_capacity)
        self._reset_pending()
        self._patterns: list[LearnedPattern] = []  # row order of the centroid cache
        self._row: dict[int, int] = {}
        self._cent = np.zeros((0, self._dim), dtype=np.float32)
        self._norms = np.zeros(0, dtype=np.float32)
        self._cv, self._nv = self._cent, self._norms  # views of the rows in use
        self._next_id = 0
        self._extractions = 0
        self._reset_counters()

    # ----------------------------------------------------------------- pending pool
    def _reset_pending(self) -> None:
        self._p_emb = np.zeros((0, self._dim), dtype=np.float32)
        self._p_q = np.zeros(0, dtype=np.float64)
        self._p_w = np.zeros(0, dtype=np.float64)
        self._p_route: list[str | None] = []
        self._p_start = 0  # ring start once the pool is full
        self._p_len = 0

    def _reset_counters(self) -> None:
        self._dropped = 0
        self._clusters_dropped = 0
        self._created = 0
        self._merged = 0
        self._pruned = 0
        self._evicted = 0

    def add_trajectory(
        self, embedding: Any, quality: float, route: str | None = None, weight: float | None = None
    ) -> None:
        """Queue one trajectory summary for the next :meth:`extract_patterns`.

        Args:
            embedding: 1-D vector of length ``config.embed_dim`` (NumPy, list or tensor).
            quality: the trajectory's quality in [0, 1].
            route: optional route (router mode) whose quality the pattern tracks.
            weight: clustering weight > 0; default ``max(quality, 1e-3)``.

        Raises:
            DimensionMismatch: the embedding is not 1-D of length ``embed_dim``.
            InvalidValue: empty or non-finite embedding, quality outside [0, 1], weight not
                finite and > 0, route not a string.

        When the pool holds ``trajectory_capacity`` entries the oldest is dropped and
        counted in :attr:`dropped`. On error nothing changes.
        """
        e = as_vector("embedding", embedding, self._dim)
        q = check_unit("quality", quality)
        if weight is None:
            wt = max(q, _MIN_WEIGHT)
        else:
            try:
                wt = float(weight)
            except (TypeError, ValueError):
                raise InvalidValue(f"weight must be a finite number > 0, got {weight!r}") from None
            if not (math.isfinite(wt) and wt > 0):
                raise InvalidValue(f"weight must be a finite number > 0, got {weight!r}")
        if route is not None and not isinstance(route, str):
            raise InvalidValue(
                f"route must be a string or None, got {type(route).__name__} {route!r}"
            )
        if self._p_len < self._cap:
            if self._p_len == self._p_emb.shape[0]:
                self._grow_pending(min(self._cap, max(64, 2 * self._p_len)))
            i = self._p_len
            self._p_len += 1
            self._p_route.append(route)
        else:
            i = self._p_start
            self._p_start = (self._p_start + 1) % self._cap
            self._p_route[i] = route
            self._dropped += 1
        self._p_emb[i] = e
        self._p_q[i] = q
        self._p_w[i] = wt

    def add_trajectories(
        self,
        embeddings: np.ndarray,
        qualities: np.ndarray,
        routes: list[str | None] | None = None,
        weights: np.ndarray | None = None,
    ) -> None:
        """Queue many summaries at once (one check for the whole batch).

        ``embeddings`` [n, embed_dim], ``qualities`` [n] in [0, 1], weights [n] > 0
        (default ``max(quality, 1e-3)``; ones give every pattern the plain mean quality of
        its members). Same semantics and errors as :meth:`add_trajectory`.
        """
        E = np.ascontiguousarray(embeddings, dtype=np.float32)
        Q = np.asarray(qualities, dtype=np.float64)
        if E.ndim != 2 or E.shape[1] != self._dim or Q.shape != (E.shape[0],):
            raise DimensionMismatch(
                f"embeddings must be [n, {self._dim}] with n qualities, got "
                f"{E.shape} and {Q.shape}",
                self._dim,
                E.shape[-1] if E.ndim else 0,
            )
        if not np.isfinite(E).all():
            raise InvalidValue("embeddings contain a non-finite value")
        if not (np.isfinite(Q).all() and (Q >= 0).all() and (Q <= 1).all()):
            raise InvalidValue("qualities must be finite numbers in [0, 1]")
        routes = [None] * len(E) if routes is None else list(routes)
        if len(routes) != len(E):
            raise DimensionMismatch(
                f"{len(routes)} routes for {len(E)} embeddings", len(E), len(routes)
            )
        if any(r is not None and not isinstance(r, str) for r in routes):
            raise InvalidValue("routes must be strings or None")
        W = np.maximum(Q, _MIN_WEIGHT) if weights is None else np.asarray(weights, np.float64)
        if W.shape != Q.shape or not (np.isfinite(W).all() and (W > 0).all()):
            raise InvalidValue(f"weights must be [n] finite numbers > 0, got shape {W.shape}")
        n = len(E)
        if self._p_start == 0 and self._p_len + n <= self._cap:
            if self._p_len + n > self._p_emb.shape[0]:
                self._grow_pending(min(self._cap, max(64, 2 * (self._p_len + n))))
            i = self._p_len
            self._p_emb[i : i + n] = E
            self._p_q[i : i + n] = Q
            self._p_w[i : i + n] = W
            self._p_route.extend(routes)
            self._p_len += n
            return
        for e, q, r, w in zip(E, Q.tolist(), routes, W.tolist()):
            self.add_trajectory(e, q, r, w)

    def _grow_pending(self, size: int) -> None:
        emb = np.zeros((size, self._dim), dtype=np.float32)
        emb[: self._p_len] = self._p_emb[: self._p_len]
        self._p_emb = emb
        self._p_q = np.resize(self._p_q, size)
        self._p_w = np.resize(self._p_w, size)

    def _pending(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str | None]]:
        """Pending (embeddings, qualities, weights, routes), oldest first, C-contiguous.

        Views of the pool when it has not wrapped around; callers must not modify them.
        """
        n, s = self._p_len, self._p_start
        if s == 0:
            return self._p_emb[:n], self._p_q[:n], self._p_w[:n], self._p_route[:n]
        order = np.r_[s:n, 0:s]
        return (
            self._p_emb[order],
            self._p_q[order],
            self._p_w[order],
            self._p_route[s:n] + self._p_route[:s],
        )

    # ------------------------------------------------------------------ extraction
    def extract_patterns(self, k: int | None = None) -> list[LearnedPattern]:
        """Cluster the pending trajectories into patterns and fold them into the bank.

        Weighted k-means++ (see :func:`_weighted_kmeans`) with
        ``k = min(k or pattern_clusters, distinct points)`` and weights
        ``w = max(quality, 1e-3)`` unless given. Each cluster becomes a pattern with
        ``centroid = Σ w x / Σ w``, ``cluster_size``, ``total_weight = Σ w``,
        ``avg_quality = Σ w q / Σ w``, ``quality_sq_sum = Σ w q²`` and
        ``route_stats = {route: [count, mean quality]}``. Clusters smaller than
        ``pattern_min_cluster_size`` are dropped (counted in ``stats()``). A cluster whose
        centroid has cosine ≥ ``pattern_merge_similarity`` with a pattern already in the
        bank (including one added earlier in this call) is merged into the most similar
        one; otherwise it is added with a fresh id. The pending pool is emptied.

        Deterministic for a given ``config.seed`` and call sequence.

        Returns:
            The patterns created or updated, in cluster order (no duplicates).
        """
        n = self._p_len
        if n == 0:
            return []
        X, q, w, routes = self._pending()
        rng = np.random.default_rng([self.config.seed, self._extractions])
        C, labels = _weighted_kmeans(
            X,
            w,
            min(k or self.config.pattern_clusters, self.config.pattern_clusters),
            rng,
            self.config.pattern_max_iterations,
            self.config.pattern_convergence_threshold,
        )
        k = C.shape[0]
        counts = np.bincount(labels, minlength=k)
        tw = np.bincount(labels, weights=w, minlength=k)
        qs = np.bincount(labels, weights=w * q, minlength=k)
        qss = np.bincount(labels, weights=w * q * q, minlength=k)
        route_stats = self._route_stats(labels, q, routes, k)

        self._extractions += 1
        self._reset_pending()
        now = time.time()
        touched: dict[int, LearnedPattern] = {}
        min_size = self.config.pattern_min_cluster_size
        for j in range(k):
            c = int(counts[j])
            if c == 0:
                continue
            if c < min_size:
                self._clusters_dropped += 1
                continue
            p = LearnedPattern(
                id=-1,
                centroid=C[j].copy(),
                cluster_size=c,
                total_weight=float(tw[j]),
                avg_quality=min(max(float(qs[j] / tw[j]), 0.0), 1.0),
                created_at=now,
                last_accessed=now,
                quality_sq_sum=float(qss[j]),
                route_stats=route_stats[j],
            )
            stored = self._insert(p)
            touched[id(stored)] = stored
        self._enforce_max()
        logger.debug(
            "extracted %d clusters from %d trajectories; bank holds %d patterns",
            k,
            n,
            len(self._patterns),
        )
        return [
            p
            for p in touched.values()
            if p.id in self._row and self._patterns[self._row[p.id]] is p
        ]

    @staticmethod
    def _route_stats(
        labels: np.ndarray, q: np.ndarray, routes: list[str | None], k: int
    ) -> list[dict[str, list[float]]]:
        out: list[dict[str, list[float]]] = [{} for _ in range(k)]
        if all(r is None for r in routes):
            return out
        names: dict[str, int] = {}
        codes = np.fromiter(
            (-1 if r is None else names.setdefault(r, len(names)) for r in routes),
            dtype=np.int64,
            count=len(routes),
        )
        has = codes >= 0
        key = labels[has] * len(names) + codes[has]
        size = k * len(names)
        cnt = np.bincount(key, minlength=size)
        qsum = np.bincount(key, weights=q[has], minlength=size)
        by_code = list(names)
        for kk in np.flatnonzero(cnt):
            j, r = divmod(int(kk), len(names))
            out[j][by_code[r]] = [float(cnt[kk]), float(qsum[kk] / cnt[kk])]
        return out

    # -------------------------------------------------------------- pattern storage
    def _insert(self, p: LearnedPattern) -> LearnedPattern:
        """Merge ``p`` into its most similar pattern if cosine ≥ threshold, else append it."""
        if self._patterns:
            idx, sims = cosine_topk(self._cv, p.centroid, 1, self._nv)
            if idx.size and float(sims[0]) >= self.config.pattern_merge_similarity:
                r = int(idx[0])
                target = self._patterns[r]
                keep_id = target.id
                target.__dict__.update(target.merge(p).__dict__)
                target.id = keep_id
                self._set_row(r, target.centroid)
                self._merged += 1
                return target
        p.id = self._next_id
        self._next_id += 1
        self._append(p)
        self._created += 1
        return p

    def _append(self, p: LearnedPattern) -> None:
        n = len(self._patterns)
        if n == self._cent.shape[0]:
            size = max(16, 2 * n)
            cent = np.zeros((size, self._dim), dtype=np.float32)
            cent[:n] = self._cent[:n]
            norms = np.zeros(size, dtype=np.float32)
            norms[:n] = self._norms[:n]
            self._cent, self._norms = cent, norms
        self._patterns.append(p)
        self._row[p.id] = n
        self._set_row(n, p.centroid)
        self._cv, self._nv = self._cent[: n + 1], self._norms[: n + 1]

    def _set_row(self, r: int, centroid: np.ndarray) -> None:
        self._cent[r] = centroid
        self._norms[r] = np.sqrt(np.dot(self._cent[r], self._cent[r]))

    def _rebuild(self, patterns: list[LearnedPattern]) -> None:
        """Replace the pattern list and rebuild the centroid cache from it."""
        self._patterns = []
        self._row = {}
        self._cent = np.zeros((0, self._dim), dtype=np.float32)
        self._norms = np.zeros(0, dtype=np.float32)
        self._cv, self._nv = self._cent, self._norms
        for p in patterns:
            self._append(p)

    def _enforce_max(self) -> int:
        excess = len(self._patterns) - self.config.max_patterns
        if excess <= 0:
            return 0
        strength = np.array([p.total_weight * p.avg_quality for p in self._patterns])
        drop = set(np.argsort(strength, kind="stable")[:excess].tolist())
        self._rebuild([p for i, p in enumerate(self._patterns) if i not in drop])
        self._evicted += excess
        return excess

    def add_pattern(self, pattern: LearnedPattern) -> LearnedPattern:
        """Add a copy of ``pattern`` (fresh id), or merge it into a near-duplicate.

        The pattern is merged into the most similar stored pattern when their cosine is
        ≥ ``pattern_merge_similarity``; otherwise a copy is stored under a fresh id. The
        bank is then held to ``max_patterns``.

        Returns:
            The stored pattern (the new copy, or the pattern it was merged into). When the
            bank is full and the new pattern is the weakest, it is evicted at once (and
            counted in ``stats()["patterns_evicted"]``).

        Raises:
            DimensionMismatch: wrong centroid length.
            InvalidValue: non-finite centroid, negative size or weight, quality outside [0, 1].
        """
        if not isinstance(pattern, LearnedPattern):
            raise InvalidValue(f"pattern must be a LearnedPattern, got {type(pattern).__name__}")
        c = as_vector("pattern centroid", pattern.centroid, self._dim).copy()
        check_unit("pattern avg_quality", pattern.avg_quality)
        tw = float(pattern.total_weight)
        if not (math.isfinite(tw) and tw >= 0):
            raise InvalidValue(
                f"pattern total_weight must be a finite number >= 0, got {pattern.total_weight!r}"
            )
        if int(pattern.cluster_size) < 0:
            raise InvalidValue(f"pattern cluster_size must be >= 0, got {pattern.cluster_size}")
        p = dataclasses.replace(
            pattern, centroid=c, route_stats={r: list(v) for r, v in pattern.route_stats.items()}
        )
        stored = self._insert(p)
        self._enforce_max()
        return stored

    # ---------------------------------------------------------------------- lookup
    def _check_k(self, k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise InvalidValue(f"k must be an integer > 0, got {k!r}")
        return int(k)

    def find_patterns_with_scores(self, query: Any, k: int) -> list[tuple[LearnedPattern, float]]:
        """The ``k`` patterns most cosine-similar to ``query``, with their similarities.

        Sorted by descending cosine. Bumps ``access_count`` and ``last_accessed`` of the
        patterns returned.

        Raises:
            InvalidValue: ``k <= 0``, empty or non-finite query.
            DimensionMismatch: query not 1-D of length ``embed_dim``.
        """
        q = np.ascontiguousarray(as_vector("query", query, self._dim))
        k = self._check_k(k)
        n = len(self._patterns)
        if n == 0:
            return []
        idx, sims = cosine_topk(self._cv, q, min(k, n), self._nv)
        now = time.time()
        pats = self._patterns
        out = [(pats[i], s) for i, s in zip(idx.tolist(), sims.tolist(), strict=True)]
        for p, _ in out:
            p.access_count += 1
            p.last_accessed = now
        return out

    def find_patterns(self, query: Any, k: int) -> list[LearnedPattern]:
        """The ``k`` patterns most cosine-similar to ``query``, most similar first.

        See :meth:`find_patterns_with_scores`.
        """
        # the hot path: the kernel itself checks a float32 query's width and finiteness
        if type(query) is not np.ndarray or query.dtype != np.float32 or query.ndim != 1:
            query = as_vector("query", query, self._dim)
        if type(k) is not int or k <= 0:
            k = self._check_k(k)
        pats = self._patterns
        if not pats:
            if query.shape[0] != self._dim:
                as_vector("query", query, self._dim)
            return []
        idx, _ = cosine_topk(self._cv, query, k, self._nv)
        now = time.time()
        out = [pats[i] for i in idx.tolist()]
        for p in out:
            p.access_count += 1
            p.last_accessed = now
        return out

    def route_quality(self, query: Any, k: int = 5) -> dict[str, float]:
        """Per-route quality near ``query``.

        Over the ``k`` nearest patterns P, for each route r seen in them:
        ``Σ_p s_p n_{p,r} q_{p,r} / Σ_p s_p n_{p,r}`` with ``s_p = max(cos, 0)`` the
        similarity, ``n_{p,r}`` and ``q_{p,r}`` the route's count and mean quality in
        pattern p (similarity- and evidence-weighted mean). Routes whose weights are all
        zero are left out. Counts as an access of the patterns looked at.
        """
        num: dict[str, float] = {}
        den: dict[str, float] = {}
        for p, s in self.find_patterns_with_scores(query, k):
            s = max(s, 0.0)
            for r, (cnt, mean) in p.route_stats.items():
                wt = s * cnt
                num[r] = num.get(r, 0.0) + wt * mean
                den[r] = den.get(r, 0.0) + wt
        return {r: num[r] / den[r] for r in num if den[r] > 0}

    def get_pattern(self, pattern_id: int) -> LearnedPattern | None:
        """The pattern with this id, or None."""
        r = self._row.get(pattern_id)
        return None if r is None else self._patterns[r]

    def strong_patterns(self) -> list[LearnedPattern]:
        """Patterns with ``avg_quality >= pattern_quality_threshold`` (dream/replay sources)."""
        t = self.config.pattern_quality_threshold
        return [p for p in self._patterns if p.avg_quality >= t]

    # ------------------------------------------------------------------ maintenance
    def merge_similar(self) -> int:
        """Merge every pair of patterns whose cosine is ≥ ``pattern_merge_similarity``.

        Greedy: in each pass every pattern proposes its most similar partner, the
        proposals are taken by descending similarity, and each pattern merges at most once
        per pass (the lower id survives, see :meth:`LearnedPattern.merge`); passes repeat
        until no pair qualifies, since a merged centroid may come near another pattern.

        Returns:
            The number of merges.
        """
        thr = self.config.pattern_merge_similarity
        total = 0
        while True:
            n = len(self._patterns)
            if n < 2:
                return total
            cn = self._cent[:n] / np.maximum(self._norms[:n], 1e-30)[:, None]
            best: dict[tuple[int, int], float] = {}  # each pattern's nearest partner
            for s in range(0, n, 1024):
                sims = cn[s : s + 1024] @ cn.T
                rows = np.arange(sims.shape[0])
                sims[rows, rows + s] = -np.inf
                jj = sims.argmax(axis=1)
                ss = sims[rows, jj]
                for i in np.flatnonzero(ss >= thr).tolist():
                    j = int(jj[i])
                    best[(min(i + s, j), max(i + s, j))] = float(ss[i])
            if not best:
                return total
            pairs = sorted((-v, i, j) for (i, j), v in best.items())
            used: set[int] = set()
            gone: set[int] = set()
            for _, i, j in pairs:
                if i in used or j in used:
                    continue
                used.update((i, j))
                a, b = self._patterns[i], self._patterns[j]
                merged = a.merge(b)
                keep_row, drop_row = (i, j) if a.id <= b.id else (j, i)
                self._patterns[keep_row].__dict__.update(merged.__dict__)
                gone.add(drop_row)
                total += 1
            self._merged += len(gone)
            self._rebuild([p for r, p in enumerate(self._patterns) if r not in gone])

    def decay(self, factor: float | None = None) -> None:
        """Multiply every pattern's weight by ``factor`` (default ``pattern_decay``).

        Raises:
            InvalidValue: factor outside [0, 1].
        """
        f = check_unit("factor", self.config.pattern_decay if factor is None else factor)
        for p in self._patterns:
            p.decay(f)

    def prune(self) -> int:
        """Drop weak patterns; returns how many were removed.

        A pattern goes when :meth:`LearnedPattern.should_prune` says so (quality below
        ``pattern_prune_quality`` and fewer than ``pattern_prune_min_accesses`` accesses,
        or no weight left); then, beyond ``max_patterns``, those with the lowest
        ``total_weight · avg_quality`` go.
        """
        mq, ma = self.config.pattern_prune_quality, self.config.pattern_prune_min_accesses
        keep = [p for p in self._patterns if not p.should_prune(mq, ma)]
        removed = len(self._patterns) - len(keep)
        if removed:
            self._rebuild(keep)
            self._pruned += removed
        return removed + self._enforce_max()

    def clear(self) -> None:
        """Drop every pattern and pending trajectory and reset the counters.

        Pattern ids stay unique over the bank's life (the id counter is kept), and so
        does the extraction counter that seeds k-means++.
        """
        self._reset_pending()
        self._rebuild([])
        self._reset_counters()

    # -------------------------------------------------------------------- accessors
    @property
    def patterns(self) -> list[LearnedPattern]:
        """The stored patterns (live objects), in storage order."""
        return list(self._patterns)

    @property
    def pattern_count(self) -> int:
        return len(self._patterns)

    @property
    def trajectory_count(self) -> int:
        """Pending trajectories (not yet extracted)."""
        return self._p_len

    @property
    def dropped(self) -> int:
        """Pending trajectories dropped because the pool was full."""
        return self._dropped

    def stats(self) -> dict[str, Any]:
        """JSON-serialisable counters and summaries."""
        n = len(self._patterns)
        tw = float(sum(p.total_weight for p in self._patterns))
        return {
            "pattern_count": n,
            "trajectory_count": self._p_len,
            "dropped": self._dropped,
            "clusters_dropped": self._clusters_dropped,
            "extractions": self._extractions,
            "patterns_created": self._created,
            "patterns_merged": self._merged,
            "patterns_pruned": self._pruned,
            "patterns_evicted": self._evicted,
            "strong_patterns": len(self.strong_patterns()),
            "total_weight": tw,
            "mean_quality": (
                float(sum(p.total_weight * p.avg_quality for p in self._patterns) / tw)
                if tw > 0
                else 0.0
            ),
            "total_accesses": int(sum(p.access_count for p in self._patterns)),
            "next_id": self._next_id,
        }

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(arrays, meta)``: arrays for safetensors, everything else JSON-serialisable.

        Arrays: ``centroids`` (P, d) float32, ``pending_embeddings`` (n, d) float32,
        ``pending_quality`` and ``pending_weight`` (n,) float64. ``meta`` holds the
        pattern fields, pending routes, counters and the next id; loading both with
        :meth:`load_state_dict` restores exactly equal behaviour.
        """
        X, q, w, routes = self._pending()
        n = len(self._patterns)
        arrays = {
            "centroids": self._cent[:n].copy(),
            "pending_embeddings": X,
            "pending_quality": q,
            "pending_weight": w,
        }
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "embed_dim": self._dim,
            "patterns": [
                {
                    "id": p.id,
                    "cluster_size": int(p.cluster_size),
                    "total_weight": float(p.total_weight),
                    "avg_quality": float(p.avg_quality),
                    "created_at": float(p.created_at),
                    "last_accessed": float(p.last_accessed),
                    "access_count": int(p.access_count),
                    "pattern_type": p.pattern_type.value,
                    "quality_sq_sum": float(p.quality_sq_sum),
                    "route_stats": {
                        r: [float(v[0]), float(v[1])] for r, v in p.route_stats.items()
                    },
                }
                for p in self._patterns
            ],
            "pending_routes": routes,
            "next_id": self._next_id,
            "extractions": self._extractions,
            "counters": {
                "dropped": self._dropped,
                "clusters_dropped": self._clusters_dropped,
                "created": self._created,
                "merged": self._merged,
                "pruned": self._pruned,
                "evicted": self._evicted,
            },
        }
        return arrays, meta

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`. All or nothing: on error the bank is unchanged.

        Raises:
            StateError: missing keys, wrong format or inconsistent lengths.
            DimensionMismatch: saved with another ``embed_dim``.
        """
        try:
            if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
                raise StateError(
                    f"not a {_FORMAT} v{_VERSION} state: format "
                    f"{meta.get('format')!r} version {meta.get('version')!r}"
                )
            if meta["embed_dim"] != self._dim:
                raise DimensionMismatch(
                    f"saved ReasoningBank has embed_dim {meta['embed_dim']}, this one {self._dim}",
                    self._dim,
                    meta["embed_dim"],
                )
            cent = np.asarray(arrays["centroids"], dtype=np.float32)
            X = np.asarray(arrays["pending_embeddings"], dtype=np.float32)
            q = np.asarray(arrays["pending_quality"], dtype=np.float64)
            w = np.asarray(arrays["pending_weight"], dtype=np.float64)
            pmeta, routes = meta["patterns"], list(meta["pending_routes"])
            if cent.shape != (len(pmeta), self._dim):
                raise StateError(
                    f"centroids have shape {cent.shape}, expected ({len(pmeta)}, {self._dim})"
                )
            m = X.shape[0]
            if X.shape != (m, self._dim) or q.shape != (m,) or w.shape != (m,) or len(routes) != m:
                raise StateError(
                    f"pending arrays disagree: embeddings {X.shape}, quality "
                    f"{q.shape}, weight {w.shape}, routes {len(routes)}"
                )
            patterns = [
                LearnedPattern(
                    id=int(d["id"]),
                    centroid=cent[i].copy(),
                    cluster_size=int(d["cluster_size"]),
                    total_weight=float(d["total_weight"]),
                    avg_quality=float(d["avg_quality"]),
                    created_at=float(d["created_at"]),
                    last_accessed=float(d["last_accessed"]),
                    access_count=int(d["access_count"]),
                    pattern_type=PatternType(d["pattern_type"]),
                    quality_sq_sum=float(d["quality_sq_sum"]),
                    route_stats={
                        r: [float(v[0]), float(v[1])] for r, v in d["route_stats"].items()
                    },
                )
                for i, d in enumerate(pmeta)
            ]
            if any(r is not None and not isinstance(r, str) for r in routes):
                raise StateError("pending routes must be strings or null")
            if len({p.id for p in patterns}) != len(patterns):
                raise StateError("saved patterns have duplicate ids")
            counters = meta["counters"]
            next_id, extractions = int(meta["next_id"]), int(meta["extractions"])
            c = {
                k: int(counters[k])
                for k in ("dropped", "clusters_dropped", "created", "merged", "pruned", "evicted")
            }
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, (StateError, DimensionMismatch)):
                raise
            raise StateError(f"corrupt ReasoningBank state: {type(e).__name__}: {e}") from e
        extra = max(0, m - self._cap)
        self._reset_pending()
        if m:
            X, q, w, routes = X[extra:], q[extra:], w[extra:], routes[extra:]
            self._p_len = m - extra
            self._p_emb = np.ascontiguousarray(X)
            self._p_q, self._p_w, self._p_route = q.copy(), w.copy(), routes
        self._rebuild(patterns)
        self._next_id, self._extractions = next_id, extractions
        self._dropped = c["dropped"] + extra
        self._clusters_dropped, self._created = c["clusters_dropped"], c["created"]
        self._merged, self._pruned, self._evicted = c["merged"], c["pruned"], c["evicted"]
