"""The differentiable cost model: one code path for discrete plans and relaxed ones.

A relaxed plan (``SoftPlan``) gives, for a fixed number of stages p, the probability that each
layer belongs to each stage, that each stage uses each candidate ``StageConfig`` (device group
class and dp x tp split), that each layer recomputes, and which link joins consecutive stages.
``relaxed_cost`` turns it into expected per-stage times, the pipeline makespan (exact max, or a
log-sum-exp when ``smooth_s`` is given), data-parallel synchronisation and per-device memory.
Expectations are taken term by term under independence of the rows (mean field), which is exact
when the rows are one-hot: ``CostModel.evaluate(plan)`` builds exactly that one-hot SoftPlan, so
the baselines, the search and the executor's predicted column share every formula.

Step time = pipeline makespan (GPipe / 1F1B closed form, ``schedule.py``) + the slowest stage's
gradient synchronisation and optimizer update, which start after the stage's last backward and
are not overlapped, + a fixed per-step overhead. Every stage also pays a fixed overhead per
micro-batch and pass (kernel launches, the pipelining runtime), and every recomputed layer a
fixed overhead per micro-batch (the checkpoint wrapper's bookkeeping): these overheads are 0
unless calibrated (``dartspar.calibrate``), since on GPUs they are small and on CPU they are
machine-specific.
The optimizer update is memory-bound (``compute.optimizer_tables``); under FSDP every layer
is its own unit, so every layer adds the latency of one all-gather and one reduce-scatter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import torch

from ..cluster import Cluster, Link
from ..plan import Plan, PlanError
from ..profile import ModelProfile
from .comm import hierarchical_allreduce_time_s, ring_allreduce_time_s
from .compute import ComputeTables, compute_tables, optimizer_tables
from .groups import StageConfig, group_class
from .latency import LatencyEstimator, make_estimator
from .memory import MemoryTables, memory_tables, stage_memory_bytes
from .schedule import inflight_microbatches, pipeline_makespan_s, smooth_max

__all__ = [
    "CostModel", "LayerTables", "SoftPlan", "RelaxedCost", "CostBreakdown", "StageCost",
    "ACT_BYTES", "GRAD_BYTES", "relaxed_cost",
]

ACT_BYTES = {"fp32": 4, "bf16": 2, "fp8": 1}
GRAD_BYTES = {"fp32": 4, "bf16": 2, "int8": 1}
GIB = 2.0**30


@dataclass(frozen=True)
class LayerTables:
    """Everything per layer x config that the relaxed cost needs, at one micro-batch size.

    (L, C) tensors unless noted; C indexes ``configs``.
    """

    configs: tuple[StageConfig, ...]
    micro_batch_size: int
    data_parallel: str
    compute: ComputeTables
    memory: MemoryTables
    grad_bytes: torch.Tensor  # per device, at the training dtype, before the precision choice
    param_bytes: torch.Tensor  # per device (what FSDP all-gathers)
    output_bytes: torch.Tensor  # (L,) the layer's output for a whole micro-batch
    dp: torch.Tensor  # (C,)
    capacity_bytes: torch.Tensor  # (C,)
    sync_alpha_s: torch.Tensor  # (C,) latency part of the gradient synchronisation
    sync_beta_s_per_byte: torch.Tensor  # (C,) seconds per payload byte
    # (L, C) seconds each layer adds once per step after its stage's last backward, on one
    # device: its optimizer update and, under FSDP with dp > 1, its unit's collective latency.
    step_layer_s: torch.Tensor


@dataclass
class SoftPlan:
    """A relaxed (or, with one-hot rows, a discrete) plan with p stages; see module doc.

    Attributes:
        membership: (p, L) P(layer l in stage k); columns sum to 1.
        last_layer: (p, L) P(layer l is the last layer of stage k); rows of stages 0..p-2 sum
            to 1 (the last stage sends nothing, its row is ignored).
        config_probs: (p, C) P(stage k uses config c).
        recompute: (L,) P(layer l recomputes its forward in backward).
        boundary_link_probs: (p, K) P(the boundary k -> k+1 uses link ``links[j]``).
        links: the K candidate links.
        num_microbatches, schedule, data_parallel: fixed discrete choices of this branch.
        act_bytes_factor / grad_bytes_factor: expected bytes per element of the activations sent
            between stages / the synchronised gradients, relative to the training dtype.
    """

    membership: torch.Tensor
    last_layer: torch.Tensor
    config_probs: torch.Tensor
    recompute: torch.Tensor
    boundary_link_probs: torch.Tensor
    links: tuple[Link, ...]
    num_microbatches: int
    schedule: str
    data_parallel: str
    act_bytes_factor: torch.Tensor
    grad_bytes_factor: torch.Tensor


@dataclass
class RelaxedCost:
    """Expected cost figures of a SoftPlan (tensors, differentiable)."""

    step_time_s: torch.Tensor
    makespan_s: torch.Tensor
    fwd_s: torch.Tensor  # (p,) per micro-batch: compute + tp comm
    bwd_s: torch.Tensor  # (p,) per micro-batch: compute + tp comm + recomputation
    fwd_compute_s: torch.Tensor
    bwd_compute_s: torch.Tensor
    recompute_s: torch.Tensor
    tp_comm_s: torch.Tensor  # (p,) per micro-batch, forward + backward
    update_s: torch.Tensor  # (p,) per step: optimizer update (+ FSDP per-layer latency)
    p2p_s: torch.Tensor  # (p,) one way per micro-batch to the next stage (0 for the last)
    dp_sync_s: torch.Tensor  # (p,)
    memory_bytes: torch.Tensor  # (p, C) per-device bytes under each config
    expected_memory_bytes: torch.Tensor  # (p,)
    overflow_bytes: torch.Tensor  # (p,) expected max(0, memory - capacity)
    inflight: torch.Tensor  # (p,)


def relaxed_cost(
    soft: SoftPlan, tables: LayerTables, smooth_s: float | None = None,
    stage_overhead_s: float = 0.0, step_overhead_s: float = 0.0,
) -> RelaxedCost:
    """Expected step time, per-stage terms and memory of ``soft`` (see module doc).

    ``smooth_s``: log-sum-exp temperature in seconds for the slowest-stage terms; None = exact.
    ``stage_overhead_s``: fixed seconds per stage, micro-batch and pass (forward or backward);
    ``step_overhead_s``: fixed seconds per step.
    """
    W, Q, R = soft.membership, soft.config_probs, soft.recompute
    num_stages = W.shape[0]
    ct = tables.compute

    def per_stage(layer_table: torch.Tensor) -> torch.Tensor:
        # sum_c Q[k,c] sum_l W[k,l] T[l,c]
        return ((W @ layer_table) * Q).sum(-1)

    fwd_compute = per_stage(ct.fwd_compute_s)
    bwd_compute = per_stage(ct.bwd_compute_s)
    tp_fwd = per_stage(ct.tp_fwd_comm_s)
    tp_bwd = per_stage(ct.tp_bwd_comm_s)
    recompute = per_stage(R[:, None] * ct.recompute_s)
    fwd = fwd_compute + tp_fwd + stage_overhead_s
    bwd = bwd_compute + tp_bwd + recompute + stage_overhead_s

    # Stage-to-stage transfer: the last layer's output, each replica sending its shard.
    lat = torch.tensor([link.latency_s for link in soft.links], dtype=torch.float64)
    inv_bw = torch.tensor([1.0 / link.bandwidth_bytes_per_s for link in soft.links], dtype=torch.float64)
    sent_bytes = (soft.last_layer @ tables.output_bytes) * soft.act_bytes_factor
    p2p = soft.boundary_link_probs @ lat + sent_bytes * (soft.boundary_link_probs @ inv_bw) * (Q @ (1.0 / tables.dp))
    p2p = torch.cat([p2p[:-1], torch.zeros_like(p2p[-1:])])

    grad_payload = W @ tables.grad_bytes * soft.grad_bytes_factor  # (p, C)
    if soft.data_parallel == "fsdp":
        # Reduce-scatter the gradients and all-gather the parameters: half an all-reduce each.
        payload = 0.5 * (grad_payload + W @ tables.param_bytes)
    else:
        payload = grad_payload
    sync = (Q * (tables.sync_alpha_s + payload * tables.sync_beta_s_per_byte)).sum(-1)
    sync = torch.where(Q @ (tables.dp > 1).double() > 0, sync, torch.zeros_like(sync))

    update = per_stage(tables.step_layer_s)

    makespan = pipeline_makespan_s(fwd, bwd, p2p, soft.num_microbatches, soft.schedule, smooth_s)
    step = makespan + smooth_max(sync + update, smooth_s) + step_overhead_s

    inflight = inflight_microbatches(num_stages, soft.num_microbatches, soft.schedule)
    memory = stage_memory_bytes(W, R, inflight, tables.memory)
    overflow = (Q * torch.relu(memory - tables.capacity_bytes)).sum(-1)
    return RelaxedCost(
        step_time_s=step, makespan_s=makespan, fwd_s=fwd, bwd_s=bwd,
        fwd_compute_s=fwd_compute, bwd_compute_s=bwd_compute, recompute_s=recompute,
        tp_comm_s=tp_fwd + tp_bwd, update_s=update, p2p_s=p2p, dp_sync_s=sync, memory_bytes=memory,
        expected_memory_bytes=(Q * memory).sum(-1), overflow_bytes=overflow, inflight=inflight,
    )


@dataclass(frozen=True)
class StageCost:
    """Predicted figures of one stage (seconds per micro-batch unless noted)."""

    layers: tuple[int, int]
    devices: str
    dp: int
    tp: int
    fwd_s: float
    bwd_s: float
    recompute_s: float
    tp_comm_s: float
    p2p_s: float
    dp_sync_s: float  # per step
    update_s: float  # per step: optimizer update (+ FSDP per-layer latency)
    memory_bytes: float  # per device
    capacity_bytes: float
    inflight_microbatches: int


@dataclass(frozen=True)
class CostBreakdown:
    """What ``CostModel.evaluate`` returns: the step time, its terms, per-stage figures, memory."""

    step_time_s: float
    step_time_smooth_s: float
    makespan_s: float
    bubble_s: float
    dp_sync_s: float
    stages: tuple[StageCost, ...]
    peak_bytes_per_device: dict
    max_overflow_bytes: float
    fits: bool
    smooth_temperature_s: float
    terms: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A readable per-stage table."""
        head = (
            f"{'stage':>5} {'layers':>11} {'devices':>24} {'dp':>3} {'tp':>3} {'fwd ms':>9} "
            f"{'bwd ms':>9} {'p2p ms':>8} {'sync ms':>8} {'mem GiB':>8} {'cap GiB':>8}"
        )
        rows = [head]
        for i, s in enumerate(self.stages):
            rows.append(
                f"{i:>5} {f'[{s.layers[0]}, {s.layers[1]})':>11} {s.devices:>24} {s.dp:>3} {s.tp:>3} "
                f"{1e3 * s.fwd_s:>9.3f} {1e3 * s.bwd_s:>9.3f} {1e3 * s.p2p_s:>8.3f} "
                f"{1e3 * s.dp_sync_s:>8.3f} {s.memory_bytes / GIB:>8.2f} {s.capacity_bytes / GIB:>8.2f}"
            )
        rows.append(
            f"step {1e3 * self.step_time_s:.3f} ms (makespan {1e3 * self.makespan_s:.3f} ms, "
            f"bubble {1e3 * self.bubble_s:.3f} ms, dp sync {1e3 * self.dp_sync_s:.3f} ms); "
            + ("fits in memory" if self.fits else f"DOES NOT FIT: over by {self.max_overflow_bytes / GIB:.2f} GiB")
        )
        return "\n".join(rows)


