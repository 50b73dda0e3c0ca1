"""mteb v2 encoder adapter: any ``TextEncoder`` behind mteb's ``EncoderProtocol``.

``MTEBEncoder(encoder, instructions=InstructionSet.load())`` is what ``mteb.evaluate`` receives.
Per-task instructions come from a data file (``l2vg_ray/resources/instructions.yaml``) and are
passed as ``instruction=`` to ``TextEncoder.encode``; retrieval / reranking documents get none.
The mteb model name is ``l2vg-ray/<encoder name>`` and its revision the encoder fingerprint, so
mteb result files of different weights never overwrite one another.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from l2vg_ray.encoders import TextEncoder

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.models.model_meta import ModelMeta
    from mteb.types import Array, PromptType
    from torch.utils.data import DataLoader

INSTRUCTIONS_FILE = "instructions.yaml"


@dataclass(frozen=True)
class InstructionSet:
    """Query instructions by task name, then by task type, then a default (null = none)."""

    by_task: Mapping[str, str | None] = field(default_factory=dict)
    by_type: Mapping[str, str | None] = field(default_factory=dict)
    default: str | None = None

    @classmethod
    def load(cls, path: str | Path | None = None) -> InstructionSet:
        """Read the YAML at ``path`` (default: the packaged ``resources/instructions.yaml``)."""
        if path is None:
            text = resources.files("l2vg_ray").joinpath("resources", INSTRUCTIONS_FILE).read_text()
            source = f"l2vg_ray/resources/{INSTRUCTIONS_FILE}"
        else:
            text, source = Path(path).read_text(), str(path)
        data = yaml.safe_load(text) or {}
        unknown = set(data) - {"default", "by_type", "by_task"}
        if unknown:
            raise ValueError(
                f"{source}: unknown keys {sorted(unknown)}; use default, by_type and by_task."
            )
        return cls(
            by_task=dict(data.get("by_task") or {}),
            by_type=dict(data.get("by_type") or {}),
            default=data.get("default"),
        )

    @classmethod
    def none(cls) -> InstructionSet:
        return cls()

    def for_task(self, task_name: str, task_type: str, prompt_type: Any = None) -> str | None:
        """The instruction for one encode call; documents of asymmetric tasks get none."""
        if prompt_type is not None and str(getattr(prompt_type, "value", prompt_type)) == "document":
            return None
        if task_name in self.by_task:
            return self.by_task[task_name] or None
        if task_type in self.by_type:
            return self.by_type[task_type] or None
        return self.default or None


def mteb_model_name(encoder_name: str) -> str:
    """``l2vg-ray/<slug>``: mteb wants ``org/name``; encoder names can be paths."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(encoder_name).strip("/")).strip("_.") or "encoder"
    return f"l2vg-ray/{slug[-96:]}"


class MTEBEncoder:
    """mteb ``EncoderProtocol`` over a ``TextEncoder`` (cosine similarity, text modality)."""

    def __init__(
        self,
        encoder: TextEncoder,
        *,
        instructions: InstructionSet | None = None,
        batch_size: int = 32,
        model_name: str | None = None,
    ) -> None:
        self.encoder = encoder
        self.instructions = instructions if instructions is not None else InstructionSet.load()
        self.batch_size = batch_size
        self._model_name = model_name or mteb_model_name(encoder.name)
        self._meta: ModelMeta | None = None

    @property
    def mteb_model_meta(self) -> ModelMeta:
        if self._meta is None:
            from mteb.models.model_meta import ModelMeta

            self._meta = ModelMeta(
                loader=None,
                name=self._model_name,
                revision=self.encoder.fingerprint(),
                release_date=None,
                languages=["eng-Latn"],
                n_parameters=None,
                memory_usage_mb=None,
                max_tokens=None,
                embed_dim=int(self.encoder.dim),
                license=None,
                open_weights=True,
                public_training_code=None,
                public_training_data=None,
                framework=["PyTorch"],
                similarity_fn_name="cosine",
                use_instructions=True,
                training_datasets=None,
            )
        return self._meta

    def encode(
        self,
        inputs: DataLoader,
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        texts: list[str] = []
        for batch in inputs:
            if "text" not in batch:
                raise ValueError(
                    f"Task {task_metadata.name!r} gave a batch without a 'text' field "
                    f"(keys: {sorted(batch)}); only text tasks are supported."
                )
            texts.extend(str(t) for t in batch["text"])
        instruction = self.instructions.for_task(
            task_metadata.name, str(task_metadata.type), prompt_type
        )
        batch_size = int(kwargs.get("batch_size") or self.batch_size)
        emb = self.encoder.encode(texts, instruction=instruction, batch_size=batch_size)
        return np.asarray(emb, dtype=np.float32)

    def similarity(self, embeddings1: Array, embeddings2: Array) -> Array:
        from mteb.similarity_functions import cos_sim

        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1: Array, embeddings2: Array) -> Array:
        from mteb.similarity_functions import pairwise_cos_sim

        return pairwise_cos_sim(embeddings1, embeddings2)
