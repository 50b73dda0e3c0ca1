from __future__ import annotations

from pathlib import Path

import pytest

from l2vg_ray.config import ConfigError, L2VGConfig, load_config, to_dict

REPO = Path(__file__).resolve().parents[2]
ALL_YAMLS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.name != "serve.yaml")


def test_defaults_are_the_papers():
    cfg = load_config()
    assert cfg.train.lr == 3e-4
    assert cfg.train.warmup_steps == 100
    assert cfg.train.batch_size == 32
    assert cfg.train.scheduler == "linear"
    assert cfg.model.max_length == 512
    assert (cfg.model.n_thought, cfg.model.n_compression) == (10, 10)
    assert (cfg.train.recon_weight, cfg.train.align_weight) == (1.0, 1.0)


def test_merge_order_defaults_yaml_cli(tmp_path):
    y = tmp_path / "exp.yaml"
    y.write_text("train:\n  lr: 1.0e-3\n  max_steps: 7\n")
    cfg = load_config(y, ["train.lr=5e-5"])
    assert cfg.train.lr == 5e-5  # CLI beats YAML
    assert cfg.train.max_steps == 7  # YAML beats defaults
    assert cfg.train.warmup_steps == 100  # default kept


def test_interpolated_paths_follow_output_dir():
    cfg = load_config(None, ["output_dir=/tmp/x"])
    assert cfg.generate.output_dir == "/tmp/x/data"
    assert cfg.train.data_dir == "/tmp/x/data"
    assert cfg.eval.model == "/tmp/x/train/final"
    assert to_dict(cfg)["train"]["output_dir"] == "/tmp/x/train"


@pytest.mark.parametrize(
    "override, key",
    [("train.lrr=1", "train.lrr"), ("modle.llm=x", "modle"), ("generate.queries.sorce=x", "sorce")],
)
def test_misspelt_cli_key_is_an_error_naming_it(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_misspelt_yaml_key_is_an_error_naming_file_and_key(tmp_path):
    y = tmp_path / "typo.yaml"
    y.write_text("train:\n  warmup_step: 3\n")
    with pytest.raises(ConfigError, match=r"train\.warmup_step.*typo\.yaml|typo\.yaml.*warmup_step"):
        load_config(y)


def test_wrong_type_and_malformed_override():
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope/missing.yaml")


def test_cross_field_validation_names_value_and_fix():
    with pytest.raises(ConfigError, match=r"batch_size=30 .* 4 x 2 = 8"):
        load_config(None, ["train.batch_size=30", "train.num_workers=4", "train.grad_accum_steps=2"])
    with pytest.raises(ConfigError, match="n_compression"):
        load_config(None, ["model.n_compression=0"])
    with pytest.raises(ConfigError, match="dtype"):
        load_config(None, ["model.dtype=fp8"])


def test_zero_thought_tokens_allowed():
    assert load_config(None, ["model.n_thought=0"]).model.n_thought == 0


@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_under_configs_is_valid(path):
    cfg = load_config(path)
    assert isinstance(cfg.name, str) and cfg.name
    # Every stage's section resolves (interpolations included).
    d = to_dict(cfg)
    assert set(d) >= {"model", "generate", "teacher", "train", "eval", "serve", "cluster"}


# The paper's settings per family (the official repository's configs and training scripts).
PAPER = {
    "qwen3-8b": ("Qwen/Qwen3-8B", "McGill-NLP/LLM2Vec-Qwen3-8B-mntp", 3e-4, True),
    "qwen3-4b": ("Qwen/Qwen3-4B", "McGill-NLP/LLM2Vec-Qwen3-4B-mntp", 3e-4, True),
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B-Instruct",
                     "McGill-NLP/LLM2Vec-Meta-Llama-31-8B-Instruct-mntp", 5e-4, False),
}


@pytest.mark.parametrize("version", ["", "-v1"])
@pytest.mark.parametrize("family", sorted(PAPER))
def test_paper_configs_use_paper_settings(family, version):
    llm, mntp, lr, qwen3 = PAPER[family]
    cfg = load_config(REPO / "configs" / "paper" / f"{family}{version}.yaml")
    m, g, t, tr, e = cfg.model, cfg.generate, cfg.teacher, cfg.train, cfg.eval
    assert (m.llm, m.teacher) == (llm, mntp)
    # Tokens: the current version 0 + 10, the first version 10 + 10.
    assert (m.n_thought, m.n_compression) == ((10, 10) if version else (0, 10))
    assert (m.max_length, m.dtype) == (512, "bfloat16")
    # Teacher: the backbone's unsupervised LLM2Vec (MNTP merged + unsup-SimCSE on top).
    assert (t.kind, t.adapter, t.max_length, t.dtype) == (
        "llm2vec", f"{mntp}-unsup-simcse", 512, "bfloat16")
    # Queries: single-turn Tulu prompts.
    q = g.queries
    assert (q.source, q.name, q.split, q.column) == (
        "huggingface", "McGill-NLP/llm2vec-gen-tulu", "original", "question")
    # Sampling: the model's generation config, 500 new tokens; Qwen3 without thinking.
    assert (g.sampling, g.max_tokens) == ("model", 500)
    assert dict(g.chat_template_kwargs) == ({"enable_thinking": False} if qwen3 else {})
    # Schedule: linear over 20000 steps, stopped at 5000, the family's lr, batch 32.
    assert (tr.scheduler, tr.schedule_steps, tr.max_steps, tr.warmup_steps) == (
        "linear", 20000, 5000, 100)
    assert (tr.lr, tr.batch_size) == (lr, 32)
    # The paper's loss: raw MSE, 1.0 / 1.0, plain Linear heads.
    assert (tr.align_loss, tr.recon_weight, tr.align_weight, tr.head_init) == (
        "mse", 1.0, 1.0, "default")
    assert e.instructions == "paper"


def test_the_bge_m3_teacher_variant():
    """The official second version's teacher: bge-m3-unsupervised's raw [CLS] state."""
    cfg = load_config(REPO / "configs" / "paper" / "qwen3-4b-bge-m3.yaml")
    base = load_config(REPO / "configs" / "paper" / "qwen3-4b.yaml")
    assert (cfg.model.teacher, cfg.model.teacher_dim) == ("BAAI/bge-m3-unsupervised", 1024)
    assert (cfg.teacher.kind, cfg.teacher.adapter) == ("cls-encoder", None)
    assert (cfg.model.llm, cfg.train.lr, cfg.train.max_steps) == (
        base.model.llm, base.train.lr, base.train.max_steps)


def test_every_paper_config_is_tested():
    names = {p.stem for p in (REPO / "configs" / "paper").glob("*.yaml") if not p.stem.startswith("_")}
    assert names == {f + v for f in PAPER for v in ("", "-v1")} | {"qwen3-4b-bge-m3"}


def test_a_config_extends_its_parent_and_cycles_are_errors(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\ntrain:\n  lr: 0.1\n  max_steps: 7\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ntrain:\n  lr: 0.5\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.warmup_steps=2"])
    assert (cfg.name, cfg.train.lr, cfg.train.max_steps, cfg.train.warmup_steps) == ("base", 0.5, 7, 2)
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_dataclass_is_the_single_source_of_defaults():
    assert L2VGConfig().train.lr == load_config().train.lr
