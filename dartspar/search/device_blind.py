"""Device-blind planning: plan as if every device were the cluster's average, score for real.

This is the assumption of planners built for homogeneous clusters (Alpa, PipeDream, Megatron's
rules of thumb): one device model everywhere. We build an averaged copy of the cluster (every
device replaced by one ``DeviceSpec`` whose peak FLOP/s per dtype and memory bandwidth are the
means over all devices, memory per ``memory=``; node sizes and links unchanged), find the best
plan there with the exact DP, keep its device ids, and score that same plan with the real
cluster's cost model.

Memory policy: ``memory="min"`` (default) gives the average device the smallest real memory, so
a blind plan always fits the real devices (the per-device footprint does not depend on the
device model) and the baseline is as strong as a careful practitioner would make it;
``memory="mean"`` is the literal average and can produce plans that overflow the smaller
devices -- a known failure of device-blind planning. Such plans are repaired by turning
recompute on for the overflowing stages (when the space allows recompute) and reported in
``info``; a plan that still overflows is returned with ``cost.fits`` False.
"""

from __future__ import annotations

import time
from dataclasses import replace

from ..cluster import Cluster, DeviceSpec, Node
from ..cost.model import CostModel
from ..space import SearchSpace
from .dp import dp_search
from .result import SearchResult

__all__ = ["average_cluster", "device_blind_search"]



def average_cluster(cluster: Cluster, memory: str = "min") -> Cluster:
    """``cluster`` with every device replaced by the device-weighted average device.

    Args:
        memory: "min" (smallest device memory) or "mean" (device-weighted mean).
    """
    if memory not in ("min", "mean"):
        raise ValueError(f"device_blind.memory={memory!r} is not one of 'min', 'mean'")
    weights = [(node.device, node.num_devices) for node in cluster.nodes]
    total = sum(n for _, n in weights)
    dtypes = set.intersection(*(set(d.peak_flops_per_s) for d, _ in weights))

    def mean(value) -> float:
        return sum(value(d) * n for d, n in weights) / total

    device = DeviceSpec(
        name="average",
        peak_flops_per_s={t: mean(lambda d, t=t: float(d.peak_flops_per_s[t])) for t in sorted(dtypes)},
        memory_bytes=min(d.memory_bytes for d, _ in weights) if memory == "min" else mean(lambda d: d.memory_bytes),
        memory_bandwidth_bytes_per_s=mean(lambda d: d.memory_bandwidth_bytes_per_s),
    )
    nodes = tuple(Node(n.name, device, n.num_devices, n.intra_link) for n in cluster.nodes)
    return Cluster(f"{cluster.name}-device-blind", nodes, cluster.inter_link)


def _with_recompute(plan, stages: set[int]):
    new = tuple(
        replace(s, recompute=(True,) * s.num_layers) if k in stages else s
        for k, s in enumerate(plan.stages)
    )
    return replace(plan, stages=new)


def device_blind_search(space: SearchSpace, *, seed: int = 0, progress: bool = False, callback=None,
                        memory: str = "min", repair: bool = True, time_limit_s: float | None = None,
                        max_solves: int | None = None, layer_group: int = 1,
                        max_elements: float = 2e7, num_threads: int | None = 1) -> SearchResult:
    """The DP's best plan for the averaged cluster, scored on the real one (module doc).

    Args:
        space: the real search space; the averaged space uses the same options and estimator.
        memory: the average device's memory, "min" or "mean".
        repair: turn recompute on for stages that overflow the real devices.
        time_limit_s, max_solves, layer_group, max_elements, num_threads: the DP's options (``dp_search``).
    """
    start = time.perf_counter()
    real = space.cost_model
    blind_cluster = average_cluster(space.cluster, memory)
    blind_model = CostModel(
        space.profile, blind_cluster, real.estimator, real.compute_dtype, real.smooth_rel,
        stage_overhead_s=real.stage_overhead_s, step_overhead_s=real.step_overhead_s,
    )
    blind_space = SearchSpace(space.profile, blind_cluster, space.options, blind_model)
    planned = dp_search(
        blind_space, seed=seed, progress=progress, callback=callback, time_limit_s=time_limit_s,
        max_solves=max_solves, layer_group=layer_group, max_elements=max_elements,
        num_threads=num_threads,
    )
    plan = replace(planned.plan, predicted={}, meta={})
    cost = real.evaluate(plan)
    fits_as_planned = cost.fits
    repaired: list[int] = []
    if not cost.fits and repair and space.options.recompute != "off":
        repaired = [k for k, s in enumerate(cost.stages) if s.memory_bytes > s.capacity_bytes]
        plan = _with_recompute(plan, set(repaired))
        cost = real.evaluate(plan)

    # The same plan as a point of the real space, when its device order is one of the space's.
    choice = None
    blind_choice = planned.info["choice"]
    blind_ids = blind_space.orders[blind_choice.order].device_ids
    for index, order in enumerate(space.orders):
        if order.device_ids == blind_ids:
            flags = tuple(f for s in plan.stages for f in s.recompute)
            choice = replace(blind_choice, order=index, recompute=flags)
    info = {
        "choice": choice,
        "memory_policy": memory,
        "average_device": blind_cluster.nodes[0].device,
        "blind_step_time_s": planned.cost.step_time_s,
        "real_step_time_s": cost.step_time_s,
        "fits_as_planned": fits_as_planned,
        "repaired_stages": repaired,
        "fits": cost.fits,
        "dp": {k: v for k, v in planned.info.items() if k != "choice"},
    }
    return SearchResult(
        method="device_blind", plan=plan, cost=cost, history=planned.history,
        wall_time_s=time.perf_counter() - start, evaluations=planned.evaluations + 1, info=info,
    )

