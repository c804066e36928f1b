"""Stage 2: run the Qwen-Image transformer and VAE over cached embeddings, a batch at a time.

This is diffusers' `QwenImagePipeline.__call__` unrolled for batches of different prompts, with the
same arithmetic, so a row's image does not depend on what shares its batch:
- each row's starting noise is drawn from its own `torch.Generator("cpu").manual_seed(seed)`, with
  the shape and dtype the pipeline draws for a single image;
- the prompts of a batch are zero-padded to a common length and masked, so a row attends only to
  its own tokens;
- with true CFG the conditional and unconditional passes of the whole batch run as one forward (2B
  rows) or, where that is faster (`text.CFG_LAYOUT`), as two of B rows each, instead of two calls per image;
  their combination is rescaled per token to the conditional norm, as diffusers does.
Only the transformer, VAE and scheduler are loaded (`text_encoder=None, tokenizer=None`).

The loop is five blocks over one `DenoiseState` (`blocks`, `state`), as in diffusers' Modular pipelines: text
conditions, timesteps, starting latents, one step (per kept timestep), decode. They read the loaded model from
one `DenoiseComponents`, and the batch's conditions (`qwen_batch.pipeline.conditions`: edit tokens, image starts
and masks, control images) read the same two objects. `ImageGenerator` (`generator`) loads and places the model
once and runs each batch through the blocks; a model family of another architecture brings its own blocks
(`DenoiseBlocks`).

What a batch is keyed on besides shapes (`Request.batch_key`) is applied before it runs, in one place
(`ImageGenerator._prepare`): its LoRA adapters are fused into the weights (`qwen_batch.adapters.fusion`), and
a row with a `scheduler_shift` samples with the model's scheduler config set to that fixed shift
(`base_shift = max_shift = ln(shift)`, `shift_terminal = None`: the Lightning recipe with 3).

Edit models (Qwen-Image-Edit, Edit-Plus) run the same loop with the input images' cached latents
appended to each row's noise tokens (`image_latents`), as `QwenImageEditPipeline` does; only the
noise tokens' prediction is kept.

Rows with a step cache (`Request.step_cache`, shared by a batch) hand each step's forwards to it
(`qwen_batch.pipeline.step_cache`), which runs or reuses the transformer's work row by row and counts each row's
full steps (`DecodedImages.steps_computed`); a batch without one calls the transformer as it always did.
"""

from qwen_batch.pipeline.denoise.decoded import DecodedImages
from qwen_batch.pipeline.denoise.generator import ImageGenerator, fixed_shift_scheduler

__all__ = ["DecodedImages", "ImageGenerator", "fixed_shift_scheduler"]
