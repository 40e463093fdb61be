//! Durable Parquet files of labelled rows.
//!
//! A file is written to `*.parquet.tmp`, fsynced, renamed into place and the
//! directory fsynced: readers never see half a file, and a file that exists
//! has all its rows. Its footer records the impression offsets it covers
//! (`adserve.offsets`), which is how a restarted joiner recognises rows it
//! already wrote but had not yet committed.

use std::{
    collections::HashMap,
    fs::File,
    path::{Path, PathBuf},
    sync::Arc,
};

use arrow::{
    array::{
        ArrayRef, AsArray, BooleanArray, Float32Array, Float32Builder, Int8Array, Int32Array, Int64Array, ListBuilder,
        RecordBatch, StringArray, StringBuilder, TimestampMillisecondArray,
    },
    datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit},
};
use parquet::{
    arrow::{ArrowWriter, ProjectionMask, arrow_reader::ParquetRecordBatchReaderBuilder},
    basic::Compression,
    file::{metadata::KeyValue, properties::WriterProperties},
};

use crate::join::{LabelledRow, millis};

/// Version of the row schema; bump on any change (see training/adserve_trainer/schema.py).
pub const SCHEMA_VERSION: &str = "2";
/// Footer key: JSON `{"partition": [min_offset, max_offset]}` of the impressions in the file.
pub const OFFSETS_KEY: &str = "adserve.offsets";

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
}

fn pq<E: std::fmt::Display>(e: E) -> SinkError {
    SinkError::Parquet(e.to_string())
}

/// The row schema. The Python trainer's `ROW_SCHEMA` mirrors it; its tests
/// read files written here.
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
        Field::new("model_version", DataType::Utf8, false),
        Field::new("pctr", DataType::Float32, false),
        Field::new("ecpm_micros", DataType::Int64, false),
        Field::new("price_cpc_micros", DataType::Int64, false),
        Field::new("advertiser_id", DataType::Int64, false),
        Field::new("price_cpm_micros", DataType::Int64, false),
        Field::new("propensity", DataType::Float32, false),
        Field::new("explored", DataType::Boolean, false),
        Field::new("feature_names", list(DataType::Utf8), false),
        Field::new("feature_values", list(DataType::Float32), false),
        Field::new("kafka_partition", DataType::Int32, false),
        Field::new("kafka_offset", DataType::Int64, false),
    ]))
}

/// Converts rows to one record batch.
pub fn to_batch(rows: &[LabelledRow]) -> Result<RecordBatch, SinkError> {
    let s = |f: fn(&LabelledRow) -> &str| Arc::new(StringArray::from_iter_values(rows.iter().map(f))) as ArrayRef;
    let ts = |v: Vec<Option<i64>>| Arc::new(TimestampMillisecondArray::from(v).with_timezone("UTC")) as ArrayRef;
    let mut names = ListBuilder::new(StringBuilder::new());
    let mut values = ListBuilder::new(Float32Builder::new());
    for r in rows {
        let f = r.event.features.clone().unwrap_or_default();
        for n in &f.names {
            names.values().append_value(n);
        }
        names.append(true);
        values.values().append_slice(&f.values);
        values.append(true);
    }
    let columns: Vec<ArrayRef> = vec![
        s(|r| &r.event.impression_id),
        s(|r| &r.event.request_id),
        s(|r| &r.event.user_id),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.event.ad_id))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.event.campaign_id))),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.event.slot as i32))),
        s(|r| &r.event.placement),
        s(|r| &r.event.device),
        s(|r| &r.event.surface),
        Arc::new(BooleanArray::from(rows.iter().map(|r| r.event.coppa).collect::<Vec<_>>())),
        ts(rows.iter().map(|r| Some(r.event.served_at.as_ref().map(millis).unwrap_or_default())).collect()),
        ts(rows.iter().map(|r| r.clicked_at.as_ref().map(millis)).collect()),
        ts(rows.iter().map(|r| Some(r.joined_at_ms)).collect()),
        Arc::new(Int8Array::from_iter_values(rows.iter().map(|r| i8::from(r.label)))),
        s(|r| &r.event.model_version),
        Arc::new(Float32Array::from_iter_values(rows.iter().map(|r| r.event.pctr))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.event.ecpm_micros))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.event.price_cpc_micros))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.event.advertiser_id))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.event.price_cpm_micros))),
        // Events from before propensities were logged carry 0: they were
        // served by rank, with probability 1.
        Arc::new(Float32Array::from_iter_values(
            rows.iter().map(|r| if r.event.propensity > 0.0 { r.event.propensity } else { 1.0 }),
        )),
        Arc::new(BooleanArray::from(rows.iter().map(|r| r.event.explored).collect::<Vec<_>>())),
        Arc::new(names.finish()),
        Arc::new(values.finish()),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.partition))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.offset))),
    ];
    RecordBatch::try_new(schema(), columns).map_err(pq)
}

/// Writes files into one directory.
#[derive(Debug)]
pub struct ParquetSink {
    dir: PathBuf,
    seq: u64,
}

