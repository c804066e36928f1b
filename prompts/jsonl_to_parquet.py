"""Turn an example manifest's readable JSON Lines source into its Parquet file.

`build.py` (every manifest) and `build_edit.py` (the edit manifests) both use it; it imports neither.
Each `NAME.jsonl` becomes `NAME.parquet`, with the columns qwen-batch knows typed as its schema says
(`qwen_batch.manifest.MANIFEST_SCHEMA`, plus the edit manifests' `image` and `images`) and any other
column (here `category`) carried as is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from qwen_batch.manifest import MANIFEST_SCHEMA


def build(source: Path) -> Path:
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    names = list(dict.fromkeys(name for row in rows for name in row))
    known = {field.name: field.type for field in MANIFEST_SCHEMA}
    known |= {"image": pa.string(), "images": pa.list_(pa.string())}  # edit manifests' input images
    columns = {name: pa.array([row.get(name) for row in rows], type=known.get(name)) for name in names}
    target = source.with_suffix(".parquet")
    pq.write_table(pa.table(columns), target)
    return target
