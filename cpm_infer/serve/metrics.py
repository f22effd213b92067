"""Prometheus metrics of one app (its own registry: several apps in one process never share counters).

Exposed on ``GET /metrics`` in the text format: requests by route/method/status, queue depth, running rows,
prompt and generated tokens, time to first token and inter-token latency, and the prefix cache's lookups, hits
(hit rate: ``rate(cpm_prefix_cache_hits_total) / rate(cpm_prefix_cache_lookups_total)``), prompt tokens reused,
evictions, entries and bytes; with a draft (``--draft``), speculative decoding's verify passes and the tokens they
were proposed, accepted and emitted (acceptance: ``rate(cpm_speculation_accepted_tokens_total) /
rate(cpm_speculation_proposed_tokens_total)``; tokens per pass: emitted over passes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Latency buckets (seconds): tens of ms per decode step on a CPU, up to minutes for a long queue.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cpm_requests",
            "HTTP requests answered, by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("cpm_prompt_tokens", "Prompt tokens of accepted completion requests", registry=r)
        self.generated_tokens = Counter("cpm_generation_tokens", "Tokens generated (all rows)", registry=r)
        self.ttft = Histogram(
            "cpm_time_to_first_token_seconds",
            "From a request's arrival to its first generated token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "cpm_inter_token_latency_seconds",
            "Between two consecutive tokens of a row (one decode step of the running batch)",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("cpm_queue_depth", "Requests waiting to join the running batch", registry=r)
        self.running_rows = Gauge("cpm_running_rows", "Rows (prompt x sample) in the running batch", registry=r)

    def watch(self, queued: Callable[[], float], running_rows: Callable[[], float]) -> None:
        """Gauges read at scrape time."""
        self.queue_depth.set_function(queued)
        self.running_rows.set_function(running_rows)

    def watch_prefix_cache(self, stats: Callable[[], dict[str, int]]) -> None:
        """The prefix cache's counters (``PrefixCacheStats.as_dict``), read at scrape time."""
        self.registry.register(_PrefixCacheCollector(stats))

    def watch_speculation(self, stats: Callable[[], dict[str, int]]) -> None:
        """Speculative decoding's totals (``SpeculationStats`` as a dict: passes, proposed, accepted, emitted), read at
        scrape time."""
        self.registry.register(_SpeculationCollector(stats))

    def prompt(self, tokens: int) -> None:
        self.prompt_tokens.inc(tokens)

    def generated(self, tokens: int) -> None:
        self.generated_tokens.inc(tokens)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StatsCollector:
    """Counts kept elsewhere (a ``stats()`` dict), exposed as Prometheus counters and gauges when scraped."""

    _COUNTERS: tuple[tuple[str, str, str], ...] = ()  # (key in stats(), metric name, help)
    _GAUGES: tuple[tuple[str, str, str], ...] = ()

    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        for key, name, doc in self._COUNTERS:
            yield CounterMetricFamily(name, doc, value=stats[key])
        for key, name, doc in self._GAUGES:
            yield GaugeMetricFamily(name, doc, value=stats[key])


class _PrefixCacheCollector(_StatsCollector):
    """The engine's prefix cache counts for itself; exposed as counters and gauges when scraped."""

    _COUNTERS = (
        ("lookups", "cpm_prefix_cache_lookups", "Prompts looked up in the prefix cache (long enough to reuse one)"),
        ("hits", "cpm_prefix_cache_hits", "Lookups that reused a cached prefix"),
        ("hit_tokens", "cpm_prefix_cache_cached_tokens", "Prompt tokens reused from the prefix cache, not prefilled"),
        ("evictions", "cpm_prefix_cache_evictions", "Prefix cache entries dropped for room (least recently used)"),
    )
    _GAUGES = (
        ("bytes", "cpm_prefix_cache_bytes", "Bytes the prefix cache's KV snapshots hold"),
        ("entries", "cpm_prefix_cache_entries", "Prompts in the prefix cache"),
    )


class _SpeculationCollector(_StatsCollector):
    """The engine counts its speculation (``SpeculationStats``); exposed as counters when scraped."""

    _COUNTERS = (
        ("passes", "cpm_speculation_verify_passes", "Target passes that verified a draft's proposals"),
        ("proposed", "cpm_speculation_proposed_tokens", "Tokens the draft proposed to verify passes"),
        ("accepted", "cpm_speculation_accepted_tokens", "Proposed tokens the verify passes accepted"),
        (
            "emitted",
            "cpm_speculation_emitted_tokens",
            "Tokens the verify passes produced (accepted + the target's own)",
        ),
    )


class RequestCounter:
    """ASGI middleware counting every answer by route template (``other`` for unknown paths), method and status;
    outermost, so that answers from other middleware (413, 401) are counted too."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, routes: Callable[[], set[str]]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            route = getattr(scope.get("route"), "path", None)  # the matched route's template
            if route is None:
                route = path if path in self.routes() else "other"
            self.metrics.requests.labels(route, scope.get("method", ""), str(status[0])).inc()
