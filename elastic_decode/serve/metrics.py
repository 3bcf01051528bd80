"""GET /metrics: the engine loop's gauges and counters in Prometheus' text format (version 0.0.4),
written out directly (a dozen lines; no client library needed)."""
from __future__ import annotations

from ..engine.loop import ABORT_CAUSES, EngineLoop


def render_metrics(loop: EngineLoop) -> str:
    stats, m = loop.stats(), loop.metrics
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP elastic_decode_{name} {help_text}")
        lines.append(f"# TYPE elastic_decode_{name} {kind}")
        lines.extend(f"elastic_decode_{name}{labels} {value:g}" for labels, value in samples)

    metric("running_sequences", "gauge", "Sequences in the running batch.", [("", stats["running"])])
    metric("waiting_sequences", "gauge", "Sequences queued (or held while paused).", [("", stats["waiting"])])
    metric("kv_blocks_used", "gauge", "KV cache blocks in use (0 when no request is in flight: else a leak).",
           [("", stats["kv_blocks_used"])])
    metric("kv_blocks_free", "gauge", "KV cache blocks free.", [("", stats["kv_blocks_free"])])
    metric("kv_blocks_total", "gauge", "KV cache blocks in all.", [("", stats["kv_blocks_total"])])
    metric("requests_running", "gauge", "Requests generating.", [("", stats["requests_running"])])
    metric("requests_waiting", "gauge", "Requests received but not started (held while paused).",
           [("", stats["requests_waiting"])])
    metric("requests_paused", "gauge", "Requests stopped mid-generation by a pause (keep).",
           [("", stats["requests_paused"])])
    metric("paused", "gauge", "1 while the engine is paused.", [("", int(loop.paused))])
    metric("generation_tokens_total", "counter", "Tokens generated (forced ones included).",
           [("", m.output_tokens)])
    metric("forced_tokens_total", "counter", "Tokens the budget machine forced.", [("", m.forced_tokens)])
    metric("forced_ends_total", "counter", "Completions whose end of thinking was forced.", [("", m.forced_ends)])
    metric("preemptions_total", "counter", "Sequences preempted for KV space (recomputed later).",
           [("", stats["preemptions"])])
    metric("engine_steps_total", "counter", "Engine steps run.", [("", m.steps)])
    metric("engine_prefill_steps_total", "counter", "Engine steps that were prefills.", [("", m.prefill_steps)])
    metric("engine_step_sequences_total", "counter", "Sequences stepped, summed over steps (over steps: the mean "
           "batch).", [("", m.batch_sequences)])
    metric("engine_step_seconds_total", "counter", "Seconds spent inside engine steps.", [("", m.step_seconds)])
    metric("requests_finished_total", "counter", "Requests finished, by finish reason.",
           [(f'{{finish_reason="{r}"}}', c) for r, c in sorted(m.requests_finished.items())])
    metric("requests_failed_total", "counter", "Requests that failed in the engine.", [("", m.requests_failed)])
    metric("requests_aborted_total", "counter", "Requests aborted, by cause: the client left (client), a pause with "
           "mode abort (pause), the server shutting down (shutdown), a failed step (error), an abort call (request).",
           [(f'{{cause="{c}"}}', m.aborts.get(c, 0)) for c in ABORT_CAUSES])
    bounds = [f"{b:g}" for b in m.latency_buckets] + ["+Inf"]
    counts = list(m.latency_counts)
    metric("request_latency_seconds", "histogram", "Seconds from a request's arrival to its last token.",
           [(f'_bucket{{le="{b}"}}', c) for b, c in zip(bounds, counts)]
           + [("_sum", m.latency_sum), ("_count", counts[-1])])
    return "\n".join(lines) + "\n"
