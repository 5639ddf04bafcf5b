"""Triton kernels against torch (in Triton's CPU interpreter), GPT layer work, and the profiler."""

import os

# Triton decides interpreter vs compiler when a kernel is decorated, i.e. when a kernel module
# is first imported: set the flag before any of them is.
os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from dartspar.cost.kernels.workload import (  # noqa: E402
    backward_gemms, gpt_block_work, gpt_head_work, training_gemm_shapes,
)
from dartspar.models.gpt import Block, GPTConfig  # noqa: E402

# Output rounding of each dtype: a few units in the last place of values of size ~10.
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1.5e-1}


@pytest.fixture(scope="module")
def kernels():
    from dartspar.cost.kernels import layernorm, matmul, softmax

    return matmul, layernorm, softmax


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matmul_matches_torch_with_masked_edges(kernels, dtype):
    matmul = kernels[0].matmul
    gen = torch.Generator().manual_seed(0)
    # 32 x 48 x 40: K is not a multiple of the 32-wide tile, N is not a multiple of 32 either.
    a = torch.randn(32, 40, generator=gen).to(dtype)
    b = torch.randn(40, 48, generator=gen).to(dtype)
    out = matmul(a, b)
    reference = a.float() @ b.float()  # fp32 accumulation of the same rounded inputs
    assert out.dtype == dtype and out.shape == (32, 48)
    assert (out.float() - reference).abs().max().item() < TOL[dtype]


def test_matmul_batched_and_strided(kernels):
    matmul = kernels[0].matmul
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(3, 40, 17, generator=gen).transpose(1, 2)  # (3, 17, 40), non-contiguous
    b = torch.randn(3, 40, 20, generator=gen)
    assert (matmul(a, b) - torch.bmm(a, b)).abs().max().item() < 1e-4


