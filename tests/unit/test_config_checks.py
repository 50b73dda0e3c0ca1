"""Every section's values are checked at load (``l2vg_ray.config.validate``): `l2vg <stage>` and
`l2vg run --dry-run` refuse a bad value before anything starts (exit 2, one line naming the key,
the value and the fix), whichever section it is in."""

from __future__ import annotations

import pytest

from l2vg_ray.cli import main
from l2vg_ray.config import SECTION_CHECKS, VOCABULARIES, ConfigError, L2VGConfig, load_config

# One bad value per check (at least one per section), and the text the error must hold.
BAD = [
    ("model.n_compression=0", "model.n_compression"),
    ("model.dtype=fp8", "model.dtype='fp8'"),
    ("serve.max_batch_size=0", "serve.max_batch_size=0"),
    ("serve.min_replicas=5", "serve.min_replicas"),
    ("serve.loader=nope", "serve.loader='nope' is unknown; use one of encoder"),
    ("serve.target_ongoing_requests=0", "serve.target_ongoing_requests"),
    ("serve.request_timeout_s=0", "serve.request_timeout_s"),
    ("eval.encoders=-1", "eval.encoders=-1"),
    ("eval.instructions=nonsense", "eval.instructions='nonsense' is unknown; use one of project"),
    ("eval.suite=nope", "eval.suite='nope' is unknown"),
    ("eval.max_docs=5", "eval.max_docs=5"),
    ("eval.max_concurrency=0", "eval.max_concurrency=0"),
    ("eval.scoring_cpus=0", "eval.scoring_cpus=0"),
    ("eval.tracking.kind=neptune", "eval.tracking.kind='neptune'"),
    ("eval.resources_per_task.CPU=1", "eval.resources_per_task.CPU=1.0: CPU is one of Ray's own "
                                      "resources, not a custom one; set eval.num_cpus_per_task"),
    ("eval.resources_per_task.gpu=1", "set eval.num_gpus_per_task"),
    ("eval.resources_per_task.Memory=1", "eval.resources_per_task.Memory=1.0: Memory is one of"),
    ("eval.resources_per_task.eval_slot=-1", "eval.resources_per_task.eval_slot=-1.0; it must be "
                                             "a number >= 0"),
    ("eval.resources_per_task.eval_slot=0.5", None),
    ("serve.resources.GPU=1", "serve.resources.GPU=1.0: GPU is one of Ray's own resources, not "
                              "a custom one; set serve.num_gpus"),
    ("serve.resources.object_store_memory=1", "serve.resources.object_store_memory=1.0"),
    ("serve.resources.serve_slot=-2", "serve.resources.serve_slot=-2.0; it must be a number >= 0"),
    ("serve.upscale_delay_s=-1", "serve.upscale_delay_s=-1.0; it must be >= 0 seconds"),
    ("serve.downscale_delay_s=-0.5", "serve.downscale_delay_s=-0.5; it must be >= 0 seconds"),
    ("serve.downscale_delay_s=0", None),
    ("generate.num_actors=0", "generate.num_actors=0"),
    ("generate.top_p=2", "generate.top_p=2"),
    ("generate.temperature=-1", "generate.temperature=-1"),
    ("generate.sampling=beam", "generate.sampling='beam'"),
    ("generate.backend=vlm", "generate.backend='vlm' is unknown; use one of auto"),
    ("generate.queries.source=tulu", "generate.queries.source='tulu' is unknown"),
    ("generate.memory_gb_per_actor=0", "generate.memory_gb_per_actor=0"),
    ("generate.num_gpus_per_actor=1", None),  # tensor_parallel_size 1 <= 1 GPU: fine
    ("teacher.kind=bge", "teacher.kind='bge' is unknown; use one of cls-encoder"),
    ("teacher.batch_size=0", "teacher.batch_size=0"),
    ("teacher.dtype=int8", "teacher.dtype='int8'"),
    ("train.lr=-1", "train.lr=-1"),
    ("train.align_loss=bogus", "train.align_loss='bogus' is unknown"),
    ("train.scheduler=bogus", "train.scheduler='bogus'"),
    ("train.precision=fp16", "train.precision='fp16'"),
    ("train.head_init=zeros", "train.head_init='zeros'"),
    ("train.grad_accum_steps=3", "train.batch_size=32 is not divisible"),
    ("train.max_failures=-2", "train.max_failures=-2"),
    ("train.gpus_per_worker=1", "train.use_gpu=true"),
    ("train.tracking.kind=neptune", "train.tracking.kind='neptune'"),
    ("train.recon_weight=0", None),  # fine alone
    ("embed.num_actors=0", "embed.num_actors=0"),
    ("embed.num_cpus_per_actor=-1", "embed.num_cpus_per_actor=-1"),
    ("decode.max_new_tokens=0", "decode.max_new_tokens=0"),
    ("llm2vec.mntp.mask_prob=1.5", "llm2vec.mntp.mask_prob=1.5"),
    ("llm2vec.simcse.batch_size=1", "llm2vec.simcse.batch_size=1"),
    ("llm2vec.corpus.source=tulu", "llm2vec.corpus.source='tulu'"),
    ("llm2vec.simcse.temperature=0", "llm2vec.simcse.temperature=0"),
    ("export.instructions=mine", "export.instructions='mine'"),
]


