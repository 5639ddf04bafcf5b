"""The built-in data sets: deterministic, well-shaped, and learnable at the levels they claim."""

import math

import pytest
import torch

from dartspar.data import (
    BatchStream,
    MarkovSource,
    make_dataset_for_model,
    make_lm_dataset,
    make_regression_dataset,
)


def test_lm_dataset_is_deterministic_and_shaped():
    train, val = make_lm_dataset(vocab_size=64, seq_len=16, num_train=300, num_val=50, seed=3)
    again, _ = make_lm_dataset(vocab_size=64, seq_len=16, num_train=300, num_val=50, seed=3)
    other, _ = make_lm_dataset(vocab_size=64, seq_len=16, num_train=300, num_val=50, seed=4)
    assert train.shape == (300, 17) and val.shape == (50, 17)
    assert train.dtype == torch.long
    assert int(train.min()) >= 0 and int(train.max()) < 64
    assert torch.equal(train, again)
    assert not torch.equal(train, other)
    assert not torch.equal(train[:50], val)


def _bigram_and_unigram_nats(train: torch.Tensor, val: torch.Tensor, vocab: int) -> tuple[float, float]:
    uni = torch.bincount(train.flatten(), minlength=vocab).double() + 1.0
    uni = uni / uni.sum()
    big = torch.full((vocab, vocab), 0.1, dtype=torch.float64)
    big.index_put_(
        (train[:, :-1].flatten(), train[:, 1:].flatten()),
        torch.ones(train[:, 1:].numel(), dtype=torch.float64),
        accumulate=True,
    )
    big = big / big.sum(1, keepdim=True)
    h_uni = float(-uni.log()[val[:, 1:]].mean())
    h_big = float(-big.log()[val[:, :-1], val[:, 1:]].mean())
    return h_uni, h_big


def test_bigram_model_learns_below_unigram_entropy_and_above_the_source_rate():
    vocab = 64
    train, val = make_lm_dataset(vocab_size=vocab, seq_len=32, num_train=2000, num_val=200, seed=0)
    h_uni, h_big = _bigram_and_unigram_nats(train, val, vocab)
    rate = MarkovSource(vocab, seed=0).entropy_rate_nats(val)
    # Unigram: about log V; bigram: the supports (~log sqrt(V)); the source: lower still, so a
    # model that looks two tokens back has something left to learn.
    assert h_uni > 0.95 * math.log(vocab)
    assert h_big < h_uni - 1.0
    assert rate < h_big - 0.3
    assert rate > 0.5


def test_markov_source_validates_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        MarkovSource(1, seed=0)
    with pytest.raises(ValueError, match="noise"):
        MarkovSource(16, seed=0, noise=1.0)
    with pytest.raises(ValueError, match="support"):
        MarkovSource(16, seed=0, support=17)


def test_regression_dataset_is_deterministic_and_nonlinear():
    (xt, yt), (xv, yv) = make_regression_dataset(dim=8, num_train=512, num_val=64, seed=1)
    (xt2, yt2), _ = make_regression_dataset(dim=8, num_train=512, num_val=64, seed=1)
    assert xt.shape == yt.shape == (512, 8) and xv.shape == yv.shape == (64, 8)
    assert torch.equal(xt, xt2) and torch.equal(yt, yt2)
    # The best linear fit leaves a clear residual: the teacher's tanh part is real signal.
    w = torch.linalg.lstsq(xt, yt).solution
    residual = float(((xv @ w - yv) ** 2).mean())
    assert residual > 10 * 0.01**2


def test_dataset_for_model_matches_model_shapes():
    gpt = make_dataset_for_model("gpt", {"vocab_size": 32, "seq_len": 8}, 40, 8, seed=0)
    assert gpt.train_inputs.shape == gpt.train_targets.shape == (40, 8)
    assert torch.equal(gpt.train_inputs[:, 1:], gpt.train_targets[:, :-1])
    mlp = make_dataset_for_model("mlp", {"dim": 16}, 40, 8, seed=0)
    assert mlp.train_inputs.shape == (40, 16)
    with pytest.raises(ValueError, match="no built-in data set"):
        make_dataset_for_model("resnet", {}, 10, 2, seed=0)


def test_batch_stream_is_a_function_of_the_step():
    data = torch.arange(100)
    stream = BatchStream((data,), batch_size=16, seed=5)
    first = [stream.batch(s)[0] for s in range(12)]
    fresh = BatchStream((data,), batch_size=16, seed=5)
    # A resumed run (fresh stream, starting at step 7) sees exactly the same batches.
    assert all(torch.equal(fresh.batch(s)[0], first[s]) for s in (7, 3, 11))
    # Within an epoch (6 batches of 16 from 100) no sample repeats; epochs reshuffle.
    epoch0 = torch.cat(first[:6])
    assert epoch0.unique().numel() == 96
    assert not torch.equal(torch.cat(first[6:12]), epoch0)
    it = stream.iterate(start_step=2)
    assert torch.equal(next(it)[0], first[2]) and torch.equal(next(it)[0], first[3])
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream((data,), batch_size=101, seed=0)
