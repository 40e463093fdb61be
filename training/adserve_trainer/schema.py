"""The training-row schema written by the label-joiner: the ONE definition in Python.

Both the synthetic generator and input validation use ``ROW_SCHEMA``.
"""

from __future__ import annotations

import pyarrow as pa

from . import TrainerError

_TS = pa.timestamp("ms", tz="UTC")

ROW_SCHEMA = pa.schema(
    [
        pa.field("impression_id", pa.string(), nullable=False),
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),  # "" for COPPA requests
        pa.field("ad_id", pa.int64(), nullable=False),
        pa.field("campaign_id", pa.int64(), nullable=False),
        pa.field("slot", pa.int32(), nullable=False),
        pa.field("placement", pa.string(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
        pa.field("surface", pa.string(), nullable=False),
        pa.field("coppa", pa.bool_(), nullable=False),
        pa.field("served_at", _TS, nullable=False),
        pa.field("clicked_at", _TS, nullable=True),
        pa.field("joined_at", _TS, nullable=False),
        pa.field("label", pa.int8(), nullable=False),  # 1 clicked within the label window
        # "final" (is_final: the label once the window closed), or in the
        # joiner's streaming mode "provisional" (a negative written at
        # impression time, with reduced weight) and "correction" (a positive
        # written when the click arrived). Train on final rows unless you
        # model the delay yourself.
        pa.field("row_kind", pa.string(), nullable=False),
        pa.field("is_final", pa.bool_(), nullable=False),
        pa.field("weight", pa.float32(), nullable=False),
        # Share of negatives the joiner kept (negative downsampling); the
        # ranker's manifest carries it to correct pCTR: p / (p + (1 - p) / r).
        pa.field("keep_rate", pa.float32(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("pctr", pa.float32(), nullable=False),
        # Which level of the ranker's fallback chain produced pctr: "model",
        # "fallback_model" or "prior" ("unspecified": a gateway that predates
        # the field). The label is real whatever the level, so the trainer
        # keeps every row; it counts them by level in report.json.
        pa.field("score_level", pa.string(), nullable=False),
        pa.field("ecpm_micros", pa.int64(), nullable=False),
        pa.field("price_cpc_micros", pa.int64(), nullable=False),
        pa.field("advertiser_id", pa.int64(), nullable=False),
        pa.field("price_cpm_micros", pa.int64(), nullable=False),  # CPM winners; 0 for CPC
        # P(this ad in this slot | slots above); 1 unless the slot was explored.
        # Weight a row by 1 / propensity to correct for exploration.
        pa.field("propensity", pa.float32(), nullable=False),
        pa.field("explored", pa.bool_(), nullable=False),
        # The exact row the ranker scored; names and values are aligned.
        # Schema-3 files store the names once, in the footer key
        # FEATURE_NAMES_KEY; data.load_rows rebuilds this column from it.
        pa.field("feature_names", pa.list_(pa.string()), nullable=False),
        pa.field("feature_values", pa.list_(pa.float32()), nullable=False),
        # Typed features (registry type "categorical" / "embedding"), served
        # beside the dense row: bucket ids aligned with categorical_names;
        # embeddings one after the other, embedding_dims long each. Schema-4
        # files store the names and dims once, in the footer keys below.
        pa.field("categorical_names", pa.list_(pa.string()), nullable=False),
        pa.field("categorical_ids", pa.list_(pa.int64()), nullable=False),
        pa.field("embedding_names", pa.list_(pa.string()), nullable=False),
        pa.field("embedding_dims", pa.list_(pa.int32()), nullable=False),
        pa.field("embedding_values", pa.list_(pa.float32()), nullable=False),
    ]
)

# Columns added in schema version 2 (issue 8), with the value a version-1 file
# means: every ad was placed by rank (propensity 1), CPC-priced, advertiser
# unknown (0). Older files are read with these filled in, not refused.
ADDED_IN_V2 = {
    "advertiser_id": 0,
    "price_cpm_micros": 0,
    "propensity": 1.0,
    "explored": False,
}

# Columns added in schema version 3 (issue 7), with what older files mean:
# every row was a final, unweighted row, without downsampling.
ADDED_IN_V3 = {
    "row_kind": "final",
    "is_final": True,
    "weight": 1.0,
    "keep_rate": 1.0,
}

# Columns added in schema version 4 (issue 10, typed features): older rows
# carried none.
ADDED_IN_V4 = {
    "categorical_names": [],
    "categorical_ids": [],
    "embedding_names": [],
    "embedding_dims": [],
    "embedding_values": [],
}

# Columns added in schema version 5: older files did not record the level of
# the fallback chain that scored a row.
ADDED_IN_V5 = {
    "score_level": "unspecified",
}

# Defaults for every column an older file may lack.
DEFAULTS_FOR_OLDER_FILES = {**ADDED_IN_V2, **ADDED_IN_V3, **ADDED_IN_V4, **ADDED_IN_V5}

# Footer key holding a schema-3 file's feature names (JSON list).
FEATURE_NAMES_KEY = b"adserve.feature_names"
# Footer keys of a schema-4 file's typed columns (JSON lists), by the per-row
# column each one rebuilds.
TYPED_FOOTER_KEYS = {
    "categorical_names": b"adserve.categorical_names",
    "embedding_names": b"adserve.embedding_names",
    "embedding_dims": b"adserve.embedding_dims",
}

# Columns the trainer actually reads (all of ROW_SCHEMA is still validated).
TRAINING_COLUMNS = ("label", "feature_names", "feature_values")

_UTC = {"UTC", "utc", "+00:00", "Etc/UTC", "Z"}


def _compatible(expected: pa.DataType, got: pa.DataType) -> bool:
    """Type equality modulo physical encodings other Arrow writers may choose."""
    if expected.equals(got):
        return True
    if pa.types.is_string(expected):
        return pa.types.is_string(got) or pa.types.is_large_string(got) or pa.types.is_string_view(got)
    if pa.types.is_timestamp(expected):
        # Any unit is fine; the instant must be UTC.
        return pa.types.is_timestamp(got) and got.tz in _UTC
    if pa.types.is_list(expected):
        # Parquet round-trips may rename the item field ("item" vs "element").
        if pa.types.is_list(got) or pa.types.is_large_list(got) or pa.types.is_list_view(got):
            return _compatible(expected.value_type, got.value_type)
        return False
    return False


def validate_schema(schema: pa.Schema, source: str = "input") -> None:
    """Raise TrainerError naming the first missing or mistyped column."""
    names = set(schema.names)
    for field in ROW_SCHEMA:
        if field.name not in names and field.name in DEFAULTS_FOR_OLDER_FILES:
            continue
        if field.name not in names:
            raise TrainerError(f"{source}: schema mismatch: missing column '{field.name}' ({field.type})")
        got = schema.field(field.name).type
        if not _compatible(field.type, got):
            raise TrainerError(
                f"{source}: schema mismatch: column '{field.name}' has type {got}, expected {field.type}"
            )


def conform(table: pa.Table, source: str = "input") -> pa.Table:
    """Validate ``table`` and return it with exactly ROW_SCHEMA's columns and types."""
    validate_schema(table.schema, source)
    for name in TRAINING_COLUMNS:
        nulls = table.column(name).null_count
        if nulls:
            raise TrainerError(f"{source}: column '{name}' has {nulls} null value(s)")
    n = table.num_rows
    columns = [
        table.column(f.name).cast(f.type)
        if f.name in table.schema.names
        else pa.array([DEFAULTS_FOR_OLDER_FILES[f.name]] * n, f.type)
        for f in ROW_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=ROW_SCHEMA)
