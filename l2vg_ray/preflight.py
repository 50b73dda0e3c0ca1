"""Every section of a config checked at once, before anything starts: ``check_config(cfg)``.

``load_config`` checks the cross-field rules that need nothing but the config; the stages' own
value checks (bounds, registry names) live beside the stage that reads them, and this module runs
all of them for ``l2vg <stage>`` and ``l2vg run --dry-run``, so that a typo in the serve or eval
section fails in a second, not after generation and training. No model, data or Ray is touched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from l2vg_ray.config import ConfigError


def _generate(cfg: Any) -> None:
    from l2vg_ray.generate.backends import check_generate_config
    from l2vg_ray.generate.queries import QUERY_SOURCES

    check_generate_config(cfg.generate)
    q = cfg.generate.queries
    for source in ([str(p.source) for p in q.parts] if str(q.source) == "mix" else [str(q.source)]):
        QUERY_SOURCES.get(source)  # "mix" inside parts is refused by load_queries, with its reason


def _teacher(cfg: Any) -> None:
    from l2vg_ray.generate.teacher import check_teacher_config

    check_teacher_config(cfg.teacher)


def _train(cfg: Any) -> None:
    from l2vg_ray.train.trainer import check_train_config

    check_train_config(cfg)


def _eval(cfg: Any) -> None:
    from l2vg_ray.eval.runner import check_eval_config

    check_eval_config(cfg.eval)


def _serve(cfg: Any) -> None:
    from l2vg_ray.serve.app import ENCODER_LOADERS, deployment_options

    ENCODER_LOADERS.get(str(cfg.serve.loader))
    deployment_options(cfg.serve)


def _embed(cfg: Any) -> None:
    from l2vg_ray.embed import check_embed_config

    check_embed_config(cfg.embed)


SECTION_CHECKS: dict[str, Callable[[Any], None]] = {
    "generate": _generate, "teacher": _teacher, "train": _train, "eval": _eval,
    "serve": _serve, "embed": _embed,
}


def check_config(cfg: Any) -> None:
    """Run every section's checks; one ``ConfigError`` lists every problem found."""
    problems = []
    for section, check in SECTION_CHECKS.items():
        try:
            check(cfg)
        except ConfigError as e:
            problems.append(str(e))
        except ValueError as e:  # a registry's "Unknown ... Known: ..." names the valid values
            problems.append(f"{section}: {e}")
    if problems:
        raise ConfigError(" | ".join(problems))
