"""Hugging Face ``transformers`` models through torch.export train like PyTorch (tiny configs, no download)."""

import numpy as np
import pytest
import torch

import pock_tvm
from helpers import ADAM_DEEP, assert_matches_torch, tiny_llama
from pock_tvm.adapters import merge_lora
from pock_tvm.models.lora import with_lora
from pock_tvm.scheme import Scheme

transformers = pytest.importorskip("transformers")

CONFIG = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
VOCAB = 100


class BertClassifier(torch.nn.Module):
    """``BertModel`` (embeddings, LayerNorm, GELU, softmax attention with a padding mask) and a head
    on the first token."""

    def __init__(self):
        super().__init__()
        self.bert = transformers.BertModel(transformers.BertConfig(**CONFIG), add_pooling_layer=False)
        self.head = torch.nn.Linear(CONFIG["hidden_size"], 3)

    def forward(self, ids):
        hidden = self.bert(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        return self.head(hidden[:, 0])


def causal_lm():
    """A tiny ``LlamaForCausalLM`` (RMSNorm, rotary embeddings, causal + padding mask, SwiGLU) -> logits."""
    return tiny_llama(vocab_size=VOCAB)


def next_token_loss(logits, labels):
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def _lm_batch():
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # the second sequence is padded: masked keys, labels that do not count
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


# Adam with eps=1e-6: the key projection's bias has a gradient of exactly zero in exact arithmetic
# (softmax ignores a shift shared by all keys), ~1e-9 of float noise in both frameworks; Adam's default
# eps would turn that noise into full-size updates of random sign.
@pytest.mark.parametrize("scheme", ["last-2", pytest.param("full", marks=pytest.mark.slow)])
def test_bert_classifier_matches_torch(scheme):
    torch.manual_seed(0)
    model = BertClassifier().eval()
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 8))
    program = pock_tvm.compile(model, (ids,), scheme=scheme, optimizer=ADAM_DEEP, tuning_database=False)
    trained = {p.source for p in program.layout.params if p.trainable}
    if scheme == "full":
        assert "bert.embeddings.word_embeddings.weight" in trained and "bert.embeddings.LayerNorm.weight" in trained
    else:
        assert trained and all(n.startswith(("bert.encoder.layer.1.", "head.")) for n in trained)
    assert_matches_torch(model, program, ADAM_DEEP, (ids,), torch.randint(0, 3, (2,)))


@pytest.mark.parametrize("scheme", [pytest.param("full", marks=pytest.mark.slow), "mlp-partial", "lora"])
def test_llama_causal_lm_matches_torch(scheme):
    ids, mask, labels = _lm_batch()
    model = causal_lm()
    program = pock_tvm.compile(model, (ids, mask), scheme=scheme, loss="next_token", optimizer=ADAM_DEEP,
                               tuning_database=False)
    state = program.state_dict()
    assert "lm.lm_head.weight" not in state  # tied to the input embeddings: one tensor, trained once
    trained = {p.source for p in program.layout.params if p.trainable}
    reference = model
    if scheme == "full":
        assert "lm.model.embed_tokens.weight" in trained and "lm.model.norm.weight" in trained
    elif scheme == "lora":
        assert trained == {f"lm.model.layers.{i}.self_attn.{p}_proj.lora_{m}.weight"
                           for i in range(2) for p in "qkvo" for m in "AB"}
        assert not state["lm.model.layers.0.self_attn.q_proj.lora_B.weight"].any()  # starts as the model
        reference = with_lora(model, state, Scheme.preset("lora").lora.scale)
    else:
        assert {p.axis for p in program.layout.params if p.trainable} == {1}
    assert_matches_torch(reference, program, ADAM_DEEP, (ids, mask), labels, loss_fn=next_token_loss)


@pytest.mark.parametrize("seq", [8, 12])
def test_a_llama_layers_attention_and_norms_train_like_torch(seq):
    """The backward pass goes through the attention (its rotary embedding) into the layer's input
    norm. At sequence 12 (head size 8), LLVM's Zen 4/5 tuning miscompiled the rotate-half gradient
    of q and k: wrong by half their size (pock_tvm.targets.toolchain.GENERIC_TUNING)."""
    from pock_tvm.scheme import Rule

    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, seq))
    mask = torch.ones_like(ids)
    model = tiny_llama()
    scheme = Scheme("attention-norms", rules=[Rule("lm.model.layers.1&@role:attention", "full"),
                                              Rule("lm.model.layers.1&@norms", "full")])
    program = pock_tvm.compile(model, (ids, mask), scheme=scheme, loss="next_token", optimizer=ADAM_DEEP,
                               tuning_database=False)
    assert {p.source for p in program.layout.params if p.trainable} >= {
        "lm.model.layers.1.self_attn.q_proj.weight", "lm.model.layers.1.input_layernorm.weight"}
    assert_matches_torch(model, program, ADAM_DEEP, (ids, mask), ids.clone(), loss_fn=next_token_loss)


