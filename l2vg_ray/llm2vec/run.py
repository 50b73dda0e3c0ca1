"""``l2vg llm2vec``: train an LLM2Vec teacher for a decoder on Ray Train (MNTP, then SimCSE).

Output folder (``llm2vec.output_dir``)::

    corpus.jsonl           the unlabelled texts, written once by the driver (the workers read it)
    mntp/                  the MNTP LoRA: adapter_config.json names the base model (llm2vec.llm),
                           adapter_model.safetensors, the tokenizer, train_log.csv
    simcse/                the SimCSE LoRA on the merged MNTP model, train_log.csv
    llm2vec_result.json    what ran: steps, losses, seconds, the teacher section to use

``teacher.kind: llm2vec`` with ``teacher.model=<output_dir>/mntp`` and
``teacher.adapter=<output_dir>/simcse`` loads it, exactly as a published LLM2Vec teacher.

Resumable: each step saves ``<step>/checkpoint.pt`` (the LoRA, optimiser and scheduler state, the
data order's position) every ``llm2vec.checkpoint_every`` steps; a rerun continues from it, and a
finished step (its adapter and ``DONE``) is not trained again.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from l2vg_ray import storage
from l2vg_ray.config import ConfigError, L2VGConfig, LLM2VecConfig, typed
from l2vg_ray.llm2vec import steps
from l2vg_ray.models import resolve_model
from l2vg_ray.torch_utils import set_threads

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

CORPUS_FILE = "corpus.jsonl"
DONE_FILE = "DONE"
CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "train_log.csv"
RESULT_FILE = "llm2vec_result.json"
PHASES = ("mntp", "simcse")


@dataclass(frozen=True)
class WorkerArgs:
    """What each Ray Train worker gets (small: paths and the typed section, no data)."""

    cfg: LLM2VecConfig
    llm: str  # the spec written into the MNTP adapter (hub id, packaged name or folder)
    base_path: str  # the local folder of the base model
    output_dir: str
    phase: str


def write_corpus(cfg: L2VGConfig, out: Path) -> int:
    """The corpus texts to ``out/corpus.jsonl`` once (atomically); returns how many texts."""
    from l2vg_ray.generate.queries import load_source_texts

    path = out / CORPUS_FILE
    if path.is_file():
        return sum(1 for _ in path.open())
    texts = load_source_texts(cfg.llm2vec.corpus, cfg.cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return len(texts)


def read_corpus(out: str | Path) -> list[str]:
    with (Path(out) / CORPUS_FILE).open() as f:
        return [json.loads(line)["text"] for line in f]


def batch_texts(texts: list[str], step: int, batch_size: int, seed: int, rank: int = 0,
                world: int = 1) -> list[str]:
    """This worker's texts of global batch ``step``: a seeded permutation per pass over the
    corpus, so a resumed run sees exactly the batches an uninterrupted one would."""
    import numpy as np

    per_pass = max(1, len(texts) // batch_size)
    epoch, index = divmod(step, per_pass)
    order = np.random.default_rng([seed, epoch]).permutation(len(texts))
    rows = order[index * batch_size:(index + 1) * batch_size]
    return [texts[i] for i in rows[rank::world]]


class PhaseTrainer:
    """One LLM2Vec step (``mntp`` or ``simcse``) on one Ray Train worker: ``setup`` builds the
    model, optimiser and schedule and resumes from a checkpoint; ``train`` runs the steps;
    ``save`` writes the adapter."""

    def __init__(self, args: WorkerArgs, rank: int = 0, world: int = 1) -> None:
        self.args, self.rank, self.world = args, rank, world
        self.cfg = args.cfg
        self.phase_cfg = getattr(args.cfg, args.phase)
        self.folder = Path(args.output_dir) / args.phase
        self.step = 0

    def setup(self) -> None:
        import torch

        torch.manual_seed(int(self.cfg.seed))
        self.tokenizer = steps.tokenizer_for(self.args.base_path)
        if self.args.phase == "mntp":
            self.model, self.head = steps.mntp_model(self.args.base_path, self.cfg)
            self.mask_id = steps.mask_token_id(self.tokenizer, str(self.cfg.mntp.mask_token))
        else:
            mntp_dir = str(Path(self.args.output_dir) / "mntp")
            self.model, self.head = steps.simcse_model(self.args.base_path, mntp_dir, self.cfg), None
        self.model.train()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=float(self.phase_cfg.lr),
                                           weight_decay=float(self.cfg.weight_decay))
        warmup = int(self.cfg.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self.ddp = self.model
        if self.world > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model)
        self.texts = read_corpus(self.args.output_dir)
        self.generator = torch.Generator().manual_seed(int(self.cfg.seed) + self.rank)
        self._resume()

    def _resume(self) -> None:
        import torch
        from peft import set_peft_model_state_dict

        path = self.folder / CHECKPOINT_FILE
        if not path.is_file():
            return
        state = torch.load(path, map_location="cpu", weights_only=False)
        set_peft_model_state_dict(self.model, state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"][self.rank % len(state["generator"])])
        self.step = int(state["step"])
        log.info("llm2vec %s: resumed at step %d", self.args.phase, self.step)

    def loss(self, texts: list[str]):
        batch = steps.tokenize(self.tokenizer, texts, int(self.cfg.max_length))
        if self.args.phase == "mntp":
            ids, labels = steps.mask_for_mntp(batch, mask_id=self.mask_id,
                                              vocab_size=len(self.tokenizer),
                                              prob=float(self.cfg.mntp.mask_prob),
                                              generator=self.generator)
            return steps.mntp_loss(self.ddp, self.head, ids, batch["attention_mask"], labels)
        return steps.simcse_loss(self.ddp, batch["input_ids"], batch["attention_mask"],
                                 float(self.cfg.simcse.temperature))

    def train_step(self) -> float:
        import torch

        texts = batch_texts(self.texts, self.step, int(self.phase_cfg.batch_size),
                            int(self.cfg.seed), self.rank, self.world)
        loss = self.loss(texts)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, float(self.cfg.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return float(loss.detach())

    def train(self, report: Any = None) -> None:
        total = int(self.phase_cfg.steps)
        start, window = time.perf_counter(), []
        while self.step < total:
            window.append(self.train_step())
            if self.step % int(self.cfg.log_every) == 0 or self.step == total:
                mean = sum(window) / len(window)
                self._log_row(mean, time.perf_counter() - start)
                window = []
                if report is not None:
                    report({"phase": self.args.phase, "step": self.step, "loss": mean})
            if self.step % int(self.cfg.checkpoint_every) == 0 and self.step < total:
                self.save_checkpoint()

    def _log_row(self, loss: float, seconds: float) -> None:
        log.info("llm2vec %s step %d/%d loss %.4f (%.1f s)", self.args.phase, self.step,
                 int(self.phase_cfg.steps), loss, seconds)
        if self.rank:
            return
        path = self.folder / LOG_FILE
        new = not path.is_file()
        with path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "loss", "lr", "seconds"])
            writer.writerow([self.step, f"{loss:.6f}", f"{self.scheduler.get_last_lr()[0]:.3g}",
                             f"{seconds:.1f}"])

    def save_checkpoint(self) -> None:
        import torch
        from peft import get_peft_model_state_dict

        if self.rank:
            return
        state = {"lora": get_peft_model_state_dict(self.model),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "generator": [self.generator.get_state()], "step": self.step}
        tmp = self.folder / (CHECKPOINT_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.folder / CHECKPOINT_FILE)

    def save(self) -> None:
        """The adapter in LLM2Vec's layout (rank 0); ``DONE`` last, so a folder with it is whole."""
        if self.rank:
            return
        # Saved against the local base folder (PEFT reads its config.json while saving), then
        # adapter_config.json names the spec as given (a hub id or packaged name works anywhere).
        self.model.peft_config["default"].base_model_name_or_path = self.args.base_path
        self.model.save_pretrained(self.folder)
        config_file = self.folder / "adapter_config.json"
        adapter = json.loads(config_file.read_text())
        adapter["base_model_name_or_path"] = self.args.llm
        config_file.write_text(json.dumps(adapter, indent=2))
        if self.args.phase == "mntp":
            self.tokenizer.save_pretrained(self.folder)
        (self.folder / DONE_FILE).write_text(json.dumps({"steps": self.step}))
        (self.folder / CHECKPOINT_FILE).unlink(missing_ok=True)


