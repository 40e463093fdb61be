//! Durable Parquet files of labelled rows.
//!
//! The dataset is Hive-partitioned by the impression's serving time:
//! `<dir>/date=YYYY-MM-DD/hour=HH/rows-….parquet`. A file is written to
//! `*.parquet.tmp`, fsynced, renamed into place and its directory fsynced:
//! readers never see half a file, and a file that exists has all its rows.
//! If the directory fsync fails after the rename the file is taken back (the
//! rows are written again later, not twice); if even that fails the error is
//! [`SinkError::Ambiguous`] and the process must restart, which re-reads the
//! files before writing anything.
//!
//! Each file holds rows of one hour and one feature list. Its footer records
//! the feature names once (`adserve.feature_names`, and for typed features
//! `adserve.categorical_names`, `adserve.embedding_names` and
//! `adserve.embedding_dims`), the impression offsets it covers
//! (`adserve.offsets`) and the schema version. The offsets are how
//! a restarted joiner, or a partition's new owner, recognises rows already
//! written but not yet committed.

use std::{
    collections::HashMap,
    fs::File,
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
};

use arrow::{
    array::{
        ArrayRef, AsArray, BooleanArray, Float32Array, Float32Builder, Int8Array, Int32Array, Int64Array, Int64Builder,
        ListBuilder, RecordBatch, StringArray, TimestampMillisecondArray,
    },
    datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit},
};
use parquet::{
    arrow::{ArrowWriter, ProjectionMask, arrow_reader::ParquetRecordBatchReaderBuilder},
    basic::Compression,
    file::{metadata::KeyValue, properties::WriterProperties, reader::ChunkReader},
};

use crate::{
    join::{LabelledRow, RowKind, WrittenRow, millis},
    store::ObjectTarget,
};

/// Version of the row schema; bump on any change (see training/adserve_trainer/schema.py).
pub const SCHEMA_VERSION: &str = "5";
/// Footer key: the schema version.
pub const VERSION_KEY: &str = "adserve.schema_version";
/// Footer key: JSON `{"partition": [min_offset, max_offset]}` of the impressions in the file.
pub const OFFSETS_KEY: &str = "adserve.offsets";
/// Footer key: JSON list of the feature names every row's `feature_values` follows.
pub const FEATURE_NAMES_KEY: &str = "adserve.feature_names";
/// Footer key: JSON list of the categorical feature names every row's
/// `categorical_ids` follows.
pub const CATEGORICAL_NAMES_KEY: &str = "adserve.categorical_names";
/// Footer key: JSON list of the embedding feature names every row's
/// `embedding_values` holds, one after the other.
pub const EMBEDDING_NAMES_KEY: &str = "adserve.embedding_names";
/// Footer key: JSON list of their lengths.
pub const EMBEDDING_DIMS_KEY: &str = "adserve.embedding_dims";

/// A Parquet failure.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// File system.
    #[error("parquet sink {path}: {source}")]
    Io {
        /// File involved.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Encoding.
    #[error("parquet sink: {0}")]
    Parquet(String),
    /// Object storage.
    #[error("parquet sink: {0}")]
    Object(String),
    /// A file may or may not be durable, and could not be taken back:
    /// whether its rows are written is unknown until a restart reads the
    /// dataset again.
    #[error("parquet sink: {location}: {reason}")]
    Ambiguous {
        /// The file.
        location: String,
        /// What failed.
        reason: String,
    },
}

fn pq<E: std::fmt::Display>(e: E) -> SinkError {
    SinkError::Parquet(e.to_string())
}

