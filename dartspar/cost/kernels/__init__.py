"""Kernels and kernel profiling for the cost model's compute term.

- ``matmul``, ``layernorm``, ``softmax``: Triton kernels (GPU, or CPU through Triton's
  interpreter with ``TRITON_INTERPRET=1`` set before triton is imported).
- ``profiler``: ``dartspar-profile-kernels``, writes the JSON tables in ``tables/``.
- ``table``: the table format; ``timing``: the timers; ``workload``: GPT layers' GEMM shapes and
  memory-bound bytes, and a layer's time under an estimator.

Nothing is imported here, so that importing the package does not import triton (the
interpreter flag must be set before that).
"""