def train_phase(args: WorkerArgs, rank: int = 0, world: int = 1, report: Any = None) -> None:
    """One LLM2Vec step from its checkpoint (if any) to its saved adapter."""
    (Path(args.output_dir) / args.phase).mkdir(parents=True, exist_ok=True)
    trainer = PhaseTrainer(args, rank, world)
    trainer.setup()
    trainer.train(report)
    trainer.save()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    ctx = ray.train.get_context()
    set_threads(config["cpus"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train_phase(config["args"], ctx.get_world_rank(), ctx.get_world_size(), ray.train.report)


def phase_done(out: Path, phase: str) -> bool:
    return (out / phase / DONE_FILE).is_file()


def _fit(args: WorkerArgs, x: LLM2VecConfig) -> None:
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": float(x.cpus_per_worker)}
    if x.use_gpu:
        resources["GPU"] = 1.0
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"args": args, "cpus": float(x.cpus_per_worker)},
        scaling_config=ScalingConfig(num_workers=int(x.num_workers), use_gpu=bool(x.use_gpu),
                                     resources_per_worker=resources),
        run_config=RunConfig(name=f"llm2vec-{args.phase}",
                             storage_path=str(Path(args.output_dir) / "ray_results"),
                             failure_config=FailureConfig(max_failures=0),
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    trainer.fit()


def run_llm2vec(cfg: L2VGConfig) -> dict[str, Any]:
    """Build the LLM2Vec teacher of ``llm2vec.llm`` into ``llm2vec.output_dir`` (Ray initialised
    by the caller). Steps already done are skipped; an interrupted one resumes."""
    c = typed(cfg)
    x = c.llm2vec
    if storage.is_uri(str(x.output_dir)):
        raise ConfigError(f"llm2vec.output_dir={x.output_dir!r}: the workers write their adapters "
                          f"and checkpoints as files; use a local folder, or on several nodes a "
                          f"shared mount (NFS / EFS) at the same path on every node.")
    out = Path(storage.absolute(str(x.output_dir)))
    base_path = resolve_model(str(x.llm), cache_dir=c.cache_dir)
    n_texts = write_corpus(c, out)
    if n_texts < max(x.mntp.batch_size, x.simcse.batch_size):
        raise ConfigError(f"llm2vec.corpus gave {n_texts} texts, fewer than one batch; raise "
                          f"llm2vec.corpus.limit or lower the batch sizes.")
    seconds: dict[str, float] = {}
    for phase in PHASES:
        if phase_done(out, phase):
            log.info("llm2vec %s: already done (%s)", phase, out / phase / DONE_FILE)
            continue
        start = time.perf_counter()
        _fit(WorkerArgs(cfg=x, llm=str(x.llm), base_path=str(base_path), output_dir=str(out),
                        phase=phase), x)
        seconds[phase] = round(time.perf_counter() - start, 1)
    result = {
        "llm": str(x.llm), "output_dir": str(out), "corpus_texts": n_texts,
        "steps": {p: int(getattr(x, p).steps) for p in PHASES},
        "final_loss": {p: last_loss(out / p / LOG_FILE) for p in PHASES},
        "seconds": seconds,
        "teacher": {"kind": "llm2vec", "model": str(out / "mntp"), "adapter": str(out / "simcse")},
    }
    (out / RESULT_FILE).write_text(json.dumps(result, indent=2))
    log.info("LLM2Vec teacher ready: teacher.kind=llm2vec teacher.model=%s teacher.adapter=%s",
             out / "mntp", out / "simcse")
    return result


def last_loss(path: Path) -> float | None:
    if not path.is_file():
        return None
    rows = list(csv.DictReader(path.open()))
    return float(rows[-1]["loss"]) if rows else None

