"""Arrow schemas of the per-shard manifest and error tables (Parquet on disk).

One manifest row per written target: which corpus sample (key, shard, row) it
belongs to, the sha256 of the image bytes it was computed from, and the spec
fingerprint of the teacher that made it. One error row per sample that was not
written, with the pipeline stage that failed and why. For every (teacher, shard):
corpus samples = manifest rows + error rows.
"""

from __future__ import annotations

import pyarrow as pa

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("row", pa.int32(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("teacher", pa.string(), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),
    ],
    metadata={b"olavlm": b"manifest"},
)

ERROR_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("teacher", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ],
    metadata={b"olavlm": b"errors"},
)

ERROR_STAGES = ("read", "decode", "preprocess", "teacher", "write")
NO_IMAGE = "no image file in sample"
"""The reason (its start) of a text-only sample's error row: no image, so no teacher target."""
