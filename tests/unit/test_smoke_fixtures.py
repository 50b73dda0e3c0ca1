from __future__ import annotations


def test_tiny_llm_generates_with_chat_template(tiny_llm_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5 or out[0, -1] == tok.eos_token_id
    assert isinstance(torch.__version__, str)


def test_tiny_teacher_embeds(tiny_teacher_dir):
    from l2vg_ray.text_encoders import SentenceTransformerEncoder

    enc = SentenceTransformerEncoder(str(tiny_teacher_dir))
    emb = enc.encode(["hello world", "the sea is blue"])
    assert emb.shape == (2, 32) and emb.dtype.name == "float32"
