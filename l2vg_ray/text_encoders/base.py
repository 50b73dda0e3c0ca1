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


def text_list(texts: Sequence[str]) -> list[str]:
    """``texts`` as a list of strings; one bare string is refused (it would split into letters)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string; wrap it: [text].")
    return [str(t) for t in texts]


def with_instruction(texts: Sequence[str], instruction: str | None) -> list[str]:
    """``instruction`` prefixed to every text, the way the encoders here read an instruction."""
    texts = text_list(texts)
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
    """A sentence-transformers model as a TextEncoder: the teacher baseline, and what the
    ``sentence-transformers`` teacher embeds responses with."""

    def __init__(
        self, spec: str, *, cache_dir: str | None = None, device: str | None = None,
        max_seq_length: int | None = None,
    ):
        from sentence_transformers import SentenceTransformer

        from l2vg_ray.models import resolve_model

        self.spec = spec
        self.name = spec
        self.model = SentenceTransformer(resolve_model(spec, cache_dir=cache_dir), device=device)
        if max_seq_length is not None:  # never longer than the model was built for
            self.model.max_seq_length = min(int(max_seq_length), self.model.max_seq_length)
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


POOLINGS = ("mean", "last")
# Which of the tokenizer's special tokens (BOS/EOS) a pooled LLM reads: none (the text's own
# tokens only, after an optional instruction prefix that is not pooled: the baselines), exclude
# (they attend but are not averaged: the mean-pooled-llm teacher), include (averaged too:
# LLM2Vec's pooling, the llm2vec teacher).
SPECIAL_TOKEN_MODES = ("none", "exclude", "include")


def pool_hidden_states(hidden, mask, pooling: str):
    """(B, T, H) hidden states, (B, T) 0/1 pool mask -> (B, H). Pure; right padding assumed
    for ``last``."""
    import torch

    from l2vg_ray.torch_utils import mean_pool

    if pooling == "mean":
        return mean_pool(hidden, mask)
    if pooling == "last":
        last = mask.long().cumsum(1).argmax(1)  # index of the last 1 in each row
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"pooling={pooling!r}; use one of {POOLINGS}.")


class PooledLLMEncoder:
    """A frozen LLM's last hidden states pooled per text (no training): the ``mean-pool`` and
    ``last-token`` baselines, and the LLM teachers (``mean-pooled-llm``, ``llm2vec``).

    Built from a loaded model and tokenizer (``PooledLLMEncoder.load(spec)`` loads them); texts
    go in length-sorted batches (little padding) and come back in input order, float32.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        spec: str,
        name: str,
        pooling: str = "mean",
        max_length: int = 512,
        special_tokens: str = "none",
        dtype: str = "float32",
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}; use one of {POOLINGS}.")
        if special_tokens not in SPECIAL_TOKEN_MODES:
            raise ValueError(f"special_tokens={special_tokens!r}; use one of {SPECIAL_TOKEN_MODES}.")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.spec, self.name, self.pooling = spec, name, pooling
        self.max_length, self.special_tokens, self._dtype = int(max_length), special_tokens, dtype
        self.dim = int(model.config.get_text_config().hidden_size)

    @classmethod
    def load(
        cls,
        spec: str,
        *,
        pooling: str = "mean",
        cache_dir: str | None = None,
        device: str = "auto",
        dtype: str = "float32",
        max_length: int = 512,
        special_tokens: str = "none",
        name: str | None = None,
    ) -> PooledLLMEncoder:
        """The base model (no LM head) of ``spec`` (resolved offline), right-padded tokenizer."""
        from transformers import AutoModel

        from l2vg_ray.models import resolve_model
        from l2vg_ray.torch_utils import load_tokenizer, resolve_device, torch_dtype

        path = resolve_model(spec, cache_dir=cache_dir)
        model = AutoModel.from_pretrained(path, dtype=torch_dtype(dtype)).to(resolve_device(device))
        if name is None:
            name = f"{'mean-pool' if pooling == 'mean' else 'last-token'}:{spec}"
        return cls(model, load_tokenizer(path, padding_side="right"), spec=spec, name=name,
                   pooling=pooling, max_length=max_length, special_tokens=special_tokens,
                   dtype=dtype)

    def _prefix_ids(self, instruction: str | None) -> list[int]:
        if not instruction:
            return []
        if self.special_tokens != "none":
            raise ValueError(
                f"{self.name} embeds texts as they are (special_tokens={self.special_tokens!r}); "
                f"it takes no instruction."
            )
        return self.tokenizer(f"{instruction.rstrip()}: ", add_special_tokens=False)["input_ids"]

    def _batch(self, texts: Sequence[str], instruction: str | None):
        """Token ids, attention mask and the pool mask (the positions that are averaged)."""
        import torch

        prefix = self._prefix_ids(instruction)
        if self.special_tokens != "none":
            enc = self.tokenizer(
                list(texts), padding=True, truncation=True, max_length=self.max_length,
                return_special_tokens_mask=True, return_tensors="pt",
            )
            attention = enc["attention_mask"]
            pool = attention if self.special_tokens == "include" else (
                attention * (1 - enc["special_tokens_mask"])
            )
            return enc["input_ids"], attention, pool
        ids, pool = [], []
        for t in texts:
            body = self.tokenizer(t, add_special_tokens=False)["input_ids"] or [self.tokenizer.eos_token_id]
            body = body[: max(1, self.max_length - len(prefix))]
            ids.append(prefix + body)
            pool.append([0] * len(prefix) + [1] * len(body))
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
        attention = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        pool_mask = torch.tensor([p + [0] * (width - len(p)) for p in pool])
        return input_ids, attention, pool_mask

    def encode(
        self,
        texts: Sequence[str],
        *,
        instruction: str | None = None,
        batch_size: int = 32,
        normalize: bool = False,
        show_progress: bool = False,
    ) -> np.ndarray:
        import torch

        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                input_ids, attention, pool_mask = self._batch([texts[i] for i in idx], instruction)
                hidden = self.model(
                    input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device)
                ).last_hidden_state
                emb = pool_hidden_states(hidden.float(), pool_mask.to(self.device), self.pooling)
                out[idx] = emb.cpu().numpy()
        if normalize and len(out):
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def fingerprint(self) -> str:
        extra = () if self.special_tokens == "none" else (self.special_tokens,)
        return hash_parts("pooled-llm", self.spec, self.pooling, self.max_length, self._dtype, 1,
                          *extra)

    @property
    def max_input_tokens(self) -> int:
        return int(self.max_length)

    def count_tokens(self, texts: Sequence[str], *, instruction: str | None = None) -> list[int]:
        """The tokens ``_batch`` reads per text (an empty text reads as one eos in mode none)."""
        texts = list(texts)
        if not texts:
            return []
        prefix = self._prefix_ids(instruction)
        if self.special_tokens != "none":
            ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
            return [len(i) for i in ids]
        bodies = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [len(prefix) + max(1, len(b)) for b in bodies]
