"""Leak detection from short tracing windows.

Each window yields a few snapshots of the allocations traced since the window began. Per allocation
traceback we look at how its retained bytes move *between* snapshots: a leak only ever grows (what it
allocated is never freed), in window after window, for as long as the process runs. Caches that churn,
request temporaries and bursts shrink as often as they grow; warm-up growth stops. Only deltas are
used, so the same logic works when someone else keeps tracemalloc on all the time.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Protocol

from kotoba_memory.memory_profiler._models import HeldBackSite, MemoryLeak
from kotoba_memory.memory_profiler._survival import Retention, SurvivalSampler

_SMALL_BLOCK = 512  # pymalloc serves (and sys.getallocatedblocks counts) blocks up to this size
_VETO_MIN_BLOCKS = 50  # below this many blocks a site is not checked against the process (noise)
_VETO_MIN_BYTES = 16 * 1024
_MAX_ADMISSIONS_PER_WINDOW = 32
_MIN_WINDOWS_FOR_SHARES = 20  # shares of ~10 routes correlate by chance over fewer windows
_ROUTE_FALSE_NAMING = 0.05  # chance that growth no route drives still gets a route named by correlation
_RETAINED = 0.9  # share of sampled objects still alive that counts as "shown to be retained"
_CHURNED = 0.5  # share of sampled objects still alive under which a site counts as "shown to churn"
_MISSES_AGAINST = 3  # censuses finding none of a growing site's objects alive before that counts
_MIN_UNPROVEN_BYTES = 8 * 1024  # growth under this must be shown retained to be reported

Frame = tuple[str, int]
Key = tuple[Frame, ...]  # innermost (most recent) frame first, as tracemalloc records them
WindowSnapshot = tuple[float, Mapping[Key, tuple[int, int]]]  # (time, {traceback: (bytes, count)})


@dataclass(slots=True)
class _Track:
    """Everything remembered about one allocation traceback (bounded)."""

    key: Key
    first_seen: float
    first_growth: float | None = None
    last_growth: float | None = None
    ups: int = 0
    downs: int = 0
    net_growth: int = 0
    positive_growth: int = 0
    traced_time: float = 0.0
    growth_windows: int = 0
    windows: int = 0
    early_steps: int = 0
    net_count_growth: int = 0
    late_steps: int = 0
    first_window: int = 0
    # growth windows in a row whose census looked for this traceback's objects and found none made in
    # that window: what grows there is not an object (a dict's table resized, a freelist, C memory).
    # Not SurvivalSampler.misses(), which counts every census, growth window or not, and only while
    # the traceback has no sample whose survival counts (an opaque one's does not).
    dry: int = 0
    # growth per window, a ring indexed by window number (preallocated: tracking allocates nothing more)
    growth_ring: array[int] = field(default_factory=lambda: array("i"))
    # growth per snapshot step (steps_per_window per window), the same ring: route attribution
    step_ring: array[int] = field(default_factory=lambda: array("i"))


def _blocks_per_track(key: Key) -> int:
    # the _Track, its ring array, the key tuple, and per frame a (filename, lineno) tuple and an int
    return 3 + 2 * len(key)


def _frames(key: Key) -> tuple[str, ...]:
    """A tracked traceback as ``file:line`` strings, innermost first."""
    return tuple(f"{filename}:{lineno}" for filename, lineno in key)


def _score(track: _Track) -> int:
    return track.positive_growth + track.ups


class LeakDetector:
    """Accumulates per-traceback growth over tracing windows and turns it into leak suspects."""

    def __init__(
        self,
        *,
        max_sites: int = 256,
        max_windows: int = 64,
        site_chooser: SiteChooser,
        steps_per_window: int = 4,
    ) -> None:
        self.max_sites = self._max_sites = max_sites
        self.max_windows = self._max_windows = max_windows
        self.steps_per_window = steps_per_window  # growth steps kept per window (snapshots - 2)
        # per window: the requests per route that finished in each growth step
        self._step_routes: deque[tuple[int, list[dict[str, int]]]] = deque(maxlen=max_windows)
        self._tracks: dict[Key, _Track] = {}
        self._windows = 0
        self._window_ends: deque[float] = deque(maxlen=max_windows)
        self._own_blocks = 0
        self._window_routes: deque[tuple[int, dict[str, int]]] = deque(maxlen=max_windows)
        self.site_chooser = site_chooser
        self.survival = SurvivalSampler()
        # A suspect's route from the windows' growth steps, per track: those change only when a window
        # has been added, and the fit is the costly part of a verdict (the fleet asks every few seconds).
        self._route_epoch = 0
        self._route_memo: dict[Key, tuple[int, tuple[str | None, int]]] = {}

    @property
    def windows(self) -> int:
        """Number of windows fed so far."""
        return self._windows

    @property
    def sites_tracked(self) -> int:
        """Number of allocation tracebacks currently remembered."""
        return len(self._tracks)

    def footprint_bytes(self) -> int:
        """Rough bytes held by the detector's bookkeeping (bounded by max_sites x max_windows)."""
        per_track = 400 + (100 + 4 * self.steps_per_window) * self._max_windows
        routes = 300 * (len(self._window_routes) + self.steps_per_window * len(self._step_routes))
        return len(self._tracks) * per_track + routes + self.survival.footprint_bytes()

    def first_seen(self) -> dict[Key, float]:
        """When each tracked traceback was first seen growing (the survival sampler's ``since``)."""
        return {key: track.first_seen for key, track in list(self._tracks.items())}

    def tracked_keys(self) -> list[Key]:
        """The allocation tracebacks currently tracked (the census samples objects allocated there)."""
        return list(self._tracks)

    def add_window(
        self,
        snapshots: Sequence[WindowSnapshot],
        routes: Mapping[str, int] | None = None,
        step_routes: Sequence[Mapping[str, int]] | None = None,
        census: tuple[Collection[Key], Collection[Key]] | None = None,
    ) -> None:
        """Feed one window's snapshots (at least three, in time order) and the route request counts in it;
        ``step_routes[j]``, when given, counts the requests that finished between snapshots j-1 and j;
        ``census``, when one ran in this window: the tracebacks it looked for and those it found live
        objects of (allocated in this window)."""
        if len(snapshots) < 3:
            return
        index = self._windows
        self._windows += 1
        t_first, t_last = snapshots[0][0], snapshots[-1][0]
        span = max(t_last - snapshots[1][0], 1e-9)
        self._window_ends.append(t_last)
        self._window_routes.append((index, dict(routes or {})))
        steps_kept = min(self.steps_per_window, len(snapshots) - 2)
        if step_routes is not None and len(step_routes) == len(snapshots) and steps_kept > 0:
            self._step_routes.append((index, [dict(step_routes[j]) for j in range(2, 2 + steps_kept)]))
        # Only tracebacks that grew in this window start being tracked: the rest cannot be leaking
        # yet, and tracking them would make our own bookkeeping grow with every window.
        first, last = snapshots[1][1], snapshots[-1][1]
        grown = [
            (size - first.get(key, (0, 0))[0], key)
            for key, (size, _count) in last.items()
            if key not in self._tracks and size > first.get(key, (0, 0))[0]
        ]
        grown.sort(reverse=True)
        for _, key in grown[:_MAX_ADMISSIONS_PER_WINDOW]:
            self._admit(key, t_first)
        # The first step is skipped: within it a site refills its normal live set (one reply being
        # built, a cache slot replaced) from zero, which is not growth. What happens after that is.
        steps = len(snapshots) - 2
        middle = 2 + steps // 2
        for key, track in self._tracks.items():
            sizes = [stats.get(key, (0, 0))[0] for _, stats in snapshots]
            first_count = snapshots[1][1].get(key, (0, 0))[1]
            track.net_count_growth += snapshots[-1][1].get(key, (0, 0))[1] - first_count
            ups = downs = 0
            base = (index % self._max_windows) * self.steps_per_window - 2
            for j in range(2, len(sizes)):
                delta = sizes[j] - sizes[j - 1]
                if j - 2 < steps_kept:
                    track.step_ring[base + j] = max(-(2**31), min(2**31 - 1, delta))
                if delta > 0:
                    ups += delta
                    if j < middle:
                        track.early_steps += 1
                    else:
                        track.late_steps += 1
                else:
                    downs -= delta
            growth = sizes[-1] - sizes[1]
            track.windows += 1
            track.traced_time += span
            track.ups += ups
            track.downs += downs
            track.net_growth += growth
            if growth > 0:
                if census is not None and key in census[0]:
                    track.dry = 0 if key in census[1] else track.dry + 1
                track.positive_growth += growth
                track.growth_windows += 1
                track.last_growth = t_last
                if track.first_growth is None:
                    track.first_growth = t_last
            track.growth_ring[index % self._max_windows] = max(-(2**31), min(2**31 - 1, growth))
        self._trim()
        # Last: a route computed while this window was being added is not reused.
        self._route_epoch += 1
        self._route_memo = {}

    def _admit(self, key: Key, now: float) -> None:
        self._tracks[key] = _Track(
            key=key,
            first_seen=now,
            first_window=self._windows - 1,
            growth_ring=array("i", bytes(4 * self._max_windows)),
            step_ring=array("i", bytes(4 * self._max_windows * self.steps_per_window)),
        )
        self._own_blocks += _blocks_per_track(key)

    def _trim(self) -> None:
        if len(self._tracks) <= self._max_sites:
            return
        # Keep the tracebacks with the most growth; drop the rest (their evidence is weakest).
        keep = sorted(self._tracks.values(), key=_score, reverse=True)[: self._max_sites]
        self._tracks = {t.key: t for t in keep}
        self._own_blocks = sum(_blocks_per_track(key) for key in self._tracks)
        self.survival.forget(self._tracks)

    @property
    def own_blocks(self) -> int:
        """Estimated interpreter blocks our tracking holds; the profiler subtracts them from its samples
        so that our own bookkeeping never looks like growth of the process."""
        return self._own_blocks + 3 * self.survival.sampled

    def suspects(
        self,
        *,
        now: float,
        window_interval_s: float,
        global_growth: GlobalGrowth | None = None,
        min_confidence: float = 0.6,
        held_back: list[HeldBackSite] | None = None,
    ) -> list[MemoryLeak]:
        """Leak suspects whose confidence reaches ``min_confidence``, most confident and fastest first;
        sites that grew but fell short go to ``held_back`` when given (unsorted)."""
        # The process growth that sites shown retained account for: only the rest can hide another leak.
        # A snapshot: the scheduler thread may add a window meanwhile (analyze() does not wait for it).
        tracks = list(self._tracks.values())
        explained_bytes = explained_blocks = 0.0  # per second, at sites shown retained
        churned: set[str] = set()  # application lines with a traceback whose objects were shown to die
        for track in tracks:
            retention = self._retention(track, window_interval_s)
            if retention is not None and retention.fraction < _CHURNED:
                churned.add(self.site_chooser.site(track.key))
            if retention is not None and retention.fraction >= _RETAINED and track.net_growth > 0:
                span = max(track.traced_time, 1e-9)
                explained_bytes += track.net_growth / span
                explained_blocks += max(track.net_count_growth, 0) / span
        observed_until = self._window_ends[-1] if self._window_ends else now
        found: list[MemoryLeak] = []
        for track in tracks:
            leak = self._judge(
                track, now, window_interval_s, global_growth, min_confidence,
                (explained_bytes, explained_blocks), observed_until, churned, held_back,
            )
            if leak is not None:
                found.append(leak)
        # Confident suspects first, the fastest-growing of them on top: that is where the memory goes.
        found.sort(key=lambda leak: (leak.confidence >= 0.8, leak.growth_rate_bytes_per_s), reverse=True)
        return found

    def _judge(
        self,
        track: _Track,
        now: float,
        window_interval_s: float,
        global_growth: GlobalGrowth | None,
        min_confidence: float = 0.0,
        explained: tuple[float, float] = (0.0, 0.0),
        observed_until: float | None = None,
        churned: Collection[str] = (),
        held_back: list[HeldBackSite] | None = None,
    ) -> MemoryLeak | None:
        if track.growth_windows < 2 or track.net_growth <= 0 or track.ups <= 0:
            return None
        owner = self.site_chooser.owner(track.key)
        if owner == "own":
            return None  # kotoba-memory's own allocations are never a suspect
        retention = self._retention(track, window_interval_s)
        retained = retention is not None and retention.fraction >= _RETAINED
        if owner == "library" and not retained:
            return None  # no application frame: reported only when shown to be retained
        rate = track.net_growth / max(track.traced_time, 1e-9)
        shrink = track.downs / track.ups
        # Leaked memory is never freed: any shrinking is evidence against a leak. A little is
        # tolerated for objects caught in flight at a snapshot; freelist reuse and churn shrink more.
        monotonic = min(1.0, max(0.0, 1.0 - 5.0 * shrink))
        # One growth window could be a burst straddling the window end; each further one halves doubt.
        persistence = 1.0 - 0.5 ** (track.growth_windows - 1)
        # Warm-up growth stops; a leak keeps going. Compare the quiet time since the last growth
        # with the usual spacing of growth windows.
        assert track.first_growth is not None and track.last_growth is not None
        spacing = (track.last_growth - track.first_growth) / max(track.growth_windows - 1, 1)
        # Quiet time up to the latest window, not to now: with no window since, nothing says it stopped
        # (a starved scheduler or a long interval must not read as "the leak stopped").
        seen_until = now if observed_until is None else min(now, observed_until)
        quiet = max(0.0, seen_until - track.last_growth)
        allowance = 2.0 * max(spacing, window_interval_s)
        recency = 1.0 if quiet <= allowance else allowance / quiet
        # A leak grows steadily through a window; a churning cache or buffer pool stops growing once
        # it has replaced its contents. Count growing steps in each window's second half against
        # its first half (with one pseudo-step each so a slow leak's few events are not over-read).
        linearity = min(1.0, 2.0 * (track.late_steps + 1) / (track.early_steps + 1))
        age = max(0.0, now - track.first_seen)
        consistency = 1.0
        evidence = [
            f"grew in {track.growth_windows}/{track.windows} windows",
            f"shrink/grow {shrink:.2f}",
            f"last growth {quiet:.0f}s before the latest window",
            f"late/early growing steps {track.late_steps}/{track.early_steps}",
        ]
        if global_growth is not None and age > 0 and not retained:
            # Survival is direct evidence; the comparison with the whole process only stands in for it.
            consistency = self._consistency(track, rate, global_growth, evidence, now, explained)
        misses = self.survival.misses(track.key)
        survival = _survival_factor(retention, evidence, misses, track.dry)
        proven = retained or (
            track.dry < _MISSES_AGAINST
            and self.survival.unrefuted(track.key, 2.0 * window_interval_s, track.first_seen)
        )
        # Memory a library allocated for this line, never found as a live object (a structure's own:
        # dict tables, OrderedDict nodes), while what the line put into it was shown to die: it churns.
        recycled = (
            not proven and misses >= _MISSES_AGAINST and self.site_chooser.made_in_library(track.key)
            and self.site_chooser.site(track.key) in churned
        )
        unproven = 1.0 if proven else _unproven_factor(track, misses, evidence, recycled)
        confidence = monotonic * persistence * recency * linearity * consistency * survival * unproven
        if round(confidence, 3) < min_confidence:
            if held_back is not None:
                factors = (
                    ("monotonic", monotonic), ("persistence", persistence), ("recency", recency),
                    ("linearity", linearity), ("consistency", consistency), ("survival", survival),
                    ("unproven", unproven),
                )
                held_back.append(HeldBackSite(
                    allocation_site=self.site_chooser.site(track.key),
                    confidence=round(confidence, 3),
                    limited_by=min(factors, key=lambda f: f[1])[0],
                    factors=tuple((name, round(value, 3)) for name, value in factors),
                    evidence="; ".join(evidence),
                    traceback=_frames(track.key),
                    window_growth=tuple(track.growth_ring[i % self._max_windows] for i in self._live(track)),
                ))
            return None  # the route is worth finding for suspects only (it is the costly part)
        frames = _frames(track.key)
        route, points = self._route_for(track)
        if route is None:
            evidence.append(f"route not yet known: its growth over {points} points follows no route "
                            "beyond chance")
        return MemoryLeak(
            size=int(max(rate * age, track.positive_growth)),
            allocation_site=self.site_chooser.site(track.key),
            traceback=frames,
            growth_rate_bytes_per_s=rate,
            age_seconds=age,
            confidence=round(confidence, 3),
            route=route,
            observed_bytes=track.positive_growth,
            growth_windows=track.growth_windows,
            windows_observed=track.windows,
            evidence="; ".join(evidence),
        )

    def _consistency(
        self,
        track: _Track,
        rate: float,
        global_growth: GlobalGrowth,
        evidence: list[str],
        now: float,
        explained: tuple[float, float] = (0.0, 0.0),
    ) -> float:
        """0.25 when the site grew significantly faster (over twice as fast) than the whole process, less
        what sites shown retained (real leaks) account for.

        Then what it allocates is being freed again outside our windows (a cache evicting, sessions
        expiring), because a leak at one site cannot outgrow the process. Small blocks are compared
        with the interpreter's allocated-block count, large ones with malloc's in-use bytes (or RSS).
        Taking out the retained leaks matters in a busy app: there the process grows with them, which
        would otherwise leave room for every churning site slower than they are.
        """
        # The later half of the site's life only: start-up and warm-up growth of the process would
        # otherwise hide that it has since gone flat.
        growth = global_growth.since(track.first_seen + max(0.0, now - track.first_seen) / 2.0)
        if growth is None or growth.span_s <= 0:
            return 1.0
        count_rate = track.net_count_growth / max(track.traced_time, 1e-9)
        mean_block = track.net_growth / track.net_count_growth if track.net_count_growth > 0 else math.inf
        explained_bytes, explained_blocks = explained
        if mean_block <= _SMALL_BLOCK:
            slope, stderr, floor, unit = growth.blocks_per_s, growth.blocks_stderr, _VETO_MIN_BLOCKS, "blocks"
            site_rate, retained = count_rate, explained_blocks
        else:
            slope, stderr, floor, unit = growth.bytes_per_s, growth.bytes_stderr, _VETO_MIN_BYTES, "bytes"
            site_rate, retained = rate, explained_bytes
        # Factor 2: the site's rate is measured inside windows, where the app may run faster or slower
        # than on average; a churning site leaves the process flat, far below half its rate.
        rest = max(slope - retained, 0.0)
        if site_rate * growth.span_s >= floor and site_rate > 2.0 * rest + 3.0 * stderr:
            less = f" ({retained:.0f} of it at retained sites)" if retained > 0 else ""
            evidence.append(
                f"site +{site_rate:.0f} {unit}/s but process +{slope:.0f}±{stderr:.0f} {unit}/s{less}"
            )
            return 0.25
        return 1.0

    def _retention(self, track: _Track, window_interval_s: float) -> Retention | None:
        """Survival of ``track``'s samples; None once the censuses of its last growth windows found none
        of its new objects: then what grows there is not what was sampled (``lru_cache`` recycles its
        link objects in place, so a link sampled while the cache filled stays "alive", while what grows
        at the calling line is the cache's dict table, never an object)."""
        if track.dry >= _MISSES_AGAINST:
            return None
        return self.survival.retention(track.key, window_interval_s, track.first_seen)

    def _live(self, track: _Track) -> range:
        """The indices of the windows ``track`` was fed that the detector still keeps, oldest first."""
        return range(max(track.first_window, self._windows - self._max_windows), self._windows)

    def _route_for(self, track: _Track) -> tuple[str | None, int]:
        """The route the track's growth follows (None when none does beyond chance), and over how many
        points that was judged; computed once per track and window."""
        epoch, memo = self._route_epoch, self._route_memo
        hit = memo.get(track.key)
        if hit is not None and hit[0] == epoch:
            return hit[1]
        found = self._route_from_windows(track)
        memo[track.key] = (epoch, found)
        return found

    def _route_from_windows(self, track: _Track) -> tuple[str | None, int]:
        """The route whose requests follow the track's growth across the windows' steps, if one does,
        and the number of points judged.

        Only growth that moves with a route's requests names it. Memory left behind per request does
        not: a request's traced delta also holds what the collector or a later request frees (its cyclic
        garbage, collected after it ends; a session that expires), so the route making the most garbage
        would be named.
        """
        live = self._live(track)
        # Per growth step (several per window) when the steps' request counts are known: many more
        # points than windows, and inside a window a leak grows exactly when its route's requests run.
        points: list[tuple[float, dict[str, int]]] = []
        for i, steps in list(self._step_routes):  # a copy: windows may be added meanwhile
            if i in live:
                base = (i % self._max_windows) * self.steps_per_window
                points.extend((float(track.step_ring[base + k]), counts) for k, counts in enumerate(steps))
        # Whole windows only where they give more points (a feed without step counts): three windows
        # are three points, too few to name any route, where their steps are twelve.
        growth = {i: track.growth_ring[i % self._max_windows] for i in live}
        windows = [(float(growth[i]), counts) for i, counts in list(self._window_routes) if i in growth]
        if len(windows) > len(points):
            points = windows
        points = [(y, counts) for y, counts in points if counts]
        return _regressed_route(points) or _best_correlated(points), len(points)


