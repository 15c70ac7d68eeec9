"""The pock_tvm pipeline: from an imported ``forward`` to a compiled ``train_step``.

Registered as ``relax.get_pipeline("pock_tvm", ...)``. Read top to bottom; one line of why per
step. Every setting is a keyword with a default; the optimizations are one typed ``PipelineOptions``.
"""

from __future__ import annotations

import tvm
from tvm import relax

from .accurate_sums import AccurateSums
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
from .in_place_updates import InPlaceUpdates
from .prepack_frozen_weights import MarkFrozenOperands, PrepackFrozenWeights
from .inline_kernel_intermediates import InlineKernelIntermediates
from .integer_kernels import IntegerKernels
from .legalize_overrides import LEGALIZE_OVERRIDES
from .gradient_rules import gradient_rules_installed, padding_rows as embedding_padding_rows
from .. import calling
from ..options import PipelineOptions
from .reorder_updates import ReorderUpdates
from .schedule_for_cpu import ScheduleForCPU
from .schedule_for_gpu import ScheduleForGPU
from .sparse_gradient import SparseGradient
from .split_frozen_prefix import SplitFrozenPrefix
from .split_partial_channels import SplitPartialChannels
from .verify_schedules import VerifySchedules

ENTRY_FUNCTIONS = [calling.FORWARD, "loss", calling.TRAIN_STEP, calling.PREFIX, calling.TRAIN_STEP_CACHED]


@relax.register_pipeline("pock_tvm")
def pock_tvm_pipeline(
    *,
    trainable: list[str] | None = None,
    partial: dict[str, tuple[int, int]] | None = None,
    loss_function: relax.Function | None = None,
    optimizer=None,
    origins: dict[str, str] | None = None,
    frozen_values: dict | None = None,
    options: PipelineOptions | None = None,
    gpu: bool = False,
    tuning_database: str | None = None,
    build_training_graph: bool = True,
    lower: bool = True,
    conv_layouts: dict | None = None,
    units: dict | None = None,
    verify: bool = False,
    padding_rows: dict[str, int] | None = None,
    names: dict[str, str] | None = None,
    prefix_inputs: int | None = None,
) -> tvm.transform.Pass:
    """``trainable``: Relax names of the updated tensors (split halves as ``W__upd``);
    ``partial``: ``{weight: (axis, k)}``; ``frozen_values``: ``{name: array}`` of the frozen
    tensors, bound as constants when ``options.fold_frozen``. ``options``
    (:class:`pock_tvm.options.PipelineOptions`, default ``O3``) switches the optimizations.
    ``lower=False`` stops at the training graph (for analysis); ``build_training_graph=False``
    only lowers an already built training graph. ``gpu=True`` schedules kernels for a GPU target
    (call inside ``with target``). ``tuning_database``: a MetaSchedule JSON database directory
    (``pock-tvm tune``); kernels it holds get their tuned schedule, the others the default one.
    ``conv_layouts``: ``relax.transform.ConvertLayout``'s desired layouts per conv op (a target's
    ``conv_layout``, ``pock_tvm.targets.CONV_LAYOUTS``); None keeps the imported NCHW.
    ``units``: ``{trainable name: unit}`` of parameters an int8 model trains in integer units
    (``pock_tvm.quantization.post_training.train_quantized``), for the optimizer's quantization-aware scaling.
    ``padding_rows``: ``{trainable name: row}``, embedding rows that get no gradient (``padding_idx``).
    ``names``: ``{Relax variable name: the user's name}`` of inputs and parameters, for the run-time
    index checks' messages (``CheckIndices``).
    ``prefix_inputs``: the number of model inputs, to add the frozen-prefix functions ``prefix`` and
    ``train_step_cached`` (``SplitFrozenPrefix``; None: ``train_step`` alone).
    ``verify=True`` (CPU targets) runs every kernel that got a schedule (default rule, tuned record,
    fast math) once against its unscheduled form and falls back where the numbers differ
    (``VerifySchedules``; what it found is the module attribute ``pock_tvm.kernel_checks``)."""
    opt = options or PipelineOptions()
    passes = []
    if build_training_graph:
        passes += [
            # Phase 1: make forward differentiable, sparse-friendly and free of frozen work
            SplitPartialChannels(partial),  # k-channel weights get their own tensor and op
            *([BindFrozenParams(frozen_values, trainable), FoldBatchNorm()] if opt.fold_frozen else []),
            # frozen tensors are constants; frozen conv+BN pairs become one conv
            FreezeBatchNorm(),  # BN uses fixed running stats; autodiff has no batch_norm rule
            CheckGradientRules(trainable, origins),  # name the source node of an op with no rule
            # Phase 2: the training graph, built once at compile time
            AppendLoss(loss_function),  # loss = L(forward(x), y) in one dataflow block
            CheckGradientRules(trainable, None, "loss"),  # and the loss's own ops (a torch loss)
            _with_padding_rows(padding_rows, SparseGradient(trainable)),  # adjoints for what the scheme updates
            AppendOptimizer(optimizer, trainable, units=units),  # train_step = loss_adjoint + update (QAS)
            *([ReorderUpdates()] if opt.reorder_updates else []),  # update right after its gradient
            *([SplitFrozenPrefix(prefix_inputs)] if prefix_inputs else []),  # frozen prefix on its own (cached)
        ]
        # pock_tvm's gradient rules are installed for these passes only (TVM's own outside them)
        passes = [_within(gradient_rules_installed, tvm.transform.Sequential(passes, name="pock_tvm.TrainingGraph"),
                          "pock_tvm.WithGradientRules")]
    if lower:
        passes += [
            # Phase 3: lower to TIR and plan memory (TVM's default build)
            _dead_code_elimination(),  # inlined adjoints, dead bindings
            *([CheckIndices(names)] if not gpu else []),  # an index outside its table raises where it is used
            # (CPU: device code cannot raise, so CUDA steps check only the inputs and labels)
            *([IntegerKernels()] if opt.integer_kernels else []),  # int8 convs/linears; keep int8 for backward
            *([relax.transform.ConvertLayout(conv_layouts)] if conv_layouts else []),  # the target's layout
            AccurateSums(),  # long float32 sums (bias gradients) accumulate in float64, inside the kernel
            relax.transform.LegalizeOps(LEGALIZE_OVERRIDES),  # every op to a TIR kernel (a few our way)
            relax.transform.AnnotateTIROpPattern(),  # elementwise/injective/reduction tags
            FoldFrozenKernels(),  # what depends only on frozen tensors, once per process (memo)
            relax.transform.FoldConstant(),  # and what remains constant (shapes, tuples)
            relax.transform.FuseOps(),  # elementwise into producers, backward included
            relax.transform.FuseTIR(),  # one kernel per fused group
            *([InlineKernelIntermediates()] if opt.inline_intermediates else []),  # no scratch per stage
            relax.transform.AnnotateTIROpPattern(),  # patterns of the fused kernels (InPlaceUpdates)
            *([MarkFrozenOperands()] if not gpu else []),  # constant operands (kernel names as `tune` sees them)
            *_verified(verify and not gpu, [
                *([ApplyTuningDatabase(tuning_database)] if tuning_database else []),  # tuned kernels (read once)
                *([ScheduleForGPU()] if gpu else []),  # GPU kernels need thread bindings (DLight rules)
                *([ScheduleForCPU()] if opt.schedule_kernels and not gpu else []),  # parallel + vector loops
                *([FastExp()] if opt.fast_math and not gpu else []),  # exp/sigmoid as vector arithmetic
            ]),  # verify=True: each scheduled kernel against its unscheduled form, wrong ones fall back
            *([PrepackFrozenWeights()] if not gpu else []),  # packed at compile time
            # Phase 4: TVM's default build, with in-place updates before memory planning
            *default_build(in_place=opt.in_place),
        ]
    return tvm.transform.Sequential(passes, name="pock_tvm")


