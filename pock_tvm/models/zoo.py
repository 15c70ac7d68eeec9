"""The architectures pock_tvm is verified on (``benchmarks/zoo_parity.py``, ``tests/test_zoo_parity.py``).

Each case builds, for a batch size, the model as a user hands it to ``pock_tvm.compile`` (a torch
module, an ONNX file exported the way model zoos ship them, or a Hugging Face model called as its
documentation shows), the torch module it computes (the gradient reference), inputs and labels.
Widths and depths are cut down so that a case compiles in seconds; the blocks, ops and the way
they are wired are the architecture's own.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

CLASSES = 10
IMAGE = 32
TOKENS = 8
VOCAB = 96


@dataclass(frozen=True)
class ZooCase:
    name: str
    family: str  # "cnn" (torch), "onnx", "hf"
    make: Callable[[], nn.Module]  # the torch module (eval mode, seeded)
    sparse: str = "bias-only"  # the sparse scheme it is checked with besides full
    opset: int | None = None  # ONNX cases: exported with torch's TorchScript exporter at this opset
    loss: str = "cross_entropy"
    convert: Callable | None = None  # ONNX cases: rewrites the exported file (returns {name: torch name})

    def build(self, batch: int, seed: int = 0) -> dict:
        """The arguments of :func:`pock_tvm.check_parity` (``model``, ``example_inputs``, ``target``,
        ``torch_model``, ``loss``, ``torch_names``) for ``batch``."""
        torch.manual_seed(seed)
        module = _with_statistics(self.make().eval())
        g = torch.Generator().manual_seed(seed + 1)
        if self.family == "hf":
            ids = torch.randint(0, VOCAB, (batch, TOKENS), generator=g)
            mask = torch.ones_like(ids)
            if batch > 1:
                mask[-1, TOKENS - 3:] = 0  # a padded sequence
            target = ids.masked_fill(mask == 0, -100) if self.loss == "next_token" else \
                torch.randint(0, CLASSES, (batch,), generator=g)
            return dict(model=module, example_inputs=[ids, mask], target=target, torch_model=module, loss=self.loss)
        x = torch.randn(batch, 3, IMAGE, IMAGE, generator=g)
        target = torch.randint(0, CLASSES, (batch,), generator=g)
        case = dict(model=module, example_inputs=[x], target=target, torch_model=module, loss=self.loss)
        if self.family == "onnx":
            case["model"] = export_onnx(module, x, self.opset)
            if self.convert is not None:
                case["torch_names"] = self.convert(case["model"])
        return case


def _with_statistics(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, as a trained model has."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def export_onnx(model: nn.Module, x: torch.Tensor, opset: int):
    """``model`` as an ONNX ModelProto from torch's TorchScript exporter at ``opset`` (the exporter
    model zoos used: BatchNormalization and Dropout kept, shape arithmetic for flatten)."""
    import onnx

    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=opset, do_constant_folding=False,
                      input_names=["data"], output_names=["logits"])
    return onnx.load_from_string(buffer.getvalue())


class HFCall(nn.Module):
    """A Hugging Face model called as its documentation shows: ``model(input_ids=..., attention_mask=...)``
    with its defaults (the cache on); the import trains on the output's logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids, mask):
        return self.model(input_ids=ids, attention_mask=mask)


def _hf(config_cls: str, model_cls: str, **config) -> Callable[[], nn.Module]:
    def make():
        import transformers

        base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64)
        cfg = getattr(transformers, config_cls)(**{**base, **config})
        if model_cls.endswith("SequenceClassification"):
            cfg.num_labels = CLASSES
        return HFCall(getattr(transformers, model_cls)(cfg))
    return make


