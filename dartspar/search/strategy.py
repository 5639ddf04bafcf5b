"""The strategy matrix A: the logits DARTS optimizes, and the relaxed rows they give.

A has global rows and per-branch rows (a *branch* is a node order and a stage count p):

- global: node order, stage count, micro-batch count m, schedule, activation precision,
  gradient precision. The four rows that pick a branch and its (m, schedule) are by default
  one *joint* categorical row over their product (``global_rows="joint"``), reported through
  its marginals; ``"factorized"`` keeps one independent row each (a product distribution).
  The factorized rows couple badly: the gradient of P(p) sees each p's cost averaged over
  the current P(m) and P(schedule), so a stage count that is best with its own m loses to one
  that is better on average, and the relaxation settles on it. The joint row scores each
  combination by its own cost. The precision rows are always independent rows;
- per branch (order, p): a (L, p) row per layer (which stage it belongs to) and a (p, S) row
  per stage (its (dp, tp) shape; with the node order and the previous stages' sizes this fixes
  its device group). The shape rows are masked per m: a shape whose dp does not divide the
  micro-batch size ``B / m``, or larger than ``D - (p - 1)`` devices, gets probability 0;
- recomputation: one (L,) binary row shared by all branches (``recompute="layer"``), a (p,)
  row per branch (``recompute="stage"``), or none (``"off"``).

Stage contiguity is not built into the per-layer rows; the relaxed cost reads them as
independent (mean field) and decoding takes the best *monotone* assignment (Viterbi), so the
decoded plan always has contiguous stages. The rows start from a contiguous split balanced by
training FLOPs (a band around each layer's stage), so the relaxation starts near a plan.

Which choices change numerics: only the two precision rows (``NUMERICS_CHOICES``); the loss of
the weights depends on them (``bilevel.py``), everything else changes only the cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..space import NUMERICS_CHOICES, Choice, SearchSpace
from .relax import relax_binary, relax_categorical

__all__ = ["Branch", "BranchRows", "StrategyMatrix", "GLOBAL_ROWS", "BRANCH_ROWS", "NUMERICS_CHOICES"]

GLOBAL_ROWS = ("order", "stages", "microbatches", "schedule", "activation_precision", "gradient_precision")
BRANCH_ROWS = GLOBAL_ROWS[:4]


@dataclass(frozen=True)
class Branch:
    """A node order and a stage count; ``group`` indexes ``StrategyMatrix.stage_counts``."""

    index: int
    order: int
    num_stages: int
    group: int


@dataclass
class BranchRows:
    """Relaxed rows of all node orders of one stage count (``O`` orders, ``M`` m values).

    membership: (O, p, L) P(layer l in stage k); shape_probs: (O, M, p, S) per micro-batch
    count; recompute: (O, L) P(layer l recomputes). ``branch_rows`` returns one order's
    slice without the leading dim.
    """

    membership: torch.Tensor
    shape_probs: torch.Tensor
    recompute: torch.Tensor


class StrategyMatrix(nn.Module):
    """The logits of A for ``space`` (see module doc).

    The per-branch rows of all node orders with the same p are stored stacked, (O, ...), so the
    cost of one stage count is evaluated for every order in one batched pass.

    Args:
        space: the search space.
        stage_band: initial logit slope of the layer-stage band (logit ``-stage_band * |k -
            k0(l)|`` for stage k around the balanced stage ``k0(l)`` of layer l).
        shape_bias: initial logit bonus of the shapes whose size is the largest allowed size
            that lets all p stages take the same number of devices.
        recompute_bias: initial recompute logit (negative: start mostly off).
    """

    def __init__(
        self, space: SearchSpace, stage_band: float = 3.0, shape_bias: float = 2.0,
        recompute_bias: float = -2.0, global_rows: str = "joint",
    ) -> None:
        super().__init__()
        if global_rows not in ("joint", "factorized"):
            raise ValueError(f"global_rows={global_rows!r} is not one of joint, factorized")
        self.space = space
        self.global_rows = global_rows
        o = space.options
        self.row_values = {
            "order": tuple(range(len(space.orders))),
            "stages": tuple(space.stage_counts),
            "microbatches": tuple(space.microbatch_counts),
            "schedule": tuple(o.schedules),
            "activation_precision": tuple(o.activation_precisions),
            "gradient_precision": tuple(o.gradient_precisions),
        }
        branch_shape = tuple(len(self.row_values[r]) for r in BRANCH_ROWS)
        if global_rows == "joint":
            logits = {"branch": nn.Parameter(torch.zeros(branch_shape, dtype=torch.float64))}
        else:
            logits = {r: nn.Parameter(torch.zeros(n, dtype=torch.float64)) for r, n in zip(BRANCH_ROWS, branch_shape)}
        for r in NUMERICS_CHOICES:
            logits[r] = nn.Parameter(torch.zeros(len(self.row_values[r]), dtype=torch.float64))
        self.global_logits = nn.ParameterDict(logits)
        self.stage_counts = tuple(space.stage_counts)
        O = len(space.orders)
        self.num_orders = O
        self.branches = [
            Branch(gi * O + order, order, p, gi) for gi, p in enumerate(self.stage_counts) for order in range(O)
        ]
        L, S, D = space.num_layers, len(space.shapes), space.num_devices
        sizes = torch.tensor([dp * tp for dp, tp in space.shapes])
        work = torch.tensor([lay.fwd_flops + lay.bwd_flops for lay in space.profile.layers], dtype=torch.float64)
        # A layer with no FLOPs (an embedding) still takes a share, or the band degenerates.
        work = work + 1e-3 * work.sum().clamp(min=1.0) / L
        centre = (torch.cumsum(work, 0) - 0.5 * work) / work.sum()  # (L,) in (0, 1)
        self.stage_logits = nn.ParameterList()
        self.shape_logits = nn.ParameterList()
        self.stage_recompute_logits = nn.ParameterList()
        for p in self.stage_counts:
            k0 = (centre * p - 0.5).clamp(0, p - 1)  # fractional balanced stage of each layer
            band = -stage_band * (torch.arange(p, dtype=torch.float64)[None, :] - k0[:, None]).abs()
            self.stage_logits.append(nn.Parameter(band[None].repeat(O, 1, 1)))
            fitting = [n for n in sizes.unique().tolist() if n * p <= D]
            target = max(fitting) if fitting else 1
            bias = shape_bias * (sizes == target).double()
            self.shape_logits.append(nn.Parameter(bias[None, None, :].repeat(O, p, 1)))
            if o.recompute == "stage":
                self.stage_recompute_logits.append(
                    nn.Parameter(torch.full((O, p), recompute_bias, dtype=torch.float64)))
        self.recompute_logits = nn.Parameter(
            torch.full((L,), recompute_bias, dtype=torch.float64), requires_grad=o.recompute == "layer")
        # Shape masks: (M, S) dp divides B/m, and (per p) the size leaves a device for the others.
        self.m_masks = torch.stack([space.feasible_shapes(m) for m in space.microbatch_counts])
        self.size_ok = {p: sizes <= D - (p - 1) for p in self.stage_counts}
        self._index = {(b.order, b.num_stages): b for b in self.branches}
        if not all(bool((self.m_masks & self.size_ok[p]).any(-1).all()) for p in self.stage_counts):
            raise ValueError("a micro-batch count leaves no feasible shape: check space.microbatch_counts")

    # ------------------------------------------------------------------------------ access
    def branch(self, order: int, num_stages: int) -> Branch:
        return self._index[(order, num_stages)]

    def global_params(self) -> list[nn.Parameter]:
        return list(self.global_logits.values())

    def branch_params(self) -> list[nn.Parameter]:
        params = list(self.stage_logits) + list(self.shape_logits) + list(self.stage_recompute_logits)
        if self.recompute_logits.requires_grad:
            params.append(self.recompute_logits)
        return params

    def shape_mask(self, num_stages: int) -> torch.Tensor:
        """(M, S) bool: shapes allowed for each m when there are ``num_stages`` stages."""
        return self.m_masks & self.size_ok[num_stages][None, :]

    def numerics_rows(self) -> tuple[str, ...]:
        """The rows that change numerics and have more than one option."""
        return tuple(r for r in NUMERICS_CHOICES if len(self.row_values[r]) > 1)

    # ------------------------------------------------------------------------------ rows
    def global_probs(
        self, temperature: float, mode: str = "softmax", generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Relaxed probabilities of the global rows.

        Keys: "branch", the (O, P, M, Sc) joint P(order, p, m, schedule) (the product of the
        rows when factorized), the marginal rows "order", "stages", "microbatches",
        "schedule", and the precision rows.
        """
        out = {r: relax_categorical(self.global_logits[r], temperature, mode, generator) for r in NUMERICS_CHOICES}
        if self.global_rows == "joint":
            z = self.global_logits["branch"]
            joint = relax_categorical(z.reshape(-1), temperature, mode, generator).view(z.shape)
            dims = range(joint.dim())
            for i, r in enumerate(BRANCH_ROWS):
                out[r] = joint.sum(dim=tuple(d for d in dims if d != i))
        else:
            rows = [relax_categorical(self.global_logits[r], temperature, mode, generator) for r in BRANCH_ROWS]
            joint = rows[0][:, None, None, None] * rows[1][None, :, None, None] * rows[2][None, None, :, None] * rows[3]
            out.update(zip(BRANCH_ROWS, rows))
        out["branch"] = joint
        return out

    def group_rows(
        self, group: int, temperature: float, mode: str = "softmax", generator: torch.Generator | None = None,
    ) -> BranchRows:
        """Relaxed rows of every node order at stage count ``stage_counts[group]``."""
        p = self.stage_counts[group]
        O, M = self.num_orders, len(self.space.microbatch_counts)
        membership = relax_categorical(self.stage_logits[group], temperature, mode, generator).transpose(1, 2)
        shape_probs = relax_categorical(
            self.shape_logits[group][:, None].expand(O, M, -1, -1), temperature, mode, generator,
            mask=self.shape_mask(p)[None, :, None, :])
        rec = self.space.options.recompute
        if rec == "off":
            recompute = torch.zeros(O, self.space.num_layers, dtype=torch.float64)
        elif rec == "stage":
            per_stage = relax_binary(self.stage_recompute_logits[group], temperature, mode, generator)  # (O, p)
            recompute = (per_stage[:, None, :] @ membership)[:, 0]
        else:
            recompute = relax_binary(self.recompute_logits, temperature, mode, generator)[None].expand(O, -1)
        return BranchRows(membership, shape_probs, recompute)

    def branch_rows(self, branch: Branch, temperature: float) -> BranchRows:
        """Softmax rows of one branch: membership (p, L), shape_probs (M, p, S), recompute (L,)."""
        rows = self.group_rows(branch.group, temperature)
        o = branch.order
        return BranchRows(rows.membership[o], rows.shape_probs[o], rows.recompute[o])

    def cut_probs(self, temperature: float, global_probs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(L - 1,) P(a stage boundary sits after layer l), over branches (softmax rows).

        Within a branch, layers l and l+1 are in different stages with probability
        ``1 - sum_k W[k, l] W[k, l+1]`` (mean field); branches are weighted by P(order) P(p).
        """
        g = global_probs or self.global_probs(temperature)
        out = torch.zeros(max(self.space.num_layers - 1, 0), dtype=torch.float64)
        for gi, p in enumerate(self.stage_counts):
            if p == 1:
                continue
            W = torch.softmax(self.stage_logits[gi] / temperature, dim=-1)  # (O, L, p)
            differ = 1.0 - (W[:, :-1] * W[:, 1:]).sum(-1)  # (O, L-1)
            weight = g["branch"][:, gi].sum((1, 2))  # (O,) P(order, p)
            out = out + weight @ differ
        return out

    # --------------------------------------------------------------------------- one-hot A
    @torch.no_grad()
    def load_choice(self, choice: Choice, margin: float = 1e3) -> None:
        """Set the logits so that the softmax rows (at temperature <= 1) are ``choice``, one-hot
        to float64 precision (``exp(-margin)`` underflows). Other branches are left alone."""
        values = {
            "order": choice.order, "stages": choice.num_stages, "microbatches": choice.microbatches,
            "schedule": choice.schedule, "activation_precision": choice.activation_precision,
            "gradient_precision": choice.gradient_precision,
        }
        index = {name: self.row_values[name].index(value) for name, value in values.items()}
        for name, row in self.global_logits.items():
            row.fill_(-margin)
            if name == "branch":
                row[tuple(index[r] for r in BRANCH_ROWS)] = 0.0
            else:
                row[index[name]] = 0.0
        b = self.branch(choice.order, choice.num_stages)
        rows = self.space.one_hot_rows(choice)
        self.stage_logits[b.group][b.order].copy_(margin * (rows["stage_probs"] - 1))
        self.shape_logits[b.group][b.order].copy_(margin * (rows["shape_probs"] - 1))
        rec = torch.tensor(choice.recompute, dtype=torch.float64)
        if self.space.options.recompute == "layer":
            self.recompute_logits.copy_(margin * (2 * rec - 1))
        elif self.space.options.recompute == "stage":
            cuts = (0, *choice.cuts, self.space.num_layers)
            flags = torch.tensor([float(choice.recompute[cuts[k]]) for k in range(choice.num_stages)],
                                 dtype=torch.float64)
            self.stage_recompute_logits[b.group][b.order].copy_(margin * (2 * flags - 1))


def entropy_summary(probs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Normalised entropy (0 = one-hot, 1 = uniform) of each row in ``probs``."""
    out = {}
    for name, p in probs.items():
        n = p.shape[-1]
        p = p.detach()
        h = float(-(p * torch.log(p.clamp(min=1e-300))).sum(-1).mean()) if n > 1 else 0.0
        out[name] = h / math.log(n) if n > 1 else 0.0
    return out
