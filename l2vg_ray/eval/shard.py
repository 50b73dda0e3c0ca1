"""Within-task sharding: a large retrieval corpus is embedded by every eval worker at once.

    plan (one Ray task per retrieval / reranking task: count its documents)
      -> tasks with >= eval.shard_min_docs documents: n shard jobs, one slice of the corpus each
      -> fan_out(embed_shard): each worker encodes its slice into the shared embedding cache
      -> the task itself then runs as usual, its documents served from cache hits

The texts a shard encodes are exactly what the task later sends to the encoder: mteb's own
``_retrieval_texts`` (a document is its title and text joined) with the instruction set's
document instruction, so the cache keys match and scores equal an unsharded run's. mteb users
ask for this for one huge retrieval task on many GPUs (embeddings-benchmark/mteb#883).

Pure core: ``corpus_texts(task, instructions)`` and ``shard_slice(texts, index, count)``; the
Ray part is ``prefill_large_corpora(jobs, ...)``, called by ``run_eval`` before its fan-out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from l2vg_ray.eval.adapter import InstructionSet
    from l2vg_ray.eval.worker import TaskJob

log = logging.getLogger(__name__)

# Task types whose documents are encoded as a corpus (AbsTaskRetrieval covers both).
CORPUS_TYPES = ("Retrieval", "Reranking", "InstructionRetrieval", "InstructionReranking")
# Texts per encode call inside a shard: each call's vectors reach the cache before the next
# starts, so a worker that dies loses at most one chunk.
CHUNK = 4096


def corpus_texts(task: Any, instructions: InstructionSet) -> list[tuple[str | None, list[str]]]:
    """``[(instruction, texts)]`` of a loaded retrieval task's corpora, one entry per distinct
    document instruction, texts deduplicated, in the order mteb encodes them."""
    from mteb._create_dataloaders import _retrieval_texts
    from mteb.types import PromptType

    out: dict[str | None, dict[str, None]] = {}
    name, kind = task.metadata.name, str(task.metadata.type)
    for subset in task.hf_subsets or list(task.dataset):
        for split in task.metadata.eval_splits:
            data = task.dataset.get(subset, {}).get(split)
            if data is None or data.get("corpus") is None:
                continue
            instruction = instructions.for_task(name, kind, PromptType.document, subset=subset)
            texts = out.setdefault(instruction, {})
            texts.update(dict.fromkeys(_retrieval_texts(data["corpus"], PromptType.document)))
    return [(instruction, list(texts)) for instruction, texts in out.items()]


def shard_slice(texts: Sequence[str], index: int, count: int) -> list[str]:
    """The ``index``-th of ``count`` contiguous, near-equal slices of ``texts`` (they cover it)."""
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is outside 0..{count - 1}.")
    n = len(texts)
    return list(texts[index * n // count : (index + 1) * n // count])


@dataclass(frozen=True)
class ShardJob:
    job: TaskJob
    index: int
    count: int


def _loaded_task(job: TaskJob):
    from l2vg_ray.eval.suites import build_task

    task = build_task(job.task, data_dir=job.data_dir, max_docs=job.eval.max_docs, seed=job.eval.seed)
    task.load_data()
    return task


def count_corpus(job: TaskJob) -> int:
    """How many distinct (instruction, document) texts the task's corpora hold."""
    from l2vg_ray.eval.adapter import InstructionSet
    from l2vg_ray.torch_utils import set_threads

    set_threads(job.task_resources["num_cpus"])
    instructions = InstructionSet.named(job.eval.instructions)
    return sum(len(t) for _, t in corpus_texts(_loaded_task(job), instructions))


def embed_shard(shard: ShardJob) -> int:
    """Encode one slice of the task's corpus into the embedding cache; returns texts encoded."""
    from l2vg_ray.eval.adapter import InstructionSet
    from l2vg_ray.eval.worker import job_encoder
    from l2vg_ray.torch_utils import set_threads

    job = shard.job
    set_threads(job.task_resources["num_cpus"])
    encoder = job_encoder(job)
    misses0 = encoder.misses
    for instruction, texts in corpus_texts(_loaded_task(job), InstructionSet.named(job.eval.instructions)):
        part = shard_slice(texts, shard.index, shard.count)
        for i in range(0, len(part), CHUNK):
            encoder.encode(part[i : i + CHUNK], instruction=instruction, batch_size=job.eval.batch_size)
    return encoder.misses - misses0


def prefill_large_corpora(
    jobs: Sequence[TaskJob], *, min_docs: int, shards: int, max_retries: int,
    task_types: dict[str, str],
) -> dict[str, int]:
    """Embed the corpus of every job's task with >= ``min_docs`` documents over ``shards`` Ray
    tasks (each with its job's ``task_resources``); returns ``{task: shards}`` for the tasks it
    sharded. A planning or shard failure is logged and leaves that task to encode its own corpus
    (its eval job still runs)."""
    from l2vg_ray.eval.fanout import fan_out

    if min_docs <= 0 or shards < 2:
        return {}
    candidates = [j for j in jobs if task_types.get(j.task) in CORPUS_TYPES]
    if not candidates:
        return {}
    if any(j.cache_dir is None for j in candidates):
        log.warning("eval.shard_min_docs is set but eval.cache_dir is not: shards could not share "
                    "their embeddings, so no corpus is sharded. Set eval.cache_dir to shard.")
        return {}
    opts = {**candidates[0].task_resources, "max_retries": max_retries}  # one config: same for all
    counts = fan_out(count_corpus, candidates, keys=[j.task for j in candidates],
                     max_concurrency=shards, **opts)
    large = []
    for j, c in zip(candidates, counts, strict=True):
        if c.ok:
            log.info("%s: %d documents%s", j.task, c.value,
                     f", sharded over {shards} workers" if c.value >= min_docs else "")
            if c.value >= min_docs:
                large.append(j)
    if not large:
        return {}
    work = [ShardJob(j, i, shards) for j in large for i in range(shards)]
    done = fan_out(embed_shard, work, keys=[f"{s.job.task}[{s.index}/{s.count}]" for s in work],
                   max_concurrency=shards,
                   on_done=lambda o: log.info("%s: %s", o.key,
                                              f"{o.value} encoded" if o.ok else "FAILED"),
                   **opts)
    failed = {s.job.task for s, o in zip(work, done, strict=True) if not o.ok}
    if failed:
        log.warning("Corpus shards failed for %s: those tasks encode what is missing themselves.",
                    ", ".join(sorted(failed)))
    return {j.task: shards for j in large if j.task not in failed}
