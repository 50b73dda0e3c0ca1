"""Every file under cluster/ parses and states what a user needs: image, resources, autoscaling
limits, entrypoint, and a `# FILL:` marker on each value that differs per cluster."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))


def _ray_version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    return re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', text).group(1)


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _fill_lines(path: Path, pattern: str) -> list[str]:
    """Lines matching ``pattern`` (a key such as ``image:``)."""
    return [line for line in path.read_text().splitlines() if re.search(pattern, line)]


def _check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == _ray_version(), f"{where}: rayVersion != pyproject's ray pin"
    assert spec["enableInTreeAutoscaling"] is True, where
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0", where
    containers = [head["template"]["spec"]["containers"][0]]
    gpu_groups = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu_groups, f"{where}: no GPU worker group"
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
        assert group["maxReplicas"] >= 1, where
        containers.append(group["template"]["spec"]["containers"][0])
    gpu = gpu_groups[0]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] >= 1, where
    assert gpu["requests"]["nvidia.com/gpu"] == gpu["limits"]["nvidia.com/gpu"], where
    for c in containers:
        assert c["image"], where
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{where}: {c['name']} {kind}"


def test_cluster_folder_has_the_documented_files():
    names = {p.relative_to(CLUSTER).as_posix() for p in CLUSTER.rglob("*") if p.is_file()}
    assert {
        "README.md",
        "Dockerfile",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/shared-storage.yaml",
        "kuberay/rayservice.yaml",
        "aws/cluster.yaml",
    } <= names
    readme = (CLUSTER / "README.md").read_text()
    for name in names - {"README.md"}:
        assert name in readme, f"cluster/README.md never mentions {name}"


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_every_yaml_parses_and_marks_its_images_to_fill(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)
    for line in _fill_lines(path, r"^\s*(- )?image:"):
        assert "# FILL:" in line, f"{path.name}: image line without a FILL marker: {line!r}"


def test_raycluster_manifest():
    path = CLUSTER / "kuberay" / "raycluster.yaml"
    doc = _load(path)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    _check_ray_cluster_spec(doc["spec"], path.name)
    for key in ("minReplicas:", "maxReplicas:", "claimName:"):
        assert all("# FILL:" in line for line in _fill_lines(path, key)), key


def test_rayjob_runs_the_pipeline_job_with_a_repo_config():
    path = CLUSTER / "kuberay" / "rayjob.yaml"
    doc = _load(path)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    _check_ray_cluster_spec(spec["rayClusterSpec"], path.name)
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/pipeline.py"]
    assert (REPO / argv[1]).is_file()
    config = argv[argv.index("--config") + 1]
    assert (REPO / config).is_file(), f"the RayJob's config {config} is not in the repository"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]
    assert spec["shutdownAfterJobFinishes"] is True
    # The job's overrides must be valid config keys: parse them like the job script does.
    from l2vg_ray.config import load_config

    cfg = load_config(REPO / config, [a for a in argv[2:] if "=" in a])
    assert cfg.output_dir.startswith("/mnt/shared/"), "outputs must go to the shared volume"


def test_shared_storage_is_read_write_many():
    doc = _load(CLUSTER / "kuberay" / "shared-storage.yaml")
    assert doc["kind"] == "PersistentVolumeClaim"
    assert doc["spec"]["accessModes"] == ["ReadWriteMany"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for f in ("raycluster.yaml",)
        for v in _load(CLUSTER / "kuberay" / f)["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {doc["metadata"]["name"]}


def test_aws_cluster_launcher_has_a_gpu_worker_type_and_limits():
    path = CLUSTER / "aws" / "cluster.yaml"
    doc = _load(path)
    assert doc["provider"]["type"] == "aws"
    assert doc["head_node_type"] in doc["available_node_types"]
    gpu_types = {
        name: t
        for name, t in doc["available_node_types"].items()
        if t.get("resources", {}).get("GPU", 0) >= 1
    }
    assert gpu_types, "no node type with a GPU"
    for t in gpu_types.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= doc["max_workers"]
        assert t["node_config"]["InstanceType"]
    assert doc["idle_timeout_minutes"] > 0
    assert doc["docker"]["image"]
    for key in ("region:", "ImageId:", "Arn:", "max_workers:", "min_workers:"):
        lines = _fill_lines(path, rf"^\s*{key}")
        assert lines and all("# FILL:" in line for line in lines), key


def test_dockerfile_uses_the_pinned_ray_version():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:([0-9.]+)-", text, re.M)
    assert base and base.group(1) == _ray_version()
    assert "pip install" in text


def test_rayservice_serves_the_build_app_of_the_serve_module():
    path = CLUSTER / "kuberay" / "rayservice.yaml"
    doc = _load(path)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    _check_ray_cluster_spec(doc["spec"]["rayClusterConfig"], path.name)
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve_cfg["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert (REPO / (module.replace(".", "/") + ".py")).is_file(), app["import_path"]
    assert f"def {attr}(" in (REPO / (module.replace(".", "/") + ".py")).read_text()
    args = dict(app["args"])
    config = Path(args.pop("config"))
    assert config.is_relative_to("/home/ray/l2vg-ray"), "the config path inside the image"
    assert (REPO / config.relative_to("/home/ray/l2vg-ray")).is_file()
    # Every arg is a serve.* field or a full config key (what build_app accepts).
    from l2vg_ray.config import ServeConfig, load_config

    fields = {f for f in ServeConfig.__dataclass_fields__}
    overrides = [f"{'serve.' + k if k in fields else k}={v}" for k, v in args.items()]
    load_config(REPO / config.relative_to("/home/ray/l2vg-ray"), overrides)
    assert serve_cfg["http_options"]["host"] == "0.0.0.0"


def test_rayservice_exposes_metrics_and_reads_the_api_key_from_a_secret():
    spec = _load(CLUSTER / "kuberay" / "rayservice.yaml")["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
        (container,) = group["template"]["spec"]["containers"]
        assert {"containerPort": 8080, "name": "metrics"} in container["ports"]
    from l2vg_ray.serve.app import API_KEY_ENV

    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    (key,) = [e for e in head["env"] if e["name"] == API_KEY_ENV]
    assert key["valueFrom"]["secretKeyRef"]["optional"] is True
