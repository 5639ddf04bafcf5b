"""Fast paths of the shared cost model for the search: batched relaxed cost, exact discrete cost.

The search evaluates the relaxed cost of every branch (node order, stage count) at every
micro-batch count and schedule on every step, and its local refinement scores thousands of
discrete points. Calling ``SearchSpace.soft_plan`` + ``relaxed_cost`` once per (branch, m,
schedule) costs milliseconds each (hundreds of small torch ops), which the 60 s budget for a
96-layer model on 64 devices cannot afford. This module evaluates the *same formulas*:

- ``StackedTables``: ``SearchSpace.tables(m)`` for all micro-batch counts, stacked on a leading
  dimension, plus prefix sums for the discrete path;
- ``batched_soft_configs``: ``SearchSpace.soft_plan``'s offset convolution, config and link
  probabilities, batched over node orders and micro-batch counts (whose shape rows differ by
  their feasibility masks);
- ``batched_relaxed_cost``: ``cost.model.relaxed_cost`` for all node orders, micro-batch counts
  and schedules of one stage count at once (the makespan itself is
  ``cost.schedule.pipeline_makespan_s``);
- ``ExactEvaluator``: the one-hot special case in numpy with prefix sums (~tens of
  microseconds per plan).

These are mirrors, so they could drift from the reference; ``tests/test_fastcost.py`` checks
them against ``relaxed_cost`` / ``SearchSpace.evaluate`` to 1e-9 relative, and every figure the
search *reports* comes from ``SearchSpace.evaluate`` / ``CostModel.evaluate``, never from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import torch

from ..cost.model import ACT_BYTES, GRAD_BYTES
from ..cost.schedule import inflight_microbatches, pipeline_makespan_s, smooth_max
from ..space import Choice, SearchSpace

__all__ = [
    "StackedTables", "BatchedCost", "batched_soft_configs", "batched_relaxed_cost",
    "last_layer_probs", "ExactEvaluator", "ExactCost", "LIN",
]

# The per-layer tables that sum linearly over a stage's layers, in ``StackedTables.lin`` order.
LIN = ("fwd", "bwd", "tp_fwd", "tp_bwd", "state", "saved", "input", "grad", "param", "update")
NLIN = len(LIN)
FWD, BWD, TP_FWD, TP_BWD, STATE, SAVED, INPUT, GRAD, PARAM, UPDATE = range(NLIN)


@dataclass(frozen=True, eq=False)
class StackedTables:
    """``space.tables(m)`` for every m of ``space.microbatch_counts``; M = number of m values.

    Tensors (torch, float64): ``lin`` (M, L, NLIN C) = the ``LIN`` columns (fwd, bwd, tp_fwd,
    tp_bwd, state, saved, input, grad, param, update) per layer and config; ``rec`` (M, L, 3C)
    = [recompute, saved, input] (the terms that recomputation weights); ``output_bytes`` (M, L); ``dp``, ``capacity_bytes``,
    ``sync_alpha_s``, ``sync_beta_s_per_byte`` (M, C); ``m`` (M,) the micro-batch counts.
    """

    microbatch_counts: tuple[int, ...]
    num_configs: int
    lin: torch.Tensor
    rec: torch.Tensor
    output_bytes: torch.Tensor
    dp: torch.Tensor
    capacity_bytes: torch.Tensor
    sync_alpha_s: torch.Tensor
    sync_beta_s_per_byte: torch.Tensor
    m: torch.Tensor

    @cached_property
    def lin_flat(self) -> torch.Tensor:
        """``lin`` as (L, M * NLIN C)."""
        return self.lin.permute(1, 0, 2).reshape(self.lin.shape[1], -1).contiguous()

    @cached_property
    def rec_flat(self) -> torch.Tensor:
        """``rec`` as (L, M * 3C)."""
        return self.rec.permute(1, 0, 2).reshape(self.rec.shape[1], -1).contiguous()

    def inflight(self, num_stages: int, schedule: str) -> torch.Tensor:
        """(M, p) in-flight micro-batches per stage for every m (cached)."""
        key = (num_stages, schedule)
        cache = self.__dict__.setdefault("_inflight", {})
        if key not in cache:
            cache[key] = torch.stack([
                inflight_microbatches(num_stages, m, schedule) for m in self.microbatch_counts])
        return cache[key]

    @classmethod
    def build(cls, space: SearchSpace) -> "StackedTables":
        lin, rec, out, dp, cap, alpha, beta = [], [], [], [], [], [], []
        for m in space.microbatch_counts:
            t = space.tables(m)
            ct, mt = t.compute, t.memory
            lin.append(torch.cat([ct.fwd_compute_s, ct.bwd_compute_s, ct.tp_fwd_comm_s, ct.tp_bwd_comm_s,
                                  mt.state_bytes, mt.saved_bytes, mt.input_bytes, t.grad_bytes, t.param_bytes,
                                  t.step_layer_s], dim=1))
            rec.append(torch.cat([ct.recompute_s, mt.saved_bytes, mt.input_bytes], dim=1))
            out.append(t.output_bytes)
            dp.append(t.dp)
            cap.append(t.capacity_bytes)
            alpha.append(t.sync_alpha_s)
            beta.append(t.sync_beta_s_per_byte)
        return cls(
            microbatch_counts=tuple(space.microbatch_counts), num_configs=len(space.configs),
            lin=torch.stack(lin), rec=torch.stack(rec), output_bytes=torch.stack(out),
            dp=torch.stack(dp), capacity_bytes=torch.stack(cap), sync_alpha_s=torch.stack(alpha),
            sync_beta_s_per_byte=torch.stack(beta),
            m=torch.tensor(space.microbatch_counts, dtype=torch.float64),
        )


def last_layer_probs(membership: torch.Tensor) -> torch.Tensor:
    """(..., p, L) P(layer l is the last of stage k), as ``SearchSpace.soft_plan`` defines it."""
    L = membership.shape[-1]
    last = membership[..., :-1, :-1] * membership[..., 1:, 1:]
    last = last / last.sum(-1, keepdim=True).clamp(min=1e-30)
    last = torch.nn.functional.pad(last, (0, 1))
    return torch.cat([last, membership.new_zeros(*membership.shape[:-2], 1, L)], dim=-2)


class _OrderIndex:
    """The allowed (offset, shape) pairs of a list of node orders, padded to a common count V.

    ``a``, ``s``, ``c``, ``end``: (O, V) offset, shape, config index and end offset (a + size)
    of each pair; ``mask``: (O, V) 1.0 for real pairs, 0.0 for padding. Only allowed pairs
    carry probability, so the offset convolution and the config sums run over V pairs
    instead of all (D + 1) x S.
    """

    def __init__(self, space: SearchSpace, orders: tuple[int, ...]) -> None:
        sizes = torch.tensor([dp * tp for dp, tp in space.shapes])
        pairs = []
        for o in orders:
            ci = space.orders[o].config_index
            a, s = torch.nonzero(ci >= 0, as_tuple=True)
            pairs.append((a, s, ci[a, s]))
        V = max(len(a) for a, _, _ in pairs)
        O = len(orders)
        self.a = torch.zeros(O, V, dtype=torch.long)
        self.s = torch.zeros(O, V, dtype=torch.long)
        self.c = torch.zeros(O, V, dtype=torch.long)
        self.mask = torch.zeros(O, V, dtype=torch.float64)
        for i, (a, s, c) in enumerate(pairs):
            n = len(a)
            self.a[i, :n], self.s[i, :n], self.c[i, :n], self.mask[i, :n] = a, s, c, 1.0
        self.end = self.a + sizes[self.s]
        self.link_valid = torch.stack([(space.orders[o].link_index >= 0).double() for o in orders])  # (O, D+1)
        self.link_flat = torch.stack([space.orders[o].link_index.clamp(min=0) for o in orders])  # (O, D+1)


def batched_soft_configs(
    space: SearchSpace, orders: tuple[int, ...], shape_probs: torch.Tensor, cache: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Config and link probabilities of many shape-probability tensors at once.

    Args:
        space: the search space.
        orders: O node-order indices.
        shape_probs: (O, M, p, S) P(stage k has shape s) for each order and micro-batch count
            (the rows are masked per m).
        cache: optional dict for the index tensors.
    Returns:
        ``config_probs`` (O, M, p, C), ``infeasible`` (O, M, p) and ``link_probs``
        (O, M, p, K): the fields of ``space.soft_plan`` for every (order, m) slice.
    """
    key = ("orders", tuple(orders))
    if cache is not None and key in cache:
        idx = cache[key]
    else:
        idx = _OrderIndex(space, tuple(orders))
        if cache is not None:
            cache[key] = idx
    O, M, p, S = shape_probs.shape
    D, C = space.num_devices, len(space.configs)
    V = idx.a.shape[1]
    a, s, c, end = (t[:, None, :].expand(O, M, V) for t in (idx.a, idx.s, idx.c, idx.end))
    mask = idx.mask[:, None, :]
    offset = shape_probs.new_zeros(O, M, D + 1)
    offset[..., 0] = 1.0
    offsets, configs = [offset], []
    for k in range(p):
        # P(stage k starts at a and has shape s), over the allowed pairs.
        joint = offset.gather(2, a) * shape_probs[:, :, k].gather(2, s) * mask  # (O, M, V)
        configs.append(shape_probs.new_zeros(O, M, C).scatter_add(2, c, joint))
        offset = shape_probs.new_zeros(O, M, D + 1).scatter_add(2, end, joint)
        offsets.append(offset)
    config_probs = torch.stack(configs, dim=2)  # (O, M, p, C)
    infeasible = 1.0 - config_probs.sum(-1)
    # Boundary k -> k+1 sits at stage k+1's offset.
    K = len(space.links) or 1
    starts = torch.stack(offsets[1:], dim=2)  # (O, M, p, D+1)
    link_probs = shape_probs.new_zeros(O, M, p, K).scatter_add(
        3, idx.link_flat[:, None, None, :].expand(O, M, p, -1), starts * idx.link_valid[:, None, None, :])
    return config_probs, infeasible, link_probs


