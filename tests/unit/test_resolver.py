from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest

from l2vg_ray.models import PACKAGED_MODELS, resolve_model
from l2vg_ray.models.resolver import PACKAGED_ENCODERS, READY_MARKER, PackagedModel


def test_hub_ids_pass_through_unchanged():
    assert resolve_model("Qwen/Qwen3-4B") == "Qwen/Qwen3-4B"
    assert resolve_model("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    assert resolve_model("hf:gpt2") == "gpt2"


def test_local_path_passes_through(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as e:
        resolve_model("smollm-135m")
    msg = str(e.value)
    assert "smollm2-135m-instruct" in msg and "all-minilm-l6-v2" in msg and "hf:" in msg


def test_missing_local_path_is_clear():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model("./no/such/model")


@pytest.mark.parametrize("bad", ["", "   ", None])
def test_empty_spec(bad):
    with pytest.raises(ValueError, match="non-empty"):
        resolve_model(bad)


def test_teacher_resolves_to_sentence_transformers_folder():
    path = Path(resolve_model("all-minilm-l6-v2"))
    assert (path / "modules.json").is_file() or (path / "config.json").is_file()


def test_smollm2_materialises_a_loadable_folder_with_chat_template():
    from transformers import AutoConfig, AutoTokenizer

    path = Path(resolve_model("smollm2-135m-instruct"))
    assert (path / READY_MARKER).is_file()
    assert AutoConfig.from_pretrained(path).model_type == "llama"
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "Hi" in text and text.rstrip().endswith("assistant")
    assert resolve_model("smollm2-135m-instruct") == str(path)  # second call: cached


# A fake packaged model whose conversion is slow, to race concurrent converters.
def _slow_materialize(out_dir: Path) -> None:
    (out_dir / "part1").write_text("a" * 1000)
    time.sleep(0.5)
    (out_dir / "part2").write_text("b" * 1000)
    counter = out_dir.parent / "conversions.log"
    with counter.open("a") as f:
        f.write("x\n")


def _resolve_fake(cache_dir: str, q) -> None:
    if "fake-slow" not in PACKAGED_MODELS:
        PACKAGED_MODELS.add(
            "fake-slow",
            PackagedModel("fake-slow", "causal-lm", "fake==0", "n/a", _slow_materialize),
        )
    path = Path(resolve_model("fake-slow", cache_dir=cache_dir))
    q.put(((path / "part1").read_text() == "a" * 1000, (path / "part2").is_file(), str(path)))


def test_concurrent_converters_do_not_corrupt_each_other(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_resolve_fake, args=(str(tmp_path), q)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    results = [q.get(timeout=5) for _ in procs]
    assert all(r[0] and r[1] for r in results), results
    assert len({r[2] for r in results}) == 1
    # The lock made exactly one process convert; the others waited and reused it.
    assert (tmp_path / "models" / "conversions.log").read_text().count("x") == 1
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".fake-slow.")]
    assert leftovers == [".fake-slow.lock"] or leftovers == []


@pytest.mark.parametrize("name", sorted(PACKAGED_ENCODERS))
def test_packaged_encoder_recipe_matches_its_config(name):
    """Each shipped student's recipe.json names the config that trained it, and that config still
    gives the recipe's generate and train hashes: editing a training value in the YAML without
    retraining and re-shipping the student fails here."""
    import json

    from l2vg_ray.models.resolver import packaged_encoder_dir
    from l2vg_ray.pipeline import config_file_hashes

    recipe = json.loads((packaged_encoder_dir(name) / "recipe.json").read_text())
    config = PACKAGED_ENCODERS[name]
    assert recipe["config"] == config
    now = config_file_hashes(str(Path(__file__).resolve().parents[2] / config))
    assert {s: recipe["config_hashes"][s] for s in ("generate", "train")} == {
        s: now[s] for s in ("generate", "train")
    }, f"{config} no longer trains {name}: retrain it (bench/ship_encoder.py) or revert the edit"
