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
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address is not a dashboard
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


class FakeClient:
    """Stands in for ray.job_submission.JobSubmissionClient (records what submit sends)."""

    statuses: list[str] = []

    def __init__(self, address):
        self.address = address
        self.submitted: dict = {}
        FakeClient.last = self

    def submit_job(self, **kwargs):
        self.submitted = kwargs
        return "raysubmit_fake"

    async def tail_job_logs(self, job_id):
        for line in ("stage 1\n", "stage 2\n"):
            yield line

    def get_job_status(self, job_id):
        from ray.job_submission import JobStatus

        return JobStatus(FakeClient.statuses.pop(0))

    def get_job_info(self, job_id):
        from types import SimpleNamespace

        return SimpleNamespace(message="done")


@pytest.mark.parametrize(
    ("statuses", "code"), [(["RUNNING", "SUCCEEDED"], 0), (["FAILED"], 1), (["STOPPED"], 1)]
)
def test_wait_follows_logs_and_maps_the_final_status(monkeypatch, capsys, statuses, code):
    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    monkeypatch.setattr(submit.time, "sleep", lambda s: None)
    FakeClient.statuses = list(statuses)
    rc = submit.submit("train", config_path=None, overrides=["train.lr=1e-4"],
                       address="http://head:8265", working_dir=REPO)
    assert rc == code
    out = capsys.readouterr().out
    assert "stage 1\nstage 2\n" in out and "raysubmit_fake" in out
    sent = FakeClient.last.submitted
    assert sent["entrypoint"] == "python jobs/train.py train.lr=1e-4"
    assert sent["runtime_env"]["working_dir"] == str(REPO)


def test_no_wait_prints_the_job_id_and_returns(monkeypatch, capsys):
    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    FakeClient.statuses = []  # any status query would fail: --no-wait must not ask
    rc = submit.submit("pipeline", config_path=None, overrides=[], address="http://head:8265",
                       wait=False, working_dir=REPO)
    assert rc == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "raysubmit_fake"
