"""The LLM2Vec-Gen model: special tokens on a frozen LLM, reconstruction + alignment heads."""

from l2vg_ray.method.losses import alignment_loss, combine_losses, reconstruction_loss
from l2vg_ray.method.model import L2VGEncoder, L2VGOutput

__all__ = [
    "L2VGEncoder",
    "L2VGOutput",
    "alignment_loss",
    "combine_losses",
    "reconstruction_loss",
]
