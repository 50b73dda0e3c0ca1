"""Tiny random models for tests and smoke runs (built locally, nothing downloaded).

``tests/conftest.py`` wraps these in session fixtures; they live in the library so that the e2e
tests, benchmarks and the local-cluster job test can build the same tiny models in a subprocess.
"""

from __future__ import annotations

import json
from pathlib import Path

# A small corpus to train the tiny BPE tokenizer on: enough English for sensible merges.
_CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "How do I bake bread at home? Mix flour, water, salt and yeast, then let it rise.",
    "Explain photosynthesis in simple terms. Plants turn light, water and air into sugar.",
    "Write a short poem about the sea. The sea is wide and blue and deep.",
    "Translate hello into Spanish. Hello in Spanish is hola.",
    "What is two plus two? Two plus two is four.",
    "Give me three tips for better sleep: keep a schedule, avoid screens, and exercise.",
    "Who wrote Hamlet? Hamlet was written by William Shakespeare.",
    "Why is the sky blue? Sunlight scatters off air molecules, and blue light scatters most.",
    "Summarise the plot of a detective story: a crime, clues, suspects and a reveal.",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer (PreTrainedTokenizerFast) with chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llm(
    out_dir: str | Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    initializer_range: float = 0.02,
) -> Path:
    """Save a tiny random Llama-architecture causal LM with its tokenizer to ``out_dir``.

    With the default ``initializer_range`` greedy decoding repeats one token; a large one (0.5)
    gives varied greedy texts with clear logit margins (for comparing generation engines).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_tiny_bert(out_dir: str | Path, *, hidden: int = 32, seed: int = 0) -> Path:
    """A tiny random BERT encoder and a WordPiece tokenizer that wraps texts in [CLS] .. [SEP]
    (the layout of the ``cls-encoder`` teacher's models), saved to ``out_dir``."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(_CORPUS * 4, trainer=trainers.WordPieceTrainer(
        vocab_size=256, special_tokens=specials, show_progress=False))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.BertProcessing(("[SEP]", sep_id), ("[CLS]", cls_id))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(fast), hidden_size=hidden, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=hidden * 2,
                                 max_position_embeddings=128, pad_token_id=fast.pad_token_id))
    model.save_pretrained(out_dir, safe_serialization=True)
    fast.save_pretrained(out_dir)
    return out_dir


def build_tiny_sentence_encoder(out_dir: str | Path, *, hidden: int = 32, seed: int = 0) -> Path:
    """Save a tiny random BERT + mean pooling sentence-transformers model to ``out_dir``."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out_dir = Path(out_dir)
    hf_dir = out_dir.parent / (out_dir.name + "-hf")
    hf_dir.mkdir(parents=True, exist_ok=True)
    words = sorted({w.strip(".,?:!").lower() for line in _CORPUS for w in line.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    vocab += [chr(c) for c in range(ord("a"), ord("z") + 1) if chr(c) not in vocab]
    vocab += [f"##{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
    (hf_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(hf_dir / "vocab.txt"))  # transformers 5: `vocab`, not `vocab_file`
    torch.manual_seed(seed)
    bert = BertModel(
        BertConfig(
            vocab_size=len(vocab),
            hidden_size=hidden,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=hidden * 2,
            max_position_embeddings=512,
        )
    )
    bert.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    transformer = models.Transformer(str(hf_dir), max_seq_length=128)
    pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(out_dir))
    return out_dir


def build_tiny_llm2vec_adapters(base_dir: str | Path, out_dir: str | Path, *, seed: int = 0) -> tuple[Path, Path]:
    """Two LoRA adapters on the tiny LLM in LLM2Vec's layout: ``mntp`` (its adapter_config.json
    names ``base_dir`` as the base model; it carries the tokenizer too) and ``simcse`` (applied on
    top of the merged MNTP model). LoRA B matrices are random, so both adapters change the
    outputs. Returns (mntp folder, simcse folder)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    folders = []
    base = AutoModel.from_pretrained(str(base_dir))
    for name in ("mntp", "simcse"):
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        peft_model = get_peft_model(base, lora)
        peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
        folder = out_dir / name
        peft_model.save_pretrained(folder)
        folders.append(folder)
        base = peft_model.merge_and_unload()
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(folders[0])
    return folders[0], folders[1]


