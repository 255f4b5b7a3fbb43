"""Metric series kept as plain numbers, for the series a process changes on every call.

prometheus_client's Counter, Gauge and Histogram take a lock and check their state on every
change; a collector of the process's own turns these numbers into metric families at each
scrape instead (queue_worker/metrics.py, gateway/metrics.py).
"""

import bisect

from prometheus_client import Histogram

# prometheus_client's default buckets, which the duration histograms have always had.
DEFAULT_BUCKETS_S = tuple(bound for bound in Histogram.DEFAULT_BUCKETS if bound != float("inf"))


class Buckets:
    """One histogram series: a count per bucket (not cumulative), the sum, in plain numbers."""

    __slots__ = ("_bounds", "_les", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        # The le labels as prometheus_client writes these bounds (Go's float format).
        self._les = (*(repr(float(bound)) for bound in bounds), "+Inf")
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # A value equal to a bound counts in that bound's bucket (le), as in prometheus_client.
        self.counts[bisect.bisect_left(self._bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        buckets = []
        running = 0
        for le, count in zip(self._les, self.counts, strict=True):
            running += count
            buckets.append((le, float(running)))
        return buckets
