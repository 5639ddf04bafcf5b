"""Data sets the package makes itself (no downloads): a language-modelling corpus and a regression
task, with deterministic train/validation splits and a resumable batch stream.

Language modelling: tokens come from a seeded sparse second-order Markov source. Every token ``a``
has ``k`` possible successors (its "support"); which of them follows, and how likely, depends on
the token before ``a`` too, through a hashed table of logits. With probability ``noise`` the next
token is uniform instead. So the corpus is learnable at three levels that a test can tell apart:
a unigram model knows nothing (about ``log V`` nats), a bigram model learns the supports (at most
about ``log k`` nats), and a model that looks two tokens back (a transformer) can reach the source's
own entropy rate, which ``MarkovSource.entropy_rate_nats`` reports.

Regression: inputs ``x ~ N(0, I)`` and targets from a fixed random residual teacher network
``y = x + W2 tanh(W1 x) + noise``, the shape of the built-in dense models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

__all__ = [
    "MarkovSource",
    "make_lm_dataset",
    "make_regression_dataset",
    "SupervisedData",
    "make_dataset_for_model",
    "BatchStream",
]

# Large enough that a tiny vocabulary gets one bucket per (previous, current) pair, small enough
# that a 50k vocabulary does not need a V^2 table.
_MAX_CONTEXT_BUCKETS = 1 << 16
_HASH_MULTIPLIER = 2654435761  # Knuth's multiplicative hash constant


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")


class MarkovSource:
    """A seeded sparse second-order Markov chain over ``vocab_size`` tokens.

    Args:
        vocab_size: V, number of distinct tokens (>= 2).
        seed: fixes the successor sets and the context logits.
        support: k, successors per token; default ``max(2, round(sqrt(V)))`` capped at V.
        temperature: scale of the N(0, 1) context logits; larger = peakier, lower entropy.
        noise: probability that the next token is uniform over the vocabulary instead.
    """

    def __init__(
        self,
        vocab_size: int,
        seed: int,
        support: int | None = None,
        temperature: float = 2.0,
        noise: float = 0.02,
    ) -> None:
        if vocab_size < 2:
            raise ValueError(f"vocab_size={vocab_size} must be >= 2 for a language-modelling corpus")
        if not 0.0 <= noise < 1.0:
            raise ValueError(f"noise={noise} must be in [0, 1)")
        k = support if support is not None else max(2, round(math.sqrt(vocab_size)))
        if not 1 <= k <= vocab_size:
            raise ValueError(f"support={k} must be in [1, vocab_size={vocab_size}]")
        self.vocab_size, self.support, self.noise = vocab_size, k, noise
        gen = torch.Generator().manual_seed(seed)
        # Successor sets: k distinct tokens per current token (rows of random permutations).
        self.successors = torch.stack(
            [torch.randperm(vocab_size, generator=gen)[:k] for _ in range(vocab_size)]
        )  # (V, k) int64
        self.num_buckets = min(vocab_size * vocab_size, _MAX_CONTEXT_BUCKETS)
        logits = temperature * torch.randn(self.num_buckets, k, generator=gen, dtype=torch.float64)
        self.probs = torch.softmax(logits, dim=-1)  # (buckets, k) float64

    def _bucket(self, prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
        pair = prev * self.vocab_size + cur
        if self.num_buckets == self.vocab_size * self.vocab_size:
            return pair
        return (pair * _HASH_MULTIPLIER) % self.num_buckets

    def sample(self, num_sequences: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """(num_sequences, length) int64 tokens; the first token of each sequence is uniform."""
        _check_positive(num_sequences=num_sequences, length=length)
        out = torch.empty(num_sequences, length, dtype=torch.long)
        out[:, 0] = torch.randint(self.vocab_size, (num_sequences,), generator=generator)
        for t in range(1, length):
            cur = out[:, t - 1]
            prev = out[:, t - 2] if t >= 2 else cur
            choice = torch.multinomial(self.probs[self._bucket(prev, cur)], 1, generator=generator)
            nxt = self.successors[cur].gather(1, choice).squeeze(1)
            uniform = torch.randint(self.vocab_size, (num_sequences,), generator=generator)
            is_noise = torch.rand(num_sequences, generator=generator) < self.noise
            out[:, t] = torch.where(is_noise, uniform, nxt)
        return out

    def conditional_entropy_nats(self, prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
        """Entropy (nats, float64) of the next token given the two previous tokens, elementwise."""
        p = (1.0 - self.noise) * self.probs[self._bucket(prev, cur)] + self.noise / self.vocab_size
        h_support = -(p * p.log()).sum(-1)
        # The V - k tokens outside the support each get noise / V.
        q = self.noise / self.vocab_size
        h_rest = 0.0 if q == 0 else -(self.vocab_size - self.support) * q * math.log(q)
        return h_support + h_rest

    def entropy_rate_nats(self, tokens: torch.Tensor) -> float:
        """The source's entropy per token (nats), averaged over the positions t >= 2 of
        ``tokens`` (N, L): the loss floor of a perfect model on data from this source."""
        if tokens.shape[1] < 3:
            raise ValueError("entropy_rate_nats needs sequences of at least 3 tokens")
        h = self.conditional_entropy_nats(tokens[:, :-2], tokens[:, 1:-1])
        return float(h.mean())


def make_lm_dataset(
    vocab_size: int, seq_len: int, num_train: int, num_val: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and validation token sequences from ``MarkovSource(vocab_size, seed)``.

    Returns ``(train, val)``, int64 tensors of shapes (num_train, seq_len + 1) and
    (num_val, seq_len + 1): inputs are ``x[:, :-1]``, next-token targets ``x[:, 1:]``. The two
    splits are drawn from independent streams, so they share the source but no sequences
    (except by chance).
    """
    _check_positive(seq_len=seq_len, num_train=num_train, num_val=num_val)
    source = MarkovSource(vocab_size, seed)
    train = source.sample(num_train, seq_len + 1, torch.Generator().manual_seed(seed + 1))
    val = source.sample(num_val, seq_len + 1, torch.Generator().manual_seed(seed + 2))
    return train, val


