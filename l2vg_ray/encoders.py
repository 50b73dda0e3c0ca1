"""The text-encoder protocol shared by evaluation and serving, and the baselines' registry.

Everything that turns texts into vectors - the trained LLM2Vec-Gen encoder and every baseline -
implements ``TextEncoder``. ``l2vg_ray.loading.load_encoder(spec)`` builds one by spec.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from l2vg_ray.registry import Registry

if TYPE_CHECKING:
    from omegaconf import DictConfig

# The file that marks a folder as a trained LLM2Vec-Gen encoder (written by L2VGEncoder.save).
ENCODER_CONFIG_FILE = "l2vg_config.json"


@runtime_checkable
class TextEncoder(Protocol):
    """Texts -> float32 array of shape (len(texts), dim)."""

    name: str  # human-readable name used in results tables
    dim: int

    def encode(
        self,
        texts: Sequence[str],
        *,
        instruction: str | None = None,
        batch_size: int = 32,
        normalize: bool = False,
        show_progress: bool = False,
    ) -> np.ndarray: ...

    def fingerprint(self) -> str:
        """Changes whenever the embeddings could change (weights, pooling, model): cache key."""
        ...

    def count_tokens(self, texts: Sequence[str], *, instruction: str | None = None) -> list[int]:
        """Tokens the model would read for each text (with ``instruction``, special tokens
        included), counted *before* the model's own cut at ``max_input_tokens``."""
        ...

    @property
    def max_input_tokens(self) -> int:
        """The most tokens the model reads of one text; it cuts the rest (``count_tokens``
        counts on the same scale)."""
        ...


def with_instruction(texts: Sequence[str], instruction: str | None) -> list[str]:
    """``instruction`` prefixed to every text, the way the encoders here read an instruction."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string; wrap it: [text].")
    texts = [str(t) for t in texts]
    return [f"{instruction} {t}" for t in texts] if instruction else texts


# A baseline factory takes (full config, cache_dir) and returns a TextEncoder.
BaselineFactory = Callable[["DictConfig", str | None], TextEncoder]
BASELINES: Registry[BaselineFactory] = Registry(
    "baseline encoder",
    hint="Or pass the folder of a trained encoder (it holds l2vg_config.json).",
)


def hash_parts(*parts: object) -> str:
    """A short stable hash of the given parts (for fingerprints)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


class SentenceTransformerEncoder:
    """A sentence-transformers model as a TextEncoder (the teacher baseline)."""

    def __init__(self, spec: str, *, cache_dir: str | None = None, device: str | None = None):
        from sentence_transformers import SentenceTransformer

        from l2vg_ray.models import resolve_model

        self.spec = spec
        self.name = spec
        self.model = SentenceTransformer(resolve_model(spec, cache_dir=cache_dir), device=device)
        self.dim = int(self.model.get_embedding_dimension())

    def encode(
        self,
        texts: Sequence[str],
        *,
        instruction: str | None = None,
        batch_size: int = 32,
        normalize: bool = False,
        show_progress: bool = False,
    ) -> np.ndarray:
        texts = with_instruction(texts, instruction)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(
            texts,
            batch_size=batch_size,
            normalize_embeddings=normalize,
            show_progress_bar=show_progress,
            convert_to_numpy=True,
        )
        return np.asarray(out, dtype=np.float32)

    def fingerprint(self) -> str:
        return hash_parts("sentence-transformers", self.spec, self.dim)

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def max_input_tokens(self) -> int:
        return int(self.model.max_seq_length)

    def count_tokens(self, texts: Sequence[str], *, instruction: str | None = None) -> list[int]:
        texts = with_instruction(texts, instruction)
        if not texts:
            return []
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]
