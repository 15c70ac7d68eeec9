"""Fine-tuned Hugging Face models back into transformers and PEFT, read by their own loaders."""

import numpy as np
import pytest
import torch

import pock_tvm
from helpers import tiny_llama
from pock_tvm.scheme import LoRA, Scheme

transformers = pytest.importorskip("transformers")


def _fine_tuned(scheme, steps=3):
    torch.manual_seed(0)
    wrapped = tiny_llama()
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones_like(ids)
    program = pock_tvm.compile(wrapped, (ids, mask), scheme=scheme, loss="next_token",
                               optimizer=pock_tvm.Adam(lr=1e-2))
    for _ in range(steps):
        program.step(ids.numpy(), mask.numpy(), ids.numpy())
    return wrapped, program, ids, mask


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.numpy()


@pytest.fixture(scope="module")
def last_1():
    return _fine_tuned("last-1")


def test_save_pretrained_is_read_back_by_from_pretrained(tmp_path, last_1):
    from pock_tvm.export.hf import save_pretrained

    wrapped, program, ids, mask = last_1
    before = _logits(wrapped.lm, ids, mask)
    save_pretrained(program, wrapped.lm, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").exists()
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    expected = program.predict(ids.numpy(), mask.numpy())
    np.testing.assert_allclose(_logits(loaded, ids, mask), expected, rtol=1e-4, atol=1e-4)
    assert np.abs(expected - before).max() > 1e-3, "the fine-tune changed the model"
    np.testing.assert_allclose(_logits(wrapped.lm, ids, mask), before)  # the user's model is left as it was


def test_lora_as_a_peft_adapter_and_merged(tmp_path):
    peft = pytest.importorskip("peft")
    from pock_tvm.export.hf import save_peft_adapter, save_pretrained

    wrapped, program, ids, mask = _fine_tuned(Scheme("lora", lora=LoRA(rank=4, alpha=8)))
    expected = program.predict(ids.numpy(), mask.numpy())
    save_peft_adapter(program, wrapped.lm, tmp_path / "adapter")
    base = transformers.LlamaForCausalLM(wrapped.lm.config)
    base.load_state_dict(wrapped.lm.state_dict())
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    np.testing.assert_allclose(_logits(adapted, ids, mask), expected, rtol=1e-4, atol=1e-4)
    assert np.abs(expected - _logits(wrapped.lm, ids, mask)).max() > 1e-3, "the adapters changed the model"
    save_pretrained(program, wrapped.lm, tmp_path / "merged")
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(_logits(merged, ids, mask), expected, rtol=1e-4, atol=1e-4)


def test_errors_name_the_fix(tmp_path, last_1):
    from pock_tvm.export.hf import save_peft_adapter, save_pretrained

    wrapped, program, _, _ = last_1
    with pytest.raises(ValueError, match="trains no LoRA adapters: use save_pretrained"):
        save_peft_adapter(program, wrapped.lm, tmp_path / "a")
    with pytest.raises(ValueError, match="match none of the Hugging Face model's"):
        save_pretrained(program, torch.nn.Linear(3, 3), tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a saved model"):
        save_pretrained(program, wrapped.lm, tmp_path / "c")
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"


def test_gguf_is_read_back_by_the_transformers_gguf_loader(tmp_path, last_1):
    pytest.importorskip("gguf")
    from pock_tvm.export.gguf_export import save_gguf

    wrapped, program, ids, mask = last_1
    save_gguf(program, wrapped.lm, tmp_path / "tuned.gguf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tuned.gguf").eval()
    expected = program.predict(ids.numpy(), mask.numpy())
    np.testing.assert_allclose(_logits(loaded, ids, mask), expected, rtol=1e-4, atol=1e-4)
    # written again with that file as the template: its metadata carried over, the same model
    save_gguf(program, wrapped.lm, tmp_path / "again.gguf", template=tmp_path / "tuned.gguf", dtype="f16")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="again.gguf").eval()
    np.testing.assert_allclose(_logits(again, ids, mask), expected, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="exists; choose another path"):
        save_gguf(program, wrapped.lm, tmp_path / "tuned.gguf")
