"""Compiler passes of pock_tvm, one per file, and the registered pipeline."""

from .AccurateSums import AccurateSums
from .AppendLoss import AppendLoss
from .AppendOptimizer import AppendOptimizer
from .ApplyTuningDatabase import ApplyTuningDatabase
from .BindFrozenParams import BindFrozenParams
from .CheckGradientRules import CheckGradientRules
from .CheckIndices import CheckIndices
from .FastExp import FastExp
from .FoldBatchNorm import FoldBatchNorm
from .FreezeBatchNorm import FreezeBatchNorm
from .gradient_rules import GRADIENT_RULES, register_gradient_rules
from .pipeline import pock_tvm_pipeline
from .ReorderUpdates import ReorderUpdates
from .ScheduleForCPU import ScheduleForCPU
from .ScheduleForGPU import ScheduleForGPU
from .SparseGradient import SparseGradient
from .SplitPartialChannels import SplitPartialChannels
from .UnbroadcastLinear import UnbroadcastLinear
from .VerifySchedules import VerifySchedules

register_gradient_rules()

__all__ = ["AccurateSums", "AppendLoss", "AppendOptimizer", "ApplyTuningDatabase", "BindFrozenParams", "CheckGradientRules", "CheckIndices", "FastExp", "FoldBatchNorm",
           "FreezeBatchNorm", "InlineKernelIntermediates",
           "GRADIENT_RULES", "ReorderUpdates", "ScheduleForCPU", "ScheduleForGPU", "SparseGradient", "SplitPartialChannels", "UnbroadcastLinear", "VerifySchedules",
           "pock_tvm_pipeline",
           "register_gradient_rules"]
