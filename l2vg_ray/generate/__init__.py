"""Generation stage: queries -> LLM responses -> teacher embeddings -> Parquet.

Kept light on purpose: importing ``l2vg_ray.generate`` pulls no torch, transformers, vllm or ray.
Import the submodules (``backends``, ``teacher``, ``queries``, ``pipeline``) for the real work.
"""
