"""Build the example manifests' Parquet files from their readable JSON Lines sources.

    python prompts/build.py

Each `NAME.jsonl` becomes `NAME.parquet`, with the columns qwen-batch knows typed as its schema says
(`qwen_batch.manifest.MANIFEST_SCHEMA`, plus the edit manifests' `image` and `images`) and any other
column (here `category`) carried as is. The edit manifests' input images in `edit/` are drawn first
(`build_edit.py`), the conditions example's in `conditions/` (`build_conditions.py`), and the example
adapters in `loras/` written (`build_loras.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from qwen_batch.manifest import MANIFEST_SCHEMA

HERE = Path(__file__).parent


def build(source: Path) -> Path:
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    names = list(dict.fromkeys(name for row in rows for name in row))
    known = {field.name: field.type for field in MANIFEST_SCHEMA}
    known |= {"image": pa.string(), "images": pa.list_(pa.string())}  # edit manifests' input images
    columns = {name: pa.array([row.get(name) for row in rows], type=known.get(name)) for name in names}
    target = source.with_suffix(".parquet")
    pq.write_table(pa.table(columns), target)
    return target


if __name__ == "__main__":
    from build_conditions import draw_inputs as draw_conditions
    from build_edit import draw_inputs  # prompts/ is on the path: it is this script's folder
    from build_loras import write_adapters

    for path in [*draw_inputs(), *draw_conditions(), *write_adapters()]:
        print(f"wrote {path}")
    for source in sorted(HERE.glob("*.jsonl")):
        print(f"wrote {build(source)}")