/// The row schema. The Python trainer's `ROW_SCHEMA` mirrors it (plus the
/// per-row `feature_names` it rebuilds from the footer); its tests read
/// files written here.
pub fn schema() -> SchemaRef {
    let ts = || DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    let list = |t: DataType| DataType::List(Arc::new(Field::new_list_field(t, true)));
    Arc::new(Schema::new(vec![
        Field::new("impression_id", DataType::Utf8, false),
        Field::new("request_id", DataType::Utf8, false),
        Field::new("user_id", DataType::Utf8, false),
        Field::new("ad_id", DataType::Int64, false),
        Field::new("campaign_id", DataType::Int64, false),
        Field::new("slot", DataType::Int32, false),
        Field::new("placement", DataType::Utf8, false),
        Field::new("device", DataType::Utf8, false),
        Field::new("surface", DataType::Utf8, false),
        Field::new("coppa", DataType::Boolean, false),
        Field::new("served_at", ts(), false),
        Field::new("clicked_at", ts(), true),
        Field::new("joined_at", ts(), false),
        Field::new("label", DataType::Int8, false),
        Field::new("row_kind", DataType::Utf8, false),
        Field::new("is_final", DataType::Boolean, false),
        Field::new("weight", DataType::Float32, false),
        Field::new("keep_rate", DataType::Float32, false),
        Field::new("model_version", DataType::Utf8, false),
        Field::new("pctr", DataType::Float32, false),
        Field::new("score_level", DataType::Utf8, false),
        Field::new("ecpm_micros", DataType::Int64, false),
        Field::new("price_cpc_micros", DataType::Int64, false),
        Field::new("advertiser_id", DataType::Int64, false),
        Field::new("price_cpm_micros", DataType::Int64, false),
        Field::new("propensity", DataType::Float32, false),
        Field::new("explored", DataType::Boolean, false),
        Field::new("feature_values", list(DataType::Float32), false),
        Field::new("categorical_ids", list(DataType::Int64), false),
        Field::new("embedding_values", list(DataType::Float32), false),
        Field::new("kafka_partition", DataType::Int32, false),
        Field::new("kafka_offset", DataType::Int64, false),
    ]))
}

/// `(date, hour)` of a row's serving time, e.g. `("2026-12-01", "09")`.
pub fn hour_of(row: &LabelledRow) -> (String, String) {
    let ms = row.event.served_at.as_ref().map(millis).unwrap_or_default().max(0);
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64);
    // "YYYY-MM-DDTHH:MM:SSZ"
    let s = humantime::format_rfc3339_seconds(at).to_string();
    (s.get(..10).unwrap_or("1970-01-01").to_string(), s.get(11..13).unwrap_or("00").to_string())
}

/// Whether two rows have the same typed columns (names and lengths).
fn same_typed_columns(a: &LabelledRow, b: &LabelledRow) -> bool {
    match (&a.event.features, &b.event.features) {
        (Some(a), Some(b)) => {
            a.categorical_names == b.categorical_names
                && a.embedding_names == b.embedding_names
                && a.embedding_dims == b.embedding_dims
        }
        (a, b) => a.is_none() && b.is_none(),
    }
}

/// Whether two rows can share a file: one hour, one feature list.
fn same_file(a: &LabelledRow, b: &LabelledRow) -> bool {
    Arc::ptr_eq(&a.names, &b.names) && same_typed_columns(a, b) && hour_of(a) == hour_of(b)
}

/// Splits rows into groups a file can hold (one hour, one feature list),
/// keeping their order within each group.
pub fn groups(rows: Vec<LabelledRow>) -> Vec<Vec<LabelledRow>> {
    let mut out: Vec<Vec<LabelledRow>> = Vec::new();
    for row in rows {
        match out.iter_mut().find(|g| same_file(&g[0], &row)) {
            Some(g) => g.push(row),
            None => out.push(vec![row]),
        }
    }
    out
}

