"""Published LLM2Vec-Gen checkpoints (``McGill-NLP/LLM2Vec-Gen-*``) as an ``L2VGEncoder``.

The official code saves a trained model as a folder (or hub repo) holding

    run_config.yml               the run's arguments: model_name_or_path, torch_dtype,
                                 special_tokens, encoding_mode (``last_<N>_tokens``), ...
    encoder_decoder_config.json  encoding_mode, save_decoder
    encoder/                     a PEFT ``TrainableTokens`` adapter on the base model's embedding
                                 matrix (adapter_config.json with token_indices,
                                 adapter_model.safetensors with the rows' new values)
    reconstruction_mlp           torch.save({"state_dict", "config"}) of a Linear H -> H
    alignment_mlp                the same for the Linear H -> teacher_dim
    tokenizer files              the base tokenizer plus the special tokens

That is exactly this project's trainable state in another layout: the special tokens' rows
(``N`` of them, the last ``n_compression`` being the ``last_<n>_tokens`` that are read out),
the reconstruction head and the alignment head on the same frozen LLM. ``load_official`` reads
the files and builds an ``L2VGEncoder`` on the base model, so ``encode``, ``decode``, ``l2vg
eval`` and ``l2vg serve`` work on published weights unchanged. Differences that remain are
documented in docs/paper.md (position ids here do not depend on the padding).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

RUN_CONFIG = "run_config.yml"
ENC_DEC_CONFIG = "encoder_decoder_config.json"
ENCODER_DIR = "encoder"
HEADS = ("reconstruction_mlp", "alignment_mlp")
_DELTA_KEY = "trainable_tokens_delta"
_LAST_N = re.compile(r"^last_(\d+)_tokens$")


class _RunConfigLoader(yaml.SafeLoader):
    """Reads run_config.yml, whose dump holds ``!!python/object/apply`` tags (enums, dtypes):
    a tagged scalar is read as its text, a tagged sequence as its first item."""


def _python_tag(loader: yaml.Loader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        values = loader.construct_sequence(node, deep=True)
        return values[0] if values else None
    return None


_RunConfigLoader.add_multi_constructor("tag:yaml.org,2002:python/", _python_tag)


def is_official_layout(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / RUN_CONFIG).is_file() and (folder / ENCODER_DIR).is_dir()


def fetch_official(spec: str) -> Path:
    """A local folder in the official layout, or ``hf:OWNER/NAME`` downloaded from the hub."""
    if spec.startswith("hf:"):
        repo = spec[3:]
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo_id=repo))
        except Exception as e:  # offline, gated, missing: many exception types
            raise RuntimeError(
                f"Could not download the published checkpoint {repo!r} ({type(e).__name__}: "
                f"{str(e)[:200]}). It needs the Hugging Face hub (unset HF_HUB_OFFLINE) or a "
                f"local copy: pass its folder instead."
            ) from e
    folder = Path(spec).expanduser()
    if not is_official_layout(folder):
        raise ValueError(
            f"{spec!r} is not a published LLM2Vec-Gen checkpoint: it needs {RUN_CONFIG} and an "
            f"{ENCODER_DIR}/ adapter folder."
        )
    return folder


def read_run_config(folder: Path) -> dict[str, Any]:
    data = yaml.load((folder / RUN_CONFIG).read_text(), Loader=_RunConfigLoader) or {}
    if not isinstance(data, dict) or "model_name_or_path" not in data:
        raise ValueError(f"{folder / RUN_CONFIG} names no model_name_or_path.")
    return data


def _encoding_mode(folder: Path, run: dict[str, Any]) -> str:
    mode = run.get("encoding_mode", "last_10_tokens")
    if (folder / ENC_DEC_CONFIG).is_file():
        mode = json.loads((folder / ENC_DEC_CONFIG).read_text()).get("encoding_mode", mode)
    return str(mode)


def _load_head(path: Path) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint has no {path.name}.")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    conf = payload.get("config", {})
    if conf.get("pooling_mode", "linear") != "linear" or int(conf.get("size", 1)) != 1:
        raise ValueError(
            f"{path.name} is a {conf.get('pooling_mode')!r} projection of size {conf.get('size')}; "
            f"only the plain Linear heads of the paper's models (pooling_mode linear, size 1) load."
        )
    sd = payload["state_dict"]
    return {"weight": sd["projection.weight"].float(), "bias": sd["projection.bias"].float()}


def _special_rows(folder: Path, n_tokens: int):
    from safetensors.torch import load_file

    adapter = folder / ENCODER_DIR
    conf = json.loads((adapter / "adapter_config.json").read_text())
    indices = list(conf.get("token_indices") or [])
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    keys = [k for k in weights if _DELTA_KEY in k]
    if len(keys) != 1:
        raise ValueError(
            f"{adapter} holds {len(keys)} tensors named *{_DELTA_KEY}* ({keys}); expected the one "
            f"TrainableTokens adapter of the encoder's embedding matrix."
        )
    rows = weights[keys[0]].float()
    if rows.shape[0] != n_tokens or (indices and len(indices) != n_tokens):
        raise ValueError(
            f"{adapter} trains {rows.shape[0]} token rows (indices {indices}) but run_config.yml "
            f"lists {n_tokens} special tokens."
        )
    return rows


def load_official(
    spec: str,
    *,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    llm: str | None = None,
):
    """An ``L2VGEncoder`` with the published trainable state of ``spec`` (folder or ``hf:``).

    ``llm`` overrides the base model named in run_config.yml (e.g. a local copy of it).
    """
    from l2vg_ray.config import ModelConfig
    from l2vg_ray.method.model import L2VGEncoder

    folder = fetch_official(spec)
    run = read_run_config(folder)
    special = list(run.get("special_tokens") or [])
    m = _LAST_N.match(_encoding_mode(folder, run))
    if not special or m is None:
        raise ValueError(
            f"{folder / RUN_CONFIG}: special_tokens={special!r}, encoding_mode="
            f"{_encoding_mode(folder, run)!r}; expected a list of tokens and last_<N>_tokens."
        )
    n_compression = int(m.group(1))
    if n_compression > len(special):
        raise ValueError(
            f"encoding_mode reads the last {n_compression} tokens but only {len(special)} exist."
        )
    rows = _special_rows(folder, len(special))
    recon, align = (_load_head(folder / name) for name in HEADS)
    dtype = str(run.get("torch_dtype") or "bfloat16").replace("torch.", "")
    cfg = ModelConfig(
        llm=llm or str(run["model_name_or_path"]),
        teacher=str(run.get("pretrained_teacher_path") or "unknown"),
        teacher_dim=int(align["weight"].shape[0]),
        n_thought=len(special) - n_compression,
        n_compression=n_compression,
        max_length=int(run.get("max_input_length") or 512),
        max_response_length=int(run.get("max_input_length") or 512),
        dtype=dtype if dtype in ("float32", "bfloat16", "float16") else "bfloat16",
    )
    enc = L2VGEncoder.from_config(cfg, cache_dir=cache_dir, device=device, teacher_dim=cfg.teacher_dim)
    enc.load_trainable_state_dict({
        "special_embeddings": rows,
        "reconstruction.weight": recon["weight"],
        "reconstruction.bias": recon["bias"],
        "alignment.weight": align["weight"],
        "alignment.bias": align["bias"],
    })
    enc.name = f"llm2vec-gen:{spec}"
    return enc
