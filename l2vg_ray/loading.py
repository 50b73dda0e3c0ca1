"""``load_encoder(spec, cfg)``: every way to name an encoder, resolved in one place.

It sits above the method (`l2vg_ray.method`), the text encoders and baselines and the
published-checkpoint reader (it imports all of
them), so none of those imports it back.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from l2vg_ray.text_encoders import BASELINES, ENCODER_CONFIG_FILE, TextEncoder

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from l2vg_ray.config import L2VGConfig


def _register_builtin_baselines() -> None:
    # teacher / mean-pool / last-token register when l2vg_ray.text_encoders is imported;
    # generate-then-encode lives with the generation backends, imported when first needed.
    import l2vg_ray.generate.baseline  # noqa: F401  (registers into BASELINES)


def saved_encoder_folder(spec: str, cfg: DictConfig | L2VGConfig) -> Path | None:
    """The folder of an encoder saved by ``l2vg train`` that ``spec`` names (the folder itself or
    a packaged encoder name, materialised once), or None when ``spec`` names something else."""
    from l2vg_ray.config import typed
    from l2vg_ray.models import PACKAGED_MODELS, resolve_model

    spec = str(spec)
    if spec in PACKAGED_MODELS and PACKAGED_MODELS.get(spec).kind == "l2vg-encoder":
        spec = resolve_model(spec, cache_dir=typed(cfg).cache_dir)
    path = Path(spec).expanduser()
    return path if (path / ENCODER_CONFIG_FILE).is_file() else None


def load_encoder(
    spec: str, cfg: DictConfig | L2VGConfig, *, device: str | None = None,
    max_length: int | None = None,
) -> TextEncoder:
    """An encoder by spec -> TextEncoder. A spec is

    - a trained encoder folder (with ``l2vg_config.json``, written by ``l2vg train``);
    - a packaged encoder name (``l2vg-smollm2-135m-laptop``: trained state shipped in the package);
    - a published LLM2Vec-Gen checkpoint: its folder, or ``hf:McGill-NLP/LLM2Vec-Gen-Qwen3-8B``;
    - a baseline name (``BASELINES``).

    ``max_length`` (input tokens per text; None = the encoder's own) overrides the trained
    encoder's ``model.max_length`` and the pooled-LLM baselines'.
    """
    from l2vg_ray.config import typed

    cfg = typed(cfg)
    spec = str(spec)
    saved = saved_encoder_folder(spec, cfg)
    if saved is not None:
        from l2vg_ray.method import L2VGEncoder

        encoder = L2VGEncoder.load(saved, cache_dir=cfg.cache_dir, device=device)
        if max_length is not None:
            encoder.set_max_length(max_length)
        return encoder
    from l2vg_ray.method.official import is_official_layout, load_official

    path = Path(spec).expanduser()
    if spec.startswith("hf:") or is_official_layout(path):
        encoder = load_official(spec, cache_dir=cfg.cache_dir, device=device)
        if max_length is not None:
            encoder.set_max_length(max_length)
        return encoder
    if path.exists():
        raise ValueError(
            f"{str(path)!r} exists but holds no {ENCODER_CONFIG_FILE}: it is not a trained "
            f"encoder folder. Pass the `final` folder written by `l2vg train`, or a published "
            f"LLM2Vec-Gen checkpoint folder (run_config.yml + encoder/)."
        )
    _register_builtin_baselines()  # idempotent: a module is imported once
    if max_length is not None:
        cfg = replace(cfg, model=replace(cfg.model, max_length=int(max_length)))
    return BASELINES.get(str(spec))(cfg, cfg.cache_dir)
