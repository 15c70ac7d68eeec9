"""Hugging Face ``transformers`` models through torch.export train like PyTorch (tiny configs, no download)."""

import pytest
import torch

import pock_tvm
from helpers import ADAM_DEEP, assert_matches_torch

transformers = pytest.importorskip("transformers")

CONFIG = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


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


# Adam with eps=1e-6: the key projection's bias has a gradient of exactly zero in exact arithmetic
# (softmax ignores a shift shared by all keys), ~1e-9 of float noise in both frameworks; Adam's default
# eps would turn that noise into full-size updates of random sign.
@pytest.mark.parametrize("scheme", ["last-2", "full"])
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
