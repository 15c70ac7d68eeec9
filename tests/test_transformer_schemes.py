"""Transformer schemes: what each preset selects in Llama and BERT, LoRA files, and their errors
(tiny Hugging Face configs; resolution only, nothing compiled)."""

import pytest
import torch

import pock_tvm
from pock_tvm.adapters import add_lora
from pock_tvm.frontend import from_torch
from pock_tvm.scheme import LoRA, Scheme
from helpers import tiny_llama

transformers = pytest.importorskip("transformers")

BERT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16)


class Bert(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bert = transformers.BertModel(transformers.BertConfig(**BERT), add_pooling_layer=False)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, ids):
        return self.head(self.bert(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[:, 0])


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama(vocab_size=50, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1)
    return from_torch(model, (torch.zeros(1, 4, dtype=torch.int64), torch.ones(1, 4, dtype=torch.int64)))


@pytest.fixture(scope="module")
def bert():
    return from_torch(Bert().eval(), torch.zeros(1, 4, dtype=torch.int64))


def trained(scheme, model):
    return sorted(n for n, u in Scheme.load(scheme).resolve(model).items() if u.mode != "frozen")


def per_layer(*leaves):
    return sorted(n.format(i) for i in range(2) for n in leaves)


def test_attention_only(llama, bert):
    assert trained("attention-only", llama) == per_layer(
        *[f"lm.model.layers.{{}}.self_attn.{p}_proj.weight" for p in "qkvo"])
    assert trained("attention-only", bert) == per_layer(
        *[f"bert.encoder.layer.{{}}.attention.{p}.weight" for p in ("self.query", "self.key", "self.value",
                                                                        "output.dense")])


def test_mlp_only(llama, bert):
    assert trained("mlp-only", llama) == per_layer(
        *[f"lm.model.layers.{{}}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")])
    assert trained("mlp-only", bert) == per_layer(
        "bert.encoder.layer.{}.intermediate.dense.weight", "bert.encoder.layer.{}.output.dense.weight")


def test_bias_norm_takes_rms_norm_weights_and_every_bias(llama, bert):
    assert trained("bias-norm", llama) == sorted(
        ["lm.model.norm.weight"] + per_layer("lm.model.layers.{}.input_layernorm.weight",
                                             "lm.model.layers.{}.post_attention_layernorm.weight"))
    names = trained("bias-norm", bert)
    assert "bert.embeddings.LayerNorm.weight" in names and "head.bias" in names
    assert all(n.endswith("bias") or "LayerNorm" in n for n in names)


def test_mlp_partial_takes_a_quarter_of_the_input_channels(llama):
    updates = Scheme.preset("mlp-partial").resolve(llama)
    assert updates["lm.model.layers.0.mlp.up_proj.weight"].channels == 4  # of 16
    assert updates["lm.model.layers.0.mlp.down_proj.weight"].channels == 8  # of 32


def test_the_tied_output_embedding_is_the_input_embedding(llama):
    assert [p.name for p in llama.params if "embed" in p.name or "lm_head" in p.name] == ["lm.model.embed_tokens.weight"]


def test_lora_adds_trained_adapters_only(llama):
    scheme = Scheme.preset("lora")
    adapted = add_lora(llama, scheme.lora)
    assert len(adapted.params) == len(llama.params) + 16
    a = adapted.param("lm.model.layers.1.self_attn.k_proj.lora_A.weight")
    b = adapted.param("lm.model.layers.1.self_attn.k_proj.lora_B.weight")
    assert a.value.shape == (8, 16) and b.value.shape == (8, 8) and not b.value.any()  # k_proj: 16 -> 8
    assert trained(scheme, adapted) == sorted(p.name for p in adapted.params if p.adapter)


def test_lora_file_reads_back_equal(tmp_path, llama):
    scheme = Scheme("mine", lora=LoRA(rank=4, alpha=8, select="@role:mlp"))
    path = tmp_path / "s.toml"
    path.write_text(scheme.to_toml())
    assert Scheme.load(path) == scheme
    path.write_text('preset = "bias-norm"\n[lora]\nrank = 2\n')
    loaded = Scheme.load(path)
    assert loaded.norm_affine and loaded.lora == LoRA(rank=2)


@pytest.mark.parametrize("text, message", [
    ('[lora]\nrank = "8"\n', r"field 'lora' must be a table with rank \(integer > 0\)"),
    ('[lora]\nranks = 8\n', r"field 'lora' must be a table"),
])
def test_bad_lora_tables_are_named(tmp_path, text, message):
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        Scheme.load(path)


def test_lora_on_nothing_and_unknown_roles_are_errors(llama):
    with pytest.raises(ValueError, match=r"LoRA: select 'head\*' matches no linear weight"):
        add_lora(llama, LoRA(select="head*"))
    with pytest.raises(ValueError, match=r"unknown role 'attn' in '@role:attn'; roles are attention, mlp"):
        Scheme("x", rules=[pock_tvm.scheme.Rule("@role:attn")]).resolve(llama)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match=r"unknown preset 'lora-8'; choose full, .*lora, last-k, last-N"):
        Scheme.preset("lora-8")