@dataclass
class BatchedCost:
    """Relaxed cost figures for every (order, schedule, m); see ``batched_relaxed_cost``.

    ``step_time_s`` (O, Sc, M); ``overflow_bytes`` and ``expected_memory_bytes`` (O, Sc, M, p);
    ``expected_capacity_bytes`` (O, M, p); ``fwd_s``, ``bwd_s``, ``p2p_s``, ``dp_sync_s``
    (O, M, p).
    """

    step_time_s: torch.Tensor
    overflow_bytes: torch.Tensor
    expected_memory_bytes: torch.Tensor
    expected_capacity_bytes: torch.Tensor
    fwd_s: torch.Tensor
    bwd_s: torch.Tensor
    p2p_s: torch.Tensor
    dp_sync_s: torch.Tensor


def batched_relaxed_cost(
    membership: torch.Tensor,
    config_probs: torch.Tensor,
    recompute: torch.Tensor,
    link_probs: torch.Tensor,
    act_bytes_factor: torch.Tensor,
    grad_bytes_factor: torch.Tensor,
    tables: StackedTables,
    links_latency_s: torch.Tensor,
    links_inv_bw_s_per_byte: torch.Tensor,
    schedules: tuple[str, ...],
    data_parallel: str,
    smooth_rel: float | None = None,
    stage_overhead_s: float = 0.0,
    step_overhead_s: float = 0.0,
) -> BatchedCost:
    """``relaxed_cost`` for O node orders x M micro-batch counts x all schedules of one p.

    Args:
        membership: (O, p, L) P(layer l in stage k).
        config_probs: (O, M, p, C) (the shape rows are masked per m).
        recompute: (O, L) P(layer l recomputes).
        link_probs: (O, M, p, K).
        act_bytes_factor / grad_bytes_factor: scalar tensors (expected bytes per element
            relative to the training dtype).
        tables: stacked tables (M entries, same order as ``config_probs``).
        links_latency_s, links_inv_bw_s_per_byte: (K,) of the space's candidate links.
        schedules: schedule names (the outputs' schedule dim).
        data_parallel: "replicate" or "fsdp".
        smooth_rel: log-sum-exp temperature of the slowest-stage terms as a fraction of each
            (order, m)'s mean stage time (fwd + bwd), detached; None = exact max.
        stage_overhead_s / step_overhead_s: the cost model's fixed overheads (``CostModel``).
    """
    W, Q, R = membership, config_probs, recompute
    O, p, L = W.shape
    C = tables.num_configs
    M = Q.shape[1]
    # One 2-D product per table family: (O p, L) @ (L, M kC) is much cheaper than a batched one.
    lin = (W.reshape(O * p, L) @ tables.lin_flat).view(O, p, M, NLIN, C).transpose(1, 2)  # (O, M, p, NLIN, C)
    rec = ((W * R[:, None, :]).reshape(O * p, L) @ tables.rec_flat).view(O, p, M, 3, C).transpose(1, 2)
    per_stage = (lin[..., :4, :] * Q[..., None, :]).sum(-1)  # fwd, bwd, tp_fwd, tp_bwd: (O, M, p, 4)
    fwd_compute, bwd_compute, tp_fwd, tp_bwd = per_stage.unbind(-1)
    recompute_s = (rec[..., 0, :] * Q).sum(-1)
    fwd = fwd_compute + tp_fwd + stage_overhead_s
    bwd = bwd_compute + tp_bwd + recompute_s + stage_overhead_s

    # (O, p, L) @ (L, M) -> (O, p, M) -> (O, M, p)
    sent_bytes = (last_layer_probs(W) @ tables.output_bytes.t()).transpose(1, 2) * act_bytes_factor
    inv_dp = (Q * (1.0 / tables.dp)[:, None, :]).sum(-1)
    p2p = link_probs @ links_latency_s + sent_bytes * (link_probs @ links_inv_bw_s_per_byte) * inv_dp
    p2p = torch.cat([p2p[..., :-1], torch.zeros_like(p2p[..., -1:])], dim=-1)

    grad_payload = lin[..., GRAD, :] * grad_bytes_factor
    payload = 0.5 * (grad_payload + lin[..., PARAM, :]) if data_parallel == "fsdp" else grad_payload
    sync = (Q * (tables.sync_alpha_s[:, None, :] + payload * tables.sync_beta_s_per_byte[:, None, :])).sum(-1)
    multi = (Q * (tables.dp > 1).double()[:, None, :]).sum(-1)
    sync = torch.where(multi > 0, sync, torch.zeros_like(sync))
    after_backward = sync + (lin[..., UPDATE, :] * Q).sum(-1)

    if smooth_rel is None:
        scale = torch.ones(O, M, 1, dtype=W.dtype)
        temperature = None
    else:
        # pipeline_makespan_s and smooth_max are positively homogeneous in (times, temperature),
        # so a per-(order, m) temperature is a rescaling of the inputs with one temperature.
        scale = (fwd + bwd).mean(-1, keepdim=True).detach().clamp(min=1e-30)
        temperature = smooth_rel
    sync_max = smooth_max(after_backward / scale, temperature) * scale[..., 0]

    state = lin[..., STATE, :]  # (O, M, p, C)
    per_mb = lin[..., SAVED, :] - rec[..., 1, :] + rec[..., 2, :]
    capacity = tables.capacity_bytes[:, None, :]  # (M, 1, C)
    steps, overflow, memory = [], [], []
    for schedule in schedules:
        makespan = pipeline_makespan_s(fwd / scale, bwd / scale, p2p / scale, tables.m, schedule,
                                       temperature) * scale[..., 0]
        steps.append(makespan + sync_max + step_overhead_s)
        mem = state + tables.inflight(p, schedule)[:, :, None] * per_mb  # (O, M, p, C)
        overflow.append((Q * torch.relu(mem - capacity)).sum(-1))
        memory.append((Q * mem).sum(-1))
    return BatchedCost(
        step_time_s=torch.stack(steps, dim=1), overflow_bytes=torch.stack(overflow, dim=1),
        expected_memory_bytes=torch.stack(memory, dim=1),
        expected_capacity_bytes=(Q * capacity).sum(-1),
        fwd_s=fwd, bwd_s=bwd, p2p_s=p2p, dp_sync_s=sync,
    )