def default_build(in_place: bool = True) -> list:
    """TVM's ``relax.pipeline.default_build_pipeline`` as a list of passes, with ``InPlaceUpdates``
    (new parameters and optimizer state overwrite the old) before memory planning. A test pins the
    rest to TVM's own list, so an upgrade that changes it fails there, not silently here."""
    return [
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.LegalizeOps(),
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),  # kernels get explicit output tensors
        *([InPlaceUpdates()] if in_place else []),  # new params/state overwrite the old
        relax.transform.StaticPlanBlockMemory(),  # one storage pool, reused by liveness
        relax.transform.RewriteCUDAGraph(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]


def _dead_code_elimination():
    """TVM's ``DeadCodeElimination`` kept to the ``ENTRY_FUNCTIONS`` the module has (it rejects a
    name the module lacks; the frozen-prefix functions exist only when asked for)."""

    @tvm.transform.module_pass(opt_level=0, name="pock_tvm.DeadCodeElimination")
    def run(mod, _ctx):
        present = {g.name_hint for g in mod.get_global_vars()}
        return relax.transform.DeadCodeElimination([f for f in ENTRY_FUNCTIONS if f in present])(mod)
    return run


def _within(context, inner, name: str):
    """``inner`` (a pass) run inside ``context()`` (a context manager factory), as one pass."""

    @tvm.transform.module_pass(opt_level=0, name=name)
    def run(mod, _ctx):
        with context():
            return inner(mod)
    return run


def _with_padding_rows(rows: dict | None, autodiff):
    """``autodiff`` with the embeddings' padding rows known to the ``take`` gradient rule."""
    return _within(lambda: embedding_padding_rows(rows), autodiff, "pock_tvm.WithPaddingRows") if rows else autodiff


def _verified(verify: bool, scheduling: list) -> list:
    """The scheduling passes, wrapped in ``VerifySchedules`` when ``verify``."""
    return [VerifySchedules(scheduling)] if verify else scheduling

