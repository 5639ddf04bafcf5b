"""Hand-built profiles and clusters for cost-model and search tests (no profiler, no YAML)."""

from __future__ import annotations

from dartspar.cluster import Cluster, DeviceSpec, Link, Node
from dartspar.profile import GemmShape, LayerProfile, ModelProfile

FAST = DeviceSpec("fast", {"fp32": 100e12, "bf16": 400e12}, 40e9, 2e12)
SLOW = DeviceSpec("slow", {"fp32": 25e12, "bf16": 100e12}, 16e9, 0.5e12)
NVLINK = Link("nvlink", 3e-6, 300e9)
PCIE = Link("pcie", 8e-6, 25e9)
IB = Link("ib", 5e-6, 25e9)


def gpt_like_profile(num_blocks: int = 6, batch: int = 8, seq: int = 512, hidden: int = 1024,
                     vocab: int = 8192, heads: int = 16, heavy: dict | None = None) -> ModelProfile:
    """A GPT-shaped profile with Megatron FLOP counts; ``heavy`` maps block index -> cost factor."""
    tokens = batch * seq
    def block(i: int) -> LayerProfile:
        f = (heavy or {}).get(i, 1)
        h = hidden * f
        params = 12 * h * h
        gemms = (
            GemmShape(tokens, h, h, count=3, tp_split="n"), GemmShape(tokens, h, h, tp_split="k"),
            GemmShape(tokens, 4 * h, h, tp_split="n"), GemmShape(tokens, h, 4 * h, tp_split="k"),
            GemmShape(seq, seq, h // heads, batch=batch * heads, count=2, tp_split="batch", scales_with_batch="batch"),
        )
        fwd = sum(g.flops for g in gemms)
        return LayerProfile(
            name=f"blocks.{i}", kind="block", fwd_flops=fwd, bwd_flops=2 * fwd, num_params=params,
            param_bytes=2 * params, grad_bytes=2 * params, optimizer_bytes=12 * params,
            saved_bytes=34 * tokens * h, input_bytes=2 * tokens * hidden, output_bytes=2 * tokens * hidden,
            gemms=gemms, tp_allreduce_bytes=2 * 2 * tokens * hidden, tp_allreduce_count=2,
            tp_bwd_allreduce_bytes=2 * 2 * tokens * hidden, tp_bwd_allreduce_count=2, tp_max_degree=heads,
            other_bytes_moved=20 * tokens * h,
        )
    embed = LayerProfile("embed", "pre", 0.0, 0.0, vocab * hidden, 2 * vocab * hidden, 2 * vocab * hidden,
                         12 * vocab * hidden, 8 * tokens, 8 * tokens, 2 * tokens * hidden,
                         other_bytes_moved=4 * tokens * hidden)
    head_gemm = GemmShape(tokens, vocab, hidden)
    head = LayerProfile("head", "post", head_gemm.flops, 2 * head_gemm.flops, vocab * hidden,
                        2 * vocab * hidden, 2 * vocab * hidden, 12 * vocab * hidden,
                        2 * tokens * hidden + 4 * tokens * vocab, 2 * tokens * hidden, 2 * tokens * vocab,
                        gemms=(head_gemm,), other_bytes_moved=4 * tokens * vocab)
    return ModelProfile("gpt-like", (embed, *(block(i) for i in range(num_blocks)), head), batch, 2)


def mixed_cluster(fast_nodes: int = 1, slow_nodes: int = 1, per_node: int = 4) -> Cluster:
    nodes = [Node(f"fast{i}", FAST, per_node, NVLINK) for i in range(fast_nodes)]
    nodes += [Node(f"slow{i}", SLOW, per_node, PCIE) for i in range(slow_nodes)]
    return Cluster("test-mixed", tuple(nodes), IB)