/// Converts rows to one record batch.
pub fn to_batch(rows: &[LabelledRow]) -> Result<RecordBatch, SinkError> {
    let s = |f: fn(&LabelledRow) -> &str| Arc::new(StringArray::from_iter_values(rows.iter().map(f))) as ArrayRef;
    let ts = |v: Vec<Option<i64>>| Arc::new(TimestampMillisecondArray::from(v).with_timezone("UTC")) as ArrayRef;
    let f32s = |f: fn(&LabelledRow) -> f32| Arc::new(Float32Array::from_iter_values(rows.iter().map(f))) as ArrayRef;
    let i64s = |f: fn(&LabelledRow) -> i64| Arc::new(Int64Array::from_iter_values(rows.iter().map(f))) as ArrayRef;
    let bools =
        |f: fn(&LabelledRow) -> bool| Arc::new(BooleanArray::from(rows.iter().map(f).collect::<Vec<_>>())) as ArrayRef;
    let mut values = ListBuilder::new(Float32Builder::new());
    let mut ids = ListBuilder::new(Int64Builder::new());
    let mut vectors = ListBuilder::new(Float32Builder::new());
    for r in rows {
        let f = r.event.features.as_ref();
        values.values().append_slice(f.map(|f| f.values.as_slice()).unwrap_or_default());
        values.append(true);
        ids.values().append_slice(f.map(|f| f.categorical_ids.as_slice()).unwrap_or_default());
        ids.append(true);
        vectors.values().append_slice(f.map(|f| f.embedding_values.as_slice()).unwrap_or_default());
        vectors.append(true);
    }
    let columns: Vec<ArrayRef> = vec![
        s(|r| &r.event.impression_id),
        s(|r| &r.event.request_id),
        s(|r| &r.event.user_id),
        i64s(|r| r.event.ad_id),
        i64s(|r| r.event.campaign_id),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.event.slot as i32))),
        s(|r| &r.event.placement),
        s(|r| &r.event.device),
        s(|r| &r.event.surface),
        bools(|r| r.event.coppa),
        ts(rows.iter().map(|r| Some(r.event.served_at.as_ref().map(millis).unwrap_or_default())).collect()),
        ts(rows.iter().map(|r| r.clicked_at.as_ref().map(millis)).collect()),
        ts(rows.iter().map(|r| Some(r.joined_at_ms)).collect()),
        Arc::new(Int8Array::from_iter_values(rows.iter().map(|r| i8::from(r.label)))),
        s(|r| r.kind.as_str()),
        bools(|r| r.kind == RowKind::Final),
        f32s(|r| r.weight),
        f32s(|r| r.keep_rate),
        s(|r| &r.event.model_version),
        f32s(|r| r.event.pctr),
        s(|r| adserve_proto::v1::ScoreLevel::of(r.event.score_level).label()),
        i64s(|r| r.event.ecpm_micros),
        i64s(|r| r.event.price_cpc_micros),
        i64s(|r| r.event.advertiser_id),
        i64s(|r| r.event.price_cpm_micros),
        // Events from before propensities were logged carry 0: they were
        // served by rank, with probability 1.
        f32s(|r| if r.event.propensity > 0.0 { r.event.propensity } else { 1.0 }),
        bools(|r| r.event.explored),
        Arc::new(values.finish()),
        Arc::new(ids.finish()),
        Arc::new(vectors.finish()),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.partition))),
        i64s(|r| r.offset),
    ];
    RecordBatch::try_new(schema(), columns).map_err(pq)
}

/// Where the dataset lives.
#[derive(Debug, Clone)]
pub enum Target {
    /// A local (or mounted) directory.
    Dir(PathBuf),
    /// A bucket and prefix on object storage.
    Object(ObjectTarget),
}