# ------------------------------------------------------------------------------ discrete path
@dataclass(frozen=True)
class ExactCost:
    """Exact figures of one discrete point: step time, per-stage memory and overflow (bytes)."""

    step_time_s: float
    memory_bytes: np.ndarray
    capacity_bytes: np.ndarray
    valid: bool

    @property
    def overflow_bytes(self) -> np.ndarray:
        return np.maximum(self.memory_bytes - self.capacity_bytes, 0.0)

    @property
    def fits(self) -> bool:
        return self.valid and bool((self.memory_bytes <= self.capacity_bytes).all())

    @property
    def objective_s(self) -> float:
        """Step time if the point is valid and fits, else +inf (what local search minimizes)."""
        return self.step_time_s if self.fits else float("inf")


INVALID = ExactCost(float("inf"), np.zeros(0), np.zeros(0), False)


class ExactEvaluator:
    """Exact step time and memory of discrete points of ``space`` (numpy, prefix sums).

    Same figures as ``space.evaluate(choice)`` (step_time_s, memory of the chosen config) up to
    float rounding; a point whose device group is not allowed, or whose dp does not divide the
    micro-batch size, is returned as invalid instead of raising. ``count`` counts calls.
    """

    def __init__(self, space: SearchSpace, tables: StackedTables | None = None) -> None:
        self.space = space
        tables = tables or StackedTables.build(space)
        self.C = tables.num_configs
        self.m_index = {m: i for i, m in enumerate(tables.microbatch_counts)}
        lin = tables.lin.numpy()
        self.prefix = np.concatenate([np.zeros_like(lin[:, :1]), np.cumsum(lin, axis=1)], axis=1)  # (M, L+1, NLIN C)
        self.rec = tables.rec.numpy()  # (M, L, 3C)
        self.output_bytes = tables.output_bytes.numpy()
        self.dp = tables.dp.numpy()
        self.cap = tables.capacity_bytes.numpy()
        self.alpha = tables.sync_alpha_s.numpy()
        self.beta = tables.sync_beta_s_per_byte.numpy()
        links = tuple(space.links) or (space.cluster.inter_link,)
        self.lat = np.array([link.latency_s for link in links])
        self.inv_bw = np.array([1.0 / link.bandwidth_bytes_per_s for link in links])
        self.config_index = [o.config_index.numpy() for o in space.orders]
        self.link_index = [o.link_index.numpy() for o in space.orders]
        self.sizes = np.array([dp * tp for dp, tp in space.shapes])
        self.shape_dp = np.array([dp for dp, _ in space.shapes])
        dtype_bytes = space.profile.dtype_bytes
        self.act_factor = {a: ACT_BYTES[a] / dtype_bytes for a in space.options.activation_precisions}
        self.grad_factor = {g: GRAD_BYTES[g] / dtype_bytes for g in space.options.gradient_precisions}
        self.fsdp = space.options.data_parallel == "fsdp"
        self.stage_overhead_s = float(getattr(space.cost_model, "stage_overhead_s", 0.0))
        self.step_overhead_s = float(getattr(space.cost_model, "step_overhead_s", 0.0))
        self._rec_prefix: dict = {}
        self.count = 0

    def recompute_prefix(self, mi: int, recompute: tuple[bool, ...]) -> np.ndarray:
        """(L+1, 3C) prefix sums over layers of ``rec[mi] * recompute`` (cached)."""
        key = (mi, recompute)
        hit = self._rec_prefix.get(key)
        if hit is None:
            # Each entry is (L+1, 3C) floats (~100 KB at 96 layers): keep the cache small.
            if len(self._rec_prefix) >= 256:
                self._rec_prefix.clear()
            r = np.asarray(recompute, dtype=np.float64)
            body = np.cumsum(self.rec[mi] * r[:, None], axis=0)
            hit = np.concatenate([np.zeros_like(body[:1]), body], axis=0)
            self._rec_prefix[key] = hit
        return hit

    def placement(self, choice: Choice) -> tuple[np.ndarray, np.ndarray] | None:
        """(offsets (p+1,), config ids (p,)) of the stages, or None if a group is not allowed."""
        sizes = self.sizes[list(choice.shapes)]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        if offsets[-1] > self.space.num_devices:
            return None
        configs = self.config_index[choice.order][offsets[:-1], list(choice.shapes)]
        if (configs < 0).any():
            return None
        return offsets, configs

    def __call__(self, choice: Choice) -> ExactCost:
        self.count += 1
        mi = self.m_index.get(choice.microbatches)
        if mi is None:
            return INVALID
        b = self.space.options.global_batch_size // choice.microbatches
        if (b % self.shape_dp[list(choice.shapes)]).any():
            return INVALID
        placed = self.placement(choice)
        if placed is None:
            return INVALID
        offsets, cfg = placed
        L, C, m = self.space.num_layers, self.C, choice.microbatches
        p = len(cfg)
        starts = np.array((0, *choice.cuts))
        ends = np.array((*choice.cuts, L))
        if (ends <= starts).any():
            return INVALID
        P = self.prefix[mi]
        cols = np.arange(NLIN)[None, :] * C + cfg[:, None]  # (p, NLIN)
        sums = P[ends[:, None], cols] - P[starts[:, None], cols]  # (p, NLIN)
        RP = self.recompute_prefix(mi, choice.recompute)
        rcols = np.arange(3)[None, :] * C + cfg[:, None]
        rsums = RP[ends[:, None], rcols] - RP[starts[:, None], rcols]  # (p, 3)
        fwd = sums[:, FWD] + sums[:, TP_FWD] + self.stage_overhead_s
        bwd = sums[:, BWD] + sums[:, TP_BWD] + rsums[:, 0] + self.stage_overhead_s
        dp = self.dp[mi, cfg]
        if p > 1:
            links = self.link_index[choice.order][offsets[1:-1]]
            sent = self.output_bytes[mi, ends[:-1] - 1] * self.act_factor[choice.activation_precision]
            comm = self.lat[links] + sent * self.inv_bw[links] / dp[:-1]
        else:
            comm = np.zeros(0)
        grad = sums[:, GRAD] * self.grad_factor[choice.gradient_precision]
        payload = 0.5 * (grad + sums[:, PARAM]) if self.fsdp else grad
        sync = np.where(dp > 1, self.alpha[mi, cfg] + payload * self.beta[mi, cfg], 0.0) + sums[:, UPDATE]
        # cost.schedule.pipeline_makespan_s, one-hot.
        base = fwd.sum() + bwd.sum() + 2 * comm.sum()
        if choice.schedule == "gpipe":
            slow = max(fwd.max(), comm.max(initial=-np.inf)) + max(bwd.max(), comm.max(initial=-np.inf))
            inflight = np.full(p, float(m))
        else:
            if p > 1:
                base += 2 * comm.sum() * math.floor((m - 1) * (p - 1) / p) / (p - 1)
            slow = (fwd + bwd).max()
            inflight = np.minimum(p - np.arange(p), m).astype(np.float64)
        step = base + (m - 1) * slow + sync.max() + self.step_overhead_s
        memory = sums[:, STATE] + inflight * (sums[:, SAVED] - rsums[:, 1] + rsums[:, 2])
        return ExactCost(float(step), memory, self.cap[mi, cfg], True)

    # ------------------------------------------------------------------- recompute helpers
    def stage_layout(self, choice: Choice):
        """(starts, ends, config ids, m index) of a point with a valid placement, else None."""
        mi = self.m_index.get(choice.microbatches)
        placed = self.placement(choice)
        if mi is None or placed is None:
            return None
        starts = np.array((0, *choice.cuts))
        ends = np.array((*choice.cuts, self.space.num_layers))
        return starts, ends, placed[1], mi

    def minimal_recompute(self, choice: Choice) -> Choice:
        """``choice`` with the fewest recomputed layers (greedy) that let every stage fit.

        Recomputation only adds backward time, so the best flags for given stages are the
        cheapest set that fits memory: per stage, layers are switched on in order of memory
        saved per second of recomputation until the stage fits (a fractional-knapsack greedy).
        A stage that cannot fit even with every useful layer recomputed gets all of them.
        ``recompute="stage"`` switches whole stages; ``"off"`` returns ``choice`` unchanged.
        """
        mode = self.space.options.recompute
        layout = self.stage_layout(choice)
        if mode == "off" or layout is None:
            return choice
        starts, ends, cfg, mi = layout
        p, C, m = len(cfg), self.C, choice.microbatches
        P = self.prefix[mi]
        if choice.schedule == "gpipe":
            inflight = np.full(p, float(m))
        else:
            inflight = np.minimum(p - np.arange(p), m).astype(np.float64)
        flags = np.zeros(self.space.num_layers, dtype=bool)
        rec = self.rec[mi]
        for k in range(p):
            a, b, c = starts[k], ends[k], cfg[k]
            state = P[b, STATE * C + c] - P[a, STATE * C + c]
            saved = rec[a:b, C + c]
            inputs = rec[a:b, 2 * C + c]
            need = state + inflight[k] * saved.sum() - self.cap[mi, c]
            if need <= 0:
                continue
            gain = inflight[k] * (saved - inputs)
            if mode == "stage":
                flags[a:b] = True
                continue
            seconds = rec[a:b, c]
            ratio = np.where(seconds > 0, gain / np.maximum(seconds, 1e-300), np.inf)
            order = np.argsort(-ratio, kind="stable")
            total, chosen = 0.0, []
            for i in order:
                if gain[i] <= 0:
                    break
                chosen.append(i)
                total += gain[i]
                if total >= need:
                    break
            # Drop what the last picks made redundant, costliest per byte first, so that no
            # single recomputed layer can be switched off without overflowing.
            for i in reversed(chosen[:-1]):
                if total - gain[i] >= need:
                    chosen.remove(i)
                    total -= gain[i]
            flags[a + np.array(chosen, dtype=np.int64)] = True
        return replace(choice, recompute=tuple(bool(f) for f in flags))
