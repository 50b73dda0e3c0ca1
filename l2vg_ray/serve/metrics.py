"""The serving metrics: recorded through ``ray.serve.metrics``, read back from Prometheus text.

Each replica records (Serve adds the ``application``, ``deployment`` and ``replica`` tags; Ray
exports them, prefixed ``ray_``, on every node's metrics endpoint, where Prometheus scrapes them):

- ``l2vg_requests`` (counter, by ``route`` and ``status``): HTTP answers;
- ``l2vg_request_seconds`` (histogram, by ``route``): time from request to answer;
- ``l2vg_batch_texts`` (histogram): texts per model call (Ray records a histogram's sum from
  bucket midpoints, so exact means come from the two counters below);
- ``l2vg_model_calls`` and ``l2vg_model_texts`` (counters): model calls and the texts in them;
- ``l2vg_tokens_embedded`` (counter): tokens read by the model, as ``usage`` reports them;
- ``l2vg_queued_texts`` (gauge): texts admitted and not yet answered.

``read_metric`` sums one metric's samples from a scrape (for tests and ``bench/serve.py``).
"""

from __future__ import annotations

import re

_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class ServeMetrics:
    """One replica's metrics (construct inside the replica)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests = metrics.Counter(
            "l2vg_requests",
            description="HTTP requests answered, by route and status code.",
            tag_keys=("route", "status"),
        )
        self.latency = metrics.Histogram(
            "l2vg_request_seconds",
            description="Seconds from request to answer, by route.",
            boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
            tag_keys=("route",),
        )
        self.batch_texts = metrics.Histogram(
            "l2vg_batch_texts",
            description="Texts per model call.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256],
        )
        self.model_calls = metrics.Counter("l2vg_model_calls", description="Model calls.")
        self.model_texts = metrics.Counter(
            "l2vg_model_texts", description="Texts embedded, over all model calls."
        )
        self.tokens = metrics.Counter(
            "l2vg_tokens_embedded", description="Tokens read by the model (what usage reports)."
        )
        self.queued = metrics.Gauge(
            "l2vg_queued_texts", description="Texts admitted and not yet answered."
        )

    def on_model_call(self, n_texts: int) -> None:
        self.batch_texts.observe(n_texts)
        self.model_calls.inc()
        self.model_texts.inc(n_texts)

    def on_response(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe(seconds, tags={"route": route})


def metrics_url() -> str:
    """This Ray node's Prometheus endpoint (call from a connected driver)."""
    import ray

    node = ray._private.worker._global_node
    if node is None:
        raise RuntimeError("Not connected to Ray: call ray.init() first.")
    return f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"


def read_metric(text: str, name: str, **labels: str) -> float:
    """The sum of metric ``name``'s samples in Prometheus ``text`` whose labels match ``labels``
    (the ``ray_`` prefix and a counter's ``_total`` suffix optional; for a histogram pass
    ``name_sum`` / ``name_count``)."""
    wanted = {f"{prefix}{name}{suffix}" for prefix in ("", "ray_") for suffix in ("", "_total")}
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) not in wanted:
            continue
        got = dict(_LABEL.findall(m.group(2) or ""))
        if all(got.get(k) == str(v) for k, v in labels.items()):
            total += float(m.group(3))
    return total
