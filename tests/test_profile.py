"""dartspar.profile: per-layer FLOPs, memory, GEMM shapes and tensor-parallel facts."""

from __future__ import annotations

import copy
import resource

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dartspar.models import GPT, GPTConfig, MLP, MLPConfig, Unbalanced, UnbalancedConfig
from dartspar.profile import GemmShape, ModelProfile, profile


def megatron_train_flops(batch, seq, layers, hidden, vocab):
    """Megatron-LM (Narayanan et al. 2021, eq. 3) training FLOPs without recomputation."""
    return 72 * batch * seq * layers * hidden**2 * (
        1 + seq / (6 * hidden) + vocab / (12 * layers * hidden))


def meta_gpt(**config) -> GPT:
    with torch.device("meta"):
        return GPT(GPTConfig(**config))


# --- FLOPs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["math", "flash"])
def test_gpt_train_flops_match_megatron(attention):
    B, s, l, h, V = 4, 256, 8, 512, 8192
    model = meta_gpt(num_layers=l, hidden=h, num_heads=8, seq_len=s, vocab_size=V)
    prof = profile(model, model.example_inputs(B, "meta"), attention=attention)
    megatron = megatron_train_flops(B, s, l, h, V)
    assert abs(prof.train_flops / megatron - 1) < 0.02
    # Exact accounting: the unfused backward is twice the forward everywhere; the fused
    # attention backward also recomputes Q K^T, 2*B*s^2*h FLOPs per block.
    recompute = 0 if attention == "math" else 2 * B * s * s * h * l
    assert prof.train_flops == pytest.approx(megatron + recompute, rel=1e-12)
    for layer in prof.layers:
        assert sum(g.flops for g in layer.gemms) == pytest.approx(layer.fwd_flops, rel=1e-12)


def test_gpt_175b_profiles_within_memory():
    B, s, l, h, V = 1, 2048, 96, 12288, 51200
    model = meta_gpt(num_layers=l, hidden=h, num_heads=96, seq_len=s, vocab_size=V)
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prof = profile(model, model.example_inputs(B, "meta"))
    rss_growth_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib) / 2**20
    # Wall time is measured by experiments/bench_profile.py; memory is a property, not a timing.
    assert rss_growth_gib < 2
    assert prof.num_layers == l + 2
    assert prof.total_params == l * (12 * h * h + 13 * h) + (V + s) * h + V * h + 2 * h
    assert abs(prof.train_flops / megatron_train_flops(B, s, l, h, V) - 1) < 0.02


def test_unbalanced_layers_differ_tenfold():
    model = Unbalanced(UnbalancedConfig())
    prof = profile(model, model.example_inputs(8))
    fwd = [layer.fwd_flops for layer in prof.layers]
    assert max(fwd) / min(fwd) >= 10
    # widths 1024 vs 64 with the same dim: exactly 16x.
    assert max(fwd) / min(fwd) == pytest.approx(16)


def test_first_layer_skips_input_gradient():
    # A training step never differentiates the inputs: the first layer's backward computes
    # weight gradients only (1x forward for `up`, 2x for `down`), later layers 2x forward.
    model = MLP(MLPConfig(num_layers=3, dim=32, width=128))
    prof = profile(model, model.example_inputs(4))
    ratios = [layer.bwd_flops / layer.fwd_flops for layer in prof.layers]
    assert ratios == pytest.approx([1.5, 2.0, 2.0])


# --- memory and boundaries of a GPT block ---------------------------------------------------

SMALL = dict(num_layers=2, hidden=64, num_heads=4, seq_len=32, vocab_size=128)