class CostModel:
    """Scores plans of ``profile`` on ``cluster``.

    Args:
        profile: the model's per-layer profile.
        cluster: the hardware.
        estimator: a ``LatencyEstimator`` or its registered name (default "roofline").
        compute_dtype: dtype of the GEMMs on every device; default: for a 2-byte training dtype
            bf16 where the device has bf16 units and fp16 where it does not (V100, T4), else
            fp32 (see ``dtype_for``).
        smooth_rel: log-sum-exp temperature for the reported smooth step time, as a fraction of
            the mean per-micro-batch stage time.
        stage_overhead_s / step_overhead_s / recompute_overhead_s: fixed overheads (see module
            doc); default: the cluster's calibration, else 0.
    """

    def __init__(
        self,
        profile: ModelProfile,
        cluster: Cluster,
        estimator: LatencyEstimator | str = "roofline",
        compute_dtype: str | None = None,
        smooth_rel: float = 0.05,
        stage_overhead_s: float | None = None,
        step_overhead_s: float | None = None,
        recompute_overhead_s: float | None = None,
    ) -> None:
        self.profile = profile
        self.cluster = cluster
        self.estimator = make_estimator(estimator) if isinstance(estimator, str) else estimator
        self.compute_dtype = compute_dtype
        self.smooth_rel = smooth_rel
        calibration = getattr(cluster, "calibration", None) or {}
        self.stage_overhead_s = float(
            calibration.get("stage_overhead_s", 0.0) if stage_overhead_s is None else stage_overhead_s
        )
        self.step_overhead_s = float(
            calibration.get("step_overhead_s", 0.0) if step_overhead_s is None else step_overhead_s
        )
        self.recompute_overhead_s = float(
            calibration.get("recompute_overhead_s", 0.0) if recompute_overhead_s is None else recompute_overhead_s
        )
        # What a process holds before any model state (runtime, allocator pools): it is taken out
        # of every device's capacity in the tables, so every planner sees it, and added back in
        # the reported per-device memory.
        self.memory_baseline_bytes = float(calibration.get("memory_baseline_bytes", 0.0))
        if min(self.stage_overhead_s, self.step_overhead_s, self.recompute_overhead_s) < 0:
            raise ValueError(
                f"overheads must be >= 0, got recompute_overhead_s={self.recompute_overhead_s}, "
                f"stage_overhead_s={self.stage_overhead_s}, "
                f"step_overhead_s={self.step_overhead_s}"
            )
        self._tables: dict = {}
        self._grad_bytes = torch.tensor([lay.grad_bytes for lay in profile.layers], dtype=torch.float64)
        self._param_bytes = torch.tensor([lay.param_bytes for lay in profile.layers], dtype=torch.float64)
        self._tp_splits = torch.tensor([lay.tp_max_degree > 1 for lay in profile.layers])

    def dtype_for(self, device) -> str:
        """The GEMM dtype ``device`` trains in (see ``compute_dtype``)."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        if self.profile.dtype_bytes == 2:
            has = device.peak_flops_per_s
            if "bf16" in has:
                return "bf16"
            if "fp16" in has:
                return "fp16"
            raise ValueError(
                f"device {device.name!r} has neither bf16 nor fp16 units for a 2-byte training "
                "dtype: profile with dtype_bytes=4 or give compute_dtype='fp32'"
            )
        return "fp32"

    # ------------------------------------------------------------------------------ tables
    def tables(
        self, configs: Sequence[StageConfig], micro_batch_size: int, data_parallel: str = "replicate"
    ) -> LayerTables:
        """Per-layer per-config tables at ``micro_batch_size`` samples per micro-batch (cached)."""
        key = (tuple(configs), micro_batch_size, data_parallel)
        if key not in self._tables:
            self._tables[key] = self._build_tables(tuple(configs), micro_batch_size, data_parallel)
        return self._tables[key]

    def _build_tables(self, configs, micro_batch_size, data_parallel) -> LayerTables:
        compute = compute_tables(self.profile, configs, micro_batch_size, self.estimator, self.dtype_for)
        if self.recompute_overhead_s:
            compute = replace(compute, recompute_s=compute.recompute_s + self.recompute_overhead_s)
        memory = memory_tables(self.profile, configs, micro_batch_size, data_parallel)
        tp = torch.tensor([c.tp for c in configs], dtype=torch.float64)
        tp_eff = torch.where(self._tp_splits[:, None], tp[None, :], torch.ones_like(tp)[None, :])
        alpha, beta = zip(*(self._sync_coefficients(c) for c in configs))
        step_layer = optimizer_tables(self.profile, configs, data_parallel, self.estimator)
        if data_parallel == "fsdp":
            has_params = torch.tensor([lay.num_params > 0 for lay in self.profile.layers])
            step_layer = step_layer + has_params[:, None] * torch.tensor(alpha, dtype=torch.float64)[None, :]
        scale = micro_batch_size / self.profile.batch_size
        return LayerTables(
            configs=configs,
            micro_batch_size=micro_batch_size,
            data_parallel=data_parallel,
            compute=compute,
            memory=memory,
            grad_bytes=self._grad_bytes[:, None] / tp_eff,
            param_bytes=self._param_bytes[:, None] / tp_eff,
            output_bytes=torch.tensor(
                [lay.output_bytes * scale for lay in self.profile.layers], dtype=torch.float64
            ),
            dp=torch.tensor([c.dp for c in configs], dtype=torch.float64),
            capacity_bytes=torch.tensor(
                [c.group.memory_bytes - self.memory_baseline_bytes for c in configs], dtype=torch.float64
            ),
            sync_alpha_s=torch.tensor(alpha, dtype=torch.float64),
            sync_beta_s_per_byte=torch.tensor(beta, dtype=torch.float64),
            step_layer_s=step_layer,
        )

    @staticmethod
    def _sync_coefficients(config: StageConfig) -> tuple[float, float]:
        """(alpha, beta) of the data-parallel all-reduce time ``alpha + beta * bytes`` per device.

        Inside one node: a ring over the dp ranks. Across nodes: hierarchical (reduce-scatter in
        the node, all-reduce across nodes, all-gather in the node). Both are linear in bytes, so
        two evaluations give the coefficients exactly.
        """
        g = config.group
        if config.dp == 1:
            return 0.0, 0.0
        if g.num_nodes == 1:
            def time(n):
                return ring_allreduce_time_s(n, config.dp, g.intra_link.latency_s, g.intra_link.bandwidth_bytes_per_s)
        else:
            per_node = max(1, config.dp // g.num_nodes)
            nodes = config.dp // per_node

            def time(n):
                return hierarchical_allreduce_time_s(
                    n, per_node, nodes, g.intra_link.latency_s, g.intra_link.bandwidth_bytes_per_s,
                    g.inter_link.latency_s, g.inter_link.bandwidth_bytes_per_s,
                )
        t0, t1 = float(time(0.0)), float(time(1.0))
        return t0, t1 - t0

    # ----------------------------------------------------------------------- discrete plans
    def stage_configs(self, plan: Plan) -> tuple[StageConfig, ...]:
        return tuple(
            StageConfig(group_class(self.cluster, s.device_ids, self.dtype_for), s.dp, s.tp)
            for s in plan.stages
        )

    def one_hot(self, plan: Plan) -> tuple[SoftPlan, LayerTables]:
        """The SoftPlan whose rows are the plan's choices, and the tables it indexes."""
        plan.validate(self.profile, self.cluster)
        configs = self.stage_configs(plan)
        # One table column per distinct config: stages sharing a config share the column.
        distinct = list(dict.fromkeys(configs))
        tables = self.tables(distinct, plan.micro_batch_size, plan.data_parallel)
        p, L = plan.num_stages, self.profile.num_layers
        membership = torch.zeros(p, L, dtype=torch.float64)
        last = torch.zeros(p, L, dtype=torch.float64)
        config_probs = torch.zeros(p, len(distinct), dtype=torch.float64)
        recompute = torch.zeros(L, dtype=torch.float64)
        links = []
        for k, stage in enumerate(plan.stages):
            membership[k, stage.layer_start : stage.layer_end] = 1
            last[k, stage.layer_end - 1] = 1
            config_probs[k, distinct.index(configs[k])] = 1
            recompute[stage.layer_start : stage.layer_end] = torch.tensor(stage.recompute, dtype=torch.float64)
            if k + 1 < p:
                links.append(self.cluster.link_between(stage.device_ids[-1], plan.stages[k + 1].device_ids[0]))
        distinct_links = list(dict.fromkeys(links)) or [self.cluster.inter_link]
        link_probs = torch.zeros(p, len(distinct_links), dtype=torch.float64)
        for k, link in enumerate(links):
            link_probs[k, distinct_links.index(link)] = 1
        dtype_bytes = self.profile.dtype_bytes
        soft = SoftPlan(
            membership=membership, last_layer=last, config_probs=config_probs, recompute=recompute,
            boundary_link_probs=link_probs, links=tuple(distinct_links),
            num_microbatches=plan.num_microbatches, schedule=plan.schedule,
            data_parallel=plan.data_parallel,
            act_bytes_factor=torch.tensor(ACT_BYTES[plan.activation_precision] / dtype_bytes, dtype=torch.float64),
            grad_bytes_factor=torch.tensor(GRAD_BYTES[plan.gradient_precision] / dtype_bytes, dtype=torch.float64),
        )
        return soft, tables

    def relaxed(self, soft: SoftPlan, tables: LayerTables, smooth_s: float | None = None) -> RelaxedCost:
        """``relaxed_cost`` with this model's overheads: what every planner must call."""
        return relaxed_cost(soft, tables, smooth_s, self.stage_overhead_s, self.step_overhead_s)

    def smooth_temperature_s(self, cost: RelaxedCost) -> float:
        """The reported smooth max's temperature: ``smooth_rel`` x mean stage time."""
        return self.smooth_rel * float((cost.fwd_s + cost.bwd_s).mean().detach())

    def evaluate(self, plan: Plan) -> CostBreakdown:
        """Predicted step time, per-stage terms and per-device peak memory of ``plan``."""
        soft, tables = self.one_hot(plan)
        exact = self.relaxed(soft, tables)
        temperature = self.smooth_temperature_s(exact)
        smooth = self.relaxed(soft, tables, smooth_s=temperature)
        m = plan.num_microbatches
        stages, peak = [], {}
        for k, stage in enumerate(plan.stages):
            c = int(soft.config_probs[k].argmax())
            mem = float(exact.memory_bytes[k, c]) + self.memory_baseline_bytes
            cfg = tables.configs[c]
            for device in stage.device_ids:
                peak[device] = mem
            stages.append(StageCost(
                layers=(stage.layer_start, stage.layer_end), devices=cfg.group.label, dp=stage.dp,
                tp=stage.tp, fwd_s=float(exact.fwd_s[k]), bwd_s=float(exact.bwd_s[k]),
                recompute_s=float(exact.recompute_s[k]), tp_comm_s=float(exact.tp_comm_s[k]),
                p2p_s=float(exact.p2p_s[k]), dp_sync_s=float(exact.dp_sync_s[k]),
                update_s=float(exact.update_s[k]), memory_bytes=mem, capacity_bytes=float(cfg.group.memory_bytes),
                inflight_microbatches=int(exact.inflight[k]),
            ))
        slowest = float((exact.fwd_s + exact.bwd_s).max())
        overflow = float(exact.overflow_bytes.max())
        return CostBreakdown(
            step_time_s=float(exact.step_time_s),
            step_time_smooth_s=float(smooth.step_time_s),
            makespan_s=float(exact.makespan_s),
            bubble_s=float(exact.makespan_s) - m * slowest,
            dp_sync_s=float(exact.dp_sync_s.max()),
            stages=tuple(stages),
            peak_bytes_per_device=peak,
            max_overflow_bytes=overflow,
            fits=overflow <= 0,
            smooth_temperature_s=temperature,
            terms={
                "compute_s": m * float((exact.fwd_compute_s + exact.bwd_compute_s).max()),
                "recompute_s": m * float(exact.recompute_s.max()),
                "tp_comm_s": m * float(exact.tp_comm_s.max()),
                "p2p_s": 2 * float(exact.p2p_s.sum()),
                "dp_sync_s": float(exact.dp_sync_s.max()),
                "update_s": float(exact.update_s.max()),
                "makespan_s": float(exact.makespan_s),
            },
        )

    def check_fits(self, plan: Plan) -> CostBreakdown:
        """``evaluate`` that raises PlanError when a device's memory overflows, naming it."""
        breakdown = self.evaluate(plan)
        for k, stage in enumerate(breakdown.stages):
            if stage.memory_bytes > stage.capacity_bytes:
                raise PlanError(
                    f"stage {k} (layers [{stage.layers[0]}, {stage.layers[1]}) on {stage.devices}, "
                    f"dp={stage.dp} tp={stage.tp}) needs {stage.memory_bytes / GIB:.2f} GiB per "
                    f"device but a device holds {stage.capacity_bytes / GIB:.2f} GiB: enable "
                    "recompute, raise tp or dp (with data_parallel=fsdp), use more micro-batches "
                    "or more stages"
                )
        return breakdown

    def with_prediction(self, plan: Plan) -> Plan:
        """``plan`` with ``predicted`` filled from ``evaluate``."""
        b = self.evaluate(plan)
        predicted = {
            "step_time_s": b.step_time_s,
            "step_time_smooth_s": b.step_time_smooth_s,
            "makespan_s": b.makespan_s,
            "dp_sync_s": b.dp_sync_s,
            "fits": b.fits,
            "peak_bytes": max(b.peak_bytes_per_device.values()),
            "peak_bytes_per_device": {str(k): v for k, v in b.peak_bytes_per_device.items()},
            "stages": [asdict(s) for s in b.stages],
            "estimator": self.estimator.name,
            "cluster": self.cluster.name,
        }
        return replace(plan, predicted=predicted)
