"""Generation speed of the engine, optionally against transformers' `generate` in the same run.

`tulu.bench.workloads` holds the one implementation of every workload (single stream,
fixed-shape and mixed-length offline throughput, prefill, the GPU roofline) that both
`tulu bench` (`tulu.bench.cli`) and `benchmarks/generation.py` run. This package file imports
nothing, so building the `tulu` argument parser stays fast.
"""
