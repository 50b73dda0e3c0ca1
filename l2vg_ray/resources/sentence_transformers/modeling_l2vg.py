"""An LLM2Vec-Gen encoder as a sentence-transformers module (written by ``l2vg export``).

Self-contained: it needs torch, transformers, safetensors and sentence-transformers, not
l2vg-ray. Load the folder with ``SentenceTransformer(path, trust_remote_code=True)``.

The text (after its prompt) is tokenised by the frozen LLM's tokenizer and followed by
``n_thought`` + ``n_compression`` special tokens whose embeddings are the trained rows in
``l2vg_trainable.safetensors``; the LLM's last hidden states at the compression positions pass the
``reconstruction`` head, then the ``alignment`` head; the mean over those positions is the
embedding. Left padding, positions counted from each text's first token, exactly as
``l2vg_ray.method.L2VGEncoder.encode``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import Any

import torch
from sentence_transformers.base.modules.input_module import InputModule
from torch import nn

LLM_DIR = "llm"
WEIGHTS_FILE = "l2vg_trainable.safetensors"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class L2VGModule(InputModule):
    config_keys = ["n_thought", "n_compression", "max_length", "teacher_dim", "dtype"]
    config_file_name = "l2vg_module.json"
    save_in_root = True

    def __init__(self, llm_path: str, n_thought: int, n_compression: int, max_length: int,
                 teacher_dim: int, dtype: str = "float32", **_: Any) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.llm_path = llm_path
        self.n_thought, self.n_compression = int(n_thought), int(n_compression)
        self.max_length, self.teacher_dim, self.dtype = int(max_length), int(teacher_dim), dtype
        self.tokenizer = AutoTokenizer.from_pretrained(llm_path)
        self.llm = AutoModel.from_pretrained(llm_path, dtype=_DTYPES[dtype]).eval()
        self.llm.requires_grad_(False)
        hidden = int(self.llm.get_input_embeddings().embedding_dim)
        n = self.n_thought + self.n_compression
        self.special_embeddings = nn.Parameter(torch.zeros(n, hidden), requires_grad=False)
        self.reconstruction = nn.Linear(hidden, hidden)
        self.alignment = nn.Linear(hidden, self.teacher_dim)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.tokenizer.eos_token_id)

    # ------------------------------------------------------------------ sentence-transformers API
    def get_embedding_dimension(self) -> int:
        return self.teacher_dim

    def preprocess(self, inputs: Sequence[str], prompt: str | None = None, **kwargs: Any) -> dict:
        texts = [str(t) for t in inputs]
        if prompt:
            texts = [prompt + t for t in texts]
        n = self.n_thought + self.n_compression
        room = self.max_length - n
        ids = [list(x[:room]) for x in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        width = max(len(x) for x in ids) + n if ids else n
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            length = len(row) + n
            input_ids[i, width - length : width - n] = torch.tensor(row, dtype=torch.long)
            mask[i, width - length :] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def forward(self, features: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
        ids, mask = features["input_ids"], features["attention_mask"]
        n = self.n_thought + self.n_compression
        embeds = self.llm.get_input_embeddings()(ids).clone()
        embeds[:, -n:] = self.special_embeddings.to(embeds.dtype)  # the special tokens end every row
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                          use_cache=False).last_hidden_state[:, -self.n_compression :].float()
        soft = self.reconstruction(hidden)
        features["sentence_embedding"] = self.alignment(soft).mean(dim=1)
        return features

    # ------------------------------------------------------------------ saving and loading
    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        from safetensors.torch import save_file

        self.save_config(output_path)
        state = {"special_embeddings": self.special_embeddings.detach().float().contiguous(),
                 **{f"reconstruction.{k}": v.detach().float().contiguous()
                    for k, v in self.reconstruction.state_dict().items()},
                 **{f"alignment.{k}": v.detach().float().contiguous()
                    for k, v in self.alignment.state_dict().items()}}
        save_file(state, os.path.join(output_path, WEIGHTS_FILE))
        target = os.path.join(output_path, LLM_DIR)
        if os.path.abspath(self.llm_path) != os.path.abspath(target):
            shutil.copytree(self.llm_path, target, dirs_exist_ok=True)
        module_file = os.path.join(output_path, os.path.basename(__file__))
        if os.path.abspath(__file__) != os.path.abspath(module_file):
            shutil.copy2(__file__, module_file)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: Any = None,
             cache_folder: str | None = None, revision: str | None = None,
             local_files_only: bool = False, **kwargs: Any) -> L2VGModule:
        from safetensors.torch import load_file

        common = {"token": token, "cache_folder": cache_folder, "revision": revision,
                  "local_files_only": local_files_only}
        config = cls.load_config(model_name_or_path, subfolder=subfolder, **common)
        llm_sub = f"{subfolder}/{LLM_DIR}" if subfolder else LLM_DIR
        llm_path = cls.load_dir_path(model_name_or_path, subfolder=llm_sub, **common)
        module = cls(llm_path=llm_path, **config)
        weights = cls.load_file_path(model_name_or_path, filename=WEIGHTS_FILE,
                                     subfolder=subfolder, **common)
        state = load_file(weights)
        with torch.no_grad():
            module.special_embeddings.copy_(state["special_embeddings"])
            module.reconstruction.load_state_dict(
                {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("reconstruction.")})
            module.alignment.load_state_dict(
                {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("alignment.")})
        return module
