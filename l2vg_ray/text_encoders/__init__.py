"""Text encoders: the protocol everything that turns texts into vectors implements, the two
wrappers baselines and teachers share (``base``), and the baselines' registry, filled on import
(``baselines``: teacher, mean-pool, last-token). The trained LLM2Vec-Gen encoder is
``l2vg_ray.method``; ``l2vg_ray.loading.load_encoder(spec)`` builds any of them by spec.
"""

from l2vg_ray.text_encoders import baselines  # noqa: E402,F401  (registers teacher, mean-pool, last-token)
from l2vg_ray.text_encoders.base import (
    BASELINES,
    ENCODER_CONFIG_FILE,
    POOLINGS,
    SPECIAL_TOKEN_MODES,
    PooledLLMEncoder,
    SentenceTransformerEncoder,
    TextEncoder,
    hash_parts,
    pool_hidden_states,
    text_list,
    with_instruction,
)

__all__ = [
    "BASELINES",
    "ENCODER_CONFIG_FILE",
    "POOLINGS",
    "SPECIAL_TOKEN_MODES",
    "PooledLLMEncoder",
    "SentenceTransformerEncoder",
    "TextEncoder",
    "hash_parts",
    "pool_hidden_states",
    "text_list",
    "with_instruction",
]