/// Writes files into one dataset.
#[derive(Debug)]
pub struct ParquetSink {
    target: Target,
    seq: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SinkError {
    let path = path.to_path_buf();
    move |source| SinkError::Io { path, source }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Encodes `rows` as one Parquet file into `out`.
fn encode<W: Write + Send>(out: W, rows: &[LabelledRow]) -> Result<W, SinkError> {
    let batch = to_batch(rows)?;
    let mut offsets: HashMap<i32, (i64, i64)> = HashMap::new();
    for r in rows {
        let e = offsets.entry(r.partition).or_insert((r.offset, r.offset));
        e.0 = e.0.min(r.offset);
        e.1 = e.1.max(r.offset);
    }
    let offsets: HashMap<String, [i64; 2]> =
        offsets.into_iter().map(|(p, (lo, hi))| (p.to_string(), [lo, hi])).collect();
    let offsets = serde_json::to_string(&offsets).map_err(pq)?;
    let names = rows.first().map(|r| serde_json::to_string(&*r.names)).transpose().map_err(pq)?.unwrap_or_default();
    let typed = rows.first().and_then(|r| r.event.features.clone()).unwrap_or_default();
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_key_value_metadata(Some(vec![
            KeyValue::new(VERSION_KEY.to_string(), SCHEMA_VERSION.to_string()),
            KeyValue::new(OFFSETS_KEY.to_string(), offsets),
            KeyValue::new(FEATURE_NAMES_KEY.to_string(), names),
            KeyValue::new(
                CATEGORICAL_NAMES_KEY.to_string(),
                serde_json::to_string(&typed.categorical_names).map_err(pq)?,
            ),
            KeyValue::new(EMBEDDING_NAMES_KEY.to_string(), serde_json::to_string(&typed.embedding_names).map_err(pq)?),
            KeyValue::new(EMBEDDING_DIMS_KEY.to_string(), serde_json::to_string(&typed.embedding_dims).map_err(pq)?),
        ]))
        .build();
    let mut writer = ArrowWriter::try_new(out, schema(), Some(props)).map_err(pq)?;
    writer.write(&batch).map_err(pq)?;
    writer.into_inner().map_err(pq)
}

impl ParquetSink {
    /// A sink writing below the local directory `dir` (created when the
    /// first file is written).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self::with_target(Target::Dir(dir.into()))
    }

    /// A sink writing to `target`.
    pub fn with_target(target: Target) -> Self {
        Self { target, seq: 0 }
    }

    /// The dataset's location: a directory path or an `s3://` URL.
    pub fn location(&self) -> String {
        match &self.target {
            Target::Dir(d) => d.display().to_string(),
            Target::Object(o) => o.url().to_string(),
        }
    }

    /// Creates `dir` and any missing parents, fsyncing each parent whose
    /// entries changed so the new directories survive a crash.
    fn make_dirs(dir: &Path) -> Result<(), SinkError> {
        if dir.is_dir() {
            return Ok(());
        }
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            Self::make_dirs(parent)?;
            match std::fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
                Err(e) => return Err(io(dir)(e)),
            }
            sync_dir(parent).map_err(io(parent))?;
            return Ok(());
        }
        std::fs::create_dir_all(dir).map_err(io(dir))
    }

    /// Writes `rows` (one hour, one feature list: see [`groups`]) to a new
    /// durable file and returns its location.
    pub fn write(&mut self, rows: &[LabelledRow]) -> Result<String, SinkError> {
        let Some(first) = rows.first() else { return Err(SinkError::Parquet("no rows to write".into())) };
        let hour = hour_of(first);
        if rows.iter().any(|r| !same_file(r, first)) {
            return Err(SinkError::Parquet("a file holds rows of one hour and one feature list".into()));
        }
        self.seq += 1;
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
        let name = format!("rows-{stamp:013}-{:05}-{}.parquet", std::process::id() % 100_000, self.seq);
        let partition = format!("date={}/hour={}", hour.0, hour.1);
        match &self.target {
            Target::Object(store) => {
                let bytes = encode(Vec::new(), rows)?;
                store.put(&format!("{partition}/{name}"), bytes)
            }
            Target::Dir(root) => {
                let dir = root.join(&partition);
                Self::make_dirs(&dir)?;
                let path = dir.join(&name);
                let tmp = dir.join(format!("{name}.tmp"));
                let file = File::create(&tmp).map_err(io(&tmp))?;
                let written = encode(file, rows).and_then(|file| file.sync_all().map_err(io(&tmp)));
                if let Err(e) = written {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
                if let Err(e) = std::fs::rename(&tmp, &path) {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(io(&path)(e));
                }
                if let Err(sync) = sync_dir(&dir) {
                    // Visible but maybe not durable: take it back so the rows
                    // are written again, not twice.
                    return match std::fs::remove_file(&path) {
                        Ok(()) => Err(io(&dir)(sync)),
                        Err(remove) => Err(SinkError::Ambiguous {
                            location: path.display().to_string(),
                            reason: format!("directory fsync failed ({sync}) and removing the file failed ({remove})"),
                        }),
                    };
                }
                Ok(path.display().to_string())
            }
        }
    }

    /// Rows in the dataset at or past the `committed` offsets of the given
    /// impressions partitions: rows written whose offsets were not
    /// committed, as (impression id, partition, kind). Only footers are read
    /// for files entirely below the committed offsets. A file that cannot be
    /// read is reported and skipped (the joiner never leaves half files).
    pub fn written_since(&self, committed: &HashMap<i32, i64>) -> Result<Vec<WrittenRow>, SinkError> {
        let mut found = Vec::new();
        match &self.target {
            Target::Dir(dir) => {
                for path in dataset_files(dir)? {
                    let read = File::open(&path)
                        .map_err(io(&path))
                        .and_then(|f| written_in(f, &path.display().to_string(), committed, &mut found));
                    skip_unreadable(read, &path.display().to_string());
                }
            }
            Target::Object(store) => {
                for (path, size) in store.files()? {
                    let url = store.url_of(&path);
                    let read = store.footer(&path, size).and_then(|kv| {
                        if covers(&kv, committed) {
                            written_in(store.get(&path)?, &url, committed, &mut found)
                        } else {
                            Ok(())
                        }
                    });
                    skip_unreadable(read, &url);
                }
            }
        }
        Ok(found)
    }
}

