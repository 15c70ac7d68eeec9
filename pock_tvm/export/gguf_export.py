"""A fine-tuned Llama-architecture model written back as GGUF (the ``gguf`` package's writer), for
the llama.cpp family and ``transformers``' GGUF loader (what read SmolLM2 in the first place)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ..runtime.program import Program
from .hf import hf_state_dict

DTYPES = ("f32", "f16")


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order of a query/key projection (its converter's ``permute``; the loader
    undoes it): each head's rotary halves interleaved."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def _metadata(writer, config, template, dtype: str) -> None:
    import gguf

    if template is not None:
        reader = gguf.GGUFReader(str(template))
        arch = str(reader.fields["general.architecture"].contents())
        if arch != "llama":
            raise ValueError(f"template '{template}' is a {arch} model; save_gguf writes Llama-architecture models")
        for key, expected in (("llama.block_count", config.num_hidden_layers),
                              ("llama.embedding_length", config.hidden_size), ("llama.vocab_size", config.vocab_size)):
            if key in reader.fields and int(reader.fields[key].contents()) != expected:
                raise ValueError(f"template '{template}' has {key} = {reader.fields[key].contents()}, the model "
                                 f"{expected}: give the GGUF file the model was loaded from")
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
                continue
            kind = field.types[0]
            if kind == gguf.GGUFValueType.ARRAY:
                writer.add_key_value(key, field.contents(), kind, sub_type=field.types[-1])
            else:
                writer.add_key_value(key, field.contents(), kind)
    else:
        writer.add_name(getattr(config, "_name_or_path", "") or "pock_tvm fine-tune")
        writer.add_block_count(config.num_hidden_layers)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or
                                        (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)


def save_gguf(program: Program, hf_model, path: str | Path, template: str | Path | None = None,
              dtype: str = "f32", force: bool = False) -> Path:
    """The fine-tuned ``hf_model`` (a ``LlamaForCausalLM``, LoRA merged) as a GGUF file at ``path``,
    written atomically. ``template``: the GGUF file the model was loaded from; its metadata (tokenizer,
    chat template, names) is carried over, so the file replaces it. ``dtype``: ``f32`` (exact) or
    ``f16`` (half the size; 1-D tensors stay float32)."""
    import gguf

    if dtype not in DTYPES:
        raise ValueError(f"save_gguf: dtype {dtype!r}; choose {' or '.join(DTYPES)}")
    config = hf_model.config
    if getattr(config, "model_type", None) != "llama":
        raise ValueError(f"save_gguf: a {getattr(config, 'model_type', type(hf_model).__name__)} model; GGUF export "
                         "covers Llama-architecture causal LMs (SmolLM2, Llama); use save_pretrained for others")
    path = Path(path)
    if path.exists() and not force:
        raise ValueError(f"'{path}' exists; choose another path or pass force=True")
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    state.update(hf_state_dict(program, hf_model))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        _metadata(writer, config, template, dtype)
        for key, value in state.items():
            if key == "lm_head.weight" and config.tie_word_embeddings:
                continue  # GGUF ties it to token_embd
            if "rotary_emb" in key:
                continue  # recomputed from the metadata
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ValueError(f"save_gguf: no GGUF name for '{key}'")
            value = np.asarray(value, "float32")
            if ".attn_q." in name:
                value = _permute(value, config.num_attention_heads)
            elif ".attn_k." in name:
                value = _permute(value, config.num_key_value_heads)
            writer.add_tensor(name, value.astype("float16") if dtype == "f16" and value.ndim > 1 else value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
