"""The LLM2Vec recipe's pure pieces: the models of its two steps, MNTP masking and loss, SimCSE
loss (no Ray, no files).

LLM2Vec (BehnamGhader et al., 2024) turns a decoder into a text encoder in three steps: enable
bidirectional attention, adapt the model to it with masked next-token prediction (MNTP, a LoRA),
then train a second LoRA on the merged model with unsupervised SimCSE. The embedding is the mean
of the last hidden states over every token of the text. ``l2vg_ray.llm2vec.run`` trains the two
LoRAs; ``teacher.kind: llm2vec`` (``l2vg_ray.generate.teacher.LLM2VecTeacher``) loads them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from l2vg_ray.generate.teacher import make_bidirectional
from l2vg_ray.torch_utils import load_tokenizer, mean_pool, torch_dtype

if TYPE_CHECKING:
    import torch

    from l2vg_ray.config import LLM2VecConfig


def lora_config(cfg: LLM2VecConfig):
    from peft import LoraConfig

    return LoraConfig(r=int(cfg.lora_r), lora_alpha=int(cfg.lora_alpha),
                      lora_dropout=float(cfg.lora_dropout),
                      target_modules=[str(t) for t in cfg.lora_targets], bias="none")


def tokenizer_for(base_path: str):
    """The base model's tokenizer, padded on the left as LLM2Vec's teacher reads texts."""
    return load_tokenizer(base_path, padding_side="left")


def mntp_model(base_path: str, cfg: LLM2VecConfig) -> tuple[Any, Any]:
    """(the bidirectional base model with a fresh LoRA, the frozen LM head). The LoRA sits on the
    base model (no head), so its saved adapter applies to ``AutoModel`` as the teacher loads it."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    causal = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype(str(cfg.dtype)))
    make_bidirectional(causal)
    head = causal.get_output_embeddings()
    head.requires_grad_(False)
    return get_peft_model(causal.get_decoder(), lora_config(cfg)), head


def simcse_model(base_path: str, mntp_dir: str, cfg: LLM2VecConfig) -> Any:
    """The bidirectional base model with the MNTP LoRA merged, attention dropout at
    ``simcse.dropout``, and a fresh LoRA on top."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModel

    model = make_bidirectional(AutoModel.from_pretrained(base_path, dtype=torch_dtype(str(cfg.dtype))))
    model = make_bidirectional(PeftModel.from_pretrained(model, mntp_dir).merge_and_unload())
    set_attention_dropout(model, float(cfg.simcse.dropout))
    return get_peft_model(model, lora_config(cfg))


def set_attention_dropout(model: Any, p: float) -> int:
    """Every attention module's dropout probability set to ``p`` (LLM2Vec's simcse_dropout);
    returns how many modules took it."""
    n = 0
    for module in model.modules():
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p
            n += 1
    if n == 0:
        raise ValueError(f"{type(model).__name__} has no attention_dropout to set for SimCSE.")
    return n


def mask_token_id(tokenizer: Any, mask_token: str) -> int:
    """The id of the mask token: the tokenizer's own, else ``mask_token`` when it is one token."""
    if tokenizer.mask_token_id is not None:
        return int(tokenizer.mask_token_id)
    ids = tokenizer(mask_token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"llm2vec.mntp.mask_token={mask_token!r} is {len(ids)} tokens for this "
                         f"tokenizer; give a string that is one token (e.g. '_').")
    return int(ids[0])


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Texts as the teacher will read them: special tokens, left padding, cut at max_length."""
    return tokenizer([t.strip() for t in texts], padding=True, truncation=True,
                     max_length=max_length, return_special_tokens_mask=True, return_tensors="pt")


def mask_for_mntp(batch: dict[str, torch.Tensor], *, mask_id: int, vocab_size: int, prob: float,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids with masking, labels): BERT's scheme on real, non-special tokens - ``prob`` of
    them are chosen, 80% become the mask token, 10% a random token, 10% stay; labels are -100
    except at the chosen positions. A text's first token is never chosen (MNTP predicts token i
    from the state at i-1, which must be a real token). At least one position is chosen per text
    that has a candidate."""
    import torch

    ids = batch["input_ids"].clone()
    real = batch["attention_mask"].bool()
    after_real = torch.zeros_like(real)
    after_real[:, 1:] = real[:, :-1]
    candidates = real & after_real & ~batch["special_tokens_mask"].bool()
    draw = torch.rand(ids.shape, generator=generator)
    chosen = candidates & (draw < prob)
    # a text with candidates but no draw under prob gets its lowest-draw candidate
    lowest = torch.where(candidates, draw, torch.full_like(draw, 2.0)).argmin(dim=1)
    none = candidates.any(dim=1) & ~chosen.any(dim=1)
    chosen[none, lowest[none]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    how = torch.rand(ids.shape, generator=generator)
    ids[chosen & (how < 0.8)] = mask_id
    randomised = chosen & (how >= 0.8) & (how < 0.9)
    ids[randomised] = torch.randint(vocab_size, (int(randomised.sum()),), generator=generator)
    return ids, labels


def mntp_loss(model: Any, head: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the masked tokens, each predicted by the LM head from the hidden state
    one position before it (the head is applied only where a prediction is scored)."""
    import torch.nn.functional as F

    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]
    where = targets != -100
    logits = head(hidden[:, :-1][where])
    return F.cross_entropy(logits.float(), targets[where])


def mean_embeddings(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of the last hidden states over every real token (the teacher's pooling)."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return mean_pool(hidden, attention_mask)


def simcse_loss(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """Unsupervised SimCSE: the batch read twice (two dropout masks); each text's second reading
    must be the closest, by cosine / temperature, among the second readings of the batch."""
    import torch
    import torch.nn.functional as F

    a = F.normalize(mean_embeddings(model, input_ids, attention_mask).float(), dim=-1)
    b = F.normalize(mean_embeddings(model, input_ids, attention_mask).float(), dim=-1)
    logits = a @ b.T / temperature
    return F.cross_entropy(logits, torch.arange(len(a)))
