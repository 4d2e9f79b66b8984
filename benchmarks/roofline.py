"""What every benchmark records in `extra_info`: the path timed, the device, bytes moved, GB/s,
the roofline (on CUDA: the bytes at the device-to-device copy bandwidth measured in the same
run, with the nominal bandwidth beside it), and peak memory of one call.

Usage inside a benchmark::

    peak = peak_memory(fn, device)            # one untimed call, measured
    benchmark(fn)                             # fn synchronizes CUDA itself (see `synchronized`)
    record(benchmark, path="dino_fast eager", device=device, bytes_moved=n, peak_bytes=peak)
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

# Nominal DRAM bandwidth in bytes/s, matched against torch.cuda.get_device_name(); first match wins.
NOMINAL_BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM / HBM3
    ("A100-SXM4-80GB", 2.04e12),
    ("A100", 1.55e12),
    ("L40S", 0.864e12),
    ("RTX 4090", 1.008e12),
]


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def peak_bandwidth(device: torch.device) -> Optional[float]:
    """Nominal bytes/s of the device's memory, or None where unknown (CPUs)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, bw in NOMINAL_BANDWIDTH:
        if key in name:
            return bw
    return None


_COPY_BANDWIDTH: dict = {}


def copy_bandwidth(device: torch.device) -> Optional[float]:
    """Bytes/s of a device-to-device copy measured here (read + write of 1 GiB, best of 5), the
    roofline every CUDA benchmark is held to; None on CPUs. Measured once per process."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    key = torch.cuda.current_device() if device.index is None else device.index
    if key not in _COPY_BANDWIDTH:
        src = torch.empty(2**28, dtype=torch.float32, device=device).fill_(1.0)
        dst = torch.empty_like(src)
        dst.copy_(src)
        best = float("inf")
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        _COPY_BANDWIDTH[key] = 2 * src.numel() * src.element_size() / best
        del src, dst
        torch.cuda.empty_cache()
    return _COPY_BANDWIDTH[key]


def synchronized(fn: Callable, device: torch.device) -> Callable:
    """Wrap fn so that the timed call includes the GPU work it launched."""
    if torch.device(device).type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out
    return run


def _rss_bytes(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_memory(fn: Callable, device: torch.device) -> Optional[int]:
    """Extra memory one call of fn takes at its peak, in bytes.

    CUDA: max_memory_allocated during the call minus what was allocated before (exact). CPU
    (Linux): the growth of the resident set at its peak, after resetting the kernel's high-water
    mark (/proc/self/clear_refs); None where that is not possible. That counts fresh pages only:
    large tensors (mmap'd, always fresh) are seen, heap blocks the allocator reuses are not, so
    on CPU it is a lower bound, recorded under its own name (`peak_rss_growth_MB`).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _rss_bytes("VmRSS")
    fn()
    peak = _rss_bytes("VmHWM")
    return None if base is None or peak is None else max(peak - base, 0)


def record(benchmark, *, path: str, device: torch.device, bytes_moved: Optional[int] = None,
           peak_bytes: Optional[int] = None, **extra) -> None:
    """Fill benchmark.extra_info after the timed runs (needs benchmark.stats)."""
    info = benchmark.extra_info
    info["path"] = path
    info["device"] = device_name(device)
    if peak_bytes is not None:
        key = "peak_memory_MB" if torch.device(device).type == "cuda" else "peak_rss_growth_MB"
        info[key] = round(peak_bytes / 2**20, 2)
    stats = getattr(benchmark, "stats", None)
    if bytes_moved is not None:
        info["bytes_moved"] = int(bytes_moved)
        if stats is not None:
            seconds = stats.stats.min
            info["GB/s"] = round(bytes_moved / seconds / 1e9, 2)
            # the roofline: the bytes at the copy bandwidth measured in this run; the nominal
            # figure beside it
            bw = copy_bandwidth(device)
            nominal = peak_bandwidth(device)
            if nominal is not None:
                info["nominal_GB/s"] = round(nominal / 1e9, 1)
            if bw is not None:
                info["copy_GB/s"] = round(bw / 1e9, 1)
                info["roofline_us"] = round(bytes_moved / bw * 1e6, 2)
                info["pct_of_roofline"] = round(100 * bytes_moved / bw / seconds, 1)
                info["x_roofline"] = round(seconds / (bytes_moved / bw), 3)
    info.update(extra)
