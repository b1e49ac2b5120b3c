"""Prometheus metrics of the serving runtime, defined once per `ServingMetrics` instance.

The engine calls the methods below; `GET /metrics` renders `registry` in the text format.
Every instance owns its own `CollectorRegistry`, so tests and several engines in one process
never collide on metric names.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "loraserve:"
OTHER_ADAPTER = "other"
BASE_ADAPTER = "base"
TIERS = ("gpu", "host", "disk")
RESIDENCIES = ("gpu", "host", "disk", "base")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 600.0)
_LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServingMetrics:
    """The runtime's metrics. Adapter labels are capped at `max_adapter_labels` distinct names;
    later adapters are counted under "other" so the series count stays bounded."""

    def __init__(self, max_adapter_labels: int = 64) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.max_adapter_labels = max_adapter_labels
        self._adapter_labels: set[str] = set()
        self._lock = threading.Lock()  # the engine may report from its runner thread
        r = self.registry
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token",
                              ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between tokens",
                             ["adapter"], buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to finish",
                             ["adapter"], buckets=_E2E_BUCKETS, registry=r)
        self.queue_time = Histogram(PREFIX + "queue_time_seconds", "Arrival to admission",
                                    ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished "
                                     "requests", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens",
                                         registry=r)
        self.requests = Counter(PREFIX + "requests", "Finished requests by finish reason",
                                ["finish_reason"], registry=r)
        self.queued = Counter(PREFIX + "queued_requests", "Requests submitted", registry=r)
        self.num_running = Gauge(PREFIX + "num_running_reqs", "Requests running", registry=r)
        self.num_queue = Gauge(PREFIX + "num_queue_reqs", "Requests waiting", registry=r)
        self.kv_usage = Gauge(PREFIX + "kv_cache_usage", "Fraction of KV blocks in use",
                              registry=r)
        self.lora_requests = Counter(PREFIX + "lora_requests", "Admitted requests by where "
                                     "their adapter was when they arrived", ["residency"],
                                     registry=r)
        self.lora_loads = Counter(PREFIX + "lora_loads", "Adapter loads into a tier", ["tier"],
                                  registry=r)
        self.lora_evictions = Counter(PREFIX + "lora_evictions", "Adapter evictions from a tier",
                                      ["tier"], registry=r)
        self.lora_load_seconds = Histogram(PREFIX + "lora_load_seconds", "Adapter load time "
                                           "into a tier", ["tier"], buckets=_LOAD_BUCKETS,
                                           registry=r)
        self.lora_adapters = Gauge(PREFIX + "lora_adapters", "Adapters resident per tier",
                                   ["tier"], registry=r)
        self.lora_pinned = Gauge(PREFIX + "lora_pinned_adapters", "Pinned adapters", registry=r)
        # by finish reason too: an aborted request (a client that left, an abort by rid, a
        # failed adapter load) is not a served one
        self.adapter_requests = Counter(PREFIX + "adapter_requests", "Finished requests per "
                                        "adapter and finish reason", ["adapter", "finish_reason"],
                                        registry=r)
        self.adapter_generation_tokens = Counter(PREFIX + "adapter_generation_tokens",
                                                 "Generated tokens per adapter", ["adapter"],
                                                 registry=r)
        # with enable_prefix_caching: prompt tokens of admitted requests, and those of them
        # taken from the prefix cache instead of computed (the hit rate: hits / queries)
        self.prefix_cache_queries = Counter(PREFIX + "prefix_cache_queries", "Prompt tokens "
                                            "looked up in the prefix cache, per adapter",
                                            ["adapter"], registry=r)
        self.prefix_cache_hits = Counter(PREFIX + "prefix_cache_hits", "Prompt tokens taken "
                                         "from the prefix cache, per adapter", ["adapter"],
                                         registry=r)
        for tier in TIERS:  # export zeros so dashboards show the series from the start
            self.lora_loads.labels(tier)
            self.lora_evictions.labels(tier)
            self.lora_adapters.labels(tier)
        for residency in RESIDENCIES:
            self.lora_requests.labels(residency)

    def adapter_label(self, lora: str | None) -> str:
        """The label value for adapter `lora`: its name, "base", or "other" past the cap."""
        if lora is None:
            return BASE_ADAPTER
        with self._lock:
            if lora in self._adapter_labels:
                return lora
            if len(self._adapter_labels) < self.max_adapter_labels:
                self._adapter_labels.add(lora)
                return lora
        return OTHER_ADAPTER

    def request_queued(self, lora: str | None) -> None:
        self.queued.inc()

    def request_admitted(self, lora: str | None, queue_time_s: float, residency: str) -> None:
        self.queue_time.labels(self.adapter_label(lora)).observe(queue_time_s)
        self.lora_requests.labels(residency).inc()

    def prefix_cache_looked_up(self, lora: str | None, prompt_tokens: int,
                               cached_tokens: int) -> None:
        label = self.adapter_label(lora)
        self.prefix_cache_queries.labels(label).inc(prompt_tokens)
        self.prefix_cache_hits.labels(label).inc(cached_tokens)

    def first_token(self, lora: str | None, ttft_s: float) -> None:
        self.ttft.labels(self.adapter_label(lora)).observe(ttft_s)

    def inter_token(self, lora: str | None, itl_s: float) -> None:
        self.itl.labels(self.adapter_label(lora)).observe(itl_s)

    def request_finished(self, lora: str | None, prompt_tokens: int, completion_tokens: int,
                         e2e_s: float, finish_reason: str) -> None:
        label = self.adapter_label(lora)
        self.e2e.labels(label).observe(e2e_s)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.requests.labels(finish_reason).inc()
        self.adapter_requests.labels(label, finish_reason).inc()
        self.adapter_generation_tokens.labels(label).inc(completion_tokens)

    def set_running_waiting(self, running: int, waiting: int) -> None:
        self.num_running.set(running)
        self.num_queue.set(waiting)

    def set_kv_usage(self, fraction: float) -> None:
        self.kv_usage.set(fraction)

    def adapter_loaded(self, tier: str, seconds: float) -> None:
        self.lora_loads.labels(tier).inc()
        self.lora_load_seconds.labels(tier).observe(seconds)

    def adapter_evicted(self, tier: str) -> None:
        self.lora_evictions.labels(tier).inc()

    def set_adapters_by_tier(self, gpu: int, host: int, disk: int, pinned: int) -> None:
        self.lora_adapters.labels("gpu").set(gpu)
        self.lora_adapters.labels("host").set(host)
        self.lora_adapters.labels("disk").set(disk)
        self.lora_pinned.set(pinned)

    def render(self) -> tuple[bytes, str]:
        """The text exposition of every metric and its Content-Type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
