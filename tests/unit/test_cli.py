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
