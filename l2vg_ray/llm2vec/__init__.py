"""The LLM2Vec teacher of any decoder (``l2vg llm2vec``): ``steps`` (pure pieces of the recipe),
``run`` (the Ray Train stage, ``run_llm2vec``)."""