def test_gpt_block_memory_figures():
    B, s, h, H, dtype_bytes = 2, SMALL["seq_len"], SMALL["hidden"], SMALL["num_heads"], 2
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL))
    prof = profile(model, model.example_inputs(B), dtype_bytes=dtype_bytes)
    block = prof.layers[1]
    assert block.name == "layers.1" and block.kind == "block"
    params = 12 * h * h + 13 * h
    assert block.num_params == params
    assert block.param_bytes == 2 * params and block.grad_bytes == 2 * params
    assert block.optimizer_bytes == 12 * params
    assert block.input_bytes == block.output_bytes == B * s * h * dtype_bytes
    # Saved for backward, per token, in elements:
    #   ln1: input x (h) + mean, rstd (2);  q/k/v linears: their shared input ln1(x) (h, once);
    #   flash attention: q, k, v (3h), output (h, also the proj linear's input: same storage),
    #   log-sum-exp (H);  ln2: input (h) + mean, rstd (2);  fc: input (h);  gelu: input (4h);
    #   mlp proj: input (4h).  Total 16h + 4 + H elements at dtype_bytes each,
    # plus the attention RNG state: uint64[2] + uint64[] = 24 bytes at their own width.
    assert block.saved_bytes == B * s * (16 * h + 4 + H) * dtype_bytes + 24
    # Embedding saves the token ids and the positions (int64); the head saves the final
    # norm's input + mean/rstd and its output (the head linear's input).
    assert prof.layers[0].saved_bytes == (B * s + s) * 8
    assert prof.layers[-1].saved_bytes == B * s * (2 * h + 2) * dtype_bytes
    assert prof.layers[0].input_bytes == B * s * 8
    assert prof.layers[-1].output_bytes == B * s * SMALL["vocab_size"] * dtype_bytes


def test_gpt_block_gemms_and_tensor_parallel_facts():
    B, s, h, H = 2, SMALL["seq_len"], SMALL["hidden"], SMALL["num_heads"]
    model = meta_gpt(**SMALL)
    prof = profile(model, model.example_inputs(B, "meta"))
    block = prof.layers[1]
    tokens, head_dim = B * s, h // H
    assert set(block.gemms) == {
        GemmShape(m=tokens, n=h, k=h, count=3, tp_split="n"),  # q, k, v
        GemmShape(m=s, n=s, k=head_dim, batch=B * H, tp_split="batch", scales_with_batch="batch"),
        GemmShape(m=s, n=head_dim, k=s, batch=B * H, tp_split="batch", scales_with_batch="batch"),
        GemmShape(m=tokens, n=h, k=h, tp_split="k"),  # attention output projection
        GemmShape(m=tokens, n=4 * h, k=h, tp_split="n"),  # mlp fc
        GemmShape(m=tokens, n=h, k=4 * h, tp_split="k"),  # mlp proj
    }
    assert block.tp_allreduce_bytes == 2 * B * s * h * 2
    # DTensor all-reduces each column-parallel module's input gradient on its own: q, k, v, fc
    # (tests/test_execute_units.py counts what DTensor issues).
    assert block.tp_allreduce_count == 2
    assert block.tp_bwd_allreduce_count == 4 and block.tp_bwd_allreduce_bytes == 4 * B * s * h * 2
    assert block.tp_max_degree == H
    embed, head = prof.layers[0], prof.layers[-1]
    assert embed.gemms == () and embed.tp_max_degree == 1 and embed.tp_allreduce_bytes == 0
    assert head.gemms == (GemmShape(m=tokens, n=SMALL["vocab_size"], k=h),)


def test_profile_scales_with_batch_and_round_trips(tmp_path):
    model = meta_gpt(**SMALL)
    small = profile(model, model.example_inputs(2, "meta"))
    large = profile(model, model.example_inputs(4, "meta"))
    assert small.batch_size == 2 and small.meta["seq_len"] == SMALL["seq_len"]
    for a, b in zip(small.layers, large.layers):
        assert a.scaled(2).gemms == b.gemms
        assert a.scaled(2).fwd_flops == b.fwd_flops and a.scaled(2).bwd_flops == b.bwd_flops
    small.to_json(tmp_path / "p.json")
    assert ModelProfile.from_json(tmp_path / "p.json") == small


def test_real_model_is_profiled_on_a_meta_copy():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL))
    before = model.layers[1].attn.q.weight.detach().clone()
    prof = profile(model, model.example_inputs(2))
    assert prof == profile(meta_gpt(**SMALL), meta_gpt(**SMALL).example_inputs(2, "meta"))
    weight = model.layers[1].attn.q.weight
    assert weight.device.type == "cpu" and weight.grad is None
    assert torch.equal(weight.detach(), before)


# --- external models: blocks= ----------------------------------------------------------------

