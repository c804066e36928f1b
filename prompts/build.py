"""Build the example manifests' Parquet files from their readable JSON Lines sources.

    python prompts/build.py

Each `NAME.jsonl` becomes `NAME.parquet` (`jsonl_to_parquet.py`: the columns qwen-batch knows typed as its
schema says, any other column carried as is). The edit manifests' input images in `edit/` are drawn first
(`build_edit.py`), the conditions example's in `conditions/` (`build_conditions.py`), the Qwen-Image-2.1
example's condition images in `qwen_image21/` (`build_qwen_image21.py`), and the example adapters in `loras/`
written (`build_loras.py`).
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent


if __name__ == "__main__":
    from build_conditions import draw_inputs as draw_conditions
    from build_edit import draw_inputs  # prompts/ is on the path: it is this script's folder
    from build_loras import write_adapters
    from build_qwen_image21 import draw_inputs as draw_conditions21
    from jsonl_to_parquet import build

    for path in [*draw_inputs(), *draw_conditions(), *draw_conditions21(), *write_adapters()]:
        print(f"wrote {path}")
    for source in sorted(HERE.glob("*.jsonl")):
        print(f"wrote {build(source)}")