fn skip_unreadable(read: Result<(), SinkError>, location: &str) {
    if let Err(e) = read {
        metrics::counter!("adserve_label_joiner_unreadable_files_total").increment(1);
        tracing::error!(file = %location, error = %e, "cannot read a dataset file; skipping it");
    }
}

/// Every `*.parquet` file below `dir`, sorted by path.
pub fn dataset_files(dir: &Path) -> Result<Vec<PathBuf>, SinkError> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(SinkError::Io { path: d, source }),
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().and_then(|e| e.to_str()) == Some("parquet") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Whether a file's footer says it holds impressions at or past `committed`.
fn covers(footer: &HashMap<String, String>, committed: &HashMap<i32, i64>) -> bool {
    let ranges: HashMap<String, [i64; 2]> =
        footer.get(OFFSETS_KEY).and_then(|v| serde_json::from_str(v).ok()).unwrap_or_default();
    ranges.iter().any(|(p, [_, hi])| {
        let p: i32 = p.parse().unwrap_or(-1);
        committed.get(&p).is_some_and(|c| hi >= c)
    })
}

fn written_in<R: ChunkReader + 'static>(
    reader: R,
    location: &str,
    committed: &HashMap<i32, i64>,
    found: &mut Vec<WrittenRow>,
) -> Result<(), SinkError> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(reader).map_err(pq)?;
    let footer: HashMap<String, String> = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kv| kv.iter().filter_map(|k| Some((k.key.clone(), k.value.clone()?))).collect())
        .unwrap_or_default();
    if !covers(&footer, committed) {
        return Ok(());
    }
    let has_kind = builder.schema().column_with_name("row_kind").is_some();
    let mut columns = vec!["impression_id", "kafka_partition", "kafka_offset", "label"];
    if has_kind {
        columns.push("row_kind");
    }
    let mask = ProjectionMask::columns(builder.parquet_schema(), columns);
    for batch in builder.with_projection(mask).build().map_err(pq)? {
        let batch = batch.map_err(pq)?;
        let (Some(id), Some(part), Some(off)) = (
            batch.column_by_name("impression_id"),
            batch.column_by_name("kafka_partition"),
            batch.column_by_name("kafka_offset"),
        ) else {
            return Err(SinkError::Parquet(format!("{location} lacks lineage columns")));
        };
        let (id, part, off) = (
            id.as_string::<i32>(),
            part.as_primitive::<arrow::datatypes::Int32Type>(),
            off.as_primitive::<arrow::datatypes::Int64Type>(),
        );
        let kind = batch.column_by_name("row_kind").map(|k| k.as_string::<i32>().clone());
        let label = batch.column_by_name("label").map(|l| l.as_primitive::<arrow::datatypes::Int8Type>().clone());
        for i in 0..batch.num_rows() {
            let p = part.value(i);
            if committed.get(&p).is_some_and(|c| off.value(i) >= *c) {
                found.push(WrittenRow {
                    impression_id: id.value(i).to_string(),
                    partition: p,
                    // Files from before schema 3 hold final rows only.
                    kind: kind.as_ref().and_then(|k| RowKind::parse(k.value(i))).unwrap_or(RowKind::Final),
                    label: label.as_ref().is_some_and(|l| l.value(i) != 0),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::join::{JoinRules, Joiner};
    use adserve_proto::v1::{FeatureRow, ImpressionEvent};

    fn rows(n: usize) -> Vec<LabelledRow> {
        let mut j = Joiner::new(JoinRules::window(1, 0), "imps", "clicks");
        for i in 0..n {
            j.on_impression(
                ImpressionEvent {
                    impression_id: format!("imp-{i}"),
                    served_at: Some(prost_types::Timestamp { seconds: 1_764_583_200, nanos: 0 }),
                    features: Some(FeatureRow {
                        names: vec!["a".into(), "b".into()],
                        values: vec![i as f32, 0.5],
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                0,
                i as i64,
                1_764_583_200_000,
            )
            .unwrap();
        }
        j.close_all(1_764_583_300_000);
        j.take_ready(n)
    }

    #[test]
    fn written_files_round_trip_features_exactly_with_names_in_the_footer() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = ParquetSink::new(dir.path());
        let mut all = rows(3);
        // Each row's level of the fallback chain; 0 from a gateway that
        // predates the field.
        all[1].event.score_level = adserve_proto::v1::ScoreLevel::FallbackModel as i32;
        all[2].event.score_level = adserve_proto::v1::ScoreLevel::Model as i32;
        let path = PathBuf::from(sink.write(&all).unwrap());
        assert!(path.starts_with(dir.path().join("date=2025-12-01").join("hour=10")), "{}", path.display());
        let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(&path).unwrap()).unwrap();
        let kv = builder.metadata().file_metadata().key_value_metadata().unwrap().clone();
        let names = kv.iter().find(|k| k.key == FEATURE_NAMES_KEY).and_then(|k| k.value.clone()).unwrap();
        assert_eq!(names, r#"["a","b"]"#);
        let batch = builder.build().unwrap().next().unwrap().unwrap();
        assert_eq!(batch.num_rows(), 3);
        let values = batch.column_by_name("feature_values").unwrap().as_list::<i32>();
        let row2 = values.value(2);
        assert_eq!(row2.as_primitive::<arrow::datatypes::Float32Type>().values(), &[2.0, 0.5]);
        assert_eq!(batch.column_by_name("row_kind").unwrap().as_string::<i32>().value(0), "final");
        let levels = batch.column_by_name("score_level").unwrap().as_string::<i32>();
        assert_eq!((0..3).map(|i| levels.value(i)).collect::<Vec<_>>(), ["unspecified", "fallback_model", "model"]);
        assert!(dataset_files(dir.path()).unwrap().iter().all(|p| !p.to_string_lossy().ends_with(".tmp")));
    }

    #[test]
    fn typed_columns_round_trip_with_their_names_in_the_footer() {
        let mut all = rows(3);
        for (i, r) in all.iter_mut().enumerate() {
            let f = r.event.features.as_mut().unwrap();
            f.categorical_names = vec!["ctx_placement".into(), "placement_x_device".into()];
            f.categorical_ids = vec![i as i64 + 1, 40 + i as i64];
            f.embedding_names = vec!["v".into()];
            f.embedding_dims = vec![2];
            f.embedding_values = vec![i as f32, -0.5];
        }
        let dir = tempfile::tempdir().unwrap();
        let path = PathBuf::from(ParquetSink::new(dir.path()).write(&all).unwrap());
        let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(&path).unwrap()).unwrap();
        let kv = builder.metadata().file_metadata().key_value_metadata().unwrap().clone();
        let footer = |key: &str| kv.iter().find(|k| k.key == key).and_then(|k| k.value.clone()).unwrap();
        assert_eq!(footer(CATEGORICAL_NAMES_KEY), r#"["ctx_placement","placement_x_device"]"#);
        assert_eq!(footer(EMBEDDING_NAMES_KEY), r#"["v"]"#);
        assert_eq!(footer(EMBEDDING_DIMS_KEY), "[2]");
        assert_eq!(footer(VERSION_KEY), "5");
        let batch = builder.build().unwrap().next().unwrap().unwrap();
        let ids = batch.column_by_name("categorical_ids").unwrap().as_list::<i32>();
        assert_eq!(ids.value(2).as_primitive::<arrow::datatypes::Int64Type>().values(), &[3, 42]);
        let vectors = batch.column_by_name("embedding_values").unwrap().as_list::<i32>();
        assert_eq!(vectors.value(1).as_primitive::<arrow::datatypes::Float32Type>().values(), &[1.0, -0.5]);
        // Rows whose typed columns differ do not share a file.
        all[1].event.features.as_mut().unwrap().embedding_dims = vec![1];
        assert_eq!(groups(all).len(), 2);
    }

    #[test]
    fn rows_of_different_hours_or_feature_lists_go_to_different_files() {
        let mut all = rows(3);
        all[1].event.served_at = Some(prost_types::Timestamp { seconds: 1_764_583_200 + 3600, nanos: 0 });
        all[2].names = vec!["a".to_string(), "c".to_string()].into();
        let groups = groups(all.clone());
        assert_eq!(groups.len(), 3);
        let mut sink = ParquetSink::new(tempfile::tempdir().unwrap().path().join("nested"));
        assert!(sink.write(&all).is_err(), "a mixed batch is refused");
        for g in groups {
            sink.write(&g).unwrap();
        }
    }

    #[test]
    fn rows_past_the_committed_offset_are_found_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = ParquetSink::new(dir.path());
        let all = rows(4);
        sink.write(&all[..2]).unwrap();
        sink.write(&all[2..]).unwrap();
        let mut ids: Vec<String> =
            sink.written_since(&HashMap::from([(0, 1)])).unwrap().into_iter().map(|w| w.impression_id).collect();
        ids.sort();
        assert_eq!(ids, vec!["imp-1", "imp-2", "imp-3"]);
        assert!(sink.written_since(&HashMap::from([(0, 4)])).unwrap().is_empty());
        assert!(sink.written_since(&HashMap::from([(1, 0)])).unwrap().is_empty(), "other partitions only");
        let missing = ParquetSink::new(dir.path().join("missing"));
        assert!(missing.written_since(&HashMap::new()).unwrap().is_empty());
    }

    #[test]
    fn an_unreadable_file_is_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = ParquetSink::new(dir.path());
        let path = PathBuf::from(sink.write(&rows(2)).unwrap());
        std::fs::write(path.with_file_name("garbage.parquet"), b"not parquet").unwrap();
        assert_eq!(sink.written_since(&HashMap::from([(0, 0)])).unwrap().len(), 2);
    }

    #[test]
    fn an_output_dir_that_cannot_be_created_is_a_clear_error_and_leaves_nothing_behind() {
        // A regular file where the dataset directory should be: refused even
        // for root, unlike a permission bit.
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("rows");
        std::fs::write(&blocker, b"a file, not a directory").unwrap();
        let err = ParquetSink::new(&blocker).write(&rows(1)).unwrap_err();
        assert!(err.to_string().contains("rows"), "{err}");
        assert_eq!(std::fs::read(&blocker).unwrap(), b"a file, not a directory");
    }
}
