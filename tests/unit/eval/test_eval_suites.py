"""Suite names resolve, mteb-lite names exist in mteb, instructions load from the data file."""

from __future__ import annotations

import dataclasses

import pytest

from l2vg_ray.config import ConfigError, load_config
from l2vg_ray.eval.adapter import InstructionSet, mteb_model_name
from l2vg_ray.eval.suites import SUITES, suite_lists, suite_task_names
from l2vg_ray.eval.tasks.offline import OFFLINE_TASKS

MTEB_LITE = [
    "ArguAna", "ClimateFEVERHardNegatives", "AskUbuntuDupQuestions",
    "ArXivHierarchicalClusteringP2P", "MedrxivClusteringP2P.v2", "SprintDuplicateQuestions",
    "Banking77Classification", "ImdbClassification", "BIOSSES", "STS17",
]


def _cfg(**over):
    return load_config(None, [f"eval.{k}={v}" for k, v in over.items()])


def test_registered_suites():
    assert SUITES.names() == ["advbench-ir", "bright", "list", "mteb-eng-v2", "mteb-lite", "offline",
                              "offline-all", "offline-bigbench"]
    assert suite_task_names(_cfg(suite="advbench-ir")) == ["AdvBench-IR"]
    # load_config rejects an unknown eval.suite first; the registry's own error lists the names.
    with pytest.raises(ValueError, match="Known: advbench-ir, bright, list, mteb-eng-v2, mteb-lite, offline"):
        SUITES.get("mteb-tiny")


def test_mteb_lite_names_exist_in_mteb():
    import mteb

    names = suite_task_names(_cfg(suite="mteb-lite"))
    assert names == MTEB_LITE  # all ten, none dropped or merged
    assert [t.metadata.name for t in mteb.get_tasks(tasks=names)] == MTEB_LITE


def test_benchmark_suites_resolve_from_mteb():
    eng = suite_task_names(_cfg(suite="mteb-eng-v2"))
    assert len(eng) == 41 and "STSBenchmark" in eng
    assert suite_task_names(_cfg(suite="bright"))


def test_offline_suite_matches_task_registry():
    from l2vg_ray.eval.tasks.data import OFFLINE_DATASETS

    names = suite_task_names(_cfg(suite="offline"))
    assert sorted(suite_task_names(_cfg(suite="offline-all"))) == OFFLINE_TASKS.names()
    assert len(names) == 12
    # The default suite: every task type, two retrieval corpora from independent archives, and
    # nothing from the archive the registry stopped serving.
    types = {OFFLINE_TASKS.get(n).metadata.type for n in names}
    assert types == {"STS", "Classification", "Clustering", "PairClassification", "Reranking",
                     "Retrieval"}
    archive = {n: OFFLINE_DATASETS.get(OFFLINE_TASKS.get(n).data_file).requirement for n in names}
    assert "bigbench==1.0.0" not in archive.values()
    retrieval = [n for n in names if OFFLINE_TASKS.get(n).metadata.type == "Retrieval"]
    assert len({archive[n] for n in retrieval}) >= 2
    bigbench = suite_task_names(_cfg(suite="offline-bigbench"))
    assert {archive_of for n in bigbench
            for archive_of in [OFFLINE_DATASETS.get(OFFLINE_TASKS.get(n).data_file).requirement]} \
        == {"bigbench==1.0.0"}


