"""The weights' side of the bilevel search: a proxy model trained with the relaxed numerics.

Two choices of A change what the model computes: the precision of activations sent between
pipeline stages and of data-parallel gradients. For these the training loss depends on A, so the
search is bilevel (DARTS): the weights theta train on the training split with A's relaxed
numerics in the forward pass, and A steps on ``L_val(theta, A) + lambda * Cost(A) / Cost_ref``.

Proxy: a small ``dartspar.models.GPT`` trained on the package's own Markov language-modelling
corpus (``dartspar.data.make_lm_dataset``; no downloads). It has as many layers as the profile
(embedding + blocks + head) unless that exceeds ``max_layers``; then profile boundary l maps to
proxy boundary ``round((l + 1) * n / L) - 1`` (proportional) and the proxy's cut probability is
the sum of the mapped ones, capped at 1 (``ProxyTask.layer_note`` says which applies).

Relaxed numerics in the forward pass: after proxy layer j (not the last), the activation is
``x + c_j * sum_q P_act(q) * (Q_q(x) - x)``, where ``c_j`` is the probability that a stage
boundary sits there and ``Q_q`` is the simulated quantization of precision q (fp32 = identity,
bf16 = round to bfloat16, fp8 = e4m3 with a power-of-two per-tensor scale, as the executor
does). ``Q_q(x) - x`` is detached (straight-through: the gradient to x is the identity; the
executor's e5m2 quantization of the backward gradient is not simulated). Gradients: the update
uses ``sum_q P_grad(q) Q_q(g)`` per tensor (fp32, bf16, int8 with a per-tensor absmax/127
scale). The unrolled second-order step differentiates through one such update.

What reaches A from ``L_val``: first order, only the activation-precision row and the stage
rows (through ``c_j``); the gradient-precision row gets nothing, because theta does not depend
on A at first order. The unrolled step (``order="second"``) adds the gradient-precision term
``-xi * <grad L_val(theta'), Q_q(g)>`` and DARTS' finite-difference Hessian-vector term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import BatchStream, make_lm_dataset
from ..models import GPT, GPTConfig

__all__ = [
    "quantize_activation", "quantize_gradient", "quantize_gradients", "mix_activation", "mix_gradients",
    "ProxyConfig",
    "ProxyTask", "ArchGrads",
]


def quantize_activation(x: torch.Tensor, precision: str) -> torch.Tensor:
    """Simulated quantize-dequantize of a stage-boundary activation (same shape, float32)."""
    if precision == "fp32":
        return x
    if precision == "bf16":
        return x.to(torch.bfloat16).to(x.dtype)
    if precision == "fp8":
        # Imported here: the executor package pulls in torch.distributed (seconds to import).
        from ..execute.precision import fp8_qdq

        return fp8_qdq(x, "e4m3").to(x.dtype)
    raise ValueError(f"activation precision {precision!r} is not one of fp32, bf16, fp8")


def quantize_gradient(g: torch.Tensor, precision: str) -> torch.Tensor:
    """Simulated quantize-dequantize of a gradient tensor for the data-parallel all-reduce."""
    if precision == "fp32":
        return g
    if precision == "bf16":
        return g.to(torch.bfloat16).to(g.dtype)
    if precision == "int8":
        amax = g.detach().abs().max()
        if amax == 0 or not torch.isfinite(amax):
            return g
        scale = amax / 127.0
        return torch.round(g / scale).clamp(-127, 127) * scale
    raise ValueError(f"gradient precision {precision!r} is not one of fp32, bf16, int8")


def mix_activation(
    x: torch.Tensor, cut_prob: torch.Tensor, act_probs: torch.Tensor, precisions: tuple[str, ...]
) -> torch.Tensor:
    """``x + c * sum_q P(q) (Q_q(x) - x)`` with the quantization error detached (see module doc)."""
    if all(q == "fp32" for q in precisions):
        return x
    errors = [(quantize_activation(x.detach(), q) - x.detach()) for q in precisions]
    mix = sum(act_probs[i].to(x.dtype) * e for i, e in enumerate(errors))
    return x + cut_prob.to(x.dtype) * mix


def _quantize_flat(flat: torch.Tensor, sizes: list[int], precision: str) -> torch.Tensor:
    """``quantize_gradient`` of consecutive segments of ``flat`` (one int8 scale per segment)."""
    if precision == "fp32":
        return flat
    if precision == "bf16":
        return flat.to(torch.bfloat16).to(flat.dtype)
    if precision == "int8":
        owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        amax = flat.new_zeros(len(sizes)).scatter_reduce(0, owner, flat.abs(), "amax", include_self=True)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))[owner]
        return torch.round(flat / scale).clamp(-127, 127) * scale
    raise ValueError(f"gradient precision {precision!r} is not one of fp32, bf16, int8")


def quantize_gradients(grads: list[torch.Tensor], precision: str) -> list[torch.Tensor]:
    """``quantize_gradient`` of every tensor (one scale per tensor), on one flat buffer: a model
    has hundreds of small gradient tensors, and per-tensor ops would dominate the step."""
    if precision == "fp32" or not grads:
        return list(grads)
    sizes = [g.numel() for g in grads]
    q = _quantize_flat(torch.cat([g.reshape(-1) for g in grads]), sizes, precision)
    return [part.view_as(g) for part, g in zip(q.split(sizes), grads)]


def mix_gradients(
    grads: list[torch.Tensor], grad_probs: torch.Tensor, precisions: tuple[str, ...]
) -> list[torch.Tensor]:
    """``sum_q P(q) Q_q(g)`` for every gradient tensor (``grad_probs`` treated as constants)."""
    if not grads:
        return []
    sizes = [g.numel() for g in grads]
    flat = torch.cat([g.reshape(-1) for g in grads])
    mixed = sum(float(w) * _quantize_flat(flat, sizes, q) for w, q in zip(grad_probs, precisions))
    return [part.view_as(g) for part, g in zip(mixed.split(sizes), grads)]


@dataclass(frozen=True)
class ProxyConfig:
    """Shape and training of the proxy model.

    Attributes:
        hidden, num_heads, seq_len, vocab_size: the proxy GPT's size.
        batch_size: sequences per training / validation batch.
        num_train, num_val: sequences in the two splits.
        max_layers: most proxy layers (embedding + blocks + head); see module doc.
        lr: Adam learning rate of the weights.
        xi: the unrolled step's learning rate (DARTS' xi).
    """

    hidden: int = 32
    num_heads: int = 2
    seq_len: int = 32
    vocab_size: int = 64
    batch_size: int = 8
    num_train: int = 1024
    num_val: int = 256
    max_layers: int = 24
    lr: float = 3e-3
    xi: float = 3e-3


@dataclass
class ArchGrads:
    """Gradients of ``L_val`` with respect to the relaxed numerics inputs.

    ``cut`` (L - 1,) over the profile's boundaries, ``act`` and ``grad`` over the precision
    lists; ``val_loss`` is L_val (at theta for first order, at theta' for second order)."""

    cut: torch.Tensor
    act: torch.Tensor
    grad: torch.Tensor
    val_loss: float


class ProxyTask:
    """Proxy GPT, data and the weights' optimizer (see module doc).

    Args:
        num_profile_layers: L, layers of the profile (its cut probabilities have L - 1 entries).
        act_precisions / grad_precisions: the space's precision lists.
        config: proxy size and training.
        seed: weights, data and batch order.
    """

    def __init__(self, num_profile_layers: int, act_precisions: tuple[str, ...], grad_precisions: tuple[str, ...],
                 config: ProxyConfig = ProxyConfig(), seed: int = 0) -> None:
        if num_profile_layers < 2:
            raise ValueError(f"a profile with {num_profile_layers} layer(s) has no stage boundary to relax")
        self.config, self.act_precisions, self.grad_precisions = config, tuple(act_precisions), tuple(grad_precisions)
        L = num_profile_layers
        n = min(L, config.max_layers)
        if n < 3:
            n = 3  # a GPT has at least embedding, one block, head
        torch.manual_seed(seed)
        self.model = GPT(GPTConfig(num_layers=n - 2, hidden=config.hidden, num_heads=config.num_heads,
                                   seq_len=config.seq_len, vocab_size=config.vocab_size))
        self.num_proxy_layers = n
        # (n - 1, L - 1) map from profile boundaries to proxy boundaries.
        mapping = torch.zeros(n - 1, L - 1, dtype=torch.float64)
        for l in range(L - 1):
            j = min(max(round((l + 1) * n / L) - 1, 0), n - 2)
            mapping[j, l] = 1.0
        self.mapping = mapping
        if n == L:
            self.layer_note = f"proxy GPT has the profile's {L} layers (one boundary per profile boundary)"
        else:
            self.layer_note = (
                f"proxy GPT has {n} layers for the profile's {L} (capped by proxy max_layers={config.max_layers}"
                if L > n else f"proxy GPT has {n} layers for the profile's {L} (a GPT needs at least 3"
            ) + "); profile boundaries map to proxy boundaries proportionally"
        train, val = make_lm_dataset(config.vocab_size, config.seq_len, config.num_train, config.num_val, seed)
        self.train = BatchStream((train[:, :-1], train[:, 1:]), config.batch_size, seed)
        self.val = BatchStream((val[:, :-1], val[:, 1:]), config.batch_size, seed + 1)
        self.params = [p for p in self.model.parameters()]
        self.optimizer = torch.optim.Adam(self.params, lr=config.lr, foreach=True)
        self.step_index = 0

    # ---------------------------------------------------------------------------- forward
    def proxy_cut_probs(self, cut_probs: torch.Tensor) -> torch.Tensor:
        """(n - 1,) proxy boundary probabilities from the profile's (L - 1,)."""
        return (self.mapping @ cut_probs).clamp(max=1.0)

    def loss(
        self, batch: tuple[torch.Tensor, torch.Tensor], cut_probs: torch.Tensor, act_probs: torch.Tensor
    ) -> torch.Tensor:
        """Mean next-token cross-entropy with the relaxed activation numerics."""
        tokens, targets = batch
        c = self.proxy_cut_probs(cut_probs)
        x = tokens
        layers = self.model.layers
        for j, layer in enumerate(layers):
            x = layer(x)
            if j < len(layers) - 1:
                x = mix_activation(x, c[j], act_probs, self.act_precisions)
        return F.cross_entropy(x.flatten(0, 1).float(), targets.flatten())

    # ------------------------------------------------------------------------- weights step
    def train_step(self, cut_probs: torch.Tensor, act_probs: torch.Tensor, grad_probs: torch.Tensor) -> float:
        """One Adam step of theta on a training batch with A's relaxed numerics (A detached)."""
        batch = self.train.batch(self.step_index)
        self.step_index += 1
        loss = self.loss(batch, cut_probs.detach(), act_probs.detach())
        grads = torch.autograd.grad(loss, self.params)
        grads = mix_gradients(list(grads), grad_probs.detach(), self.grad_precisions)
        for p, g in zip(self.params, grads):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    # -------------------------------------------------------------------- architecture grads
    def arch_grads(self, cut_probs: torch.Tensor, act_probs: torch.Tensor, grad_probs: torch.Tensor,
                   order: str = "first") -> ArchGrads:
        """Gradients of L_val with respect to (cut_probs, act_probs, grad_probs).

        ``order="first"``: at the current theta. ``order="second"``: at the unrolled
        ``theta' = theta - xi * sum_q P_grad(q) Q_q(grad L_train(theta))``, with DARTS'
        finite-difference Hessian-vector product for the dependence of theta' on A through
        the training loss.
        """
        if order not in ("first", "second"):
            raise ValueError(f"order={order!r} is not one of first, second")
        cut = cut_probs.detach().requires_grad_(True)
        act = act_probs.detach().requires_grad_(True)
        grad_p = grad_probs.detach().requires_grad_(True)
        val_batch = self.val.batch(self.step_index)
        if order == "first":
            loss = self.loss(val_batch, cut, act)
            g_cut, g_act = _grads(loss, (cut, act))
            return ArchGrads(g_cut, g_act, torch.zeros_like(grad_p), float(loss.detach()))

        xi = self.config.xi
        train_batch = self.train.batch(self.step_index)
        # theta' = theta - xi * G(A), with G the relaxed-precision training gradient.
        train_loss = self.loss(train_batch, cut.detach(), act.detach())
        raw = torch.autograd.grad(train_loss, self.params)
        quantized = [quantize_gradients(list(raw), q) for q in self.grad_precisions]
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for i, p in enumerate(self.params):
                update = sum(float(grad_p[q]) * quantized[q][i] for q in range(len(self.grad_precisions)))
                p.sub_(xi * update)
        loss = self.loss(val_batch, cut, act)
        grads = _grads(loss, [cut, act, *self.params])
        g_cut, g_act, v = grads[0], grads[1], grads[2:]
        # d L_val / d P_grad(q) = -xi <v, Q_q(g)>.
        g_grad = torch.stack([
            -xi * sum((vi * qi).sum() for vi, qi in zip(v, quantized[q])) for q in range(len(self.grad_precisions))
        ]).to(grad_p.dtype)
        # Hessian-vector term: -xi * d/dA <v, grad_theta L_train(theta, A)> by central differences.
        norm = torch.sqrt(sum((vi * vi).sum() for vi in v))
        eps = 0.01 / float(norm) if float(norm) > 0 else 0.0
        hv_cut = torch.zeros_like(cut)
        hv_act = torch.zeros_like(act)
        if eps > 0:
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for p, b, vi in zip(self.params, backup, v):
                        p.copy_(b + sign * eps * vi)
                lt = self.loss(train_batch, cut, act)
                dc, da = _grads(lt, (cut, act))
                hv_cut = hv_cut + sign * dc
                hv_act = hv_act + sign * da
            hv_cut, hv_act = hv_cut / (2 * eps), hv_act / (2 * eps)
        with torch.no_grad():
            for p, b in zip(self.params, backup):
                p.copy_(b)
        return ArchGrads(g_cut - xi * hv_cut, g_act - xi * hv_act, g_grad, float(loss.detach()))

    @torch.no_grad()
    def eval_loss(self, split: str, cut_probs: torch.Tensor, act_probs: torch.Tensor, batches: int = 2) -> float:
        """Mean loss over ``batches`` batches of a split (no update)."""
        stream = self.train if split == "train" else self.val
        total = 0.0
        for i in range(batches):
            total += float(self.loss(stream.batch(10_000 + i), cut_probs, act_probs))
        return total / batches


def _grads(loss: torch.Tensor, inputs) -> list[torch.Tensor]:
    """``torch.autograd.grad`` with zeros for inputs the loss does not use (e.g. the cut
    probabilities when every activation precision is fp32)."""
    grads = torch.autograd.grad(loss, list(inputs), allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


