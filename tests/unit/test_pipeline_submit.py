"""`l2vg submit`: entrypoint, runtime_env and address resolution (no cluster needed)."""

from __future__ import annotations

import shlex
import socket
from pathlib import Path

import pytest

from l2vg_ray import submit
from l2vg_ray.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def test_entrypoint_runs_the_stage_script_with_a_repo_relative_config():
    cmd = submit.build_entrypoint(
        "eval",
        config_path=str(REPO / "configs" / "quickstart.yaml"),
        overrides=["eval.model=teacher", "name=with space"],
        working_dir=REPO,
    )
    argv = shlex.split(cmd)
    assert argv == [
        "python", "jobs/evaluate.py", "--config", "configs/quickstart.yaml",
        "eval.model=teacher", "name=with space",
    ]
    for stage, script in submit.JOB_SCRIPTS.items():
        assert (REPO / script).is_file(), f"{stage}: {script} missing"


def test_config_outside_the_working_dir_is_passed_by_absolute_path(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("name: x\n")
    assert submit.job_config_path(str(cfg), REPO) == str(cfg)


def test_unknown_stage_is_a_config_error():
    with pytest.raises(ConfigError, match="pipeline"):
        submit.build_entrypoint("deploy", config_path=None, overrides=[], working_dir=REPO)


def test_runtime_env_uploads_the_repo_and_uses_pip_only_when_listed():
    cfg = load_config(None, ["cluster.env_vars.HF_HUB_OFFLINE=1"])
    env = submit.build_runtime_env(cfg, REPO)
    assert env["working_dir"] == str(REPO)
    assert {".venv", ".git", "outputs"} <= set(env["excludes"])
    assert env["env_vars"] == {"HF_HUB_OFFLINE": "1"}
    assert "pip" not in env  # the image's (or this machine's) environment is used as is
    cfg = load_config(None, ["cluster.pip=[vllm>=0.8,l2vg-ray]"])
    assert submit.build_runtime_env(cfg, REPO)["pip"] == ["vllm>=0.8", "l2vg-ray"]


def test_runtime_env_needs_the_repository(tmp_path):
    with pytest.raises(ConfigError, match="jobs/"):
        submit.build_runtime_env(load_config(None, []), tmp_path)


def test_address_precedence(monkeypatch):
    default = load_config(None, [])
    configured = load_config(None, ["cluster.dashboard_address=http://head:8265"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert submit.resolve_address(None, default) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://env-head:8265")
    assert submit.resolve_address(None, default) == "http://env-head:8265"
    assert submit.resolve_address(None, configured) == "http://head:8265"
    assert submit.resolve_address("http://flag:8265", configured) == "http://flag:8265"


def test_unreachable_dashboard_returns_an_error_code(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = submit.submit(
        "pipeline",
        config_path=str(REPO / "configs" / "quickstart.yaml"),
        overrides=[],
        address=f"http://127.0.0.1:{port}",
        working_dir=REPO,
    )
    assert code == 2
    assert "--address" in capsys.readouterr().err


def test_a_typo_fails_before_anything_is_submitted():
    with pytest.raises(ConfigError, match="trian"):
        submit.submit("train", config_path=None, overrides=["trian.lr=1"], address="http://x:1")
