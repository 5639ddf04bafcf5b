"""The search space: what a planner may choose, and how choices become plans and SoftPlans.

Choices (shared by every method, so they all search the same space):

- globally: a *node order* (a permutation of the cluster's device types: which kind of node
  comes first), the number of stages p, the number of micro-batches m (the micro-batch size is
  ``global_batch_size / m``), the schedule, the precision of activations sent between stages and
  of synchronised gradients;
- per stage: a *shape* (dp, tp). Stage k's device group is the next ``dp * tp`` devices of the
  node order after stage k-1's, so the shapes and the order decide *which* devices each stage
  gets (a heavy stage can land on the fast nodes) and no device is used twice. A group must lie
  inside one node at an offset aligned to its size, or cover whole consecutive nodes;
- per layer: its stage (contiguous: stage boundaries are cuts in the layer sequence) and
  whether it recomputes.

Which of these change numerics: only the two precision choices change what the model computes
(``NUMERICS_CHOICES``); every other choice changes only the cost.

Relaxation: with independent categorical rows for the shapes, the distribution of stage k's
device offset is the convolution of the size distributions of stages 0..k-1 (exact), from which
follow the probabilities of each (device group class, shape) config and of each link between
stages. ``SearchSpace.soft_plan`` builds the ``SoftPlan`` the cost model scores; with one-hot
rows it equals ``CostModel.evaluate`` of the plan that ``SearchSpace.make_plan`` builds.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from .cluster import Cluster, Link
from .cost.groups import StageConfig, group_class
from .cost.model import ACT_BYTES, GRAD_BYTES, CostModel, SoftPlan
from .plan import ACT_PRECISIONS, GRAD_PRECISIONS, Plan, StageSpec
from .profile import ModelProfile

__all__ = ["SpaceOptions", "SearchSpace", "Choice", "NUMERICS_CHOICES"]

NUMERICS_CHOICES = ("activation_precision", "gradient_precision")


@dataclass(frozen=True)
class SpaceOptions:
    """What may be chosen. ``None`` means "derive a sensible default from model and cluster".

    Attributes:
        global_batch_size: samples per training step (fixed; the search splits it).
        stage_counts: allowed numbers of pipeline stages (default 1..min(L, D, 8)).
        microbatch_counts: allowed m (default: powers of two dividing the batch, up to 64).
        schedules: allowed pipeline schedules.
        tp_degrees: allowed tensor-parallel degrees (kept only where every splittable layer
            supports them).
        max_group_size: largest stage device group (default: the whole cluster).
        recompute: "layer" (a flag per layer), "stage" (one flag per stage) or "off".
        activation_precisions / gradient_precisions: allowed communication precisions.
        data_parallel: "replicate" or "fsdp" (fixed for the search).
        max_node_orders: how many device-type permutations to consider (fastest-first and the
            cluster's own order come first).
    """

    global_batch_size: int
    stage_counts: tuple[int, ...] | None = None
    microbatch_counts: tuple[int, ...] | None = None
    schedules: tuple[str, ...] = ("1f1b", "gpipe")
    tp_degrees: tuple[int, ...] = (1, 2, 4, 8)
    max_group_size: int | None = None
    recompute: str = "layer"
    activation_precisions: tuple[str, ...] = ("fp32",)
    gradient_precisions: tuple[str, ...] = ("fp32",)
    data_parallel: str = "replicate"
    max_node_orders: int = 6


@dataclass(frozen=True)
class Choice:
    """One point of the space (a discrete plan in the space's coordinates).

    ``cuts`` are the p-1 layer indices where stages 1..p-1 start (strictly increasing);
    ``shapes`` index ``SearchSpace.shapes`` per stage; ``recompute`` has one flag per layer.
    """

    order: int
    cuts: tuple[int, ...]
    shapes: tuple[int, ...]
    microbatches: int
    schedule: str
    recompute: tuple[bool, ...]
    activation_precision: str = "fp32"
    gradient_precision: str = "fp32"

    @property
    def num_stages(self) -> int:
        return len(self.shapes)


@dataclass
class _Order:
    """A node order: device ids in order, valid groups and their config/link lookup tables."""

    node_order: tuple[int, ...]
    device_ids: tuple[int, ...]
    label: str
    # config_index[a, s]: index into SearchSpace.configs of the group [a, a+n_s) with shape s,
    # or -1 when that group is not allowed.
    config_index: torch.Tensor = field(repr=False, default=None)
    # link_index[a]: index into SearchSpace.links of the link between devices a-1 and a
    # (-1 for a = 0 and a = D).
    link_index: torch.Tensor = field(repr=False, default=None)


class SearchSpace:
    """The space of plans for ``profile`` on ``cluster`` (see module doc)."""

    def __init__(self, profile: ModelProfile, cluster: Cluster, options: SpaceOptions, cost_model: CostModel) -> None:
        self.profile, self.cluster, self.options = profile, cluster, options
        self.cost_model = cost_model
        self.num_layers = profile.num_layers
        self.num_devices = cluster.num_devices
        self._check_options()
        self.stage_counts = self._stage_counts()
        self.microbatch_counts = self._microbatch_counts()
        self.shapes = self._shapes()
        self.configs: list[StageConfig] = []
        self.links: list[Link] = []
        self.orders = [self._build_order(order) for order in self._node_orders()]

    # -------------------------------------------------------------------------- options
    def _check_options(self) -> None:
        o = self.options
        if o.global_batch_size < 1:
            raise ValueError(f"space.global_batch_size={o.global_batch_size} must be >= 1")
        if o.recompute not in ("layer", "stage", "off"):
            raise ValueError(f"space.recompute={o.recompute!r} is not one of layer, stage, off")
        for name, allowed in (("activation_precisions", ACT_PRECISIONS), ("gradient_precisions", GRAD_PRECISIONS)):
            bad = [v for v in getattr(o, name) if v not in allowed]
            if bad or not getattr(o, name):
                raise ValueError(f"space.{name}={getattr(o, name)} must be a non-empty subset of {allowed}")
        bad = [s for s in o.schedules if s not in ("1f1b", "gpipe")]
        if bad or not o.schedules:
            raise ValueError(f"space.schedules={o.schedules} must be a non-empty subset of ('1f1b', 'gpipe')")
        if o.data_parallel not in ("replicate", "fsdp"):
            raise ValueError(f"space.data_parallel={o.data_parallel!r} is not one of replicate, fsdp")

    def _stage_counts(self) -> tuple[int, ...]:
        limit = min(self.num_layers, self.num_devices)
        counts = self.options.stage_counts or tuple(range(1, min(limit, 8) + 1))
        bad = [p for p in counts if not 1 <= p <= limit]
        if bad:
            raise ValueError(
                f"space.stage_counts has {bad}: a plan of {self.profile.name} "
                f"({self.num_layers} layers) on {self.num_devices} devices allows 1..{limit} stages"
            )
        return tuple(sorted(set(counts)))

    def _microbatch_counts(self) -> tuple[int, ...]:
        batch = self.options.global_batch_size
        counts = self.options.microbatch_counts or tuple(
            m for m in (1, 2, 4, 8, 16, 32, 64) if batch % m == 0
        )
        bad = [m for m in counts if m < 1 or batch % m]
        if bad:
            raise ValueError(
                f"space.microbatch_counts has {bad}, which do not divide global_batch_size={batch}"
            )
        return tuple(sorted(set(counts)))

    def _shapes(self) -> list[tuple[int, int]]:
        max_tp = [lay.tp_max_degree for lay in self.profile.layers if lay.tp_max_degree > 1]
        tps = [t for t in self.options.tp_degrees if t == 1 or (max_tp and all(d % t == 0 for d in max_tp))]
        limit = self.options.max_group_size or self.num_devices
        sizes = [2**i for i in range(0, 31) if 2**i <= min(limit, self.num_devices)]
        sizes += [n.num_devices for n in self.cluster.nodes if n.num_devices <= limit]
        sizes = sorted(set(sizes))
        return [(n // t, t) for n in sizes for t in tps if n % t == 0]

    def _node_orders(self) -> list[tuple[int, ...]]:
        """Permutations of device types (nodes of a type keep their order), best guesses first."""
        dtype_for = self.cost_model.dtype_for
        types: list[str] = []
        for node in self.cluster.nodes:
            if node.device.name not in types:
                types.append(node.device.name)
        by_type = {t: [i for i, n in enumerate(self.cluster.nodes) if n.device.name == t] for t in types}
        speed = {t: (lambda d: d.peak(dtype_for(d)))(self.cluster.nodes[by_type[t][0]].device) for t in types}
        fastest_first = tuple(sorted(types, key=lambda t: -speed[t]))
        perms = [fastest_first, tuple(types)] + list(itertools.permutations(types))
        unique = list(dict.fromkeys(perms))[: max(1, self.options.max_node_orders)]
        return [tuple(i for t in perm for i in by_type[t]) for perm in unique]

    # ---------------------------------------------------------------------- group tables
    def _config_id(self, config: StageConfig) -> int:
        try:
            return self._config_ids[config]
        except AttributeError:
            self._config_ids: dict[StageConfig, int] = {}
        except KeyError:
            pass
        self._config_ids[config] = len(self.configs)
        self.configs.append(config)
        return self._config_ids[config]

    def _link_id(self, link: Link) -> int:
        if link not in self.links:
            self.links.append(link)
        return self.links.index(link)

    def _build_order(self, node_order: tuple[int, ...]) -> _Order:
        cluster, D = self.cluster, self.num_devices
        device_ids = tuple(
            d for i in node_order
            for d in range(cluster.node_first_device[i], cluster.node_first_device[i] + cluster.nodes[i].num_devices)
        )
        node_at = [cluster.node_of_device[d] for d in device_ids]
        starts = [0]
        for i in node_order:
            starts.append(starts[-1] + cluster.nodes[i].num_devices)
        node_start = set(starts)
        rank_at = [r for r, i in enumerate(node_order) for _ in range(cluster.nodes[i].num_devices)]
        config_index = torch.full((D + 1, len(self.shapes)), -1, dtype=torch.long)
        classes: dict[tuple[int, int], object] = {}
        for s, (dp, tp) in enumerate(self.shapes):
            n = dp * tp
            for a in range(0, D - n + 1):
                inside = node_at[a] == node_at[a + n - 1] and (a - starts[rank_at[a]]) % n == 0
                whole = a in node_start and (a + n) in node_start
                if not (inside or whole):
                    continue
                if (a, n) not in classes:
                    classes[(a, n)] = group_class(cluster, device_ids[a : a + n], self.cost_model.dtype_for)
                group = classes[(a, n)]
                if tp > group.min_devices_per_node and group.num_nodes > 1 and tp % group.min_devices_per_node:
                    continue  # a tp group would straddle a node boundary unevenly
                config_index[a, s] = self._config_id(StageConfig(group, dp, tp))
        link_index = torch.full((D + 1,), -1, dtype=torch.long)
        for a in range(1, D):
            link_index[a] = self._link_id(cluster.link_between(device_ids[a - 1], device_ids[a]))
        names = []
        for i in node_order:
            name = cluster.nodes[i].device.name
            if not names or names[-1] != name:
                names.append(name)
        return _Order(node_order, device_ids, " > ".join(names), config_index, link_index)

    # ------------------------------------------------------------------------ choices
    def feasible_shapes(self, microbatches: int) -> torch.Tensor:
        """(S,) bool: shapes whose dp divides the micro-batch size ``global_batch / m``."""
        b = self.options.global_batch_size // microbatches
        return torch.tensor([b % dp == 0 for dp, _ in self.shapes])

    def make_plan(self, choice: Choice) -> Plan:
        """The Plan a point of the space denotes (raises ValueError if the point is invalid)."""
        order = self.orders[choice.order]
        cuts = (0, *choice.cuts, self.num_layers)
        if any(b <= a for a, b in zip(cuts, cuts[1:])):
            raise ValueError(f"choice.cuts={choice.cuts} must be strictly increasing inside (0, {self.num_layers})")
        if len(choice.recompute) != self.num_layers:
            raise ValueError(f"choice.recompute has {len(choice.recompute)} flags for {self.num_layers} layers")
        stages, offset = [], 0
        for k, s in enumerate(choice.shapes):
            dp, tp = self.shapes[s]
            n = dp * tp
            if offset + n > self.num_devices or order.config_index[offset, s] < 0:
                raise ValueError(
                    f"stage {k}: a group of {n} devices at offset {offset} of node order "
                    f"'{order.label}' is not allowed (cluster has {self.num_devices} devices)"
                )
            stages.append(StageSpec(
                layer_start=cuts[k], layer_end=cuts[k + 1],
                device_ids=order.device_ids[offset : offset + n], dp=dp, tp=tp,
                recompute=tuple(choice.recompute[cuts[k] : cuts[k + 1]]),
            ))
            offset += n
        return Plan(
            stages=tuple(stages), schedule=choice.schedule, num_microbatches=choice.microbatches,
            micro_batch_size=self.options.global_batch_size // choice.microbatches,
            activation_precision=choice.activation_precision,
            gradient_precision=choice.gradient_precision,
            data_parallel=self.options.data_parallel,
        )

    # ------------------------------------------------------------------------ relaxation
    def offset_distributions(self, order: int, shape_probs: torch.Tensor) -> torch.Tensor:
        """(p + 1, D + 1) P(stage k starts at device offset a); row p is where the last ends.

        ``shape_probs``: (p, S) per-stage shape probabilities. Mass that would run past the last
        device is dropped, so rows may sum to less than 1 (the missing mass is infeasible).
        """
        D = self.num_devices
        sizes = torch.tensor([dp * tp for dp, tp in self.shapes])
        rows = [torch.zeros(D + 1, dtype=torch.float64)]
        rows[0] = rows[0].index_fill(0, torch.tensor([0]), 1.0)
        valid = (self.orders[order].config_index >= 0).double()  # (D+1, S)
        for k in range(shape_probs.shape[0]):
            joint = rows[-1][:, None] * shape_probs[k][None, :] * valid  # (D+1, S)
            nxt = torch.zeros(D + 1 + int(sizes.max()), dtype=torch.float64)
            targets = torch.arange(D + 1)[:, None] + sizes[None, :]
            nxt = nxt.index_add(0, targets.flatten(), joint.flatten())
            rows.append(nxt[: D + 1])
        return torch.stack(rows)

    def soft_plan(
        self, order: int, num_microbatches: int, schedule: str, stage_probs: torch.Tensor,
        shape_probs: torch.Tensor, recompute_probs: torch.Tensor,
        act_probs: torch.Tensor, grad_probs: torch.Tensor,
    ) -> tuple[SoftPlan, torch.Tensor]:
        """The SoftPlan of a relaxed point, and the (p,) probability mass of infeasible groups.

        Args:
            order: node-order index.
            num_microbatches, schedule: the branch's discrete globals.
            stage_probs: (L, p) P(layer l in stage k).
            shape_probs: (p, S) P(stage k has shape s); zero on shapes infeasible for m.
            recompute_probs: (L,) P(layer l recomputes).
            act_probs / grad_probs: probabilities over the space's precision lists.
        """
        p = shape_probs.shape[0]
        tab = self.orders[order]
        offsets = self.offset_distributions(order, shape_probs)  # (p+1, D+1)
        valid = tab.config_index >= 0
        joint = offsets[:p, :, None] * shape_probs[:, None, :] * valid  # (p, D+1, S)
        config_probs = torch.zeros(p, len(self.configs), dtype=torch.float64).scatter_add(
            1, tab.config_index.clamp(min=0).flatten().expand(p, -1), joint.reshape(p, -1))
        infeasible = 1.0 - config_probs.sum(-1)
        # Boundary k -> k+1 sits at stage k+1's offset.
        K = len(self.links) or 1
        link_valid = tab.link_index >= 0
        link_probs = torch.zeros(p, K, dtype=torch.float64).scatter_add(
            1, tab.link_index.clamp(min=0).expand(p, -1), offsets[1:] * link_valid)
        membership = stage_probs.t()  # (p, L)
        last = membership[:-1, :-1] * membership[1:, 1:]  # layer l ends k when l+1 starts k+1
        last = last / last.sum(-1, keepdim=True).clamp(min=1e-30)
        last = torch.cat([torch.nn.functional.pad(last, (0, 1)), torch.zeros(1, self.num_layers, dtype=torch.float64)])
        dtype_bytes = self.profile.dtype_bytes
        act = torch.tensor([ACT_BYTES[a] / dtype_bytes for a in self.options.activation_precisions], dtype=torch.float64)
        grad = torch.tensor([GRAD_BYTES[g] / dtype_bytes for g in self.options.gradient_precisions], dtype=torch.float64)
        soft = SoftPlan(
            membership=membership, last_layer=last, config_probs=config_probs,
            recompute=recompute_probs, boundary_link_probs=link_probs,
            links=tuple(self.links) or (self.cluster.inter_link,),
            num_microbatches=num_microbatches, schedule=schedule,
            data_parallel=self.options.data_parallel,
            act_bytes_factor=act_probs @ act, grad_bytes_factor=grad_probs @ grad,
        )
        return soft, infeasible

    def one_hot_rows(self, choice: Choice) -> dict:
        """The relaxed rows (as probabilities) that put all mass on ``choice``."""
        L, p = self.num_layers, choice.num_stages
        stage = torch.zeros(L, p, dtype=torch.float64)
        cuts = (0, *choice.cuts, L)
        for k in range(p):
            stage[cuts[k] : cuts[k + 1], k] = 1
        shapes = torch.zeros(p, len(self.shapes), dtype=torch.float64)
        shapes[torch.arange(p), torch.tensor(choice.shapes)] = 1
        act = torch.tensor([a == choice.activation_precision for a in self.options.activation_precisions], dtype=torch.float64)
        grad = torch.tensor([g == choice.gradient_precision for g in self.options.gradient_precisions], dtype=torch.float64)
        if act.sum() != 1 or grad.sum() != 1:
            raise ValueError(
                f"choice precisions ({choice.activation_precision}, {choice.gradient_precision}) are "
                f"not in the space ({self.options.activation_precisions}, {self.options.gradient_precisions})"
            )
        return dict(
            order=choice.order, num_microbatches=choice.microbatches, schedule=choice.schedule,
            stage_probs=stage, shape_probs=shapes,
            recompute_probs=torch.tensor(choice.recompute, dtype=torch.float64),
            act_probs=act, grad_probs=grad,
        )

    def evaluate(self, choice: Choice, smooth_s: float | None = None):
        """Exact cost of a point of the space through the shared (cached) tables.

        Returns ``(RelaxedCost, infeasible)``: the same figures as ``CostModel.evaluate`` of
        ``make_plan(choice)``, without rebuilding tables per plan (the fast path for baselines
        and local refinement); ``infeasible`` > 0 flags a device group the space does not allow.
        """
        rows = self.one_hot_rows(choice)
        soft, infeasible = self.soft_plan(**rows)
        return self.cost_model.relaxed(soft, self.tables(choice.microbatches), smooth_s), infeasible

    def tables(self, num_microbatches: int):
        """The cost model's tables over ``self.configs`` at micro-batch size B / m.

        Configs whose dp does not divide the micro-batch size get the tables of dp=1 timing
        (never used: their shapes are masked out of ``feasible_shapes``)."""
        b = self.options.global_batch_size // num_microbatches
        usable = [c if b % c.dp == 0 else StageConfig(c.group, 1, c.group.num_devices) for c in self.configs]
        return self.cost_model.tables(usable, b, self.options.data_parallel)
