"""Per-layer cost profile of a model: what the cost model needs to know about each layer.

A model is seen as a sequence of layers whose composition is the forward pass (embedding,
blocks..., head). Figures are for the batch the profile was taken at (``ModelProfile.batch_size``
samples); everything that scales with the batch (FLOPs, activation bytes, the token dimension of
GEMMs) scales linearly, and ``LayerProfile.scaled(batch)`` does that.

Byte conventions (mixed-precision Adam, as in Megatron/ZeRO): parameters and gradients in the
training dtype (2 bytes for bf16), optimizer state = fp32 master copy + two fp32 moments
(12 bytes per parameter; 8 when training in fp32, where the parameters are the master copy).
Activation bytes are in the training dtype.

``profile(model, example_inputs)`` measures these figures by running one forward and backward
pass on the meta device (no memory, no arithmetic); see its docstring.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import types
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .models.sequential import SequentialModel
from .profile_ops import iter_tensors, storage_key, tensor_bytes
from .profile_trace import ATTENTION_BACKENDS, TP_STYLES, trace

__all__ = ["GemmShape", "LayerProfile", "ModelProfile", "profile", "OPTIMIZER_BYTES_PER_PARAM"]

# Adam in mixed precision: fp32 master weights + two fp32 moments.
OPTIMIZER_BYTES_PER_PARAM = 12  # mixed precision: fp32 master copy + two fp32 Adam moments
FP32_OPTIMIZER_BYTES_PER_PARAM = 8  # fp32 training: the parameters are the master copy


@dataclass(frozen=True)
class GemmShape:
    """One matrix multiply of a layer's forward pass: ``batch`` products of (m x k) @ (k x n).

    ``tp_split`` says which dimension a Megatron tensor-parallel split divides:
    "n" (column-parallel linear), "k" (row-parallel linear), "batch" (attention heads) or
    "none" (not split, e.g. an embedding/head GEMM in a layer that is not tensor-parallel).
    ``scales_with_batch`` names the dimension that grows with the number of samples
    ("m" for linears on (tokens x features), "batch" for per-head attention products).
    """

    m: int
    n: int
    k: int
    batch: int = 1
    count: int = 1
    tp_split: str = "none"
    scales_with_batch: str = "m"

    @property
    def flops(self) -> float:
        return 2.0 * self.batch * self.m * self.n * self.k * self.count

    def scaled(self, factor: float) -> "GemmShape":
        """The same GEMM for ``factor`` times as many samples (factor may be fractional)."""
        if self.scales_with_batch == "batch":
            return replace(self, batch=max(1, round(self.batch * factor)))
        return replace(self, m=max(1, round(self.m * factor)))


@dataclass(frozen=True)
class LayerProfile:
    """Cost-relevant figures of one layer at the profiled batch size.

    Attributes:
        name: module path or a descriptive name ("embed", "blocks.3", "head").
        kind: "pre" (before the block sequence), "block", or "post" (after it).
        fwd_flops / bwd_flops: floating-point operations of the forward / backward pass.
        num_params: parameter count.
        param_bytes / grad_bytes / optimizer_bytes: training-state bytes (see module doc).
        saved_bytes: bytes kept alive between this layer's forward and its backward.
        input_bytes / output_bytes: bytes of the activation entering / leaving the layer
            (what a pipeline stage boundary sends, and what recomputation must keep).
        gemms: the forward pass's matrix multiplies.
        tp_allreduce_bytes / tp_allreduce_count: bytes all-reduced, and in how many
            collectives, in the forward pass when the layer runs tensor-parallel: one per
            row-parallel module, of its output (a GPT block: two of b*s*h elements).
        tp_bwd_allreduce_bytes / tp_bwd_allreduce_count: the same for the backward pass: one
            per column-parallel module, of its input's gradient. DTensor's column-parallel
            style all-reduces each module's input gradient on its own, so separate q, k, v
            projections cost three where Megatron's fused QKV costs one (a GPT block here:
            four). 0 for layers that do not split.
        tp_max_degree: the largest tensor-parallel degree the layer supports (divides its heads
            and hidden sizes); 1 means not tensor-parallel.
        other_bytes_moved: memory traffic of the non-GEMM work (norms, softmax, elementwise)
            in the forward pass, for the roofline's memory-bound part.
    """

    name: str
    kind: str
    fwd_flops: float
    bwd_flops: float
    num_params: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    saved_bytes: int
    input_bytes: int
    output_bytes: int
    gemms: tuple[GemmShape, ...] = ()
    tp_allreduce_bytes: int = 0
    tp_max_degree: int = 1
    other_bytes_moved: int = 0
    tp_allreduce_count: int = 0
    tp_bwd_allreduce_bytes: int = 0
    tp_bwd_allreduce_count: int = 0

    def __post_init__(self) -> None:
        for volume, count in (("tp_allreduce_bytes", "tp_allreduce_count"),
                              ("tp_bwd_allreduce_bytes", "tp_bwd_allreduce_count")):
            if getattr(self, volume) > 0 and getattr(self, count) < 1:
                raise ValueError(
                    f"layer {self.name!r}: {volume}={getattr(self, volume)} needs {count} >= 1 "
                    f"(got {getattr(self, count)}): give the number of collectives that move it"
                )

    @property
    def state_bytes(self) -> int:
        """Parameters + gradients + optimizer state."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes

    def scaled(self, factor: float) -> "LayerProfile":
        """The same layer for ``factor`` times as many samples per micro-batch."""
        return replace(
            self,
            fwd_flops=self.fwd_flops * factor,
            bwd_flops=self.bwd_flops * factor,
            saved_bytes=round(self.saved_bytes * factor),
            input_bytes=round(self.input_bytes * factor),
            output_bytes=round(self.output_bytes * factor),
            gemms=tuple(g.scaled(factor) for g in self.gemms),
            tp_allreduce_bytes=round(self.tp_allreduce_bytes * factor),
            tp_bwd_allreduce_bytes=round(self.tp_bwd_allreduce_bytes * factor),
            other_bytes_moved=round(self.other_bytes_moved * factor),
        )