def build_tiny_official_checkpoint(
    llm_dir: str | Path,
    out_dir: str | Path,
    *,
    n_special: int = 4,
    n_compression: int = 2,
    teacher_dim: int = 32,
    seed: int = 0,
) -> Path:
    """A tiny trained model in the official LLM2Vec-Gen on-disk layout (what the published
    ``McGill-NLP/LLM2Vec-Gen-*`` repos hold), with random trained values: the tokenizer with
    ``<questionK>`` special tokens, ``encoder/`` (a PEFT TrainableTokens adapter on the base
    model's embedding rows of those tokens), ``reconstruction_mlp`` / ``alignment_mlp``
    (torch.save of {"state_dict", "config"}), ``run_config.yml``, ``encoder_decoder_config.json``.
    """
    import torch
    import yaml
    from peft import TrainableTokensConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    special = [f"<question{i}>" for i in range(1, n_special + 1)]
    tok = AutoTokenizer.from_pretrained(str(llm_dir))
    tok.add_special_tokens({"additional_special_tokens": special})
    tok.padding_side = "left"
    ids = tok.convert_tokens_to_ids(special)
    base = AutoModel.from_pretrained(str(llm_dir))
    base.resize_token_embeddings(len(tok))
    hidden = base.config.hidden_size
    model = get_peft_model(base, TrainableTokensConfig(token_indices=ids))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    model.save_pretrained(out_dir / "encoder")
    tok.save_pretrained(out_dir)
    for name, (i, o) in (("reconstruction_mlp", (hidden, hidden)), ("alignment_mlp", (hidden, teacher_dim))):
        lin = torch.nn.Linear(i, o)
        torch.save({"state_dict": {"projection.weight": lin.weight.detach().clone(),
                                   "projection.bias": lin.bias.detach().clone()},
                    "config": {"input_dim": i, "output_dim": o, "dtype": "torch.float32",
                               "size": 1, "pooling_mode": "linear"}},
                   out_dir / name)
    run = {"model_name_or_path": str(llm_dir), "torch_dtype": "float32", "special_tokens": special,
           "encoding_mode": f"last_{n_compression}_tokens", "max_input_length": 64,
           "pretrained_teacher_path": "tiny-teacher"}
    # The official dump carries python-object tags (e.g. enums); one is kept to test the reader.
    text = yaml.safe_dump(run) + "lr_scheduler_type: !!python/object/apply:transformers.trainer_utils.SchedulerType\n- linear\n"
    (out_dir / "run_config.yml").write_text(text)
    (out_dir / "encoder_decoder_config.json").write_text(
        json.dumps({"encoding_mode": f"last_{n_compression}_tokens", "save_decoder": False})
    )
    return out_dir


def write_queries_jsonl(path: str | Path, queries: list[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for q in queries:
            f.write(json.dumps({"query": q}) + "\n")
    return path


TINY_QUERIES = [
    "What is the capital of France?",
    "How do I bake bread at home?",
    "Explain photosynthesis in simple terms.",
    "Write a short poem about the sea.",
    "Translate hello into Spanish.",
    "What is two plus two?",
    "Give me three tips for better sleep.",
    "Who wrote Hamlet?",
    "Why is the sky blue?",
    "Summarise the plot of a detective story.",
    "Name a fruit that is yellow.",
    "How many legs does a spider have?",
]


def write_fixture_dataset(
    out_dir: str | Path, *, n_rows: int = 24, teacher_dim: int = 32, seed: int = 0
) -> Path:
    """A generated-dataset stand-in (``schema.dataset_schema``): TINY_QUERIES cycled to ``n_rows``
    rows, short responses, seeded random unit teacher vectors; one Parquet shard in ``out_dir``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from l2vg_ray import schema

    answers = {line.split("? ")[0] + "?": line.split("? ", 1)[1] for line in _CORPUS if "? " in line}
    rng = np.random.default_rng(seed)
    queries, responses = [], []
    for i in range(n_rows):
        q = TINY_QUERIES[i % len(TINY_QUERIES)]
        k = i // len(TINY_QUERIES)
        queries.append(q if k == 0 else f"{q} (variant {k})")
        responses.append(answers.get(q, f"Here is a short answer about: {q.lower()}"))
    teacher = rng.standard_normal((n_rows, teacher_dim)).astype(np.float32)
    teacher /= np.linalg.norm(teacher, axis=1, keepdims=True)
    table = pa.table(
        {
            schema.ID: [schema.query_id(q) for q in queries],
            schema.QUERY: queries,
            schema.RESPONSE: responses,
            schema.TEACHER_EMBEDDING: list(teacher),
            schema.GENERATOR_MODEL: ["fixture"] * n_rows,
            schema.TEACHER_MODEL: ["random"] * n_rows,
            schema.SAMPLING_PARAMS: ["{}"] * n_rows,
            schema.RESPONSE_TOKENS: [len(r.split()) for r in responses],
        },
        schema=schema.dataset_schema(teacher_dim),
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out_dir / "part-00000-00000000.parquet")
    return out_dir


# ---------------------------------------------------------------- serving test apps
SERVED_NAME = "tiny-teacher"  # serve.model_name of the test apps
SERVE_MAX_TOKENS = 40
SERVE_MAX_ITEMS = 8
SERVE_MAX_BYTES = 4096


def serve_test_config(tmp_path: str | Path, model: str | Path, loader: str, *extra: str):
    """A serving config with small limits (``SERVE_*``) on a free port; ``extra`` overrides."""
    from l2vg_ray.config import load_config

    tmp_path = Path(tmp_path)
    return load_config(
        None,
        [
            f"output_dir={tmp_path / 'out'}",
            f"cache_dir={tmp_path / 'cache'}",
            f"serve.model={model}",
            f"serve.loader={loader}",
            f"serve.model_name={SERVED_NAME}",
            "serve.port=0",
            "serve.max_batch_size=4",  # so that one request of 8 texts spans 2 model batches
            f"serve.max_items_per_request={SERVE_MAX_ITEMS}",
            f"serve.max_request_bytes={SERVE_MAX_BYTES}",
            f"serve.max_tokens_per_text={SERVE_MAX_TOKENS}",
            "serve.num_cpus=0.5",
            "serve.ready_timeout_s=120",
            *extra,
        ],
    )



def skip_if_not_served(error) -> None:
    """In a test of a real registry archive: skip, loudly and with the fix, only when the
    registry answered that it does not serve it (an ``ArchiveUnavailable``); re-raise otherwise."""
    import pytest

    if str(getattr(error, "reason", "")).startswith("the registry answered"):
        pytest.skip(f"!!! THE REGISTRY DOES NOT SERVE {error.requirement}: {error.reason} What "
                    f"needs it will not run on a new machine. Fix: {error.fix}")
    raise error