def test_offline_task_table_builds_one_class_per_row(tmp_path):
    """Each row of the table is one registered mteb task class named after it (the names are in
    results files and configs), reading a known data set; its objects pickle by reference."""
    import pickle

    from l2vg_ray.eval.tasks import offline
    from l2vg_ray.eval.tasks.data import OFFLINE_DATASETS

    rows = offline.OFFLINE_TASK_TABLE
    assert sorted(r.name for r in rows) == OFFLINE_TASKS.names()
    for row in rows:
        cls = OFFLINE_TASKS.get(row.name)
        assert cls.__name__ == cls.metadata.name == row.name and cls.spec is row
        assert cls.metadata.type == row.task_type and cls.data_file == row.data_file
        assert cls.metadata.main_score == offline.KINDS[row.task_type][1]
        assert row.data_file in OFFLINE_DATASETS
    task = offline.build_offline_task("OfflineSNLIReranking", data_dir=tmp_path, max_docs=20, seed=0)
    assert type(pickle.loads(pickle.dumps(task))) is OFFLINE_TASKS.get("OfflineSNLIReranking")
    bad = dataclasses.replace(rows[0], task_type="Regression")
    with pytest.raises(ValueError, match="task_type 'Regression'; use one of Classification"):
        offline.task_class(bad)


def test_list_suite():
    cfg = load_config(None, ["eval.suite=list", "eval.tasks=[STSBenchmark,OfflineTRECClustering]"])
    assert suite_task_names(cfg) == ["STSBenchmark", "OfflineTRECClustering"]
    with pytest.raises(ConfigError, match="eval.tasks"):
        suite_task_names(_cfg(suite="list"))
    bad = load_config(None, ["eval.suite=list", "eval.tasks=[NoSuchTaskXYZ]"])
    with pytest.raises((ConfigError, KeyError, ValueError)):
        suite_task_names(bad)


def test_suite_yaml_lists_are_lists():
    for key in ("mteb-lite", "offline", "offline-bigbench"):
        assert all(isinstance(n, str) and " " not in n for n in suite_lists()[key])


def test_instructions_from_data_file(tmp_path):
    inst = InstructionSet.load()
    for name in OFFLINE_TASKS.names() + MTEB_LITE:
        assert inst.by_task.get(name), f"{name} has no instruction in instructions.yaml"
    assert inst.for_task("OfflineSQuADRetrieval", "Retrieval", "query").startswith("Write")
    assert inst.for_task("OfflineSQuADRetrieval", "Retrieval", "document") is None
    assert inst.for_task("Unknown", "Retrieval", None) == inst.by_type["Retrieval"]
    assert inst.for_task("Unknown", "Nothing", None) is None
    custom = tmp_path / "i.yaml"
    custom.write_text("default: hi\nby_type: {STS: null}\n")
    c = InstructionSet.load(custom)
    assert c.for_task("X", "STS") is None and c.for_task("X", "Other") == "hi"
    custom.write_text("by_tasks: {}\n")
    with pytest.raises(ValueError, match="by_tasks"):
        InstructionSet.load(custom)


def test_paper_instruction_set_matches_the_official_prompts():
    paper = InstructionSet.named("paper")
    assert paper.name == "paper"
    # generative.json's wording, and every document gets the official summary prompt.
    assert paper.for_task("STSBenchmark", "STS") == (
        "Generate text that is semantically similar to this text:"
    )
    assert paper.for_task("AdvBench-IR", "Retrieval", "query") == (
        "Generate a relevant document that answers this query:"
    )
    for task in ("ArguAna", "BrightRetrieval", "AdvBench-IR", "OfflineSQuADRetrieval"):
        assert paper.for_task(task, "Retrieval", "document") == "Summarize the following passage:"
    # BRIGHT's instruction names the domain (mteb's hf_subset).
    assert paper.for_task("BrightRetrieval", "Retrieval", "query", subset="biology") == (
        "Given a biology post, retrieve relevant passages that help answer the post;"
    )
    for name in OFFLINE_TASKS.names() + MTEB_LITE:
        assert paper.for_task(name, "STS"), f"{name} has no paper instruction"
    # The project set leaves documents bare; unknown names list the known sets.
    assert InstructionSet.named("project").for_task("ArguAna", "Retrieval", "document") is None
    with pytest.raises(ValueError, match="Known: paper, project"):
        InstructionSet.named("papers")


def test_mteb_model_name_is_org_slash_name():
    assert mteb_model_name("teacher") == "l2vg-ray/teacher"
    assert mteb_model_name("/tmp/out/train/final") == "l2vg-ray/tmp_out_train_final"
