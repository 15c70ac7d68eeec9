"""Compiler passes of pock_tvm, one per file (snake_case module, CamelCase pass), and the pipeline.

Importing this package registers nothing with TVM: pock_tvm's gradient rules are installed only
while it differentiates (:func:`gradient_rules_installed`).
"""

from .accurate_sums import AccurateSums
from .add_lora import AddLoRA
from .append_loss import AppendLoss
from .append_optimizer import AppendOptimizer
from .apply_tuning_database import ApplyTuningDatabase
from .bind_frozen_params import BindFrozenParams
from .check_gradient_rules import CheckGradientRules
from .check_indices import CheckIndices
from .fast_exp import FastExp
from .fold_batch_norm import FoldBatchNorm
from .fold_frozen_kernels import FoldFrozenKernels
from .freeze_batch_norm import FreezeBatchNorm
from .gradient_rules import GRADIENT_OVERRIDES, GRADIENT_RULES, gradient_rules_installed
from .in_place_updates import InPlaceUpdates
from .inline_kernel_intermediates import InlineKernelIntermediates
from .integer_kernels import IntegerKernels
from .pipeline import pock_tvm_pipeline
from .quantize_forward import QuantizeForward
from .reorder_updates import ReorderUpdates
from .schedule_for_cpu import ScheduleForCPU
from .schedule_for_gpu import ScheduleForGPU
from .sparse_gradient import SparseGradient
from .split_frozen_prefix import SplitFrozenPrefix
from .split_partial_channels import SplitPartialChannels
from .train_quantized_params import TrainQuantizedParams
from .unbroadcast_linear import UnbroadcastLinear
from .verify_schedules import VerifySchedules

__all__ = [
    "AccurateSums", "AddLoRA", "AppendLoss", "AppendOptimizer", "ApplyTuningDatabase", "BindFrozenParams",
    "CheckGradientRules", "CheckIndices", "FastExp", "FoldBatchNorm", "FoldFrozenKernels", "FreezeBatchNorm", "GRADIENT_OVERRIDES",
    "GRADIENT_RULES", "InPlaceUpdates", "InlineKernelIntermediates", "IntegerKernels", "QuantizeForward",
    "ReorderUpdates", "ScheduleForCPU", "ScheduleForGPU", "SparseGradient", "SplitFrozenPrefix", "SplitPartialChannels",
    "TrainQuantizedParams", "UnbroadcastLinear", "VerifySchedules", "gradient_rules_installed",
    "pock_tvm_pipeline",
]
