"""Data parallelism: process groups, devices, DDP and FSDP2."""