impl ParquetSink {
    /// A sink writing into `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, SinkError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| SinkError::Io { path: dir.clone(), source })?;
        Ok(Self { dir, seq: 0 })
    }

    /// The output directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `rows` to a new durable file and returns its path.
    pub fn write(&mut self, rows: &[LabelledRow]) -> Result<PathBuf, SinkError> {
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
        self.seq += 1;
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
        let name = format!("rows-{stamp:013}-{:05}-{}.parquet", std::process::id() % 100_000, self.seq);
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SinkError::Io { path, source }
        };
        let file = File::create(&tmp).map_err(io(&tmp))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_key_value_metadata(Some(vec![
                KeyValue::new("adserve.schema_version".to_string(), SCHEMA_VERSION.to_string()),
                KeyValue::new(OFFSETS_KEY.to_string(), offsets),
            ]))
            .build();
        let mut writer = ArrowWriter::try_new(file, schema(), Some(props)).map_err(pq)?;
        writer.write(&batch).map_err(pq)?;
        let file = writer.into_inner().map_err(pq)?;
        file.sync_all().map_err(io(&tmp))?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
        Ok(path)
    }
}

/// Impression ids in `dir`'s files at or past `committed` offsets (per
/// impressions partition): rows written whose offsets were not committed.
/// Only file footers are read for files entirely below the committed offsets.
pub fn written_since(dir: &Path, committed: &HashMap<i32, i64>) -> Result<Vec<String>, SinkError> {
    let mut ids = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ids),
        Err(source) => return Err(SinkError::Io { path: dir.to_path_buf(), source }),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("parquet") {
            continue;
        }
        let file = File::open(&path).map_err(|source| SinkError::Io { path: path.clone(), source })?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(pq)?;
        let covered: HashMap<String, [i64; 2]> = builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .and_then(|kv| kv.iter().find(|k| k.key == OFFSETS_KEY))
            .and_then(|k| k.value.as_deref())
            .and_then(|v| serde_json::from_str(v).ok())
            .unwrap_or_default();
        let relevant = covered.iter().any(|(p, [_, hi])| {
            let p: i32 = p.parse().unwrap_or(-1);
            *hi >= committed.get(&p).copied().unwrap_or(0)
        });
        if !relevant {
            continue;
        }
        let mask =
            ProjectionMask::columns(builder.parquet_schema(), ["impression_id", "kafka_partition", "kafka_offset"]);
        for batch in builder.with_projection(mask).build().map_err(pq)? {
            let batch = batch.map_err(pq)?;
            let (Some(id), Some(part), Some(off)) = (
                batch.column_by_name("impression_id"),
                batch.column_by_name("kafka_partition"),
                batch.column_by_name("kafka_offset"),
            ) else {
                return Err(SinkError::Parquet(format!("{} lacks lineage columns", path.display())));
            };
            let (id, part, off) = (
                id.as_string::<i32>(),
                part.as_primitive::<arrow::datatypes::Int32Type>(),
                off.as_primitive::<arrow::datatypes::Int64Type>(),
            );
            for i in 0..batch.num_rows() {
                if off.value(i) >= committed.get(&part.value(i)).copied().unwrap_or(0) {
                    ids.push(id.value(i).to_string());
                }
            }
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Joiner;
    use adserve_proto::v1::{FeatureRow, ImpressionEvent};

    fn rows(n: usize) -> Vec<LabelledRow> {
        let mut j = Joiner::new(1);
        for i in 0..n {
            j.on_impression(
                ImpressionEvent {
                    impression_id: format!("imp-{i}"),
                    served_at: Some(prost_types::Timestamp { seconds: 1, nanos: 0 }),
                    features: Some(FeatureRow { names: vec!["a".into(), "b".into()], values: vec![i as f32, 0.5] }),
                    ..Default::default()
                },
                ("imps", 0),
                i as i64,
            );
        }
        j.close_windows(i64::MAX / 4, true);
        j.take_ready(n)
    }

    #[test]
    fn written_files_round_trip_features_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = ParquetSink::new(dir.path()).unwrap();
        let path = sink.write(&rows(3)).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&path).unwrap()).unwrap().build().unwrap();
        let batch = reader.into_iter().next().unwrap().unwrap();
        assert_eq!(batch.num_rows(), 3);
        let values = batch.column_by_name("feature_values").unwrap().as_list::<i32>();
        let row2 = values.value(2);
        assert_eq!(row2.as_primitive::<arrow::datatypes::Float32Type>().values(), &[2.0, 0.5]);
        assert!(!dir.path().read_dir().unwrap().any(|e| e.unwrap().path().to_string_lossy().ends_with(".tmp")));
    }

    #[test]
    fn rows_past_the_committed_offset_are_found_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = ParquetSink::new(dir.path()).unwrap();
        let all = rows(4);
        sink.write(&all[..2]).unwrap();
        sink.write(&all[2..]).unwrap();
        let mut ids = written_since(dir.path(), &HashMap::from([(0, 1)])).unwrap();
        ids.sort();
        assert_eq!(ids, vec!["imp-1", "imp-2", "imp-3"]);
        assert!(written_since(dir.path(), &HashMap::from([(0, 4)])).unwrap().is_empty());
        assert!(written_since(&dir.path().join("missing"), &HashMap::new()).unwrap().is_empty());
    }
}