class _Block(nn.Module):
    """HF-style block: keyword mask argument, tuple output."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.ff = nn.Linear(hidden, 2 * hidden)
        self.ff2 = nn.Linear(2 * hidden, hidden)

    def forward(self, x, *, mask):
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.out(attn.transpose(1, 2).reshape(b, s, h))
        return (x + self.ff2(F.relu(self.ff(x))),)


class _Net(nn.Module):
    def __init__(self, vocab=50, hidden=32, seq=8, blocks=3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(_Block(hidden, 4) for _ in range(blocks))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab)
        self.register_buffer("mask", torch.ones(seq, seq, dtype=torch.bool).tril())

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.layers:
            (x,) = block(x, mask=self.mask)
        return self.head(self.norm(x))


def _flop_counter_total(model: nn.Module, tokens: torch.Tensor) -> int:
    meta_model = copy.deepcopy(model).to("meta")
    with FlopCounterMode(display=False) as counter:
        out = meta_model(tokens.to("meta"))
        torch.autograd.grad(out.sum(), list(meta_model.parameters()))
    return counter.get_total_flops()


def test_blocks_path_matches_flop_counter_and_has_pre_post():
    torch.manual_seed(0)
    net = _Net()
    tokens = torch.randint(0, 50, (2, 8))
    prof = profile(net, tokens, blocks="layers", attention="math")
    assert [layer.name for layer in prof.layers] == [
        "pre", "layers.0", "layers.1", "layers.2", "post"]
    assert [layer.kind for layer in prof.layers] == ["pre", "block", "block", "block", "post"]
    assert prof.train_flops == _flop_counter_total(net, tokens)
    assert prof.total_params == sum(p.numel() for p in net.parameters())
    pre, post = prof.layers[0], prof.layers[-1]
    assert pre.num_params == 50 * 32
    assert post.num_params == 2 * 32 + 32 * 50 + 50
    # The blocks receive the hidden state (bf16) and the bool mask.
    assert pre.output_bytes == prof.layers[1].input_bytes == 2 * 8 * 32 * 2 + 8 * 8
    assert post.input_bytes == 2 * 8 * 32 * 2 and post.output_bytes == 2 * 8 * 50 * 2
    # No tp_plan: not tensor-parallel.
    assert all(layer.tp_max_degree == 1 and layer.tp_allreduce_bytes == 0 for layer in prof.layers)
    assert prof.meta["blocks"] == ["layers"]


def test_blocks_path_several_lists_and_no_empty_pre():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
            self.second = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8))

        def forward(self, x):
            for layer in self.first:
                x = layer(x)
            return self.second(x)

    prof = profile(Two(), torch.zeros(4, 8), blocks=["first", "second"])
    # The forward does nothing before the first block or after the last: no pre/post layer.
    assert [layer.name for layer in prof.layers] == [
        "first.0", "first.1", "second.0", "second.1"]
    assert [layer.fwd_flops for layer in prof.layers] == [2 * 4 * 8 * 8] * 2 + [2 * 4 * 8 * 16] * 2


@pytest.mark.parametrize("blocks, words", [
    ("nope", ["blocks='nope'", "'nope'", "['embed', 'layers', 'norm', 'head']"]),
    ("head", ["blocks='head'", "Linear", "not an nn.ModuleList"]),
    (["layers", "layers.0.missing"], ["'missing'", "['norm', 'qkv', 'out', 'ff', 'ff2']"]),
    (3, ["blocks=3", "['layers']"]),
])
def test_bad_blocks_are_named(blocks, words):
    with pytest.raises(ValueError) as err:
        profile(_Net(), torch.zeros(2, 8, dtype=torch.long), blocks=blocks)
    for word in words:
        assert word in str(err.value)


def test_non_sequential_model_needs_blocks():
    with pytest.raises(ValueError, match=r"pass blocks=.*\['layers'\]"):
        profile(_Net(), torch.zeros(2, 8, dtype=torch.long))


def test_blocks_must_run_once_in_order():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

        def forward(self, x):
            return self.layers[1](self.layers[0](self.layers[0](x)))

    with pytest.raises(ValueError, match="'layers.0' ran more than once"):
        profile(Twice(), torch.zeros(2, 4), blocks="layers")


def test_bad_tp_plan_is_named():
    class Bad(nn.Module):
        tp_plan = {"up": "colwise", "dwn": "rowwise"}
        tp_max_degree = 4

        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.down(self.up(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Bad()])

        def forward(self, x):
            return self.layers[0](x)

    with pytest.raises(ValueError, match=r"tp_plan names 'dwn'.*\['up', 'down'\]"):
        profile(Net(), torch.zeros(2, 4), blocks="layers")
