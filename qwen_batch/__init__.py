"""qwen-batch: turn manifests of prompts into images with Qwen-Image, staged for big batches.

The library never imports Prefect; `flows/` wraps it. Importing this package is cheap: torch and
diffusers are imported only by the modules that run models.
"""

__version__ = "0.1.0"