def _regressed_route(points: Sequence[tuple[float, Mapping[str, int]]]) -> str | None:
    """The route contributing most to a site's growth in a least-squares fit of the growth per point on
    every route's request count per point (no intercept: no requests, no growth).

    Unlike one correlation per route, the fit separates routes whose counts rise and fall together
    (every route is busier when the server is). Needs three points per route, and the fit must explain
    at least half of the growth's variation once adjusted for the routes it had to fit (k free slopes
    explain about k/n of pure noise); else None.
    """
    names = sorted({name for _, counts in points for name in counts})
    k = len(names)
    if k == 0 or len(points) < 3 * k:
        return None
    rows = [[float(counts.get(name, 0)) for name in names] for _, counts in points]
    ys = [y for y, _ in points]
    # Normal equations (X'X + a tiny ridge) b = X'y, solved by Gaussian elimination (k is small).
    xtx = [[sum(r[i] * r[j] for r in rows) for j in range(k)] for i in range(k)]
    xty = [sum(r[i] * y for r, y in zip(rows, ys)) for i in range(k)]
    for i in range(k):
        xtx[i][i] += 1e-6 * (xtx[i][i] + 1.0)
    coef = _solve(xtx, xty)
    if coef is None:
        return None
    fitted = [sum(b * x for b, x in zip(coef, r)) for r in rows]
    mean = sum(ys) / len(ys)
    total = sum((y - mean) ** 2 for y in ys)
    residual = sum((y - f) ** 2 for y, f in zip(ys, fitted))
    if total <= 0 or 1.0 - (residual / total) * (len(ys) - 1) / (len(ys) - k) < 0.5:
        return None
    contribution = [b * sum(r[i] for r in rows) for i, b in enumerate(coef)]
    i = max(range(k), key=contribution.__getitem__)
    return names[i] if contribution[i] > 0 else None


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Solve ``a x = b`` (square, modified in place) by Gaussian elimination with partial pivoting."""
    n = len(b)
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        b[col], b[pivot] = b[pivot], b[col]
        for r in range(col + 1, n):
            factor = a[r][col] / a[col][col]
            if factor:
                for c in range(col, n):
                    a[r][c] -= factor * a[col][c]
                b[r] -= factor * b[col]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (b[r] - sum(a[r][c] * x[c] for c in range(r + 1, n))) / a[r][r]
    return x


def _best_correlated(points: Sequence[tuple[float, Mapping[str, int]]]) -> str | None:
    """The route whose request counts best follow a site's growth over ``points`` (growth, counts).

    A route's count per point against the growth; with enough points also its share of the point's
    requests against the growth per request (a busy moment makes every route's count rise with the
    growth, shares take that common factor out). The better of the two counts; at least 0.3, and more
    than chance gives the best of that many routes over that few points (see _significant_r).
    """
    names = {name for _, counts in points for name in counts}
    shares = len(points) >= _MIN_WINDOWS_FOR_SHARES
    best, best_corr = None, _significant_r(len(points), len(names) * (2 if shares else 1))
    ys = [y for y, _ in points]
    totals = [float(sum(counts.values())) for _, counts in points]
    for name in sorted(names):
        xs = [float(counts.get(name, 0)) for _, counts in points]
        corr = _pearson(xs, ys)
        if shares:
            share = _pearson([x / t for x, t in zip(xs, totals)], [y / t for y, t in zip(ys, totals)])
            if share is not None and (corr is None or share > corr):
                corr = share
        if corr is not None and corr > best_corr:
            best, best_corr = name, corr
    return best


def _significant_r(points: int, tries: int) -> float:
    """The correlation (at least 0.3) that the best of ``tries`` correlations of unrelated series over
    ``points`` points reaches by chance in under 5% of cases (Fisher's z, one-sided, Bonferroni).

    Eight routes over the twelve growth steps of three windows: the best of eight chance correlations
    tops 0.3 in most cases, and naming it put the wrong route on a real leak at production defaults.
    """
    if points <= 3:
        return 1.0
    z = NormalDist().inv_cdf(1.0 - _ROUTE_FALSE_NAMING / max(1, tries)) / math.sqrt(points - 3)
    return max(0.3, math.tanh(z))


def _unproven_factor(track: _Track, misses: int, evidence: list[str], recycled: bool = False) -> float:
    """0.5 for growth that survival has not shown retained (nor a sample alive for two window intervals
    with none dead) and that looks like a by-product of churn.

    - Tiny: under ``_MIN_UNPROVEN_BYTES`` in all windows; a one-off refill of a freelist or a buffer
      looks like that, and a leak this small is not worth a page until a census shows it retained.
    - Intermittent and never found: grew in under 80% of its windows, and no census found a live
      object of it, or none made in its last ``track.dry`` growth windows. Memory a dict's table resize or a
      freelist keeps (tracemalloc still counts freed objects CPython parks there) grows like that; a
      leak's objects are found alive, a steady one grows in nearly every window.
    - Recycled (``recycled``, judged by the caller): a library allocated it for an application line
      (the innermost frame is the library's), no census found a live object of it, and another
      traceback through the same line was shown to churn. That is a structure's own memory (a dict's
      table, an ``OrderedDict``'s nodes) in a bounded cache: it allocates for each new entry, while the
      frees of the evicted ones fall outside the windows. (A C extension's buffers are never found
      alive either, but nothing at their line is shown to die.)
    """
    if track.positive_growth < _MIN_UNPROVEN_BYTES:
        evidence.append(f"only {track.positive_growth} bytes grew, not shown retained")
        return 0.5
    if max(misses, track.dry) >= _MISSES_AGAINST and track.growth_windows < 0.8 * track.windows:
        evidence.append(
            "intermittent growth of nothing any census found alive" if misses >= _MISSES_AGAINST
            else f"intermittent growth: the censuses of its last {track.dry} growth windows found none "
            "of its new objects"
        )
        return 0.5
    if recycled:
        evidence.append("a library's own memory for this line, never found alive, while what the line "
                        "puts there was shown to be freed")
        return 0.5
    return 1.0


def _survival_factor(
    retention: Retention | None, evidence: list[str], misses: int = 0, dry: int = 0
) -> float:
    """1 when the sampled objects all survived (or nothing is known yet); falls with the share that died.

    Squared: a churning cache whose entries mostly died is far from a leak even if a few linger. That no
    census found a live object of the site (``misses``) is only reported: objects a C extension
    allocates (zstd contexts) cannot be looked up either, and they do leak.
    """
    if retention is None:
        if dry >= _MISSES_AGAINST and misses < _MISSES_AGAINST:
            evidence.append("survival set aside: earlier samples only, none of its new objects found")
        elif misses >= _MISSES_AGAINST:
            evidence.append(f"survival unknown: no live object of it found in {misses} censuses")
        else:
            evidence.append("survival not yet known")
        return 1.0
    alive, eligible, age = retention.alive, retention.eligible, retention.min_age_s
    evidence.append(f"{alive}/{eligible} sampled objects still alive after {age:.0f}s+")
    return min(1.0, retention.fraction / _RETAINED) ** 2


def _pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 0 or syy <= 0:
        return None
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    return sxy / math.sqrt(sxx * syy)


@dataclass(frozen=True, slots=True)
class Growth:
    """Least-squares growth rates of the whole process (with standard errors) over ``span_s``."""

    bytes_per_s: float
    bytes_stderr: float
    blocks_per_s: float
    blocks_stderr: float
    span_s: float


class GlobalGrowth(Protocol):
    """How fast the whole process grew between a start time and now."""

    def since(self, start: float) -> Growth | None:
        """Growth from ``start`` to now; None with too few samples."""
        ...


class SiteChooser:
    """Picks the frame to blame in a traceback: the innermost one in application code.

    Library frames (standard library, site-packages, generated code) are attributed to the frame that
    called them; an allocation whose innermost non-library frame is kotoba-memory's own is ours.
    """

    def __init__(self, library_prefixes: Sequence[str], own_prefixes: Sequence[str]) -> None:
        self._library = tuple(p for p in library_prefixes if p)
        self._own = tuple(p for p in own_prefixes if p)

    def _is_library(self, filename: str) -> bool:
        return filename.startswith(self._library) or filename.startswith("<")

    def made_in_library(self, key: Key) -> bool:
        """Allocated by library code (its innermost frame) on behalf of an application frame further out."""
        return bool(key) and self._is_library(key[0][0]) and self.owner(key) == "user"

    def owner(self, key: Key) -> str:
        """``"user"``, ``"own"`` (made by kotoba-memory, directly or through a library it called) or
        ``"library"`` (no application frame in the traceback at all)."""
        for filename, _lineno in key:
            if self._is_library(filename):
                continue
            return "own" if filename.startswith(self._own) else "user"
        return "library"

    def site(self, key: Key) -> str:
        """``file:line`` of the innermost application frame (falls back to the innermost frame)."""
        if not key:
            return "<unknown>:0"
        for filename, lineno in key:
            if not self._is_library(filename) and not filename.startswith(self._own):
                return f"{filename}:{lineno}"
        filename, lineno = key[0]
        return f"{filename}:{lineno}"
