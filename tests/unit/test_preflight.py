"""Every section's values are checked at load: `l2vg <stage>` and `l2vg run --dry-run` refuse a
bad value before anything starts (exit 2, one line naming the key), whichever section it is in."""

from __future__ import annotations

import pytest

from l2vg_ray.cli import main
from l2vg_ray.config import ConfigError, load_config
from l2vg_ray.preflight import SECTION_CHECKS, check_config

BAD = [
    ("serve.max_batch_size=0", "serve.max_batch_size"),
    ("serve.min_replicas=5", "serve.min_replicas"),
    ("serve.loader=nope", "Unknown serve loader 'nope'"),
    ("eval.encoders=-1", "eval.encoders=-1"),
    ("eval.instructions=nonsense", "Unknown instruction set 'nonsense'"),
    ("eval.suite=nope", "Unknown task suite 'nope'"),
    ("eval.max_docs=5", "eval.max_docs=5"),
    ("eval.max_concurrency=0", "eval.max_concurrency=0"),
    ("generate.num_actors=0", "generate.num_actors=0"),
    ("generate.top_p=2", "generate.top_p=2"),
    ("generate.backend=vlm", "Unknown generation backend 'vlm'"),
    ("generate.queries.source=tulu", "Unknown query source 'tulu'"),
    ("teacher.kind=bge", "Unknown teacher kind 'bge'"),
    ("teacher.batch_size=0", "teacher.batch_size=0"),
    ("train.lr=-1", "train.lr=-1"),
    ("train.align_loss=bogus", "Unknown alignment loss 'bogus'"),
    ("train.scheduler=bogus", "train.scheduler='bogus'"),
    ("train.recon_weight=0", None),  # fine alone
    ("embed.num_actors=0", "embed.num_actors=0"),
]


def test_every_section_is_checked():
    assert set(SECTION_CHECKS) == {"generate", "teacher", "train", "eval", "serve", "embed"}
    check_config(load_config(None))  # the defaults pass


@pytest.mark.parametrize("override,needle", BAD)
def test_a_bad_value_fails_the_dry_run_naming_the_key(override, needle, capsys, monkeypatch):
    monkeypatch.setattr("l2vg_ray.ray_utils.init_ray",
                        lambda *a, **k: pytest.fail("Ray started before the config was checked"))
    rc = main(["run", "--dry-run", override])
    err = capsys.readouterr().err
    if needle is None:
        assert rc == 0
        return
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_every_problem_is_listed_at_once():
    cfg = load_config(None, ["serve.max_batch_size=0", "train.lr=-1"])
    with pytest.raises(ConfigError, match=r"train.lr=-1.* \| serve.max_batch_size"):
        check_config(cfg)


def test_both_loss_weights_zero_is_refused():
    with pytest.raises(ConfigError, match="not both 0"):
        check_config(load_config(None, ["train.recon_weight=0", "train.align_weight=0"]))
