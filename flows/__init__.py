"""Prefect flows over the qwen_batch library: where a batch runs (a Prefect worker, a work pool of GPUs).

`qwen_image_batch` runs a manifest (or one shard of it) in stages; `qwen_image_fanout` splits a
manifest over several GPU workers and merges their results. The library itself never imports Prefect.
See docs/prefect.md.
"""