def test_matmul_rejects_bad_inputs(kernels):
    matmul = kernels[0].matmul
    with pytest.raises(ValueError, match="dtypes"):
        matmul(torch.ones(4, 4), torch.ones(4, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="do not chain"):
        matmul(torch.ones(4, 5), torch.ones(4, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_layer_norm_and_softmax_match_torch(kernels, dtype):
    _, layernorm, softmax = kernels
    gen = torch.Generator().manual_seed(2)
    x = (3 * torch.randn(2, 5, 40, generator=gen) + 1).to(dtype)
    w = torch.randn(40, generator=gen).to(dtype)
    b = torch.randn(40, generator=gen).to(dtype)
    ref_ln = F.layer_norm(x.float(), (40,), w.float(), b.float())
    assert (layernorm.layer_norm(x, w, b).float() - ref_ln).abs().max().item() < TOL[dtype]
    ref_sm = torch.softmax(x.float(), dim=-1)
    assert (softmax.softmax(x).float() - ref_sm).abs().max().item() < TOL[dtype] / 10


def test_gpt_block_work_matches_model_flops():
    cfg, batch = GPTConfig(hidden=32, num_heads=4, seq_len=8), 2
    work = gpt_block_work(cfg, batch, tp=1, dtype_bytes=4)
    with FlopCounterMode(display=False) as counter:
        Block(cfg)(torch.randn(batch, cfg.seq_len, cfg.hidden))
    linear = sum(g.flops for g in work.gemms if g.batch == 1)
    attention = sum(g.flops for g in work.gemms if g.batch > 1)
    # The flop counter sees the six linears (it does not count CPU flash attention) ...
    assert linear == counter.get_total_flops()
    # ... and Megatron's count of a block's forward is 24 B s h^2 + 4 B s^2 h.
    b, s, h = batch, cfg.seq_len, cfg.hidden
    assert linear + attention == 24 * b * s * h * h + 4 * b * s * s * h
    # Tensor parallelism divides every GEMM.
    tp2 = gpt_block_work(cfg, batch, tp=2, dtype_bytes=4)
    assert sum(g.flops for g in tp2.gemms) == (linear + attention) / 2
    # Layer norms, GELU and residual adds; the softmax is inside fused attention.
    assert work.other_bytes_moved == 4 * (2 * 2 * b * s * h + 2 * b * s * 4 * h + 2 * 3 * b * s * h)
    with pytest.raises(ValueError, match="must divide num_heads"):
        gpt_block_work(cfg, batch, tp=3)


def test_backward_gemms_and_shape_grid():
    cfg = GPTConfig(hidden=64, num_heads=4, seq_len=16, vocab_size=100)
    for g in gpt_block_work(cfg, 2).gemms + gpt_head_work(cfg, 2).gemms:
        dx, dw = backward_gemms(g)
        assert dx.flops == dw.flops == g.flops
        assert (dx.m, dx.n, dx.k) == (g.m, g.k, g.n) and (dw.m, dw.n, dw.k) == (g.k, g.n, g.m)
    shapes = training_gemm_shapes({"x": cfg}, tps=[1, 2, 3], micro_batches=[1, 2])
    assert (32, 100, 64, 1) in shapes          # head, micro-batch 2
    assert (32, 32, 64, 1) in shapes          # q/k/v at tp=2, micro-batch 2
    assert (16, 16, 16, 4) in shapes          # q k^T: 1 x 4 heads, head width 16
    assert len(shapes) == len(set(shapes))


def test_profiler_cli_writes_a_loadable_table(tmp_path):
    from dartspar.cost.kernels.profiler import coverage_shapes, cuda_device_spec, main, random_shapes
    from dartspar.cost.kernels.table import ProfileTable

    assert cuda_device_spec("NVIDIA H100 80GB HBM3").name == "H100-SXM"
    assert cuda_device_spec("NVIDIA A100-SXM4-40GB").peak("bf16") == 312e12
    assert cuda_device_spec("NVIDIA A100-SXM4-80GB").name == "A100-80GB"
    with pytest.raises(ValueError, match="no catalogue entry"):
        cuda_device_spec("NVIDIA GeForce GT 710")
    with pytest.raises(ValueError, match="not in the catalogue"):
        cuda_device_spec("NVIDIA H200", device_name="H200")
    assert coverage_shapes([16, 64], 2 * 16 * 64 * 64) == [(16, 16, 16, 1), (16, 16, 64, 1), (16, 64, 16, 1),
                                                         (16, 64, 64, 1), (64, 16, 16, 1), (64, 16, 64, 1),
                                                         (64, 64, 16, 1)]
    shapes = random_shapes(20, 16, 512, 2 * 64**3, seed=3)
    assert len(set(shapes)) == 20 and all(16 <= min(s[:3]) and max(s[:3]) <= 512 and 2 * s[0] * s[1] * s[2] <= 2 * 64**3
                                           for s in shapes)
    out = tmp_path / "cpu.json"
    rc = main(["--device", "cpu", "--out", str(out), "--models", "cpu-tiny", "--tp", "1", "--micro-batch", "1",
               "--coverage", "16", "--random-shapes", "0", "--rounds", "1", "--min-round-s", "0.001",
               "--no-progress"])
    assert rc == 0
    table = ProfileTable.load(out)
    data = json.loads(out.read_text())
    assert data["device"] == "CPU" and data["threads"] == 1 and data["meta"]["versions"]["triton"]
    # cpu-tiny (= GPTConfig()), micro-batch 1, tp 1: its distinct forward/backward block and head
    # shapes + the 16^3 coverage point; memory-bound: 4 single kernels + 1 block sequence.
    assert len(table.gemm_rows) == len(training_gemm_shapes({"t": GPTConfig()}, [1], [1])) + 1
    assert sorted({r.kernel for r in table.memory_rows}) == ["add", "block", "gelu", "layernorm", "softmax"]
    # The timed block sequence moves exactly the bytes the cost model's layer work counts.
    [block_row] = [r for r in table.memory_rows if r.kernel == "block"]
    assert block_row.num_bytes == gpt_block_work(GPTConfig(), 1, tp=1, dtype_bytes=4).other_bytes_moved
    assert [(r.hidden, r.dtype) for r in table.probe_rows] == [(8, "fp32"), (512, "fp32")]  # tiny, cpu-large
    assert table.spec.peak("fp32") == max(2 * r.m * r.n * r.k * r.batch / r.time_s for r in table.gemm_rows)
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--tp", "x"])
