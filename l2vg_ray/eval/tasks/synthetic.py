"""Small synthetic stand-ins for the offline data sets (same Parquet schemas), for tests.

``write_synthetic_offline_data(cache_dir)`` writes every ``<name>.parquet`` where
``prepare_offline_data`` looks first, so that the offline suite runs with no download.
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

from l2vg_ray.eval.tasks.data import OFFLINE_DATASETS, data_dir

# Words the tiny test tokenizers know (l2vg_ray.testing._CORPUS), so embeddings differ.
_TOPICS = {
    "travel": ["capital", "france", "paris", "spanish", "hello"],
    "kitchen": ["bread", "flour", "water", "salt", "yeast"],
    "nature": ["plants", "light", "sea", "sky", "blue"],
}


def _sentence(rng: random.Random, topic: str) -> str:
    words = rng.sample(_TOPICS[topic], 3)
    return f"The {words[0]} and the {words[1]} near the {words[2]} number {rng.randint(0, 99)}."


def synthetic_tables(n: int = 24, seed: int = 0) -> dict[str, pd.DataFrame]:
    rng = random.Random(seed)
    topics = list(_TOPICS)
    labelled = [(topics[i % 3], _sentence(rng, topics[i % 3])) for i in range(n)]
    cls = pd.DataFrame({"text": [t for _, t in labelled], "label": [lab for lab, _ in labelled]})
    trec = cls.assign(label=[topics.index(lab) for lab in cls["label"]],
                      split=["test" if i % 4 == 0 else "train" for i in range(n)])
    binary = cls.assign(label=[int(lab == "travel") for lab in cls["label"]])
    pairs = [(_sentence(rng, topics[i % 3]), _sentence(rng, topics[(i + i % 2) % 3])) for i in range(n)]
    squad_rows = []
    for p in range(n // 2):
        topic = topics[p % 3]
        doc = _sentence(rng, topic)
        for q in range(2):
            squad_rows.append({"query_id": f"q{p}-{q}", "query": f"Where is the {_TOPICS[topic][q]}?",
                               "doc_id": f"p{p}", "title": topic, "doc": doc})
    qs_rows = [{"query": _sentence(rng, topics[i % 3]),
                "candidates": [f"What about the {_TOPICS[t][i % 5]}?" for t in topics] + ["Why?"],
                "relevance": [1.0 if t == topics[i % 3] else 0.0 for t in topics] + [0.0]}
               for i in range(n // 2)]
    snli_rows = []
    for p in range(n // 3):
        topic = topics[p % 3]
        premise = _sentence(rng, topic)
        for label, t in (("entailment", topic), ("neutral", topics[(p + 1) % 3]),
                         ("contradiction", topics[(p + 2) % 3])):
            snli_rows.append({"premise_id": f"c{p}", "pair_id": f"c{p}{label[0]}", "sentence1": premise,
                              "sentence2": _sentence(rng, t), "label": label})
    dialog = [{"query_id": f"s{i}", "query": _sentence(rng, topics[i % 3]), "doc_id": f"r{i}",
               "doc": _sentence(rng, topics[i % 3])} for i in range(n)]
    return {
        "disaster_tweets": binary,
        "snli": pd.DataFrame(snli_rows),
        "movie_dialog": pd.DataFrame(dialog),
        "stsb": pd.DataFrame({"sentence1": [a for a, _ in pairs], "sentence2": [b for _, b in pairs],
                              "score": [float(i % 6) for i in range(n)]}),
        "trec": trec,
        "rotten_tomatoes": binary,
        "bbc_news": cls,
        "sms_spam": binary,
        "snips": cls,
        "vitaminc": pd.DataFrame({"sentence1": [a for a, _ in pairs], "sentence2": [b for _, b in pairs],
                                  "label": [i % 2 for i in range(n)]}),
        "squad": pd.DataFrame(squad_rows),
        "question_selection": pd.DataFrame(qs_rows),
    }


def write_synthetic_offline_data(cache_dir: str | Path, *, n: int = 24, seed: int = 0) -> Path:
    out = data_dir(cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = synthetic_tables(n, seed)
    missing = set(OFFLINE_DATASETS.names()) - set(tables)
    if missing:
        raise RuntimeError(f"synthetic_tables lacks {sorted(missing)}: add them.")
    for name, df in tables.items():
        df.to_parquet(out / f"{name}.parquet", index=False)
    return out
