"""Benchmarks of our detectors against torchvision's (tools/benchmark.py): `harness` times two implementations
side by side, `tasks` sets up each side of inference, training, evaluation and the data pipeline."""
