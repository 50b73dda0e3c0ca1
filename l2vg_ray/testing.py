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