def make_regression_dataset(
    dim: int, num_train: int, num_val: int, seed: int, noise_std: float = 0.01
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``((x_train, y_train), (x_val, y_val))``, float32 tensors (N, dim).

    ``y = x + W2 tanh(W1 x) + noise_std * eps`` with a fixed random teacher (hidden width 4*dim):
    a residual dense block can fit it, a linear model cannot fit it exactly.
    """
    _check_positive(dim=dim, num_train=num_train, num_val=num_val)
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(4 * dim, dim, generator=gen) / math.sqrt(dim)
    w2 = torch.randn(dim, 4 * dim, generator=gen) / math.sqrt(4 * dim)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, dim, generator=gen)
        y = x + torch.tanh(x @ w1.T) @ w2.T + noise_std * torch.randn(n, dim, generator=gen)
        return x, y

    return draw(num_train), draw(num_val)


@dataclass(frozen=True)
class SupervisedData:
    """Inputs and targets of both splits, aligned along dim 0."""

    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    val_inputs: torch.Tensor
    val_targets: torch.Tensor


def make_dataset_for_model(
    model_name: str, config: dict, num_train: int, num_val: int, seed: int
) -> SupervisedData:
    """The built-in data set that fits a built-in model (``dartspar.models.build_model`` names):
    the Markov corpus for "gpt" (vocabulary and sequence length from ``config``), the regression
    task for "mlp" and "unbalanced" (``config["dim"]``, with the model's default when absent)."""
    if model_name == "gpt":
        from .models import GPTConfig

        cfg = GPTConfig(**config)
        train, val = make_lm_dataset(cfg.vocab_size, cfg.seq_len, num_train, num_val, seed)
        return SupervisedData(train[:, :-1], train[:, 1:], val[:, :-1], val[:, 1:])
    if model_name in ("mlp", "unbalanced"):
        from .models import MLPConfig, UnbalancedConfig

        default_dim = (MLPConfig if model_name == "mlp" else UnbalancedConfig)().dim
        dim = int(config.get("dim", default_dim))
        (xt, yt), (xv, yv) = make_regression_dataset(dim, num_train, num_val, seed)
        return SupervisedData(xt, yt, xv, yv)
    raise ValueError(
        f"model name {model_name!r} has no built-in data set; choose 'gpt', 'mlp' or 'unbalanced'"
    )


class BatchStream:
    """Batches of ``batch_size`` samples drawn without replacement within each epoch.

    The batch of step ``t`` depends only on ``(seed, t)``, so a resumed run continues with exactly
    the batches it would have seen, and every process of a distributed run can compute the same
    global batch without communication. Each epoch is a fresh permutation; the last incomplete
    batch of an epoch is dropped.
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...], batch_size: int, seed: int) -> None:
        if not tensors:
            raise ValueError("BatchStream needs at least one tensor")
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError(f"BatchStream tensors disagree on dim 0: {[t.shape[0] for t in tensors]}")
        if not 1 <= batch_size <= n:
            raise ValueError(
                f"batch_size={batch_size} must be in [1, {n}] (the data set has {n} samples): "
                "use a larger data set or a smaller global batch"
            )
        self.tensors, self.batch_size, self.seed = tensors, batch_size, seed
        self.batches_per_epoch = n // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> torch.Tensor:
        """Sample indices (batch_size,) int64 of the batch at ``step`` (>= 0)."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        epoch, pos = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.tensors[0].shape[0], generator=gen)
        return self._perm[pos * self.batch_size : (pos + 1) * self.batch_size]

    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        """The tensors of the batch at ``step``, each (batch_size, ...)."""
        idx = self.indices(step)
        return tuple(t[idx] for t in self.tensors)

    def iterate(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches for steps ``start_step, start_step + 1, ...`` (endless)."""
        step = start_step
        while True:
            yield self.batch(step)
            step += 1
