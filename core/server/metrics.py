"""Prometheus metrics for ``GET /metrics`` (text exposition format).

Engine gauges and counters are read at scrape time from the snapshot the engine thread
publishes (:class:`vlm.server.async_engine.EngineStats`); the server records each request's
outcome and latencies itself, once per request (:class:`RequestMetrics`). Every metric lives in
the server's own registry, so two servers in one process (tests) do not collide.

=========================================  =========  =============================================
metric                                     type       meaning
=========================================  =========  =============================================
vlm_num_requests_waiting                   gauge      sequences queued, not yet scheduled
vlm_num_requests_running                   gauge      sequences in the running batch
vlm_num_requests_in_flight                 gauge      API requests the engine is working on
vlm_kv_cache_blocks_used                   gauge      KV-cache blocks held by sequences
vlm_kv_cache_blocks_total                  gauge      KV-cache blocks in the pool
vlm_kv_cache_usage_ratio                   gauge      used / total
vlm_generation_tokens_per_second           gauge      generated tokens/s over the last 10 s
vlm_image_pixels_in_flight                 gauge      image pixels being decoded / preprocessed
vlm_image_requests_waiting                 gauge      requests waiting for room in those pixels
vlm_prompt_tokens_total                    counter    prompt tokens admitted
vlm_generation_tokens_total                counter    tokens generated
vlm_num_preemptions_total                  counter    sequences preempted for lack of blocks
vlm_engine_step_errors_total               counter    engine steps that raised
vlm_requests_total{outcome}                counter    API requests by outcome: completed, aborted,
                                                      failed (engine error), rejected (4xx)
vlm_time_to_first_token_seconds            histogram  arrival to first generated token
vlm_e2e_request_latency_seconds            histogram  arrival to last token
=========================================  =========  =============================================
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

OUTCOMES = ("completed", "aborted", "failed", "rejected")

# no "<name>_created" timestamp series next to every counter and histogram (vLLM does the same)
disable_created_metrics()

_TTFT_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class _EngineCollector:
    def __init__(self, engine: Any):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats
        gauges = [
            ("vlm_num_requests_waiting", "Sequences waiting to be scheduled.", stats.num_waiting),
            ("vlm_num_requests_running", "Sequences in the running batch.", stats.num_running),
            ("vlm_num_requests_in_flight", "API requests the engine is working on.", stats.requests_in_flight),
            ("vlm_kv_cache_blocks_used", "KV-cache blocks held by sequences.", stats.kv_blocks_used),
            ("vlm_kv_cache_blocks_total", "KV-cache blocks in the pool.", stats.kv_blocks_total),
            (
                "vlm_kv_cache_usage_ratio",
                "Fraction of KV-cache blocks in use.",
                stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0,
            ),
            (
                "vlm_generation_tokens_per_second",
                "Generated tokens per second over the last 10 seconds.",
                self.engine.generation_throughput(),
            ),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = [
            ("vlm_prompt_tokens", "Prompt tokens admitted to the engine.", stats.prompt_tokens_total),
            ("vlm_generation_tokens", "Tokens generated.", stats.generation_tokens_total),
            ("vlm_num_preemptions", "Sequences preempted for lack of KV-cache blocks.", stats.num_preemptions),
            (
                "vlm_engine_step_errors",
                "Engine steps that raised (their requests were failed).",
                stats.step_errors_total,
            ),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)


class _PixelBudgetCollector:
    def __init__(self, budget: Any):
        self.budget = budget

    def collect(self):
        yield GaugeMetricFamily(
            "vlm_image_pixels_in_flight",
            "Image pixels being decoded and preprocessed (at most --max-inflight-pixels).",
            value=self.budget.in_use,
        )
        yield GaugeMetricFamily(
            "vlm_image_requests_waiting",
            "Requests waiting for room in --max-inflight-pixels.",
            value=self.budget.num_waiting,
        )


class ServerMetrics:
    def __init__(self, engine: Any):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.requests = Counter("vlm_requests", "API requests by outcome.", ["outcome"], registry=self.registry)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # export zeros from the start
        self.ttft = Histogram(
            "vlm_time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "vlm_e2e_request_latency_seconds",
            "Time from arrival to the last generated token.",
            buckets=_E2E_BUCKETS,
            registry=self.registry,
        )

    def watch_pixel_budget(self, budget: Any) -> None:
        """Export ``budget``'s (a :class:`vlm.server.prompts.PixelBudget`) pixels in flight and waiters."""
        self.registry.register(_PixelBudgetCollector(budget))

    def count(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestMetrics:
    """What one request adds to the server's metrics; each part is recorded at most once."""

    def __init__(self, metrics: ServerMetrics, stream: Any):
        self.metrics = metrics
        self.stream = stream
        self.outcome: str | None = None
        self._ttft_observed = False

    def set_outcome(self, outcome: str) -> None:
        """Count the request under ``outcome``, unless it was already counted."""
        if self.outcome is None:
            self.outcome = outcome
            self.metrics.count(outcome)

    def output_arrived(self) -> None:
        """Observe the time to first token, the first time the stream has one."""
        if not self._ttft_observed and self.stream.first_output_time is not None:
            self._ttft_observed = True
            self.metrics.ttft.observe(self.stream.first_output_time - self.stream.arrival_time)

    def finished(self) -> None:
        self.metrics.e2e.observe(time.monotonic() - self.stream.arrival_time)
