"""Every config key that README.md, docs/ and configs/ name exists in ``l2vg_ray.config``."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

from l2vg_ray.config import load_config

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("model", "generate", "teacher", "train", "eval", "serve", "embed", "cluster")
FREE_FORM = ("cluster.env_vars.", "generate.chat_template_kwargs.", "generate.engine_kwargs.",
             "eval.resources_per_task.", "serve.resources.")
# `section.key` inside backticks, optionally followed by =value or : value.
KEY = re.compile(r"`((?:{})(?:\.[a-z_][a-z0-9_]*)+)(?:[=:][^`]*)?`".format("|".join(SECTIONS)))
# In a stage's part of docs/stages.md, a bare `key: value` / `key=value` is that section's key.
BARE = re.compile(r"`([a-z_][a-z0-9_]*)(?:: |=)[^`]*`")
FILES = (".py", ".md", ".yaml", ".json", ".csv", ".png")


def named_keys() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
                 REPO / "cluster" / "README.md"]:
        if not path.is_file():
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for m in KEY.finditer(line):
                if not m.group(1).endswith(FILES):
                    found.setdefault(m.group(1), []).append(f"{path.relative_to(REPO)}:{n}")
    return found


def bare_stage_keys() -> dict[str, list[str]]:
    """`key: value` written in a stage's section of docs/stages.md, as section.key."""
    found: dict[str, list[str]] = {}
    section = None
    path = REPO / "docs" / "stages.md"
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("## "):
            word = line[3:].split()[0]
            section = word if word in SECTIONS else None
        elif section:
            for m in BARE.finditer(line):
                found.setdefault(f"{section}.{m.group(1)}", []).append(f"docs/stages.md:{n}")
    return found


def test_the_docs_name_keys_at_all():
    keys = named_keys()
    assert len(keys) > 40 and "eval.strict_data" in keys and "model.frozen_prefix" in keys


def test_every_key_the_docs_name_exists():
    cfg = load_config(None)
    missing = {}
    for key, where in {**bare_stage_keys(), **named_keys()}.items():
        if key.startswith(FREE_FORM):
            continue
        if OmegaConf.select(cfg, key, default="<missing>") == "<missing>":
            missing[key] = where
    assert not missing, f"keys the docs name that the config does not have: {missing}"
