"""Serving: an encoder behind an OpenAI-compatible HTTP API on Ray Serve.

- ``l2vg_ray.serve.app``: the deployments, the ingress's app factory ``build_api``,
  ``build_app(args)`` (for ``serve run``) and ``run_serve(cfg, blocking=)``; imports Ray Serve.
- ``l2vg_ray.serve.protocol``: the wire protocol: request parsing/validation, errors and
  response building (pure).
- ``l2vg_ray.serve.core``: the model replica's work on texts: token budget, batch planning,
  batched embedding, decoding (pure).
- ``l2vg_ray.serve.http``: OpenAI-shaped error handling and the request guard (auth, body
  size and time, answer time) for any FastAPI app.
- ``l2vg_ray.serve.metrics``: the Prometheus metrics a replica records, and a reader for them.
"""


class ServeLoadError(RuntimeError):
    """The replicas could not load the model; the message ends with the root cause."""
