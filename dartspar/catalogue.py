"""Catalogue of accelerators and links: published datasheet figures, by name.

Every figure is the vendor's *dense* peak (NVIDIA datasheets print sparse tensor-core figures with
an asterisk; those are halved here). Peaks are what the hardware could do, not what a kernel
reaches: the latency estimators scale them (roofline ``efficiency``, or a fitted table), and the
calibration step refits the CPU and loopback entries, which are descriptions of a typical host
rather than datasheet values.

Units: FLOP/s, bytes, bytes/s, seconds. Memory sizes printed as "80 GB" on datasheets are binary
(HBM/GDDR dies come in powers of two), so they are stored as GiB; the memory a program can actually
allocate is a few percent less (driver context, ECC on GDDR parts) and is the memory model's
concern, not the catalogue's.

Absent dtypes are absent on purpose: V100 and T4 have no bf16 or tf32 units and the CPU entry has
no bf16 peak, so ``DeviceSpec.peak("bf16")`` raises a clear error for them instead of returning a
made-up rate. Mapping bf16 to the fp16 tensor-core rate would be wrong by about 8x on V100 (PyTorch
runs bf16 matmuls there without tensor cores). A user who wants a figure anyway adds it under
``devices:`` in the cluster YAML (see ``dartspar.cluster.load_cluster``).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from .cluster import DeviceSpec, Link

__all__ = ["DEVICES", "LINKS", "device", "link"]

GIB = 2**30
TERA = 1e12
GB_S = 1e9  # link and memory bandwidths are quoted in decimal GB/s


def _spec(name: str, memory_gib: float, memory_bandwidth_bytes_per_s: float, **peaks_tflops) -> DeviceSpec:
    peaks = {dtype: tflops * TERA for dtype, tflops in peaks_tflops.items()}
    return DeviceSpec(
        name=name,
        peak_flops_per_s=peaks,
        memory_bytes=memory_gib * GIB,
        memory_bandwidth_bytes_per_s=memory_bandwidth_bytes_per_s,
    )


_DEVICES = {
    # NVIDIA H100 Tensor Core GPU datasheet, SXM column: FP32 67 TF; TF32 989 / BF16 1,979 /
    # FP16 1,979 / FP8 3,958 TF "with sparsity" (halved here); 80 GB HBM3 at 3.35 TB/s.
    # Cross-checked with glennklockwood.com/garden/processors/h100 (989.4 / 1978.9 dense).
    "H100-SXM": _spec(
        "H100-SXM", 80, 3.35e12, fp32=67, tf32=494.5, bf16=989, fp16=989, fp8=1979
    ),
    # NVIDIA A100 Tensor Core GPU datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4), SXM:
    # FP32 19.5, TF32 156, BF16/FP16 312 TF dense; 80 GB HBM2e at 2,039 GB/s.
    "A100-80GB": _spec("A100-80GB", 80, 2.039e12, fp32=19.5, tf32=156, bf16=312, fp16=312),
    # Same datasheet, 40 GB HBM2 at 1,555 GB/s (identical for the SXM4 and PCIe 40 GB parts);
    # same compute as the 80 GB part.
    "A100-40GB": _spec("A100-40GB", 40, 1.555e12, fp32=19.5, tf32=156, bf16=312, fp16=312),
    # NVIDIA V100 Tensor Core GPU datasheet, SXM2 column: FP32 15.7 TF, Tensor (FP16 in, FP32
    # accumulate) 125 TF; 32 GB HBM2 at 900 GB/s. 125 TF also in developer.nvidia.com
    # "Programming Tensor Cores in CUDA 9". Volta has no TF32 or BF16 units: those keys are absent.
    "V100-32GB": _spec("V100-32GB", 32, 0.9e12, fp32=15.7, fp16=125),
    # NVIDIA L4 Tensor Core GPU datasheet: FP32 30.3 TF; TF32 120 / BF16 242 / FP16 242 /
    # FP8 485 TF "with sparsity" (halved here); 24 GB GDDR6 at 300 GB/s; PCIe Gen4 x16.
    # Cross-checked with yobitel.com/knowledge-base/nvidia-l4 (121 BF16, 242 FP8 dense).
    "L4": _spec("L4", 24, 0.3e12, fp32=30.3, tf32=60, bf16=121, fp16=121, fp8=242.5),
    # NVIDIA T4 Tensor Core GPU datasheet: FP32 8.1 TF, mixed precision (FP16/FP32) 65 TF;
    # 16 GB GDDR6 at 320+ GB/s; PCIe Gen3 x16. Turing has no TF32 or BF16 units. (With ECC on, the
    # default, nvidia-smi shows 15 GiB of the 16.)
    "T4": _spec("T4", 16, 0.32e12, fp32=8.1, fp16=65),
    # A generic 2-core x86 AVX2 host process, not a datasheet part: the calibration step fits
    # these two numbers to measured matmul and copy throughput. 5e10 FLOP/s is about the sustained
    # fp32 GEMM rate of two AVX2 cores at 2-3 GHz (their FMA peak is 64-190 GFLOP/s); 2e10 B/s is
    # one DDR4 channel. On the shared dev box (2-core EPYC Zen1, other jobs running, load ~5) a
    # 2048^2 fp32 matmul reached 36 GFLOP/s and a 128 MiB copy 7.8 GB/s (read + write).
    # bf16 is absent: without AVX512-BF16/AMX it is emulated, and a 256^3 bf16 matmul ran at
    # 1.8 GFLOP/s on that box (10x slower than fp32), so no peak would be honest.
    # 16 GiB is an arbitrary per-process budget for memory-fit checks on a laptop-class host.
    "CPU": _spec("CPU", 16, 2e10, fp32=0.05),
}
DEVICES: Mapping[str, DeviceSpec] = MappingProxyType(_DEVICES)


_LINKS = {
    # NVLink: per-GPU aggregate, one direction (datasheets quote both directions: H100 900 GB/s,
    # A100 600 GB/s, V100 300 GB/s). Latency: NCCL point-to-point on NVLink is ~3-4 us (DGX-A100
    # p2p write ~3 us, NVIDIA/nccl-tests#123; H800 sendrecv_perf 3.7 us, NVIDIA/nccl#1984).
    "nvlink4": Link("nvlink4", 3e-6, 450 * GB_S),
    "nvlink3": Link("nvlink3", 3e-6, 300 * GB_S),
    "nvlink2": Link("nvlink2", 3e-6, 150 * GB_S),
    # PCIe x16, one direction, after 128b/130b line coding: Gen3 8 GT/s -> 15.75 GB/s, Gen4 16 GT/s
    # -> 31.5 GB/s, Gen5 32 GT/s -> 63 GB/s (PCI-SIG base specs). GPU-to-GPU traffic over PCIe
    # goes through the host bridge or a staging buffer; NCCL small messages cost ~5-10 us there.
    "pcie3": Link("pcie3", 8e-6, 15.75 * GB_S),
    "pcie4": Link("pcie4", 8e-6, 31.5 * GB_S),
    "pcie5": Link("pcie5", 8e-6, 63 * GB_S),
    # InfiniBand per GPU port (DGX H100: 8 ConnectX-7 NDR ports, one per GPU): NDR 400 Gb/s =
    # 50 GB/s, HDR 200 Gb/s = 25 GB/s. Wire + switch latency is ~1-2 us; 5 us includes NCCL's
    # proxy and GPUDirect RDMA software path.
    "ib-ndr": Link("ib-ndr", 5e-6, 50 * GB_S),
    "ib-hdr": Link("ib-hdr", 5e-6, 25 * GB_S),
    # Ethernet without RDMA: line rate / 8 bits; the latency is the kernel TCP stack and NCCL's
    # socket transport (tens of us), not the wire.
    "ethernet-100g": Link("ethernet-100g", 30e-6, 12.5 * GB_S),
    "ethernet-25g": Link("ethernet-25g", 40e-6, 3.125 * GB_S),
    # CPU processes on one host under gloo, which has no shared-memory transport: both names are
    # TCP over loopback. To be calibrated; tens of us per message and a few GB/s on an idle host.
    # (On the shared 2-core dev box, with other jobs running, gloo send/recv measured ~1 GB/s at
    # 64 MiB and ms-scale small-message latency: scheduling, not the link.) "shm" is kept as a
    # name for configs that describe intent, with the same figures.
    "loopback": Link("loopback", 30e-6, 3 * GB_S),
    "shm": Link("shm", 30e-6, 3 * GB_S),
}
LINKS: Mapping[str, Link] = MappingProxyType(_LINKS)


def device(name: str) -> DeviceSpec:
    """The catalogue entry ``name``; a ValueError listing the known names otherwise."""
    try:
        return DEVICES[name]
    except KeyError:
        raise ValueError(
            f"unknown device {name!r}; known devices: {sorted(DEVICES)}. Define it under "
            "`devices:` in the cluster YAML to add one."
        ) from None


def link(name: str) -> Link:
    """The catalogue entry ``name``; a ValueError listing the known names otherwise."""
    try:
        return LINKS[name]
    except KeyError:
        raise ValueError(
            f"unknown link {name!r}; known links: {sorted(LINKS)}. Or give a mapping "
            "{kind, latency_s, bandwidth_bytes_per_s}."
        ) from None
