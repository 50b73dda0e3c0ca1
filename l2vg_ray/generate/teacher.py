"""Teachers: responses -> the embeddings the encoder learns to align with.

Four kinds, chosen by ``teacher.kind`` in the ``TEACHERS`` registry:

- ``sentence-transformers``: a sentence-transformers model (``teacher.model`` or
  ``model.teacher``), embeddings exactly as the model's own pipeline gives them.
- ``mean-pooled-llm``: the LLM2Vec-style unsupervised teacher of the paper: the LLM
  (``teacher.model`` or ``model.llm``) reads the response, and its last hidden states are
  mean-pooled over the response tokens (special tokens and padding excluded).
- ``llm2vec``: the paper's teacher, the backbone's own LLM2Vec encoder (bidirectional attention,
  the MNTP LoRA merged, the unsupervised SimCSE LoRA on top), masked mean with BOS.
- ``cls-encoder``: a Hugging Face encoder (BERT / XLM-R family) read at its first ([CLS])
  position, raw (not normalised): the official second version's ``BAAI/bge-m3-unsupervised``.

A teacher has ``.name`` (written to TEACHER_MODEL), ``.dim`` and
``embed(texts) -> float32 (N, dim)``; ``build_teacher(spec)`` builds the one a config names. The
Ray Data wrapper that holds one per actor is ``TeacherStage`` in ``stages.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from l2vg_ray.config import L2VGConfig, ModelConfig, TeacherConfig, typed
from l2vg_ray.registry import Registry
from l2vg_ray.torch_utils import load_tokenizer, resolve_device, torch_dtype

if TYPE_CHECKING:
    from omegaconf import DictConfig


class Teacher(Protocol):
    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray: ...


TEACHERS: Registry[type] = Registry("teacher kind", hint="Set teacher.kind to one of these.")


@dataclass(frozen=True)
class TeacherSpec:
    """What a teacher is built from (the typed sections; it travels to the teacher actors)."""

    model: ModelConfig
    teacher: TeacherConfig
    cache_dir: str

    @classmethod
    def of(cls, cfg: TeacherSpec | DictConfig | L2VGConfig) -> TeacherSpec:
        if isinstance(cfg, TeacherSpec):
            return cfg
        c = typed(cfg)
        return cls(model=c.model, teacher=c.teacher, cache_dir=c.cache_dir)


def teacher_spec(cfg: TeacherSpec | DictConfig | L2VGConfig) -> str:
    """The model spec a config's teacher uses: ``teacher.model``, else the kind's default."""
    spec = TeacherSpec.of(cfg)
    kind = str(spec.teacher.kind)
    TEACHERS.get(kind)  # unknown kinds list the known ones
    if spec.teacher.model:
        return str(spec.teacher.model)
    return str(spec.model.llm if kind == "mean-pooled-llm" else spec.model.teacher)


def _resolve(name: str, spec: TeacherSpec) -> str:
    from l2vg_ray.models import resolve_model

    return resolve_model(name, cache_dir=spec.cache_dir)


@TEACHERS.register("sentence-transformers")
class SentenceTransformerTeacher:
    """A sentence-transformers model; its own modules decide pooling and normalisation."""

    def __init__(self, spec: TeacherSpec, *, device: str = "auto") -> None:
        from l2vg_ray.text_encoders import SentenceTransformerEncoder

        self.name = teacher_spec(spec)
        self.batch_size = int(spec.teacher.batch_size)
        self.encoder = SentenceTransformerEncoder(
            self.name, cache_dir=spec.cache_dir, device=str(resolve_device(device)),
            max_seq_length=int(spec.teacher.max_length),  # can only shorten the model's own
        )
        self.model, self.dim = self.encoder.model, self.encoder.dim

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode(list(texts), batch_size=self.batch_size)


@TEACHERS.register("mean-pooled-llm")
class MeanPooledLLMTeacher:
    """The LLM's last-layer hidden states mean-pooled over the response's own tokens (BOS/EOS
    attend but are not averaged)."""

    def __init__(self, spec: TeacherSpec, *, device: str = "auto") -> None:
        from l2vg_ray.text_encoders import PooledLLMEncoder

        llm = teacher_spec(spec)
        self.name = f"mean-pooled-llm:{llm}"
        self.batch_size = int(spec.teacher.batch_size)
        self.encoder = PooledLLMEncoder.load(
            _resolve(llm, spec), name=self.name, device=device, dtype=str(spec.model.dtype),
            max_length=int(spec.teacher.max_length), special_tokens="exclude",
        )
        self.model, self.tokenizer = self.encoder.model, self.encoder.tokenizer
        self.dim = self.encoder.dim

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode(list(texts), batch_size=self.batch_size)


def make_bidirectional(model: Any) -> Any:
    """Turn a decoder-only transformers model's attention non-causal, in place.

    ``config.is_causal = False`` makes the model build a bidirectional (padding-only) mask
    (transformers' ``create_causal_mask`` falls back to ``create_bidirectional_mask``), and every
    attention module's ``is_causal = False`` stops SDPA / flash attention from re-imposing
    causality when no mask is materialised. This is LLM2Vec's first step, done on the current
    transformers classes rather than a pinned fork of their modeling code.
    """
    configs = [model.config]
    text = getattr(model.config, "get_text_config", None)
    if text is not None:
        configs.append(text())
    for conf in configs:
        conf.is_causal = False
    n = 0
    for module in model.modules():
        if isinstance(getattr(module, "is_causal", None), bool):  # idempotent
            module.is_causal = False
            n += 1
    if n == 0:
        raise ValueError(
            f"{type(model).__name__} has no attention module with an is_causal flag: it cannot be "
            f"made bidirectional this way. Use a Llama/Qwen/Mistral-style decoder."
        )
    return model


def llm2vec_base(adapter: str) -> str:
    """The base model an LLM2Vec MNTP adapter was trained on (its adapter_config.json)."""
    from peft import PeftConfig

    try:
        base = PeftConfig.from_pretrained(adapter).base_model_name_or_path
    except Exception as e:  # hub errors come in many types
        raise ValueError(
            f"teacher {adapter!r} is not a PEFT adapter (no readable adapter_config.json: "
            f"{type(e).__name__}: {str(e)[:200]}). teacher.kind=llm2vec needs the MNTP adapter, "
            f"e.g. McGill-NLP/LLM2Vec-Qwen3-8B-mntp."
        ) from None
    if not base:
        raise ValueError(f"{adapter!r}/adapter_config.json names no base_model_name_or_path.")
    return str(base)


@TEACHERS.register("llm2vec")
class LLM2VecTeacher:
    """The paper's unsupervised teacher: an LLM2Vec encoder of the backbone.

    The base causal LM (named by the MNTP adapter's ``adapter_config.json``) is made
    bidirectional, the MNTP LoRA (``teacher.model`` / ``model.teacher``) is merged into it and the
    second LoRA (``teacher.adapter``, the unsupervised SimCSE one) is applied; the embedding is
    the masked mean of the last hidden states over every token, BOS included, of the response
    (no instruction), cut at ``teacher.max_length`` tokens, in ``teacher.dtype``.
    """

    def __init__(self, spec: TeacherSpec, *, device: str = "auto") -> None:
        from peft import PeftModel
        from transformers import AutoModel

        from l2vg_ray.text_encoders import PooledLLMEncoder

        adapter = teacher_spec(spec)
        second = spec.teacher.adapter
        self.name = f"llm2vec:{adapter}" + (f"+{second}" if second else "")
        adapter_path = _resolve(adapter, spec)
        base = _resolve(llm2vec_base(adapter_path), spec)
        dtype_name = str(spec.teacher.dtype or spec.model.dtype)
        self.batch_size = int(spec.teacher.batch_size)
        try:  # LLM2Vec adapters ship the tokenizer they were trained with
            tokenizer = load_tokenizer(adapter_path, padding_side="left")  # as the official collator
        except (OSError, ValueError):
            tokenizer = load_tokenizer(base, padding_side="left")
        model = make_bidirectional(AutoModel.from_pretrained(base, dtype=torch_dtype(dtype_name)))
        model = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
        if second:
            model = PeftModel.from_pretrained(model, _resolve(str(second), spec)).merge_and_unload()
        make_bidirectional(model)
        # Every real token counts, BOS included (the official teacher's pooling).
        self.encoder = PooledLLMEncoder(
            model.to(resolve_device(device)), tokenizer, spec=self.name, name=self.name,
            max_length=int(spec.teacher.max_length), special_tokens="include", dtype=dtype_name,
        )
        self.model, self.tokenizer = self.encoder.model, self.encoder.tokenizer
        self.dim = self.encoder.dim

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode([t.strip() for t in texts], batch_size=self.batch_size)


@TEACHERS.register("cls-encoder")
class CLSEncoderTeacher:
    """A Hugging Face encoder's last hidden state at the first position ([CLS] / <s>), as it is:
    no normalisation, no projection. The official code's second version embeds responses this
    way with ``BAAI/bge-m3-unsupervised`` (an XLM-R encoder). Texts are cut at
    ``teacher.max_length`` tokens and padded on the right, so position 0 is always the CLS token.
    """

    def __init__(self, spec: TeacherSpec, *, device: str = "auto") -> None:
        from transformers import AutoModel

        model_spec = teacher_spec(spec)
        self.name = f"cls-encoder:{model_spec}"
        path = _resolve(model_spec, spec)
        self.batch_size = int(spec.teacher.batch_size)
        self.max_length = int(spec.teacher.max_length)
        self.device = resolve_device(device)
        self.tokenizer = load_tokenizer(path, padding_side="right")
        dtype = torch_dtype(str(spec.teacher.dtype or spec.model.dtype))
        self.model = AutoModel.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True,
                                   truncation=True, max_length=self.max_length,
                                   return_tensors="pt").to(self.device)
            with torch.no_grad():
                hidden = self.model(**batch).last_hidden_state
            out.append(hidden[:, 0].float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def build_teacher(cfg: TeacherSpec | DictConfig | L2VGConfig) -> Teacher:
    spec = TeacherSpec.of(cfg)
    return TEACHERS.get(str(spec.teacher.kind))(spec, device=str(spec.model.device))


def _sentence_transformer_dim(folder: Path) -> int | None:
    """Output size read from a sentence-transformers folder's module configs (no weights);
    None when the layout is not one this reader knows (the caller then loads the model)."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
        for module in reversed(modules):
            kind = str(module.get("type", ""))
            conf_file = folder / module.get("path", "") / "config.json"
            if kind.endswith("Dense"):
                return int(json.loads(conf_file.read_text())["out_features"])
            if kind.endswith("Pooling"):
                conf = json.loads(conf_file.read_text())
                # Two layouts: sentence-transformers < 6 (word_embedding_dimension + one boolean
                # per mode) and >= 6 (embedding_dimension + pooling_mode, a name or a list).
                dim = conf.get("word_embedding_dimension", conf.get("embedding_dimension"))
                if "pooling_mode" in conf:
                    mode = conf["pooling_mode"]
                    n_modes = len(mode) if isinstance(mode, list) else 1
                else:
                    n_modes = sum(
                        1 for k, v in conf.items() if k.startswith("pooling_mode_") and v is True
                    )
                return int(dim) * max(1, n_modes) if dim else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


def teacher_dim(cfg: TeacherSpec | DictConfig | L2VGConfig) -> int:
    """The teacher's embedding size, read from config files where possible (no weights loaded)."""
    spec = TeacherSpec.of(cfg)
    if spec.model.teacher_dim:
        return int(spec.model.teacher_dim)
    kind = str(spec.teacher.kind)
    path = Path(_resolve(teacher_spec(spec), spec))
    if kind == "sentence-transformers":
        dim = _sentence_transformer_dim(path) if path.is_dir() else None
        if dim is not None:
            return dim
    elif kind == "mean-pooled-llm":
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(str(path)).get_text_config().hidden_size)
    elif kind == "llm2vec":
        from transformers import AutoConfig

        base = _resolve(llm2vec_base(str(path)), spec)
        return int(AutoConfig.from_pretrained(base).get_text_config().hidden_size)
    elif kind == "cls-encoder":
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(str(path)).hidden_size)
    return int(build_teacher(spec).dim)  # an unusual layout: load it once to ask
