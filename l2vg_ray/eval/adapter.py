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

from l2vg_ray.text_encoders import TextEncoder

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.models.model_meta import ModelMeta
    from mteb.types import Array, PromptType
    from torch.utils.data import DataLoader

INSTRUCTIONS_FILE = "instructions.yaml"
# Named instruction sets (eval.instructions): the project's own wording, and the paper's.
INSTRUCTION_SETS = {"project": INSTRUCTIONS_FILE, "paper": "instructions_paper.yaml"}


@dataclass(frozen=True)
class InstructionSet:
    """Query instructions by task name, then by task type, then a default (null = none), and
    the instruction every retrieval / reranking document gets (``document``; null = none)."""

    by_task: Mapping[str, str | None] = field(default_factory=dict)
    by_type: Mapping[str, str | None] = field(default_factory=dict)
    default: str | None = None
    document: str | None = None
    name: str = "custom"

    @classmethod
    def named(cls, name: str) -> InstructionSet:
        """A packaged set by name: ``project`` or ``paper`` (``INSTRUCTION_SETS``)."""
        if name not in INSTRUCTION_SETS:
            raise ValueError(
                f"Unknown instruction set {name!r}. Known: {', '.join(sorted(INSTRUCTION_SETS))}. "
                f"Set eval.instructions to one of them."
            )
        text = resources.files("l2vg_ray").joinpath("resources", INSTRUCTION_SETS[name]).read_text()
        return cls._parse(text, f"l2vg_ray/resources/{INSTRUCTION_SETS[name]}", name)

    @classmethod
    def load(cls, path: str | Path | None = None) -> InstructionSet:
        """Read the YAML at ``path`` (default: the packaged ``project`` set)."""
        if path is None:
            return cls.named("project")
        return cls._parse(Path(path).read_text(), str(path), Path(path).stem)

    @classmethod
    def _parse(cls, text: str, source: str, name: str) -> InstructionSet:
        data = yaml.safe_load(text) or {}
        unknown = set(data) - {"default", "by_type", "by_task", "document"}
        if unknown:
            raise ValueError(
                f"{source}: unknown keys {sorted(unknown)}; use default, by_type, by_task and "
                f"document."
            )
        return cls(
            by_task=dict(data.get("by_task") or {}),
            by_type=dict(data.get("by_type") or {}),
            default=data.get("default"),
            document=data.get("document"),
            name=name,
        )

    @classmethod
    def none(cls) -> InstructionSet:
        return cls(name="none")

    def for_task(
        self, task_name: str, task_type: str, prompt_type: Any = None, subset: str | None = None
    ) -> str | None:
        """The instruction for one encode call. Documents of asymmetric tasks get ``document``;
        a ``{subset}`` in an instruction is filled with mteb's hf_subset (BRIGHT's domains)."""
        if prompt_type is not None and str(getattr(prompt_type, "value", prompt_type)) == "document":
            return self.document or None
        if task_name in self.by_task:
            text = self.by_task[task_name]
        elif task_type in self.by_type:
            text = self.by_type[task_type]
        else:
            text = self.default
        if text and "{subset}" in text:
            text = text.replace("{subset}", str(subset or "").strip() or "this")
        return text or None


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
        spec: str | None = None,
    ) -> None:
        self.encoder = encoder
        self.spec = spec  # how load_encoder rebuilds it (for ModelMeta.load_model)
        self.instructions = instructions if instructions is not None else InstructionSet.load()
        self.batch_size = batch_size
        self._model_name = model_name or mteb_model_name(encoder.name)
        self._meta: ModelMeta | None = None

    @property
    def mteb_model_meta(self) -> ModelMeta:
        """A complete ``ModelMeta``: ``meta.load_model()`` rebuilds this very encoder (the loader
        is ``load_mteb_encoder`` with the encoder spec and instruction set)."""
        if self._meta is None:
            from mteb.models.model_meta import ModelMeta

            config = getattr(self.encoder, "config", None)
            llm = getattr(self.encoder, "llm", None)
            n_params = (
                sum(p.numel() for p in llm.parameters())
                + sum(p.numel() for p in self.encoder.trainable_parameters())
                if llm is not None else None
            )
            self._meta = ModelMeta(
                loader=load_mteb_encoder if self.spec is not None else None,
                loader_kwargs={"spec": self.spec, "instructions": self.instructions.name}
                if self.spec is not None else {},
                name=self._model_name,
                # Results of another instruction set must not be read back as these.
                revision=self.encoder.fingerprint()
                + ("" if self.instructions.name == "project" else f"-{self.instructions.name}"),
                release_date=None,
                languages=["eng-Latn"],
                n_parameters=n_params,
                memory_usage_mb=None,
                max_tokens=int(config.max_length) if config is not None else None,
                embed_dim=int(self.encoder.dim),
                license=None,
                open_weights=True,
                public_training_code=None,
                public_training_data=None,
                reference="https://arxiv.org/abs/2603.10913" if config is not None else None,
                framework=["PyTorch"],
                similarity_fn_name="cosine",
                use_instructions=True,
                training_datasets=None,
            )
        return self._meta

    @mteb_model_meta.setter
    def mteb_model_meta(self, meta: ModelMeta) -> None:  # mteb's load_model sets it
        self._meta = meta

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
            task_metadata.name, str(task_metadata.type), prompt_type, subset=hf_subset
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


def load_mteb_encoder(
    model_name: str,
    revision: str | None = None,
    *,
    spec: str,
    instructions: str = "project",
    device: str | None = None,
    batch_size: int = 32,
    **_: Any,
) -> MTEBEncoder:
    """mteb's loader for this project's encoders (``ModelMeta.loader``): ``spec`` as
    ``l2vg_ray.loading.load_encoder`` takes it (a folder, packaged or baseline name, ``hf:``)."""
    from l2vg_ray.config import load_config
    from l2vg_ray.loading import load_encoder

    encoder = load_encoder(spec, load_config(None), device=device)
    return MTEBEncoder(encoder, instructions=InstructionSet.named(instructions),
                       batch_size=batch_size, model_name=model_name, spec=spec)