def test_merged_lora_weights_give_the_trained_model():
    ids, mask, labels = _lm_batch()
    model = causal_lm()
    program = pock_tvm.compile(model, (ids, mask), scheme="lora", loss="next_token",
                               optimizer=pock_tvm.Adam(lr=1e-2), tuning_database=False)
    for _ in range(3):
        program.step(ids.numpy(), mask.numpy(), labels.numpy())
    merged = merge_lora(program.state_dict(), Scheme.preset("lora").lora)
    assert not any("lora" in k for k in merged)
    model.load_state_dict({k: torch.tensor(v) for k, v in merged.items()}, strict=False)
    changed = merged["lm.model.layers.1.self_attn.v_proj.weight"] - program.state_dict()[
        "lm.model.layers.1.self_attn.v_proj.weight"]
    assert np.abs(changed).max() > 1e-4  # the adapters learned something
    with torch.no_grad():
        np.testing.assert_allclose(model(ids, mask).numpy(), program.predict(ids.numpy(), mask.numpy()),
                                   rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def last1_lm():
    ids, mask, _ = _lm_batch()
    return pock_tvm.compile(causal_lm(), (ids, mask), scheme="last-1", loss="next_token", tuning_database=False)


def test_a_label_outside_the_vocabulary_is_named(last1_lm):
    ids, mask, labels = _lm_batch()
    labels[0, 3] = 100
    with pytest.raises(ValueError, match=r"label 100 at position 3 is outside \[0, 100\).*-100 for one that does not"):
        last1_lm.step(ids.numpy(), mask.numpy(), labels.numpy())


def test_a_token_id_outside_the_vocabulary_is_named_before_it_reaches_the_embedding(last1_lm):
    ids, mask, labels = _lm_batch()
    assert [s.bound for s in last1_lm.layout.inputs] == [VOCAB, None]  # ids index the embedding
    ids[1, 2] = VOCAB
    message = r"input 'ids' holds 100 at position 10, outside \[0, 100\): it indexes a table of 100 rows"
    with pytest.raises(ValueError, match=message):
        last1_lm.step(ids.numpy(), mask.numpy(), labels.numpy())
    with pytest.raises(ValueError, match=message):
        last1_lm.predict(ids.numpy(), mask.numpy())


class CachedLogits(torch.nn.Module):
    """The logits as users call a causal LM: the default ``use_cache=True``."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, mask):
        return self.lm(input_ids=ids, attention_mask=mask).logits


class FlatCrossEntropy(torch.nn.Module):
    """A user's loss: ``F.cross_entropy`` on the logits flattened (a gather in the exported graph)."""

    def forward(self, logits, labels):
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))


def test_a_causal_lm_with_its_default_cache_and_a_torch_loss_trains_like_torch():
    from pock_tvm.loss import TorchLoss

    ids, mask, _ = _lm_batch()
    model = CachedLogits(causal_lm().lm)
    assert model.lm.config.use_cache  # the default: the import switches it off for training
    program = pock_tvm.compile(model, (ids, mask), scheme="last-1", loss=TorchLoss(FlatCrossEntropy(), ids),
                               optimizer=ADAM_DEEP, tuning_database=False)
    assert model.lm.config.use_cache  # the user's model is not changed
    assert_matches_torch(model, program, ADAM_DEEP, (ids, mask), ids, loss_fn=FlatCrossEntropy())


def test_a_hugging_face_model_passed_whole_trains_on_its_logits_under_its_own_names():
    ids, mask, labels = _lm_batch()
    lm = causal_lm().lm
    program = pock_tvm.compile(lm, (ids, mask), scheme="last-1", loss="next_token", optimizer=ADAM_DEEP,
                               tuning_database=False)
    own_names = set(lm.state_dict()) | {name for name, _ in lm.named_buffers()}
    assert set(program.state_dict()) <= own_names and "model.norm.weight" in program.state_dict()
    wrapped = pock_tvm.compile(CachedLogits(lm), (ids, mask), scheme="last-1", loss="next_token",
                               optimizer=ADAM_DEEP, tuning_database=False)
    for _ in range(2):
        assert program.step(ids.numpy(), mask.numpy(), labels.numpy()) == pytest.approx(
            wrapped.step(ids.numpy(), mask.numpy(), labels.numpy()), rel=1e-6)
