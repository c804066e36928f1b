"""What a run writes for each generated row: the image file in its format (png, webp, jpeg) with its parameters and
AI-generated marks (IPTC XMP, optional C2PA content credentials), and where it goes (one file per row, or
WebDataset / Parquet shards published atomically)."""
