"""Model FLOPs utilisation: achieved FLOP/s over the device's peak."""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks (FLOP/s) by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100": 756e12,  # PCIe
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def peak_flops(device: torch.device, configured: float | None) -> float | None:
    """Peak FLOP/s of one device: the spec's value, else the known-GPU table, else None (CPU)."""
    if configured:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def mfu(flops_per_token: float, tokens_per_sec: float, peak: float | None, world_size: int) -> float | None:
    """Fraction of the cluster's peak that the training achieves (None without a known peak)."""
    return flops_per_token * tokens_per_sec / (peak * world_size) if peak else None
