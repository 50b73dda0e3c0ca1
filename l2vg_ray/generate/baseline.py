"""The ``generate-then-encode`` baseline: the LLM writes a response (a generation backend, greedy
by default), the teacher embeds it - what LLM2Vec-Gen learns to do in one forward pass. It lives
with the backends it drives; ``l2vg_ray.loading`` imports it to register it into ``BASELINES``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from l2vg_ray.generate.backends import build_backend, resolve_backend
from l2vg_ray.text_encoders import BASELINES, TextEncoder, hash_parts
from l2vg_ray.text_encoders.baselines import build_teacher

if TYPE_CHECKING:
    from l2vg_ray.config import L2VGConfig


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
