"""Model specs -> loadable folders (offline packaged models, hub ids, local paths)."""

from l2vg_ray.models.resolver import PACKAGED_MODELS, is_packaged, resolve_model

__all__ = ["PACKAGED_MODELS", "is_packaged", "resolve_model"]
