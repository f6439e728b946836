"""Benchmarks: model presets, workloads, the throughput harness (`lengthwise bench throughput`) and its report."""
