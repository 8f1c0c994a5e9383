"""Per-request results and the aggregate metrics of `qnext bench serve`.

Definitions match `vllm bench serve` (see shared/bench-protocol.md) so numbers compare:
TTFT = request sent -> first streamed chunk carrying text; TPOT = (latency - TTFT) / (output tokens - 1) for outputs
longer than one token; ITL = every gap between consecutive streamed chunks, pooled; E2EL = request sent -> last chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestResult:
    prompt_len: int
    success: bool = False
    error: str = ""
    output_tokens: int = 0          # the server's usage.completion_tokens (else chunks counted)
    ttft: float = 0.0               # seconds
    latency: float = 0.0            # seconds, E2EL
    itl: list[float] = field(default_factory=list)  # seconds between consecutive chunks
    start_time: float = 0.0         # seconds since the benchmark started


@dataclass
class Slo:
    """Goodput thresholds in milliseconds (None = not constrained)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @classmethod
    def parse(cls, items: list[str] | None) -> "Slo":
        slo = cls()
        for item in items or []:
            key, _, value = item.partition(":")
            if key not in ("ttft", "tpot", "e2el") or not value:
                raise ValueError(f"--goodput takes ttft:MS, tpot:MS or e2el:MS, got {item!r}")
            setattr(slo, f"{key}_ms", float(value))
        return slo

    def met(self, r: RequestResult) -> bool:
        tpot = _tpot(r)
        return ((self.ttft_ms is None or r.ttft * 1e3 <= self.ttft_ms)
                and (self.tpot_ms is None or tpot is None or tpot * 1e3 <= self.tpot_ms)
                and (self.e2el_ms is None or r.latency * 1e3 <= self.e2el_ms))


def _tpot(r: RequestResult) -> float | None:
    if r.output_tokens <= 1:
        return None
    return (r.latency - r.ttft) / (r.output_tokens - 1)


def _stats(name: str, values_s: list[float], percentiles: list[float]) -> dict[str, float]:
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    if ms.size == 0:
        ms = np.zeros(1)
    out = {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
           f"std_{name}_ms": float(ms.std())}
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def aggregate(results: list[RequestResult], duration_s: float, percentiles: list[float],
              slo: Slo | None = None) -> dict[str, float]:
    done = [r for r in results if r.success]
    total_out = sum(r.output_tokens for r in done)
    total_in = sum(r.prompt_len for r in done)
    metrics: dict[str, float] = {
        "duration_s": duration_s,
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration_s,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
    }
    if slo is not None and any(v is not None for v in (slo.ttft_ms, slo.tpot_ms, slo.e2el_ms)):
        metrics["request_goodput"] = sum(slo.met(r) for r in done) / duration_s
    metrics.update(_stats("ttft", [r.ttft for r in done], percentiles))
    metrics.update(_stats("tpot", [t for r in done if (t := _tpot(r)) is not None], percentiles))
    metrics.update(_stats("itl", [g for r in done for g in r.itl], percentiles))
    metrics.update(_stats("e2el", [r.latency for r in done], percentiles))
    return metrics


def format_table(metrics: dict[str, float], percentiles: list[float]) -> str:
    rows = [
        ("Successful requests", f"{metrics['completed']:.0f}"),
        ("Failed requests", f"{metrics['failed']:.0f}"),
        ("Benchmark duration (s)", f"{metrics['duration_s']:.2f}"),
        ("Total input tokens", f"{metrics['total_input_tokens']:.0f}"),
        ("Total generated tokens", f"{metrics['total_output_tokens']:.0f}"),
        ("Request throughput (req/s)", f"{metrics['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{metrics['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{metrics['total_token_throughput']:.2f}"),
    ]
    if "request_goodput" in metrics:
        rows.append(("Request goodput (req/s)", f"{metrics['request_goodput']:.2f}"))
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    lines = ["{:=^60}".format(" Serving Benchmark Result ")]
    lines += [f"{k:<45}{v:>15}" for k, v in rows]
    for key, title in titles.items():
        lines.append("{:-^60}".format(title))
        lines.append(f"{'Mean ' + key.upper() + ' (ms)':<45}{metrics[f'mean_{key}_ms']:>15.2f}")
        lines.append(f"{'Median ' + key.upper() + ' (ms)':<45}{metrics[f'median_{key}_ms']:>15.2f}")
        for p in percentiles:
            lines.append(f"{f'P{p:g} ' + key.upper() + ' (ms)':<45}{metrics[f'p{p:g}_{key}_ms']:>15.2f}")
    lines.append("=" * 60)
    return "\n".join(lines)