def test_every_section_is_checked():
    assert set(SECTION_CHECKS) == {"model", "generate", "teacher", "train", "eval", "serve",
                                   "embed", "llm2vec", "decode", "export"}
    load_config(None)  # the defaults pass


@pytest.mark.parametrize("override,needle", BAD)
def test_a_bad_value_fails_at_load_naming_the_key(override, needle):
    if needle is None:
        load_config(None, [override])
        return
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value)


@pytest.mark.parametrize("override,needle", [b for b in BAD[:12:3]] + [("train.lr=-1", "train.lr")])
def test_a_bad_value_fails_the_dry_run_before_ray(override, needle, capsys, monkeypatch):
    monkeypatch.setattr("l2vg_ray.ray_utils.init_ray",
                        lambda *a, **k: pytest.fail("Ray started before the config was checked"))
    rc = main(["run", "--dry-run", override])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError, match=r"train.lr=-1.* \| serve.max_batch_size"):
        load_config(None, ["serve.max_batch_size=0", "train.lr=-1"])


@pytest.mark.parametrize("overrides", [
    ["eval.resources_per_task.eval_slot=1", "serve.resources.serve_slot=1"],
    ["eval.resources_per_task={eval_slot: 1}", "serve.resources={serve_slot: 1}"],
])
def test_custom_resources_take_any_name_in_both_override_forms(overrides):
    cfg = load_config(None, overrides)
    assert cfg.eval.resources_per_task == {"eval_slot": 1.0}
    assert cfg.serve.resources == {"serve_slot": 1.0}
    assert load_config(None).eval.resources_per_task == {}


def test_custom_resources_from_yaml(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("eval:\n  resources_per_task:\n    eval_slot: 1\n"
                    "serve:\n  resources: {serve_slot: 0.5}\n  upscale_delay_s: 5\n")
    cfg = load_config(path, ["eval.resources_per_task.big_mem=2"])
    assert cfg.eval.resources_per_task == {"eval_slot": 1.0, "big_mem": 2.0}
    assert cfg.serve.resources == {"serve_slot": 0.5} and cfg.serve.upscale_delay_s == 5.0


@pytest.mark.parametrize("override,needle", [
    ("eval.resources_per_task={eval_slot:1}", "Write a space after the colon"),  # YAML: 'eval_slot:1'
    ("+eval.resources_per_task.eval_slot=1", "'; drop it: a key of a free-form mapping"),  # Hydra's +
    ("eval.resources_per_task.eval_slot=many", "could not be converted to Float"),
])
def test_a_malformed_resource_override_says_how_to_write_it(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])


def test_a_typed_serve_section_with_a_non_number_resource_is_refused():
    import dataclasses

    from l2vg_ray.config import ServeConfig, check_serve

    with pytest.raises(ConfigError, match=r"serve.resources.serve_slot='one'; it must be a number"):
        check_serve(dataclasses.replace(ServeConfig(), resources={"serve_slot": "one"}))


def test_both_loss_weights_zero_is_refused():
    with pytest.raises(ConfigError, match="not both 0"):
        load_config(None, ["train.recon_weight=0", "train.align_weight=0"])


def test_a_typed_config_is_checked_too():
    from l2vg_ray.config import validate

    cfg = L2VGConfig()
    cfg.eval.suite = "nope"
    with pytest.raises(ConfigError, match="eval.suite"):
        validate(cfg)


def _registry_names() -> dict[str, set[str]]:
    from ray.serve.config import ProxyLocation

    from l2vg_ray.eval.adapter import INSTRUCTION_SETS
    from l2vg_ray.eval.suites import SUITES
    from l2vg_ray.generate.backends import GENERATION_BACKENDS, SAMPLING_MODES
    from l2vg_ray.generate.queries import QUERY_SOURCES
    from l2vg_ray.generate.teacher import TEACHERS
    from l2vg_ray.method.losses import ALIGNMENT_LOSSES
    from l2vg_ray.serve.app import ENCODER_LOADERS
    from l2vg_ray.tracking import TRACKERS
    from l2vg_ray.train.schedule import SCHEDULERS

    return {
        "generate.backend": {"auto", *GENERATION_BACKENDS.names()},
        "generate.queries.source": {"mix", *QUERY_SOURCES.names()},
        "generate.sampling": set(SAMPLING_MODES),
        "teacher.kind": set(TEACHERS.names()),
        "train.scheduler": set(SCHEDULERS),
        "train.align_loss": set(ALIGNMENT_LOSSES.names()),
        "train.precision": {"auto", "bf16", "fp32"},
        "train.head_init": {"default", "calibrated"},
        "tracking.kind": set(TRACKERS.names()),
        "eval.suite": set(SUITES.names()),
        "eval.instructions": set(INSTRUCTION_SETS),
        "serve.loader": set(ENCODER_LOADERS.names()),
        # Serve's ProxyLocation less Disabled (the app is HTTP: it needs a proxy)
        "serve.proxy_location": {p.value for p in ProxyLocation} - {"Disabled"},
    }


def test_each_vocabulary_is_its_registrys_names():
    """config.py knows the names without importing the stages; this holds them equal, so a new
    registered name that config.py does not know (or a stale one) fails here."""
    names = _registry_names()
    assert set(names) == set(VOCABULARIES)
    for key, registered in names.items():
        assert set(VOCABULARIES[key]) == registered, key
