"""The baselines that need the teachers or the generation backends; ``l2vg_ray.loading`` imports
this module to register them into ``BASELINES``.

- ``teacher``: the configured teacher (``teacher.kind``, ``teacher.model``) as a text encoder.
  A sentence-transformers teacher reads the eval instructions as any sentence-transformers model;
  a pooled-LLM teacher (``mean-pooled-llm``, ``llm2vec``) embeds each text as it embeds responses
  in training - no instruction, which it never saw - at the evaluation's input length.
- ``generate-then-encode``: the LLM writes a response (a generation backend, greedy by default),
  the teacher embeds it - what LLM2Vec-Gen learns to do in one forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from l2vg_ray.config import ConfigError
from l2vg_ray.generate.backends import build_backend, resolve_backend
from l2vg_ray.generate.teacher import TeacherSpec, teacher_spec
from l2vg_ray.generate.teacher import build_teacher as build_teacher_model
from l2vg_ray.text_encoders import BASELINES, SentenceTransformerEncoder, TextEncoder, hash_parts
from l2vg_ray.torch_utils import resolve_device

if TYPE_CHECKING:
    from l2vg_ray.config import L2VGConfig


class PlainTextEncoder:
    """A text encoder that embeds every text as it is: the instruction is dropped (a teacher
    trained on plain responses); everything else is the wrapped encoder's."""

    def __init__(self, encoder: TextEncoder) -> None:
        self.encoder = encoder
        self.name, self.dim = encoder.name, encoder.dim

    def encode(self, texts: Sequence[str], *, instruction: str | None = None, batch_size: int = 32,
               normalize: bool = False, show_progress: bool = False) -> np.ndarray:
        return self.encoder.encode(texts, batch_size=batch_size, normalize=normalize,
                                   show_progress=show_progress)

    def fingerprint(self) -> str:
        return hash_parts("plain-texts", self.encoder.fingerprint())

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    @property
    def max_input_tokens(self) -> int:
        return self.encoder.max_input_tokens

    def count_tokens(self, texts: Sequence[str], *, instruction: str | None = None) -> list[int]:
        return self.encoder.count_tokens(texts)


@BASELINES.register("teacher")
def build_teacher(cfg: L2VGConfig, cache_dir: str | None) -> TextEncoder:
    kind = str(cfg.teacher.kind)
    if kind == "sentence-transformers":
        return SentenceTransformerEncoder(teacher_spec(TeacherSpec.of(cfg)), cache_dir=cache_dir,
                                          device=resolve_device(str(cfg.model.device)))
    # Evaluated at the input length every encoder gets (model.max_length, set from eval.max_length
    # by load_encoder), not at the training-time teacher.max_length of short responses.
    cfg = replace(cfg, teacher=replace(cfg.teacher, max_length=int(cfg.model.max_length)))
    encoder = getattr(build_teacher_model(cfg), "encoder", None)
    if encoder is None:
        raise ConfigError(f"teacher.kind={kind} has no text-encoder form to evaluate; the "
                          f"sentence-transformers, mean-pooled-llm and llm2vec teachers have.")
    return PlainTextEncoder(encoder)


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


@BASELINES.register("generate-then-encode")
def build_generate_then_encode(cfg: L2VGConfig, cache_dir: str | None) -> TextEncoder:
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