def _cnn(name: str):
    from . import convnext, densenet, efficientnet, googlenet, mobilenet_v2, mobilenet_v3, regnet, resnet
    from . import shufflenet_v2

    return {
        "resnet18": lambda: resnet.ResNet18(CLASSES, width=8),
        "resnet50": lambda: resnet.ResNet50(CLASSES, width=8, depths=(2, 1, 1, 1)),
        "mobilenetv2": lambda: mobilenet_v2.MobileNetV2(width_mult=0.25, num_classes=CLASSES),
        "mobilenetv3": lambda: mobilenet_v3.MobileNetV3Small(CLASSES, width_mult=0.5, blocks=6),
        "efficientnet_b0": lambda: efficientnet.EfficientNetB0(CLASSES, width_mult=0.25, depth=1),
        "regnety": lambda: regnet.RegNetY(CLASSES, widths=(16, 32, 48, 64), depths=(1, 2, 1, 1), group_width=8,
                                          stem=16),
        "shufflenetv2": lambda: shufflenet_v2.ShuffleNetV2(CLASSES, widths=(8, 16, 32, 64, 64), repeats=(2, 2, 1)),
        "densenet": lambda: densenet.DenseNet(CLASSES, growth=8, blocks=(2, 2, 2, 2), init=16, bn_size=2),
        "googlenet": lambda: googlenet.GoogLeNet(CLASSES, scale=0.125, blocks=4),
        "convnext": lambda: convnext.ConvNeXt(CLASSES, dims=(16, 32, 48, 64), depths=(1, 1, 2, 1), layer_scale=0.5),
    }[name]


def _caffe2_style(model) -> dict[str, str]:
    from .classic import caffe2_style

    return caffe2_style(model)


def _classic(name: str):
    """The classic architectures of the ONNX model zoo, small (defined for the zoo cases)."""
    from . import classic

    return {"alexnet": classic.AlexNet, "vgg": classic.VGG, "squeezenet": classic.SqueezeNet,
            "inception": classic.InceptionV2ish, "caffe2_resnet": classic.Caffe2ResNet}[name]


CASES: list[ZooCase] = [
    *[ZooCase(n, "cnn", _cnn(n)) for n in ("resnet18", "resnet50", "mobilenetv2", "mobilenetv3", "efficientnet_b0",
                                           "regnety", "shufflenetv2", "densenet", "googlenet", "convnext")],
    *[ZooCase(f"{n}-onnx{opset}", "onnx", make, opset=opset) for n, make, opset in (
        ("alexnet", _classic("alexnet"), 7), ("vgg", _classic("vgg"), 9), ("squeezenet", _classic("squeezenet"), 11),
        ("inception", _classic("inception"), 9),
        ("resnet50", _cnn("resnet50"), 9), ("densenet", _cnn("densenet"), 11), ("googlenet", _cnn("googlenet"), 13),
        ("shufflenetv2", _cnn("shufflenetv2"), 11), ("mobilenetv2", _cnn("mobilenetv2"), 13),
        ("efficientnet_b0", _cnn("efficientnet_b0"), 13))],
    ZooCase("caffe2_resnet-onnx9", "onnx", _classic("caffe2_resnet"), opset=9, convert=_caffe2_style),
    *[ZooCase(n, "hf", make, sparse="last-2", loss=loss) for n, make, loss in (
        ("gpt2", _hf("GPT2Config", "GPT2LMHeadModel", n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     vocab_size=VOCAB), "next_token"),
        ("opt", _hf("OPTConfig", "OPTForCausalLM", ffn_dim=64, word_embed_proj_dim=32), "next_token"),
        ("qwen2", _hf("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2), "next_token"),
        ("mistral", _hf("MistralConfig", "MistralForCausalLM", num_key_value_heads=2, sliding_window=4),
         "next_token"),
        ("phi3", _hf("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=4, pad_token_id=0), "next_token"),
        ("gemma", _hf("GemmaConfig", "GemmaForCausalLM", num_key_value_heads=2, head_dim=8), "next_token"),
        ("llama", _hf("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2), "next_token"),
        ("bert", _hf("BertConfig", "BertForSequenceClassification"), "cross_entropy"),
        ("roberta", _hf("RobertaConfig", "RobertaForSequenceClassification", pad_token_id=1), "cross_entropy"),
        ("distilbert", _hf("DistilBertConfig", "DistilBertForSequenceClassification", dim=32, hidden_dim=64,
                           n_layers=2, n_heads=4), "cross_entropy"))],
]
BY_NAME = {c.name: c for c in CASES}