@dataclass(frozen=True)
class ModelProfile:
    """The layer sequence of a model, profiled at ``batch_size`` samples.

    ``dtype_bytes`` is the training dtype's width used for activations, parameters and gradients
    (2 for bf16 mixed precision). ``meta`` carries descriptive facts (model config, seq length).
    """

    name: str
    layers: tuple[LayerProfile, ...]
    batch_size: int
    dtype_bytes: int = 2
    meta: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def total_params(self) -> int:
        return sum(layer.num_params for layer in self.layers)

    @property
    def train_flops(self) -> float:
        """Forward + backward FLOPs of one training step at ``batch_size`` samples."""
        return sum(layer.fwd_flops + layer.bwd_flops for layer in self.layers)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def from_dict(cls, data: dict) -> "ModelProfile":
        layers = tuple(
            LayerProfile(**{**lay, "gemms": tuple(GemmShape(**g) for g in lay.get("gemms", ()))})
            for lay in data["layers"]
        )
        return cls(
            name=data["name"],
            layers=layers,
            batch_size=data["batch_size"],
            dtype_bytes=data.get("dtype_bytes", 2),
            meta=data.get("meta", {}),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelProfile":
        return cls.from_dict(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------------------------------------
# Profiling


def profile(
    model: nn.Module,
    example_inputs: Any,
    blocks: str | Sequence[str] | None = None,
    *,
    name: str | None = None,
    dtype_bytes: int = 2,
    attention: str = "flash",
) -> ModelProfile:
    """Profile one training step of ``model`` per layer, on the meta device.

    Args:
        model: the model. If any parameter or buffer is not on the meta device, a meta copy is
            profiled (parameters and buffers are replaced by meta tensors; the model itself is
            not touched). A meta model is used as is: hooks are added and removed, and no
            ``.grad`` is written.
        example_inputs: one batch: a tensor, a tuple/list of positional arguments, or a dict
            of keyword arguments. Moved to meta; ``batch_size`` is dim 0 of its first tensor.
        blocks: which modules are the layers.
            ``None``: the model must be a ``dartspar.models.SequentialModel``; the layers are
            ``model.layers`` (all of kind "block", named "layers.<i>").
            A submodule path (``"layers"``, ``"transformer.h"``) or a list of paths of
            ``nn.ModuleList``/``nn.Sequential`` modules the forward runs one after another:
            the layers are "pre" (everything before the first block, omitted when it does no
            work, holds no parameter and saves nothing), each block (named by its path), and
            "post" (everything after the last block, same rule).
        name: the profile's name (default: the model's class name).
        dtype_bytes: bytes per element of the training dtype (2 for bf16). Floating-point
            activations, parameters and gradients are counted at this width whatever dtype the
            meta model has; integer/bool tensors keep their own width.
        attention: "flash" (default) runs ``F.scaled_dot_product_attention`` through the fused
            flash / memory-efficient kernels' meta implementations, as GPU training does;
            "math" keeps torch's meta-device choice, the unfused path that saves the
            (seq x seq) attention probabilities.

    Returns:
        A ``ModelProfile`` at ``batch_size`` samples. Per layer:
        fwd/bwd FLOPs by ``torch.utils.flop_counter``'s formulas (matmuls, convolutions,
        attention; attention counts the full, not the causal, score matrix, and the fused
        backward recomputes the scores: 2.5x its forward FLOPs); parameters (a parameter
        shared between layers counts in the first: the block that owns it, else the first
        segment that reads it; parameters outside the blocks that the forward never reads are
        listed in ``meta["unattributed_params"]``); gradients and optimizer state for the
        trainable ones; ``saved_bytes``: storages autograd keeps for backward, each counted
        once per layer, excluding parameters and buffers; ``input_bytes``/``output_bytes``:
        the tensors entering / leaving the layer; forward GEMMs with their tensor-parallel
        split; ``other_bytes_moved``: bytes read plus written by the forward's non-GEMM ops.

    Tensor parallelism: a block (or its class) may define ``tp_plan`` (submodule path ->
    "colwise" | "rowwise") and must then define ``tp_max_degree``. GEMMs inside a colwise
    module split "n", inside a rowwise module "k", other batched products (attention) of such a
    block "batch"; ``tp_allreduce_bytes`` sums the rowwise modules' outputs (one collective
    each), ``tp_bwd_allreduce_bytes`` the colwise modules' inputs (one each, in backward).

    Every block is run; none is copied from another, so no proof that blocks are identical is
    needed. A GPT-3 175B configuration profiles in a few seconds.

    Raises:
        ValueError: on a bad ``blocks``/``dtype_bytes``/``attention``/``example_inputs``,
            an invalid ``tp_plan``, blocks that do not run exactly once and in order, or a
            model with nothing to train.
    """
    if isinstance(dtype_bytes, bool) or not isinstance(dtype_bytes, int) or dtype_bytes < 1:
        raise ValueError(
            f"profile: dtype_bytes={dtype_bytes!r} must be a positive int (2 for bf16)")
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(
            f"profile: attention={attention!r} is unknown; choose one of {ATTENTION_BACKENDS}")
    args, kwargs = _split_inputs(example_inputs)
    first = next(iter(iter_tensors((args, kwargs))), None)
    if first is None or first.dim() == 0:
        raise ValueError(
            "profile: example_inputs must contain a tensor whose dim 0 is the batch, got "
            f"{type(example_inputs).__name__}"
        )
    sequential = blocks is None
    if sequential and not isinstance(model, SequentialModel):
        raise ValueError(
            f"profile: {type(model).__name__} is not a dartspar SequentialModel, so its layers "
            "are unknown; pass blocks= naming its block list, one of "
            f"{_module_list_paths(model) or '(none found)'}"
        )
    if sequential:
        paths = ["layers"]
    elif isinstance(blocks, str):
        paths = [blocks]
    elif isinstance(blocks, (list, tuple)) and blocks:
        paths = list(blocks)
    else:
        raise ValueError(
            f"profile: blocks={blocks!r} must be a submodule path such as 'layers' or a "
            f"non-empty list of such paths; module lists in the model: {_module_list_paths(model)}"
        )
    _resolve_blocks(model, paths, blocks)  # validate before copying anything

    work = model if _is_meta(model) else _meta_copy(model)
    block_names, block_mods = _resolve_blocks(work, paths, blocks)
    tp_plans = [_tp_plan(mod, block_name) for mod, block_name in zip(block_mods, block_names)]
    args, kwargs = _to_meta((args, kwargs))
    result = trace(work, args, kwargs, block_mods, block_names, tp_plans, dtype_bytes, attention)

    owners = _param_segments(work, block_mods, result.segments)
    unattributed = {
        pname: p.numel() for pname, p in work.named_parameters() if id(p) not in owners
    }
    names = ["pre", *block_names, "post"]
    kinds = ["pre", *["block"] * len(block_mods), "post"]
    layers = []
    for index, stats in enumerate(result.segments):
        params = [p for p, segment in owners.values() if segment == index]
        module = block_mods[index - 1] if kinds[index] == "block" else None
        plan = tp_plans[index - 1] if kinds[index] == "block" else None
        layer = _layer_profile(names[index], kinds[index], stats, params, dtype_bytes, plan, module)
        if kinds[index] != "block" and _is_empty(layer):
            continue
        if kinds[index] != "block" and sequential:
            raise ValueError(
                f"profile: {type(model).__name__}.forward does work outside model.layers "
                f"({layer.fwd_flops:.3g} FLOPs, {layer.num_params} parameters, "
                f"{layer.other_bytes_moved} bytes moved {'before' if index == 0 else 'after'} "
                "them); pass blocks='layers' to profile it as pre/post layers"
            )
        layers.append(layer)

    meta: dict[str, Any] = {"model_class": type(model).__name__, "attention": attention}
    if not first.is_floating_point() and first.dim() >= 2:
        meta["seq_len"] = int(first.shape[1])
    config = getattr(model, "config", None)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        meta["config"] = json.loads(json.dumps(asdict(config), default=str))
    if not sequential:
        meta["blocks"] = paths
    if unattributed:
        meta["unattributed_params"] = unattributed
    return ModelProfile(
        name=name if name is not None else type(model).__name__,
        layers=tuple(layers),
        batch_size=int(first.shape[0]),
        dtype_bytes=dtype_bytes,
        meta=meta,
    )


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    raise ValueError(
        f"profile: example_inputs is a {type(example_inputs).__name__}; pass a tensor, a "
        "tuple/list of positional arguments or a dict of keyword arguments"
    )


def _to_meta(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("meta")
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_meta(item) for item in obj)
    if isinstance(obj, dict):
        return {key: _to_meta(item) for key, item in obj.items()}
    return obj


def _is_meta(model: nn.Module) -> bool:
    return all(t.is_meta for t in (*model.parameters(), *model.buffers()))


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers are meta tensors (the data is never copied)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        meta_tensor = torch.empty_like(p, device="meta")
        memo[id(p)] = nn.Parameter(meta_tensor, requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _module_list_paths(model: nn.Module) -> list[str]:
    """Paths of the outermost ModuleList/Sequential submodules: the candidates for blocks=."""
    found: list[str] = []
    for path, mod in model.named_modules():
        if path and isinstance(mod, (nn.ModuleList, nn.Sequential)):
            if not any(path.startswith(prefix + ".") for prefix in found):
                found.append(path)
    return found


def _resolve_blocks(
    model: nn.Module, paths: list, blocks_arg: Any,
) -> tuple[list[str], list[nn.Module]]:
    names: list[str] = []
    mods: list[nn.Module] = []
    for path in paths:
        if not isinstance(path, str) or not path:
            raise ValueError(
                f"profile: blocks={blocks_arg!r} must be a submodule path such as 'layers' or a "
                "list of such paths"
            )
        container: nn.Module = model
        walked: list[str] = []
        for part in path.split("."):
            child = container._modules.get(part)
            if child is None:
                where = ".".join(walked) or type(model).__name__
                raise ValueError(
                    f"profile: blocks={blocks_arg!r}: {where} has no submodule {part!r}; its "
                    f"child modules are {list(container._modules)}; module lists in the model: "
                    f"{_module_list_paths(model)}"
                )
            container = child
            walked.append(part)
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            raise ValueError(
                f"profile: blocks={blocks_arg!r}: {path!r} is a {type(container).__name__}, not "
                f"an nn.ModuleList or nn.Sequential; its child modules are "
                f"{list(container._modules)}; module lists in the model: "
                f"{_module_list_paths(model)}"
            )
        if len(container) == 0:
            raise ValueError(f"profile: blocks={blocks_arg!r}: {path!r} is empty")
        for index, mod in enumerate(container):
            names.append(f"{path}.{index}")
            mods.append(mod)
    if len({id(m) for m in mods}) != len(mods):
        raise ValueError(
            f"profile: blocks={blocks_arg!r} lists the same module twice; each block must be a "
            "distinct module that runs once per forward pass"
        )
    return names, mods


def _tp_plan(module: nn.Module, layer_name: str) -> dict[str, str] | None:
    """The layer's validated tensor-parallel plan, or None when it does not split."""
    plan = getattr(module, "tp_plan", None)
    if plan is None:
        return None
    cls = type(module).__name__
    if not isinstance(plan, dict) or not plan:
        raise ValueError(
            f"profile: layer {layer_name!r} ({cls}) has tp_plan={plan!r}; it must be a "
            "non-empty dict of submodule path -> 'colwise' | 'rowwise'"
        )
    submodules = [path for path, _ in module.named_modules() if path]
    for path, style in plan.items():
        if style not in TP_STYLES:
            raise ValueError(
                f"profile: layer {layer_name!r} ({cls}) tp_plan[{path!r}]={style!r}; use one of "
                f"{TP_STYLES}"
            )
        if path not in submodules:
            raise ValueError(
                f"profile: layer {layer_name!r} ({cls}) tp_plan names {path!r}, which is not one "
                f"of its submodules {submodules}"
            )
    degree = getattr(module, "tp_max_degree", None)
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(
            f"profile: layer {layer_name!r} ({cls}) has a tp_plan but tp_max_degree={degree!r}; "
            "set tp_max_degree to the largest tensor-parallel degree that divides its heads "
            "and hidden sizes"
        )
    return dict(plan)


def _param_segments(model: nn.Module, blocks: list[nn.Module], segments: list) -> dict:
    """id(parameter) -> (parameter, segment index) for every parameter some segment owns.

    A block owns its own parameters (the first block, if shared); any other parameter belongs
    to the first segment whose forward reads it.
    """
    owners: dict[int, tuple[nn.Parameter, int]] = {}
    for index, block in enumerate(blocks):
        for p in block.parameters():
            owners.setdefault(id(p), (p, index + 1))
    for p in model.parameters():
        if id(p) in owners:
            continue
        key = storage_key(p)
        for index, stats in enumerate(segments):
            if key in stats.params_read:
                owners[id(p)] = (p, index)
                break
    return owners


def _merge_gemms(gemms: list) -> tuple[GemmShape, ...]:
    """Identical products (same shape, split and batch scaling) merged into ``count``."""
    counts: dict[tuple, int] = {}
    for (m, n, k, batch, family), split in gemms:
        scales = "m" if family == "linear" else "batch"
        key = (m, n, k, batch, split, scales)
        counts[key] = counts.get(key, 0) + 1
    return tuple(
        GemmShape(m=m, n=n, k=k, batch=batch, count=count, tp_split=split, scales_with_batch=scales)
        for (m, n, k, batch, split, scales), count in counts.items()
    )


def _layer_profile(name, kind, stats, params, dtype_bytes, tp_plan, module) -> LayerProfile:
    trainable = [p for p in params if p.requires_grad]
    trainable_count = sum(p.numel() for p in trainable)
    return LayerProfile(
        name=name,
        kind=kind,
        fwd_flops=float(stats.fwd_flops),
        bwd_flops=float(stats.bwd_flops),
        num_params=sum(p.numel() for p in params),
        param_bytes=sum(tensor_bytes(p, dtype_bytes) for p in params),
        grad_bytes=sum(tensor_bytes(p, dtype_bytes) for p in trainable),
        optimizer_bytes=(OPTIMIZER_BYTES_PER_PARAM if dtype_bytes < 4 else FP32_OPTIMIZER_BYTES_PER_PARAM)
        * trainable_count,
        saved_bytes=sum(stats.saved.values()),
        input_bytes=stats.input_bytes,
        output_bytes=stats.output_bytes,
        gemms=_merge_gemms(stats.gemms),
        tp_allreduce_bytes=stats.tp_allreduce_bytes if tp_plan else 0,
        tp_allreduce_count=stats.tp_allreduce_count if tp_plan else 0,
        tp_bwd_allreduce_bytes=stats.tp_bwd_allreduce_bytes if tp_plan else 0,
        tp_bwd_allreduce_count=stats.tp_bwd_allreduce_count if tp_plan else 0,
        tp_max_degree=module.tp_max_degree if tp_plan else 1,
        other_bytes_moved=stats.other_bytes_moved,
    )


def _is_empty(layer: LayerProfile) -> bool:
    return not (layer.fwd_flops or layer.bwd_flops or layer.num_params or layer.saved_bytes
                or layer.other_bytes_moved or layer.gemms)


class _CallableModule(types.ModuleType):
    """Lets ``dartspar.profile(model, inputs)`` call ``profile`` while ``dartspar.profile`` stays
    the module, so ``from dartspar.profile import ModelProfile`` and the function share a name
    without one hiding the other."""

    def __call__(self, *args, **kwargs) -> ModelProfile:
        return profile(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
