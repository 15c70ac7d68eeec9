"""int8 models, by role:

- :mod:`.int8`: the conventions every part shares (value ranges, per-channel scales, how a
  quantized tensor reads in Relax, a tensor's unit for quantization-aware scaling);
- :mod:`.post_training`: the post-training quantizer (a float model into the QDQ form the compiler
  trains: :func:`quantize`), and what the compiler needs of a quantized model (units, report);
- :mod:`.torch_reference`: the same int8 arithmetic in PyTorch with fake quantization, the
  reference the tests and benchmarks compare a compiled int8 step with (imports torch).
"""

from .post_training import calibrate, float_state_dict, quantize

__all__ = ["calibrate", "float_state_dict", "quantize"]
