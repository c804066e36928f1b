"""What a row brings to the denoise loop besides its text: the one seam every kind of condition goes through.

A kind of condition (an edit's input images, an image to start from, a mask, a control image) has three
parts, each in one place:

1. **Stage 1** reads and checks its inputs and puts what the loop needs into the embedding cache, keyed by
   content (`cached_images.prepare_image_inputs`; edits: `edit.encode_edit_inputs`; both take stage 1's
   `qwen_batch.pipeline.encode.EncodeContext`). A rerun, or another shard sharing the cache, encodes nothing
   twice; stage 2 never reads an input image.
2. **Stage 2, per row**: its cached tensors, or the reason it cannot run (a row fails alone).
3. **The loop**: a `BatchConditions` handed to `ImageGenerator.generate`, whose blocks
   (`qwen_batch.pipeline.denoise.blocks`) use it at fixed points, each kind reading what it needs from the batch's
   `DenoiseState` and the model's `DenoiseComponents`:
   - `image_latents`: latents appended to every row's noise tokens (edits), with their grids (`image_shapes`);
   - `starts.starting_latents`: where a batch starts (image-to-image: the init latents noised to the first kept
     timestep, and the schedule cut by `strength`), instead of pure noise;
   - `starts.after_step`: what happens to the latents after each scheduler step (inpainting: the area outside
     the mask goes back to the init latents noised to the next timestep);
   - `controls.sample` and `controls.block_samples`: residuals added to the transformer's blocks at each step
     (ControlNet), computed once per step for the batch and shared by the conditional and unconditional passes.

Rows that share a batch share their kinds (`Request.batch_key`), so each hook acts on the whole batch at
once, and a batch without a kind pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from qwen_batch.pipeline.conditions.controlnet import ControlBatch
    from qwen_batch.pipeline.conditions.image_start import ImageStarts


@dataclass
class BatchConditions:
    """A batch's conditions, row by row, as the denoise loop takes them (see the module's docstring)."""

    # Edits: each row's packed input-image latents ([tokens, 64]) and the grids they were encoded at.
    image_latents: Sequence[torch.Tensor] | None = None
    image_shapes: Sequence[tuple[int, int, int]] = field(default_factory=tuple)
    # Edit-inpainting: the tokens appended are the start's own latents (sampled with the row's generator).
    start_tokens: bool = False
    # Image-to-image and inpainting: where each row starts, and its mask.
    starts: ImageStarts | None = None
    # ControlNet rows: each row's control images, sampled before the noise, run through the ControlNet.
    controls: ControlBatch | None = None
