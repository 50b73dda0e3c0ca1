"""The one column schema of the generated dataset. Every stage imports names from here."""

from __future__ import annotations

import pyarrow as pa

# Columns of the generated (query -> response -> teacher embedding) dataset.
ID = "id"  # stable hash of the query text (see ``query_id``)
QUERY = "query"
RESPONSE = "response"
TEACHER_EMBEDDING = "teacher_embedding"  # float32 fixed-size list
GENERATOR_MODEL = "generator_model"
TEACHER_MODEL = "teacher_model"
SAMPLING_PARAMS = "sampling_params"  # JSON string
RESPONSE_TOKENS = "response_tokens"  # number of generated tokens (for tokens/s and filtering)

COLUMNS = (
    ID,
    QUERY,
    RESPONSE,
    TEACHER_EMBEDDING,
    GENERATOR_MODEL,
    TEACHER_MODEL,
    SAMPLING_PARAMS,
    RESPONSE_TOKENS,
)

MANIFEST_FILE = "manifest.json"


def dataset_schema(teacher_dim: int) -> pa.Schema:
    """Arrow schema of the generated Parquet shards for a teacher of ``teacher_dim`` dims."""
    if teacher_dim <= 0:
        raise ValueError(f"teacher_dim must be positive, got {teacher_dim}.")
    return pa.schema(
        [
            pa.field(ID, pa.string(), nullable=False),
            pa.field(QUERY, pa.string(), nullable=False),
            pa.field(RESPONSE, pa.string(), nullable=False),
            pa.field(TEACHER_EMBEDDING, pa.list_(pa.float32(), teacher_dim), nullable=False),
            pa.field(GENERATOR_MODEL, pa.string(), nullable=False),
            pa.field(TEACHER_MODEL, pa.string(), nullable=False),
            pa.field(SAMPLING_PARAMS, pa.string(), nullable=False),
            pa.field(RESPONSE_TOKENS, pa.int32(), nullable=False),
        ]
    )


def query_id(query: str) -> str:
    """Stable id of a query: the first 16 hex digits of its SHA-256 (UTF-8)."""
    import hashlib

    return hashlib.sha256(query.encode("utf-8")).hexdigest()[:16]


def require_columns(batch_columns, required, *, stage: str) -> None:
    """Raise a ValueError naming the missing columns of a batch handed to ``stage``."""
    missing = [c for c in required if c not in batch_columns]
    if missing:
        raise ValueError(
            f"{stage} needs columns {list(required)} but the batch lacks {missing} "
            f"(it has {sorted(batch_columns)}). Check the previous stage's output."
        )
