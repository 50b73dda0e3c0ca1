"""Serving: an encoder behind an OpenAI-compatible HTTP API on Ray Serve.

- ``l2vg_ray.serve.app``: the deployment, ``build_app(args)`` (for ``serve run``) and
  ``run_serve(cfg, blocking=)``; imports Ray Serve.
- ``l2vg_ray.serve.protocol``: request parsing/validation and response building (pure).
- ``l2vg_ray.serve.http``: OpenAI-shaped error handling for any FastAPI app.
"""
