"""Benchmarks, one module per question, all run by one harness (bench/harness.py); see bench/README.md."""
