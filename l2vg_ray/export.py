"""``l2vg export``: a trained encoder as a sentence-transformers model folder.

    SentenceTransformer(folder, trust_remote_code=True).encode(texts, prompt_name="STSBenchmark")

equals ``L2VGEncoder.encode(texts, instruction=...)`` (tested to 1e-5). The folder holds

    modules.json, config_sentence_transformers.json   the pipeline and the task prompts
    modeling_l2vg.py, l2vg_module.json                the custom module (self-contained code)
    l2vg_trainable.safetensors                        special tokens + the two heads (~2 MB)
    llm/                                              the frozen LLM and its tokenizer
    l2vg_config.json, trainable.safetensors           the same encoder for l2vg-ray itself
    README.md                                         a model card: config, data, scores

``--push-to-hub REPO`` uploads the folder with ``huggingface_hub`` (needs hub access).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from l2vg_ray.method.model import TRAINABLE_FILE, L2VGEncoder
from l2vg_ray.text_encoders import ENCODER_CONFIG_FILE

MODULE_FILE = "modeling_l2vg.py"
MODULE_CLASS = "modeling_l2vg.L2VGModule"


def _module_source() -> Path:
    return Path(__file__).resolve().parent / "resources" / "sentence_transformers" / MODULE_FILE


def task_prompts(instructions: Any) -> dict[str, str]:
    """sentence-transformers prompts (prepended as-is) from an InstructionSet: one per task name,
    one per task type, and ``document`` for corpora. The encoder joins "instruction text" with a
    space, so each prompt ends with one."""
    prompts = {}
    for table in (instructions.by_type, instructions.by_task):
        for name, text in table.items():
            if text:
                prompts[str(name)] = f"{str(text).rstrip()} "
    if instructions.document:
        prompts["document"] = f"{instructions.document.rstrip()} "
    return prompts


def model_card(encoder: L2VGEncoder, *, name: str, recipe: dict | None, prompts: dict) -> str:
    c = encoder.config
    # The teacher its targets came from: the recipe's data provenance (the generated data's
    # manifest) where there is one; model.teacher is only a label for teacher kinds that do not
    # read it (a mean-pooled-LLM teacher is the frozen LLM itself).
    teacher = ((recipe or {}).get("data") or {}).get("teacher_model") or c.teacher
    lines = [
        "---", "library_name: sentence-transformers", "tags: [sentence-transformers, llm2vec-gen]",
        "---", "", f"# {name}", "",
        "An LLM2Vec-Gen encoder (Generative Embeddings from Large Language Models, arXiv "
        "2603.10913) trained with [l2vg-ray](https://github.com/): a frozen decoder LLM whose "
        "trained special tokens and two linear heads map a text to an embedding of the LLM's "
        "own response to it.", "",
        "```python", "from sentence_transformers import SentenceTransformer",
        f"model = SentenceTransformer('{name}', trust_remote_code=True)",
        "emb = model.encode(['Why is the sky blue?'], prompt_name='STS')", "```", "",
        "| setting | value |", "|---|---|",
        f"| frozen LLM | `{c.llm}` |", f"| teacher | `{teacher}` ({encoder.dim} dims) |",
        f"| special tokens | {c.n_thought} thought + {c.n_compression} compression |",
        f"| max length | {c.max_length} tokens |", f"| fingerprint | `{encoder.fingerprint()}` |",
        f"| prompts | {', '.join(sorted(prompts)) or 'none'} |",
    ]
    if recipe:
        suite = recipe.get("offline_suite") or {}
        lines += ["", "## Training", "", f"Config `{recipe.get('config')}` "
                  f"(config hashes {recipe.get('config_hashes')}).", "",
                  "```json", json.dumps(recipe.get("data"), indent=2, default=str), "```"]
        if suite.get("scores"):
            lines += ["", f"## Offline suite (max_docs={suite.get('max_docs')})", "",
                      "| task | score |", "|---|---|"]
            lines += [f"| {t} | {s:.4f} |" for t, s in suite["scores"].items() if s is not None]
            if suite.get("mean_main_score") is not None:
                lines.append(f"| **mean** | **{suite['mean_main_score']:.4f}** |")
    return "\n".join(lines) + "\n"


def export_sentence_transformers(
    encoder: L2VGEncoder,
    out_dir: str | Path,
    *,
    llm_dir: str | Path,
    instructions: Any,
    name: str,
    recipe: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the sentence-transformers folder of ``encoder`` to ``out_dir`` (see module doc)."""
    from importlib.metadata import version

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out} exists and is not empty; pick another folder or pass --overwrite."
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".export-tmp"
    encoder.save(tmp)  # l2vg_config.json + trainable.safetensors (l2vg-ray's own format)
    for f in (ENCODER_CONFIG_FILE, TRAINABLE_FILE):
        shutil.move(str(tmp / f), out / f)
    tmp.rmdir()
    shutil.copytree(llm_dir, out / "llm", ignore=shutil.ignore_patterns(".*"))
    shutil.copy2(_module_source(), out / MODULE_FILE)
    from safetensors.torch import save_file

    state = {
        "special_embeddings": encoder.special_embeddings.detach().float().cpu().contiguous(),
        "reconstruction.weight": encoder.reconstruction.weight.detach().float().cpu().contiguous(),
        "reconstruction.bias": encoder.reconstruction.bias.detach().float().cpu().contiguous(),
        "alignment.weight": encoder.alignment.weight.detach().float().cpu().contiguous(),
        "alignment.bias": encoder.alignment.bias.detach().float().cpu().contiguous(),
    }
    save_file(state, str(out / "l2vg_trainable.safetensors"))
    c = encoder.config
    (out / "l2vg_module.json").write_text(json.dumps({
        "n_thought": c.n_thought, "n_compression": c.n_compression, "max_length": c.max_length,
        "teacher_dim": encoder.dim, "dtype": c.dtype}, indent=2))
    (out / "modules.json").write_text(json.dumps(
        [{"idx": 0, "name": "0", "path": "", "type": MODULE_CLASS}], indent=2))
    prompts = task_prompts(instructions)
    (out / "config_sentence_transformers.json").write_text(json.dumps({
        "__version__": {"sentence_transformers": version("sentence-transformers"),
                        "transformers": version("transformers"), "pytorch": version("torch"),
                        "l2vg_ray": version("l2vg-ray")},
        "model_type": "SentenceTransformer",
        "prompts": prompts,
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }, indent=2))
    (out / "README.md").write_text(model_card(encoder, name=name, recipe=recipe, prompts=prompts))
    return out


def push_to_hub(folder: str | Path, repo: str) -> str:
    """Upload an exported folder to the Hugging Face hub (needs network access and a token)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo)
    return f"https://huggingface.co/{repo}"
