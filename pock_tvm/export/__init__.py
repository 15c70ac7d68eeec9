"""Fine-tuned results back into the tools users deploy with.

- :mod:`.hf`: a Hugging Face model saved with ``save_pretrained`` (safetensors), LoRA adapters as
  a PEFT adapter directory, or merged into the weights;
- :mod:`.onnx_export`: the source ONNX (or the torch model's ONNX export) with the trained
  initializers, checked against the bundle with ONNX Runtime (``pock-tvm export``).

Each writer checks its output with the library that reads it, writes atomically, and refuses
non-finite values.
"""
