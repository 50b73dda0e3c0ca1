"""Baseline encoders, registered into ``l2vg_ray.encoders.BASELINES`` (all are ``TextEncoder``s).

- ``teacher``: the configured sentence-transformers teacher (``cfg.model.teacher``).
- ``mean-pool``: the frozen LLM (``cfg.model.llm``), last hidden states mean-pooled over the
  input tokens (LLM2Vec-style, no training). The instruction is part of the input but excluded
  from the pool, as in LLM2Vec.
- ``last-token``: the same LLM, the hidden state of the last input token.
- ``generate-then-encode``: the LLM writes a response (``l2vg_ray.generate.backends``, greedy by
  default), the teacher embeds it. What LLM2Vec-Gen learns to do in one forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from l2vg_ray.encoders import BASELINES, SentenceTransformerEncoder, TextEncoder, hash_parts
from l2vg_ray.generate.backends import resolve_device, torch_dtype
from l2vg_ray.generate.teacher import mean_pool

if TYPE_CHECKING:
    from l2vg_ray.config import L2VGConfig

POOLINGS = ("mean", "last")


def pool_hidden_states(hidden, mask, pooling: str):
    """(B, T, H) hidden states, (B, T) 0/1 pool mask -> (B, H). Pure; right padding assumed."""
    import torch

    if pooling == "mean":
        return mean_pool(hidden, mask)
    if pooling == "last":
        last = mask.long().cumsum(1).argmax(1)  # index of the last 1 in each row
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"pooling={pooling!r}; use one of {POOLINGS}.")


class PooledLLMEncoder:
    """A frozen decoder LLM as an encoder by pooling its last hidden states (no training)."""

    def __init__(
        self,
        spec: str,
        *,
        pooling: str = "mean",
        cache_dir: str | None = None,
        device: str = "auto",
        dtype: str = "float32",
        max_length: int = 512,
    ) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        from l2vg_ray.models import resolve_model

        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}; use one of {POOLINGS}.")
        self.spec, self.pooling, self.max_length = spec, pooling, max_length
        self.name = f"{'mean-pool' if pooling == 'mean' else 'last-token'}:{spec}"
        path = resolve_model(spec, cache_dir=cache_dir)
        self.device = torch.device(resolve_device(device))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModel.from_pretrained(path, dtype=torch_dtype(dtype)).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        self._dtype = dtype

    def _prefix_ids(self, instruction: str | None) -> list[int]:
        if not instruction:
            return []
        return self.tokenizer(f"{instruction.rstrip()}: ", add_special_tokens=False)["input_ids"]

    def _batch(self, texts: Sequence[str], instruction: str | None):
        """Token ids of ``instruction + text`` and a pool mask that covers the text only."""
        import torch

        prefix = self._prefix_ids(instruction)
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
        # Sort by length so that a batch pads little; results go back in input order.
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
        return hash_parts("pooled-llm", self.spec, self.pooling, self.max_length, self._dtype, 1)

    @property
    def max_input_tokens(self) -> int:
        return int(self.max_length)

    def count_tokens(self, texts: Sequence[str], *, instruction: str | None = None) -> list[int]:
        """Instruction prefix + text tokens (an empty text reads as one eos), as ``_batch``."""
        texts = list(texts)
        if not texts:
            return []
        prefix = self._prefix_ids(instruction)
        bodies = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [len(prefix) + max(1, len(b)) for b in bodies]


class GenerateThenEncode:
    """LLM response (generation backend) -> teacher embedding of that response."""

    def __init__(self, backend, teacher: TextEncoder, *, llm_spec: str, settings: dict) -> None:
        self.backend = backend
        self.teacher = teacher
        self.llm_spec = llm_spec
        self.settings = settings
        self.name = f"generate-then-encode:{llm_spec}"
        self.dim = teacher.dim

    def generate(self, texts: Sequence[str], *, instruction: str | None = None) -> list[str]:
        queries = [f"{instruction.rstrip()}: {t}" if instruction else t for t in texts]
        return [g.text for g in self.backend.generate(queries)]

    def encode(
        self,
        texts: Sequence[str],
        *,
        instruction: str | None = None,
        batch_size: int = 32,
        normalize: bool = False,
        show_progress: bool = False,
    ) -> np.ndarray:
        texts = list(texts)
        responses: list[str] = []
        for s in range(0, len(texts), batch_size):
            responses.extend(self.generate(texts[s : s + batch_size], instruction=instruction))
        return self.teacher.encode(responses, batch_size=batch_size, normalize=normalize)

    def fingerprint(self) -> str:
        return hash_parts("generate-then-encode", self.llm_spec, sorted(self.settings.items()),
                          self.teacher.fingerprint())

    @property
    def tokenizer(self):
        return self.teacher.tokenizer

    @property
    def max_input_tokens(self) -> int:
        return self.teacher.max_input_tokens

    def count_tokens(self, texts: Sequence[str], *, instruction: str | None = None) -> list[int]:
        return self.teacher.count_tokens(texts, instruction=instruction)


@BASELINES.register("teacher")
def build_teacher(cfg: L2VGConfig, cache_dir: str | None) -> TextEncoder:
    device = resolve_device(str(cfg.model.device))
    return SentenceTransformerEncoder(str(cfg.model.teacher), cache_dir=cache_dir, device=device)


def _pooled(cfg: L2VGConfig, cache_dir: str | None, pooling: str) -> PooledLLMEncoder:
    return PooledLLMEncoder(
        str(cfg.model.llm),
        pooling=pooling,
        cache_dir=cache_dir,
        device=str(cfg.model.device),
        dtype=str(cfg.model.dtype),
        max_length=int(cfg.model.max_length),
    )


@BASELINES.register("mean-pool")
def build_mean_pool(cfg: L2VGConfig, cache_dir: str | None) -> TextEncoder:
    return _pooled(cfg, cache_dir, "mean")


@BASELINES.register("last-token")
def build_last_token(cfg: L2VGConfig, cache_dir: str | None) -> TextEncoder:
    return _pooled(cfg, cache_dir, "last")


@BASELINES.register("generate-then-encode")
def build_generate_then_encode(cfg: L2VGConfig, cache_dir: str | None) -> TextEncoder:
    from l2vg_ray.generate.backends import build_backend, resolve_backend

    gen = cfg.generate
    backend_name = resolve_backend(str(gen.backend))
    backend = build_backend(cfg.model, gen, cfg.cache_dir, backend=backend_name)
    settings = {
        "backend": backend_name,
        "temperature": gen.temperature,
        "top_p": gen.top_p,
        "max_tokens": gen.max_tokens,
        "seed": gen.seed,
        "system_prompt": gen.system_prompt,
    }
    return GenerateThenEncode(
        backend, build_teacher(cfg, cache_dir), llm_spec=str(cfg.model.llm), settings=settings
    )
