"""``L2VGEncoder``: a frozen decoder LLM turned into a text encoder (LLM2Vec-Gen).

The query is followed by ``n_thought`` then ``n_compression`` trainable special tokens. The
last-layer hidden states ``h`` at the compression positions go through the ``reconstruction``
head (Linear H -> H): its outputs are soft prompts from which the *same* frozen LLM must
reconstruct the response (next-token CE on response tokens only). The ``alignment`` head
(Linear H -> teacher_dim) on top of the soft prompts, averaged over compression positions, is the
embedding, trained with MSE against the teacher's embedding of the response.

What trains, and nothing else: the special-token embedding rows (a small ``nn.Parameter`` spliced
into ``inputs_embeds``; the LLM's own embedding matrix is neither resized nor touched) and the two
heads. Trainable tensors are kept in float32 whatever the LLM's dtype, so optimizer state and
checkpoints are exact; they are cast to the LLM's dtype where they enter it.

Layouts (left padding everywhere, so the special tokens and the response end every row):
- query:   ``[pad ... pad][query tokens][thought_1..n][compress_1..n]``
- decoder: ``[pad ... pad][soft prompt_1..n_compression][response tokens][eos]``
Position ids are ``cumsum(attention_mask) - 1``: a row's embedding does not depend on how much
padding its batch needed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from l2vg_ray.config import ModelConfig, check_model
from l2vg_ray.method.losses import (
    IGNORE_INDEX,
    TargetStats,
    alignment_loss,
    combine_losses,
    reconstruction_loss,
)
from l2vg_ray.text_encoders import ENCODER_CONFIG_FILE, with_instruction
from l2vg_ray.torch_utils import resolve_device, torch_dtype

log = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable.safetensors"
FORMAT_VERSION = 1
# Seed of the trainable tensors' initialisation: every worker builds identical initial weights.
_INIT_SEED = 0


@functools.cache
def _read_only_cache_parts() -> tuple[str, type]:
    """(the name of the model forward's KV-cache argument, renamed in transformers 5.2x; a
    dynamic cache layer that returns cached + new keys without storing the new ones)."""
    import inspect

    from transformers import LlamaModel
    from transformers.cache_utils import DynamicLayer

    def update(self, key_states, value_states, *args, **kwargs):
        return (torch.cat([self.keys, key_states], dim=-2),
                torch.cat([self.values, value_states], dim=-2))

    params = inspect.signature(LlamaModel.forward).parameters
    kwarg = "cache" if "cache" in params else "past_key_values"
    return kwarg, type("ReadOnlyPrefixLayer", (DynamicLayer,), {"update": update})


@dataclass
class L2VGOutput:
    """What ``L2VGEncoder.forward`` returns. Missing terms (no responses / no teacher) are None."""

    loss: torch.Tensor | None
    recon_loss: torch.Tensor | None
    align_loss: torch.Tensor | None
    embeddings: torch.Tensor  # (B, teacher_dim), float32, not normalised
    n_response_tokens: torch.Tensor  # scalar long: tokens scored by the reconstruction loss


def as_model_config(model_cfg: Any) -> ModelConfig:
    """``cfg.model`` as a DictConfig, a mapping or a ``ModelConfig`` -> a validated ModelConfig."""
    if isinstance(model_cfg, ModelConfig):
        cfg = dataclasses.replace(model_cfg)
    else:
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(model_cfg, DictConfig):
                model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a dependency
            pass
        if not isinstance(model_cfg, Mapping):
            raise TypeError(
                f"model_cfg must be cfg.model (a DictConfig), a dict or a ModelConfig; "
                f"got {type(model_cfg).__name__}."
            )
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(model_cfg) - known)
        if unknown:
            raise ValueError(
                f"Unknown model config keys {unknown}; valid keys are {sorted(known)}."
            )
        cfg = ModelConfig(**dict(model_cfg))
    check_model(cfg)
    return cfg


def special_token_strings(n_thought: int, n_compression: int) -> list[str]:
    """The special tokens appended to every query, in order: thoughts, then compression."""
    return [f"<|l2vg_thought_{i}|>" for i in range(1, n_thought + 1)] + [
        f"<|l2vg_compress_{i}|>" for i in range(1, n_compression + 1)
    ]


def init_text_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``model.token_init_text`` (no special tokens added); errors if it has none."""
    ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise ValueError(
            f"model.token_init_text={text!r} has no tokens; give a short prompt such as "
            f"' This text means in one word: \"' or null for the mean initialisation."
        )
    return ids


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> (ids, attention_mask), both (B, max_len) long, padded on the left."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token (left padding)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def interleave_soft_prompts(
    response_embeds: torch.Tensor, response_mask: torch.Tensor, soft_prompts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[pads][response]`` (left-padded) + soft prompts -> ``[pads][soft prompts][response]``.

    Returns (inputs_embeds (B, K+R, H), attention_mask (B, K+R)). The response keeps its right
    alignment, so the last R+1 positions' logits score exactly the R padded response slots.
    """
    b, r, h = response_embeds.shape
    k = soft_prompts.shape[1]
    n_pad = (r - response_mask.sum(-1)).unsqueeze(-1)  # (B, 1)
    t = torch.arange(k + r, device=response_embeds.device).unsqueeze(0)  # (1, K+R)
    # Source rows: response slots are 0..R-1, soft prompts R..R+K-1.
    src = torch.where(t < n_pad, t, torch.where(t < n_pad + k, r + t - n_pad, t - k))
    pool = torch.cat([response_embeds, soft_prompts.to(response_embeds.dtype)], dim=1)
    embeds = pool.gather(1, src.unsqueeze(-1).expand(b, k + r, h))
    return embeds, (t >= n_pad).long()


class L2VGEncoder(nn.Module):
    """LLM2Vec-Gen encoder over a frozen causal LM; implements ``l2vg_ray.text_encoders.TextEncoder``."""

    def __init__(
        self,
        config: ModelConfig,
        llm: nn.Module,
        tokenizer: Any,
        *,
        teacher_dim: int,
    ) -> None:
        super().__init__()
        if teacher_dim is None or int(teacher_dim) < 1:
            raise ValueError(f"teacher_dim must be a positive int, got {teacher_dim!r}.")
        self.config = dataclasses.replace(config, teacher_dim=int(teacher_dim))
        self.llm = llm
        self.tokenizer = tokenizer
        self.n_thought = config.n_thought
        self.n_compression = config.n_compression
        self.dim = int(teacher_dim)
        self.name = default_name(config.llm)
        # The training objective it was trained with ({"recon_weight", "align_weight",
        # "align_loss"}), saved with it; None when unknown (untrained, or saved before it was
        # recorded). recon_weight 0 means the soft prompts were never trained to be decoded.
        self.objective: dict[str, Any] | None = None

        self.llm.requires_grad_(False)
        self.llm.eval()
        embedding = self.llm.get_input_embeddings()
        hidden = int(embedding.embedding_dim)
        self.hidden_size = hidden
        device = embedding.weight.device

        # Special tokens: added to the tokenizer (so they decode, count and never merge), but
        # their vectors live here, not in the (frozen, un-resized) embedding matrix.
        self.special_tokens = special_token_strings(self.n_thought, self.n_compression)
        tokenizer.add_tokens(self.special_tokens, special_tokens=True)
        ids = tokenizer.convert_tokens_to_ids(self.special_tokens)
        if len(set(ids)) != len(ids) or any(i is None or i < 0 for i in ids):
            raise ValueError(f"The tokenizer could not add the special tokens: ids {ids}.")
        self.special_token_ids: list[int] = [int(i) for i in ids]
        lookup = torch.full((max(ids) + 1,), -1, dtype=torch.long)
        lookup[torch.tensor(ids)] = torch.arange(len(ids))
        self.register_buffer("_special_lookup", lookup.to(device), persistent=False)
        self.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"The tokenizer of {config.llm!r} has no eos token; the reconstruction target "
                f"needs one. Use a chat/instruct model or set tokenizer.eos_token."
            )
        self.eos_token_id = int(tokenizer.eos_token_id)

        gen = torch.Generator().manual_seed(_INIT_SEED)
        with torch.no_grad():
            # Init: the mean of the vocabulary's rows (an "average token", on the embedding
            # manifold's scale) plus a little seeded noise so the tokens start distinguishable.
            w = embedding.weight.detach().float().cpu()
            mean, std = w.mean(0), w.std(0)
            noise = torch.randn(len(ids), hidden, generator=gen) * std * 0.1
            special = mean + noise
            if config.token_init_text:
                # The last special tokens start as the text's own token embeddings.
                text_ids = init_text_ids(tokenizer, config.token_init_text)[-len(ids) :]
                special[len(ids) - len(text_ids) :] = w[torch.tensor(text_ids)]
            self.special_embeddings = nn.Parameter(special.to(device))
            self.reconstruction = nn.Linear(hidden, hidden, device=device, dtype=torch.float32)
            self.alignment = nn.Linear(hidden, self.dim, device=device, dtype=torch.float32)
            for head in (self.reconstruction, self.alignment):
                # nn.Linear's default (kaiming-uniform) init, but from our generator.
                bound = 1.0 / float(np.sqrt(head.in_features))
                head.weight.copy_(
                    torch.empty_like(head.weight, device="cpu").uniform_(
                        -bound, bound, generator=gen
                    )
                )
                head.bias.copy_(
                    torch.empty_like(head.bias, device="cpu").uniform_(-bound, bound, generator=gen)
                )
        if config.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(self.llm, "activation_checkpointing_enable"):  # transformers >= 5.2x
                self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.train(False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls,
        model_cfg: Any,
        *,
        cache_dir: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        teacher_dim: int | None = None,
    ) -> L2VGEncoder:
        """Build from ``cfg.model``: load the frozen LLM + tokenizer, fresh trainable state."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from l2vg_ray.models import resolve_model

        cfg = as_model_config(model_cfg)
        dev = resolve_device(device if device is not None else cfg.device)
        if teacher_dim is None:
            teacher_dim = cfg.teacher_dim
        if teacher_dim is None:
            teacher_dim = teacher_dimension(cfg.teacher, cache_dir=cache_dir)
        path = resolve_model(cfg.llm, cache_dir=cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(path)
        llm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(cfg.dtype))
        llm.to(dev)
        return cls(cfg, llm, tokenizer, teacher_dim=int(teacher_dim))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        cache_dir: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
    ) -> L2VGEncoder:
        """Rebuild from a folder written by ``save``: base LLM from its spec + trainable state."""
        from safetensors.torch import load_file

        path = Path(path)
        meta = read_saved_meta(path)
        cfg = as_model_config(meta["model"])
        enc = cls.from_config(cfg, cache_dir=cache_dir, device=device, teacher_dim=cfg.teacher_dim)
        enc.load_trainable_state_dict(load_file(str(path / TRAINABLE_FILE)))
        enc.name = meta.get("name") or enc.name
        enc.objective = meta.get("objective")
        return enc

    def save(self, path: str | os.PathLike) -> None:
        """Write ``l2vg_config.json`` + ``trainable.safetensors`` (trainable tensors only)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.trainable_state_dict().items()}
        meta = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "model": dataclasses.asdict(self.config),
            "hidden_size": self.hidden_size,
            "special_tokens": self.special_tokens,
            "trainable": {k: list(v.shape) for k, v in state.items()},
            "fingerprint": self.fingerprint(),
            **({"objective": self.objective} if self.objective is not None else {}),
        }
        # Write then rename, so a reader never sees half a checkpoint.
        tmp_w = path / f".{TRAINABLE_FILE}.tmp"
        save_file(state, str(tmp_w), metadata={"format_version": str(FORMAT_VERSION)})
        os.replace(tmp_w, path / TRAINABLE_FILE)
        tmp_c = path / f".{ENCODER_CONFIG_FILE}.tmp"
        tmp_c.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp_c, path / ENCODER_CONFIG_FILE)

    # ------------------------------------------------------------------ trainable state
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Special-token rows and both heads; nothing else has ``requires_grad``."""
        return [
            self.special_embeddings,
            self.reconstruction.weight,
            self.reconstruction.bias,
            self.alignment.weight,
            self.alignment.bias,
        ]

    def head_parameters(self) -> list[nn.Parameter]:
        """The reconstruction and alignment heads' tensors (a subset of the trainable ones)."""
        return [self.reconstruction.weight, self.reconstruction.bias,
                self.alignment.weight, self.alignment.bias]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "special_embeddings": self.special_embeddings,
            "reconstruction.weight": self.reconstruction.weight,
            "reconstruction.bias": self.reconstruction.bias,
            "alignment.weight": self.alignment.weight,
            "alignment.bias": self.alignment.bias,
        }

    def load_trainable_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        own = self.trainable_state_dict()
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"Trainable state mismatch: missing {missing}, unexpected {unexpected}. "
                f"Load a state written by this encoder's trainable_state_dict()/save()."
            )
        for k, p in own.items():
            if tuple(sd[k].shape) != tuple(p.shape):
                raise ValueError(
                    f"Trainable tensor {k!r} has shape {tuple(sd[k].shape)}, expected "
                    f"{tuple(p.shape)}: the checkpoint was made for other n_thought/n_compression, "
                    f"LLM or teacher_dim."
                )
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(sd[k].to(device=p.device, dtype=p.dtype))

    def train(self, mode: bool = True) -> L2VGEncoder:
        super().train(mode)
        # The LLM is frozen: always eval (no dropout). Gradient checkpointing in transformers
        # only fires on a layer whose own `training` flag is set, so under checkpointing we flip
        # just that flag on the decoder layers (not on their dropout-bearing children).
        self.llm.eval()
        if self.config.gradient_checkpointing:
            for m in self.llm.modules():
                if getattr(m, "gradient_checkpointing", False) is True:
                    m.training = mode
        return self

    @property
    def device(self) -> torch.device:
        return self.special_embeddings.device

    @property
    def llm_dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    # ------------------------------------------------------------------ tokenisation
    def _with_instruction(self, texts: Sequence[str], instruction: str | None) -> list[str]:
        return with_instruction(texts, instruction)

    def set_max_length(self, max_length: int) -> None:
        """Embed up to ``max_length`` input tokens per text (special tokens included) from now
        on; the trained state is unchanged (the fingerprint records the length)."""
        max_length = int(max_length)
        if max_length <= len(self.special_token_ids):
            raise ValueError(
                f"max_length={max_length} leaves no room for a text after the "
                f"{len(self.special_token_ids)} special tokens; use at least "
                f"{len(self.special_token_ids) + 1}."
            )
        self.config = dataclasses.replace(self.config, max_length=max_length)

    def _query_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each query, cut to leave room for the special tokens that end it."""
        room = self.config.max_length - len(self.special_token_ids)
        if not texts:
            return []
        enc = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        return [list(ids[:room]) + self.special_token_ids for ids in enc]

    def _response_ids(self, texts: Sequence[str]) -> list[list[int]]:
        room = self.config.max_response_length - 1
        enc = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [list(ids[:room]) + [self.eos_token_id] for ids in enc]

    @property
    def max_input_tokens(self) -> int:
        return int(self.config.max_length)

    def count_tokens(self, texts: Sequence[str], *, instruction: str | None = None) -> list[int]:
        """Tokens each text occupies before truncation, special tokens included."""
        texts = self._with_instruction(texts, instruction)
        if not texts:
            return []
        enc = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        return [len(ids) + len(self.special_token_ids) for ids in enc]

    def prepare_batch(
        self,
        queries: Sequence[str],
        responses: Sequence[str] | None = None,
        teacher_embeddings: Any = None,
    ) -> dict[str, torch.Tensor]:
        """Texts -> CPU tensors for ``forward`` (usable in a DataLoader collate / Train worker).

        Keys: ``query_input_ids``, ``query_attention_mask`` (left-padded, special tokens last);
        with responses: ``response_input_ids``, ``response_attention_mask`` (left-padded,
        ending in eos) and ``labels`` (response ids, ``-100`` on padding); with teacher
        embeddings: ``teacher_embeddings`` (B, teacher_dim) float32.
        """
        queries = self._with_instruction(queries, None)
        if not queries:
            raise ValueError("prepare_batch needs at least one query.")
        ids, mask = left_pad(self._query_ids(queries), self.pad_token_id)
        batch = {"query_input_ids": ids, "query_attention_mask": mask}
        if responses is not None:
            responses = self._with_instruction(responses, None)
            if len(responses) != len(queries):
                raise ValueError(
                    f"Got {len(queries)} queries but {len(responses)} responses; pass one "
                    f"response per query."
                )
            r_ids, r_mask = left_pad(self._response_ids(responses), self.pad_token_id)
            batch["response_input_ids"] = r_ids
            batch["response_attention_mask"] = r_mask
            batch["labels"] = torch.where(
                r_mask.bool(), r_ids, torch.full_like(r_ids, IGNORE_INDEX)
            )
        if teacher_embeddings is not None:
            if torch.is_tensor(teacher_embeddings):
                t = teacher_embeddings.detach().to("cpu", torch.float32)
            else:
                t = torch.as_tensor(np.asarray(teacher_embeddings, dtype=np.float32))
            if t.shape != (len(queries), self.dim):
                raise ValueError(
                    f"teacher_embeddings has shape {tuple(t.shape)}, expected "
                    f"({len(queries)}, {self.dim}) = (batch, model.teacher_dim). Check that the "
                    f"data was embedded by the configured teacher ({self.config.teacher!r})."
                )
            batch["teacher_embeddings"] = t
        return batch

    # ------------------------------------------------------------------ model
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Frozen embedding rows for ordinary ids, trainable rows for the special tokens."""
        lookup = self._special_lookup
        in_range = input_ids < lookup.numel()
        special_idx = torch.where(in_range, lookup[input_ids.clamp(max=lookup.numel() - 1)], -1)
        is_special = special_idx >= 0
        base = self.llm.get_input_embeddings()(torch.where(is_special, 0, input_ids))
        rows = self.special_embeddings.to(base.dtype)[special_idx.clamp(min=0)]
        return torch.where(is_special.unsqueeze(-1), rows, base)

    def soft_prompts_from_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Query ids (left-padded, special tokens last) -> soft prompts (B, n_compression, H) f32.

        With gradient (a training step) and ``model.frozen_prefix``, the query prefix runs once
        under ``no_grad`` and only the special tokens run with gradient, attending to the
        prefix's cached keys and values (see ``_hidden_over_frozen_prefix``).
        """
        positions = position_ids_from_mask(attention_mask)
        hidden = None
        if self.config.frozen_prefix and torch.is_grad_enabled():
            hidden = self._hidden_over_frozen_prefix(input_ids, attention_mask, positions)
        if hidden is None:
            hidden = self.llm.base_model(
                inputs_embeds=self.embed_tokens(input_ids),
                attention_mask=attention_mask,
                position_ids=positions,
                use_cache=False,
            ).last_hidden_state
        h = hidden[:, -self.n_compression :].float()
        return self.reconstruction(h)

    def _hidden_over_frozen_prefix(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor | None:
        """Last hidden states of the special tokens, the query prefix computed without gradient.

        Every row ends in the same special tokens, so columns ``[:P]`` are the (left-padded)
        queries and ``[P:]`` the special tokens. Under causal attention the prefix's hidden
        states, keys and values depend on nothing trainable: they are computed once, without
        keeping activations, and the special tokens attend to them as a read-only cache (its
        layers return prefix + new keys without storing them, so a gradient-checkpointing
        recompute sees the same prefix). Returns None where this does not apply (no prefix, a
        batch not laid out that way, a model whose cache is not the plain dynamic one); the
        caller then runs the whole query with gradient.
        """
        from transformers.cache_utils import DynamicCache, DynamicLayer

        n_special = len(self.special_token_ids)
        prefix = input_ids.shape[1] - n_special
        special = torch.tensor(self.special_token_ids, device=input_ids.device)
        if prefix < 1 or not bool((input_ids[:, prefix:] == special).all()):
            return None
        kwarg, read_only_layer = _read_only_cache_parts()
        model = self.llm.base_model
        decoder_layers = [m for m in model.modules() if hasattr(m, "_can_checkpoint_with_cache")]
        if self.config.gradient_checkpointing and not decoder_layers:
            return None  # an older transformers drops any cache under checkpointing
        cache = DynamicCache(config=self.llm.config)
        with torch.no_grad():
            model(inputs_embeds=self.llm.get_input_embeddings()(input_ids[:, :prefix]),
                  attention_mask=attention_mask[:, :prefix], position_ids=positions[:, :prefix],
                  use_cache=True, **{kwarg: cache})
        if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
            return None  # sliding-window or other layer kinds: keep the reference path
        for layer in cache.layers:
            layer.__class__ = read_only_layer
        # The cache is only read, so a checkpointed layer may keep it: its backward replay reads
        # the same prefix (transformers' own switch for read-only caches).
        for m in decoder_layers:
            m._can_checkpoint_with_cache = True
        try:
            return model(
                inputs_embeds=self.embed_tokens(input_ids[:, prefix:]),
                attention_mask=attention_mask,
                position_ids=positions[:, prefix:],
                use_cache=False,
                **{kwarg: cache},
            ).last_hidden_state
        finally:
            for m in decoder_layers:
                del m._can_checkpoint_with_cache  # back to the class's default

    @torch.no_grad()
    def calibrate_heads(
        self,
        queries: Sequence[str],
        *,
        target_mean: torch.Tensor | None = None,
        target_std: float | None = None,
        spread: float = 0.1,
        batch_size: int = 32,
    ) -> dict[str, float]:
        """Data-dependent start for the two heads (their directions stay the seeded random ones).

        The last hidden states of a frozen LLM are ~10x larger than its input embeddings and
        dominated by a few massive dimensions, so with nn.Linear's default init the soft prompts
        start ~8x off the scale the frozen decoder reads, and the embeddings ~12x off the
        teacher's. On ``queries`` (a few dozen training queries) this rescales

        - ``reconstruction`` so its outputs have the spread of the LLM's own token embeddings
          and are centred on their mean row (soft prompts look like token embeddings);
        - ``alignment`` so the embeddings are centred on ``target_mean`` (the teacher targets'
          mean) with ``spread`` x ``target_std`` spread: the first alignment loss is that of the
          mean-vector guess, not 100x it.

        Returns the scale factors applied. Same inputs -> same result on every worker.
        """
        if not queries:
            raise ValueError("calibrate_heads needs at least one query.")
        rows = self.llm.get_input_embeddings().weight.detach().float()
        emb_mean = rows.mean(0).to(self.device)
        emb_spread = (rows - rows.mean(0)).pow(2).sum(-1).mean().sqrt()
        hidden = []
        for _, ids, mask in self._batches(list(queries), batch_size, False, "calibrate"):
            out = self.llm.base_model(
                inputs_embeds=self.embed_tokens(ids), attention_mask=mask,
                position_ids=position_ids_from_mask(mask), use_cache=False,
            )
            hidden.append(out.last_hidden_state[:, -self.n_compression :].float())
        h = torch.cat(hidden).reshape(-1, self.hidden_size)
        r = self.reconstruction
        wx = h @ r.weight.T
        r_scale = float(emb_spread / (wx - wx.mean(0)).pow(2).sum(-1).mean().sqrt().clamp(min=1e-12))
        r.weight.mul_(r_scale)
        r.bias.copy_(emb_mean - r_scale * wx.mean(0))
        soft = self.reconstruction(h).reshape(-1, self.n_compression, self.hidden_size)
        a = self.alignment
        emb = (soft @ a.weight.T).mean(1)
        spread_now = (emb - emb.mean(0)).pow(2).sum(-1).mean().sqrt().clamp(min=1e-12)
        goal = spread * (target_std if target_std is not None else 1.0 / np.sqrt(self.dim))
        a_scale = float(goal * np.sqrt(self.dim) / spread_now)
        a.weight.mul_(a_scale)
        mean = target_mean.to(self.device).float() if target_mean is not None else 0.0
        a.bias.copy_(mean - a_scale * emb.mean(0))
        return {"reconstruction_scale": r_scale, "alignment_scale": a_scale}

    def embed_soft_prompts(self, soft_prompts: torch.Tensor) -> torch.Tensor:
        """Soft prompts (B, K, H) -> embeddings (B, teacher_dim): mean of alignment outputs."""
        return self.alignment(soft_prompts).mean(dim=1)

    def reconstruction_logits(
        self,
        soft_prompts: torch.Tensor,
        response_input_ids: torch.Tensor,
        response_attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (B, R, V) of the frozen LLM over ``[soft prompts][response]``; column j predicts
        response slot j (aligned with ``labels``)."""
        r = response_input_ids.shape[1]
        embeds, mask = interleave_soft_prompts(
            self.llm.get_input_embeddings()(response_input_ids),
            response_attention_mask,
            soft_prompts.to(self.llm_dtype),
        )
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=False,
            logits_to_keep=r + 1,  # the last soft prompt .. the token before the last one
        )
        return out.logits[:, :-1]

    def forward(
        self,
        batch: Mapping[str, torch.Tensor],
        *,
        recon_weight: float = 1.0,
        align_weight: float = 1.0,
        align_loss: str = "mse",
        target_stats: TargetStats | None = None,
    ) -> L2VGOutput:
        """A batch from ``prepare_batch`` (any device) -> losses by name and embeddings.

        A term whose weight is 0 is not computed at all (no decoder pass for
        ``recon_weight=0``) and comes back as None. ``align_loss`` names one of
        ``ALIGNMENT_LOSSES``; the scaled kinds need ``target_stats``.
        """
        if "query_input_ids" not in batch or "query_attention_mask" not in batch:
            raise ValueError(
                f"batch needs query_input_ids and query_attention_mask (from prepare_batch); "
                f"got keys {sorted(batch)}."
            )
        dev = self.device
        b = {k: v.to(dev, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
        soft = self.soft_prompts_from_ids(b["query_input_ids"], b["query_attention_mask"])
        emb = self.embed_soft_prompts(soft)
        recon = align = None
        n_tokens = torch.zeros((), dtype=torch.long, device=dev)
        if "labels" in b and recon_weight != 0:
            logits = self.reconstruction_logits(
                soft, b["response_input_ids"], b["response_attention_mask"]
            )
            recon = reconstruction_loss(logits, b["labels"])
            n_tokens = (b["labels"] != IGNORE_INDEX).sum()
        if "teacher_embeddings" in b and align_weight != 0:
            align = alignment_loss(
                emb, b["teacher_embeddings"], kind=align_loss, stats=target_stats
            )
        terms = combine_losses(recon, align, recon_weight=recon_weight, align_weight=align_weight)
        return L2VGOutput(
            loss=terms["loss"],
            recon_loss=terms["recon_loss"],
            align_loss=terms["align_loss"],
            embeddings=emb,
            n_response_tokens=n_tokens,
        )

    # ------------------------------------------------------------------ inference
    def _batches(self, texts: list[str], batch_size: int, show_progress: bool, desc: str):
        """Yield (indices, ids, mask) in length-sorted batches (less padding, same results)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        ids = self._query_ids(texts)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        starts = range(0, len(order), batch_size)
        if show_progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=desc, unit="batch")
        for s in starts:
            idx = order[s : s + batch_size]
            t_ids, t_mask = left_pad([ids[i] for i in idx], self.pad_token_id)
            yield idx, t_ids.to(self.device), t_mask.to(self.device)

    @torch.inference_mode()
    def soft_prompts(
        self, texts: Sequence[str], *, instruction: str | None = None, batch_size: int = 32
    ) -> torch.Tensor:
        """Texts -> soft prompts (N, n_compression, H), float32, on the model's device."""
        texts = self._with_instruction(texts, instruction)
        out = torch.empty(len(texts), self.n_compression, self.hidden_size, device=self.device)
        for idx, ids, mask in self._batches(texts, batch_size, False, "soft prompts"):
            out[torch.tensor(idx, device=self.device)] = self.soft_prompts_from_ids(ids, mask)
        return out

    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str],
        *,
        instruction: str | None = None,
        batch_size: int = 32,
        normalize: bool = False,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Texts -> float32 array (N, teacher_dim); ``instruction`` is prefixed to every text."""
        texts = self._with_instruction(texts, instruction)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for idx, ids, mask in self._batches(texts, batch_size, show_progress, "encode"):
            emb = self.embed_soft_prompts(self.soft_prompts_from_ids(ids, mask))
            out[idx] = emb.float().cpu().numpy()
        if normalize and len(out):
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    @torch.inference_mode()
    def decode(
        self,
        texts: Sequence[str] | torch.Tensor,
        *,
        instruction: str | None = None,
        max_new_tokens: int = 64,
        batch_size: int = 32,
    ) -> list[str]:
        """Greedy generation by the frozen LLM from the soft prompts alone.

        ``texts``: queries (special tokens are appended as in training), or precomputed soft
        prompts of shape (N, n_compression, H) from ``soft_prompts``.
        """
        if not self.decodable:
            raise ValueError(f"{self.name!r} cannot decode: {NOT_DECODABLE}")
        if torch.is_tensor(texts):
            soft = texts.to(self.device, torch.float32)
            if soft.dim() == 2:
                soft = soft.unsqueeze(0)
            if soft.dim() != 3 or soft.shape[-1] != self.hidden_size:
                raise ValueError(
                    f"Soft prompts must have shape (N, K, {self.hidden_size}); got "
                    f"{tuple(texts.shape)}."
                )
        else:
            soft = self.soft_prompts(texts, instruction=instruction, batch_size=batch_size)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        outputs: list[str] = []
        for s in range(0, soft.shape[0], batch_size):
            chunk = soft[s : s + batch_size].to(self.llm_dtype)
            mask = torch.ones(chunk.shape[:2], dtype=torch.long, device=self.device)
            gen = self.llm.generate(
                inputs_embeds=chunk,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id,
            )
            # With inputs_embeds only, generate returns just the new tokens.
            outputs.extend(self.tokenizer.batch_decode(gen, skip_special_tokens=True))
        return outputs

    @property
    def decodable(self) -> bool:
        """False when it was trained without the reconstruction term (``train.recon_weight=0``)."""
        return not (self.objective is not None and self.objective.get("recon_weight") == 0)

    def fingerprint(self) -> str:
        """Hash of the trainable state, base model spec, token counts and numerics."""
        return state_fingerprint(self.config, self.dim, self.trainable_state_dict())


def state_fingerprint(config: ModelConfig, dim: int, state: Mapping[str, torch.Tensor]) -> str:
    """``L2VGEncoder.fingerprint`` from its parts: the model config, the embedding size and the
    trainable tensors (in ``trainable_state_dict`` order)."""
    c = config
    h = hashlib.sha256()
    h.update(repr((FORMAT_VERSION, c.llm, c.n_thought, c.n_compression, c.dtype, c.max_length,
                   int(dim))).encode())
    for k, v in state.items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class SavedEncoderInfo:
    """What a saved encoder folder says about itself without loading its LLM."""

    name: str
    dim: int
    fingerprint: str


# The keys of ``L2VGEncoder.trainable_state_dict``, in its order (the fingerprint's order).
TRAINABLE_KEYS = ("special_embeddings", "reconstruction.weight", "reconstruction.bias",
                  "alignment.weight", "alignment.bias")


def saved_encoder_info(path: str | os.PathLike, *, max_length: int | None = None) -> SavedEncoderInfo:
    """Name, embedding size and fingerprint of a folder written by ``L2VGEncoder.save``, read from
    its two small files (the base LLM is not loaded): equal to ``L2VGEncoder.load(path)``'s
    (after ``set_max_length(max_length)``), so an embedding cache can be consulted first."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_saved_meta(path)
    cfg = as_model_config(meta["model"])
    if max_length is not None:
        cfg = dataclasses.replace(cfg, max_length=int(max_length))
    raw = load_file(str(path / TRAINABLE_FILE))
    state = {k: raw[k] for k in TRAINABLE_KEYS}
    return SavedEncoderInfo(name=meta.get("name") or default_name(cfg.llm), dim=int(cfg.teacher_dim),
                            fingerprint=state_fingerprint(cfg, cfg.teacher_dim, state))


NOT_DECODABLE = ("it was trained without the reconstruction term (train.recon_weight=0), so its "
                 "soft prompts were never trained to be decoded. Decode an encoder trained with "
                 "train.recon_weight > 0; its embeddings work as they are.")


def can_decode(encoder: Any) -> bool:
    """Whether ``encoder`` (a loaded text encoder of any kind) decodes embeddings to text."""
    return callable(getattr(encoder, "decode", None)) and bool(getattr(encoder, "decodable", True))


def read_saved_meta(path: Path) -> dict[str, Any]:
    """The ``l2vg_config.json`` of a folder written by ``L2VGEncoder.save``, its version checked."""
    cfg_file = path / ENCODER_CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} holds no {ENCODER_CONFIG_FILE}: not an encoder folder written by "
            f"L2VGEncoder.save (pass the `final` or a checkpoint folder)."
        )
    meta = json.loads(cfg_file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{cfg_file} has format_version {meta.get('format_version')!r}; this code reads "
            f"version {FORMAT_VERSION}. Re-save it with a matching l2vg-ray version."
        )
    return meta


def default_name(llm: str) -> str:
    """An encoder's name when its folder names none: ``l2vg-<the LLM's last path part>``."""
    return f"l2vg-{Path(str(llm)).name}"


def teacher_dimension(spec: str, *, cache_dir: str | os.PathLike | None = None) -> int:
    """The embedding size of a sentence-transformers teacher (loads it once, on CPU)."""
    from sentence_transformers import SentenceTransformer

    from l2vg_ray.models import resolve_model

    model = SentenceTransformer(resolve_model(spec, cache_dir=cache_dir), device="cpu")
    dim = model.get_embedding_dimension()
    if not dim:
        raise ValueError(
            f"Could not read the embedding size of teacher {spec!r}; set model.teacher_dim."
        )
    return int(dim)
