"""Prometheus metrics of one server, in its own registry (never the process-global one, so several apps
can live in one process, as in tests). Engine gauges are read from `engine.stats()` at scrape time."""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)

# gauge name -> (help, EngineStats attribute)
ENGINE_GAUGES = {
    "qnext:num_requests_running": ("Requests scheduled on the engine.", "num_running"),
    "qnext:num_requests_waiting": ("Requests queued, not yet scheduled.", "num_waiting"),
    "qnext:kv_cache_pages_used": ("KV cache pages held by requests.", "kv_pages_used"),
    "qnext:kv_cache_pages_total": ("KV cache pages in the pool.", "kv_pages_total"),
    "qnext:state_slots_used": ("GDN recurrent-state slots held by requests.", "state_slots_used"),
    "qnext:state_slots_total": ("GDN recurrent-state slots in the pool.", "state_slots_total"),
    "qnext:num_preemptions": ("Requests preempted for lack of KV pages, since start.", "num_preemptions"),
}


class _EngineCollector:
    def __init__(self, stats: Callable[[], Any]):
        self._stats = stats

    def collect(self):
        s = self._stats()
        for name, (help_text, attr) in ENGINE_GAUGES.items():
            value = getattr(s, attr, None)
            if value is not None:
                yield GaugeMetricFamily(name, help_text, value=float(value))
        used, total = getattr(s, "kv_pages_used", None), getattr(s, "kv_pages_total", None)
        if used is not None and total:
            yield GaugeMetricFamily("qnext:kv_cache_usage_perc", "Fraction of KV pages in use (0..1).",
                                    value=used / total)


class ServerMetrics:
    def __init__(self, stats: Callable[[], Any]):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram("qnext:time_to_first_token_seconds", "Request arrival to first output token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("qnext:inter_token_latency_seconds", "Time between output tokens.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("qnext:e2e_request_latency_seconds", "Request arrival to last output token.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("qnext:prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter("qnext:generation_tokens", "Generated tokens.", registry=r)
        self.request_success = Counter("qnext:request_success", "Finished engine requests by finish reason.",
                                       ["finished_reason"], registry=r)
        self.request_rejected = Counter("qnext:request_rejected", "Requests refused before generation.",
                                        ["reason"], registry=r)
        r.register(_EngineCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
