//! Batch materialization: load batch features from a Parquet file into the
//! DynamoDB batch tier (`adservectl features backfill`).
//!
//! The file is the batch pipeline's output, and also what the trainer's
//! point-in-time retrieval (`adserve_trainer.offline`) reads, so online and
//! offline values come from one source. Its columns:
//!
//! - the entity key: `user_id` (string) or `ad_id` (integer, or a string
//!   holding one);
//! - `event_timestamp`: when the values became true (a timestamp of any
//!   unit, or int64 epoch milliseconds);
//! - one column per batch attribute the registry declares for the entity
//!   (every one of them: an item is written whole), null where the pipeline
//!   has no value (the feature is then served as its default): numeric for
//!   dense features, a string for categoricals (the raw value, hashed when
//!   served), a list of numbers `dim` long for embeddings.
//!
//! An entity may have many rows (a history); the latest `event_timestamp`
//! is what DynamoDB gets, the last such row in file order on a tie. The
//! item also records that time as `as_of` (epoch ms).
//!
//! **Idempotent.** Rows are written with BatchWriteItem puts keyed by the
//! entity: loading a file twice leaves the same table.
//!
//! **Resumable.** Progress is kept in a checkpoint file (row groups done,
//! with the input's size and modification time). A run that is killed
//! resumes at the first row group not done; the row group in flight is
//! written again, which the puts make harmless. A changed input starts over.
//!
//! The file is read twice: once for the keys and times only (columnar, to
//! find each entity's latest row; memory is one entry per distinct entity),
//! then row group by row group for the values.

use std::{
    collections::{BTreeSet, HashMap},
    fs::File,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use adserve_features::{Entity, FeatureRegistry};
use arrow::{
    array::{Array, AsArray, RecordBatch},
    compute::cast,
    datatypes::{DataType, Float32Type, Int64Type, TimeUnit},
};
use parquet::arrow::{
    ProjectionMask,
    arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder},
};
use serde::{Deserialize, Serialize};

use crate::{
    BatchStore,
    batch::{BatchRow, Column, stored_attributes},
};

/// The event-time column every backfill file carries.
pub const EVENT_TIMESTAMP: &str = "event_timestamp";

/// Why a backfill cannot run or stopped.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    /// The input is not a usable backfill file; names the column or row.
    #[error("{path}: {why}")]
    Input {
        /// The input file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// DynamoDB refused or failed a write (after its retries).
    #[error(transparent)]
    Store(#[from] crate::batch::BatchError),
    /// The checkpoint file cannot be read or written.
    #[error("checkpoint {path}: {why}")]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What failed.
        why: String,
    },
}

/// One entity's winning row: its key, its time and where it is.
#[derive(Debug, Clone)]
struct Winner {
    event_ms: i64,
    group: usize,
    row: usize,
}

/// What a file will write, found by the first (keys and times) pass.
#[derive(Debug)]
pub struct Plan {
    path: PathBuf,
    entity: Entity,
    key: &'static str,
    /// `(parquet root column index, DynamoDB attribute, what it holds)`.
    attributes: Vec<(usize, String, Column)>,
    key_index: usize,
    time_index: usize,
    /// Per row group, the in-group offsets of winning rows, ascending.
    winners: Vec<Vec<usize>>,
    /// The file's footer, read once: every row-group reader starts from it.
    metadata: ArrowReaderMetadata,
    /// Rows in the file.
    pub rows: usize,
    /// Distinct entities (the items the backfill writes).
    pub entities: usize,
    fingerprint: Fingerprint,
}

impl Column {
    fn accepts(self, t: &DataType) -> bool {
        match self {
            Self::Number => t.is_numeric(),
            Self::Text => matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View),
            Self::Vector(_) => match t {
                DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
                    f.data_type().is_numeric()
                }
                _ => false,
            },
        }
    }

    fn describe(self) -> String {
        match self {
            Self::Number => "numeric".into(),
            Self::Text => "a string (a categorical's raw value)".into(),
            Self::Vector(dim) => format!("a list of {dim} numbers (an embedding)"),
        }
    }
}

/// The input as the checkpoint remembers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Fingerprint {
    size: u64,
    modified_ns: u128,
    entity: String,
    table: String,
}

/// The checkpoint document.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Checkpoint {
    fingerprint: Option<Fingerprint>,
    done: BTreeSet<usize>,
    complete: bool,
}

/// How a backfill run went.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Items written by this run.
    pub written: usize,
    /// Row groups this run skipped because an earlier run finished them.
    pub groups_skipped: usize,
    /// Row groups in the file.
    pub groups: usize,
    /// Whether the run found the checkpoint already complete and wrote nothing.
    pub already_complete: bool,
}

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where progress is kept (default: the input's path + `.checkpoint.json`).
    pub checkpoint: PathBuf,
    /// Ignore the checkpoint and write everything again.
    pub restart: bool,
    /// Items per second at most (0: no limit), to spare a table's provisioned
    /// write capacity while it serves.
    pub max_items_per_second: u32,
    /// BatchWriteItem calls in flight.
    pub concurrency: usize,
}

impl Options {
    /// Defaults for `input`.
    pub fn for_input(input: &Path) -> Self {
        let mut checkpoint = input.as_os_str().to_owned();
        checkpoint.push(".checkpoint.json");
        Self { checkpoint: checkpoint.into(), restart: false, max_items_per_second: 0, concurrency: 8 }
    }
}

fn input_err(path: &Path, why: impl Into<String>) -> BackfillError {
    BackfillError::Input { path: path.to_path_buf(), why: why.into() }
}

/// Reads the file's schema and its keys and times, and finds each entity's
/// latest row. Refuses a file whose columns are not the entity's batch
/// attributes, or with an empty or malformed key or a null time, naming
/// the column and row.
pub fn plan(path: &Path, entity: Entity, registry: &FeatureRegistry) -> Result<Plan, BackfillError> {
    let (key, table) = match entity {
        Entity::User => (crate::batch::USER_KEY, registry.tables.user.clone()),
        Entity::Ad => (crate::batch::AD_KEY, registry.tables.ad.clone()),
        Entity::Context => return Err(input_err(path, "context features are not stored; backfill user or ad")),
    };
    let file = File::open(path).map_err(|e| input_err(path, e.to_string()))?;
    let meta = file.metadata().map_err(|e| input_err(path, e.to_string()))?;
    let fingerprint = Fingerprint {
        size: meta.len(),
        modified_ns: meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos()),
        entity: format!("{entity:?}").to_lowercase(),
        table,
    };
    let metadata = ArrowReaderMetadata::load(&file, ArrowReaderOptions::default())
        .map_err(|e| input_err(path, format!("not Parquet: {e}")))?;
    let schema = metadata.schema().clone();
    let columns = stored_attributes(registry, entity);
    let wanted: Vec<String> = columns.keys().cloned().collect();
    let (mut key_index, mut time_index, mut attributes) = (None, None, Vec::new());
    for (i, field) in schema.fields().iter().enumerate() {
        let name = field.name().as_str();
        if name == key {
            key_index = Some(i);
        } else if name == EVENT_TIMESTAMP {
            if !matches!(field.data_type(), DataType::Timestamp(..) | DataType::Int64) {
                return Err(input_err(
                    path,
                    format!("column {EVENT_TIMESTAMP}: a timestamp or int64 epoch ms, not {}", field.data_type()),
                ));
            }
            time_index = Some(i);
        } else if let Some(&column) = columns.get(name) {
            if !column.accepts(field.data_type()) {
                return Err(input_err(
                    path,
                    format!("column {name}: {}, not {}", column.describe(), field.data_type()),
                ));
            }
            attributes.push((i, name.to_string(), column));
        } else {
            return Err(input_err(
                path,
                format!(
                    "column {name}: not a batch attribute of {} features (they are: {})",
                    fingerprint.entity,
                    wanted.join(", ")
                ),
            ));
        }
    }
    let key_index = key_index.ok_or_else(|| input_err(path, format!("no {key} column")))?;
    let time_index = time_index.ok_or_else(|| input_err(path, format!("no {EVENT_TIMESTAMP} column")))?;
    let missing: Vec<&str> =
        wanted.iter().filter(|a| !attributes.iter().any(|(_, n, _)| n == *a)).map(String::as_str).collect();
    if !missing.is_empty() {
        return Err(input_err(
            path,
            format!(
                "missing columns {} (an item is written whole: give every batch attribute, null where unknown)",
                missing.join(", ")
            ),
        ));
    }

    let groups = metadata.metadata().num_row_groups();
    let mask = ProjectionMask::roots(metadata.parquet_schema(), [key_index, time_index]);
    let mut latest: HashMap<String, Winner> = HashMap::new();
    let mut rows = 0usize;
    for group in 0..groups {
        let reader = reader_for(path, &metadata)?
            .with_row_groups(vec![group])
            .with_projection(mask.clone())
            .build()
            .map_err(|e| input_err(path, e.to_string()))?;
        let mut offset = 0usize;
        for batch in reader {
            let batch = batch.map_err(|e| input_err(path, e.to_string()))?;
            let keys = keys(path, entity, key, batch.column(0), rows)?;
            let times = times(path, batch.column(1), rows)?;
            for (i, (k, t)) in keys.into_iter().zip(times).enumerate() {
                let w = Winner { event_ms: t, group, row: offset + i };
                match latest.get_mut(&k) {
                    Some(cur) if cur.event_ms > t => {}
                    Some(cur) => *cur = w,
                    None => {
                        latest.insert(k, w);
                    }
                }
            }
            offset += batch.num_rows();
            rows += batch.num_rows();
        }
    }
    let mut winners = vec![Vec::new(); groups];
    for w in latest.values() {
        winners[w.group].push(w.row);
    }
    for g in &mut winners {
        g.sort_unstable();
    }
    Ok(Plan {
        path: path.to_path_buf(),
        entity,
        key,
        attributes,
        key_index,
        time_index,
        winners,
        rows,
        entities: latest.len(),
        fingerprint,
        metadata,
    })
}

/// `v`, unless it is not finite (DynamoDB cannot store it): refused, naming
/// the column and row.
fn finite(path: &Path, name: &str, row: usize, v: f32) -> Result<f32, BackfillError> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(input_err(path, format!("column {name}, row {row}: {v} is not a finite f32")))
    }
}

/// A reader of `path` over its already-read footer.
fn reader_for(
    path: &Path,
    metadata: &ArrowReaderMetadata,
) -> Result<ParquetRecordBatchReaderBuilder<File>, BackfillError> {
    let file = File::open(path).map_err(|e| input_err(path, e.to_string()))?;
    Ok(ParquetRecordBatchReaderBuilder::new_with_metadata(file, metadata.clone()))
}

/// The keys of one batch as DynamoDB strings; refuses an empty, null or
/// (for ads) non-positive or non-numeric key, naming the row.
fn keys(
    path: &Path,
    entity: Entity,
    key: &str,
    col: &dyn Array,
    first_row: usize,
) -> Result<Vec<String>, BackfillError> {
    let bad = |i: usize, why: &str| input_err(path, format!("column {key}, row {}: {why}", first_row + i));
    let as_int = matches!(
        col.data_type(),
        DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
            | DataType::UInt64
    );
    let text = cast(col, if as_int { &DataType::Int64 } else { &DataType::Utf8 })
        .map_err(|e| input_err(path, format!("column {key}: {e}")))?;
    let mut out = Vec::with_capacity(col.len());
    for i in 0..col.len() {
        if text.is_null(i) {
            return Err(bad(i, "null"));
        }
        let id = if as_int {
            text.as_primitive::<Int64Type>().value(i).to_string()
        } else {
            text.as_string::<i32>().value(i).to_string()
        };
        match entity {
            Entity::Ad if !id.parse::<i64>().is_ok_and(|n| n > 0) => {
                return Err(bad(i, "an ad id is a positive integer"));
            }
            // The request contract's user id rules: what GetFeatures accepts.
            Entity::User => {
                if let Err(e) = adserve_features::request::check_user_id(&id, false) {
                    return Err(bad(i, if id.is_empty() { "empty" } else { &e.why }));
                }
            }
            _ => {}
        }
        out.push(id);
    }
    Ok(out)
}

/// Epoch milliseconds of one batch's times; refuses a null.
fn times(path: &Path, col: &dyn Array, first_row: usize) -> Result<Vec<i64>, BackfillError> {
    let ms = match col.data_type() {
        DataType::Int64 => cast(col, &DataType::Int64),
        _ => cast(col, &DataType::Timestamp(TimeUnit::Millisecond, None)).and_then(|c| cast(&c, &DataType::Int64)),
    }
    .map_err(|e| input_err(path, format!("column {EVENT_TIMESTAMP}: {e}")))?;
    let ms = ms.as_primitive::<Int64Type>();
    if let Some(i) = (0..ms.len()).find(|i| ms.is_null(*i)) {
        return Err(input_err(path, format!("column {EVENT_TIMESTAMP}, row {}: null", first_row + i)));
    }
    Ok(ms.values().to_vec())
}

impl Plan {
    /// Row groups in the file.
    pub fn groups(&self) -> usize {
        self.winners.len()
    }

    /// Items a full run writes from row group `g`.
    pub fn items_in(&self, g: usize) -> usize {
        self.winners[g].len()
    }

    /// The winning rows of one row group, ready to write. A value is the
    /// column's number as f32 (what the feature-service reads back); a
    /// null is left out of the item; a value that is not finite is refused
    /// (DynamoDB cannot store it), naming the column and row.
    fn rows_of(&self, group: usize) -> Result<Vec<BatchRow>, BackfillError> {
        let path = &self.path;
        let builder = reader_for(path, &self.metadata)?;
        let mut roots = vec![self.key_index, self.time_index];
        roots.extend(self.attributes.iter().map(|(i, ..)| *i));
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots.iter().copied());
        let reader = builder
            .with_row_groups(vec![group])
            .with_projection(mask)
            .build()
            .map_err(|e| input_err(path, e.to_string()))?;
        // The projection keeps the file's column order; find each by name.
        let wanted = &self.winners[group];
        let mut out = Vec::with_capacity(wanted.len());
        let (mut offset, mut next) = (0usize, 0usize);
        for batch in reader {
            let batch: RecordBatch = batch.map_err(|e| input_err(path, e.to_string()))?;
            let n = batch.num_rows();
            let col = |name: &str| batch.column_by_name(name).expect("projected column").clone();
            let keys = keys(path, self.entity, self.key, col(self.key).as_ref(), offset)?;
            let times = times(path, col(EVENT_TIMESTAMP).as_ref(), offset)?;
            // Numbers as f32 (what the feature-service reads back), strings
            // as UTF-8, vectors as lists of f32.
            let vector_type =
                DataType::List(std::sync::Arc::new(arrow::datatypes::Field::new_list_field(DataType::Float32, true)));
            let values = self
                .attributes
                .iter()
                .map(|(_, name, column)| {
                    let to = match column {
                        Column::Number => DataType::Float32,
                        Column::Text => DataType::Utf8,
                        Column::Vector(_) => vector_type.clone(),
                    };
                    cast(col(name).as_ref(), &to)
                        .map(|c| (name, *column, c))
                        .map_err(|e| input_err(path, format!("column {name}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            while next < wanted.len() && wanted[next] < offset + n {
                let i = wanted[next] - offset;
                let mut row = BatchRow { id: keys[i].clone(), as_of_ms: Some(times[i]), ..Default::default() };
                for (name, column, c) in &values {
                    if c.is_null(i) {
                        continue;
                    }
                    let at = offset + i;
                    match column {
                        Column::Number => {
                            let v = c.as_primitive::<Float32Type>().value(i);
                            row.values.insert(name.to_string(), finite(path, name, at, v)?);
                        }
                        Column::Text => {
                            row.text.insert(name.to_string(), c.as_string::<i32>().value(i).to_string());
                        }
                        Column::Vector(dim) => {
                            let list = c.as_list::<i32>().value(i);
                            let list = list.as_primitive::<Float32Type>();
                            if list.len() != *dim as usize || list.null_count() > 0 {
                                return Err(input_err(
                                    path,
                                    format!(
                                        "column {name}, row {at}: {} numbers ({} null), the embedding has {dim}",
                                        list.len(),
                                        list.null_count()
                                    ),
                                ));
                            }
                            let v =
                                list.values().iter().map(|x| finite(path, name, at, *x)).collect::<Result<_, _>>()?;
                            row.vectors.insert(name.to_string(), v);
                        }
                    }
                }
                out.push(row);
                next += 1;
            }
            offset += n;
        }
        Ok(out)
    }
}

fn load_checkpoint(path: &Path) -> Result<Checkpoint, BackfillError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| BackfillError::Checkpoint {
            path: path.to_path_buf(),
            why: format!("unreadable ({e}); delete it or pass --restart"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Checkpoint::default()),
        Err(e) => Err(BackfillError::Checkpoint { path: path.to_path_buf(), why: e.to_string() }),
    }
}

/// Writes the checkpoint durably: a temporary file, fsync, rename.
fn save_checkpoint(path: &Path, cp: &Checkpoint) -> Result<(), BackfillError> {
    let fail = |e: std::io::Error| BackfillError::Checkpoint { path: path.to_path_buf(), why: e.to_string() };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        use std::io::Write as _;
        let mut f = File::create(&tmp).map_err(fail)?;
        f.write_all(&serde_json::to_vec_pretty(cp).expect("serializable")).map_err(fail)?;
        f.sync_all().map_err(fail)?;
    }
    std::fs::rename(&tmp, path).map_err(fail)
}

/// Runs `plan` against `store`: every row group not done, its winning rows
/// in BatchWriteItem chunks, `concurrency` in flight, at most
/// `max_items_per_second`; the checkpoint is saved after each row group.
/// For ads the table's version item is bumped at the end, so serving
/// processes reload their in-process copy. `progress` is told the items of
/// each finished row group.
pub async fn run(
    plan: &Plan,
    store: &BatchStore,
    options: &Options,
    mut progress: impl FnMut(usize),
) -> Result<Outcome, BackfillError> {
    let mut cp = if options.restart { Checkpoint::default() } else { load_checkpoint(&options.checkpoint)? };
    if cp.fingerprint.as_ref() != Some(&plan.fingerprint) {
        if cp.fingerprint.is_some() {
            tracing::warn!(checkpoint = %options.checkpoint.display(), "the input or target changed since the checkpoint; starting over");
        }
        cp = Checkpoint { fingerprint: Some(plan.fingerprint.clone()), ..Checkpoint::default() };
    }
    let mut outcome = Outcome { groups: plan.groups(), ..Outcome::default() };
    if cp.complete {
        outcome.already_complete = true;
        outcome.groups_skipped = plan.groups();
        return Ok(outcome);
    }
    save_checkpoint(&options.checkpoint, &cp)?;
    let started = Instant::now();
    for group in 0..plan.groups() {
        if cp.done.contains(&group) {
            outcome.groups_skipped += 1;
            progress(plan.items_in(group));
            continue;
        }
        let rows = plan.rows_of(group)?;
        for wave in rows.chunks(crate::batch::BATCH_WRITE_LIMIT * options.concurrency.max(1)) {
            let writes = wave.chunks(crate::batch::BATCH_WRITE_LIMIT).map(|chunk| store.put_rows(plan.entity, chunk));
            futures::future::try_join_all(writes).await?;
            outcome.written += wave.len();
            if options.max_items_per_second > 0 {
                // Hold the average rate: sleep until the items so far are due.
                let due = Duration::from_secs_f64(outcome.written as f64 / f64::from(options.max_items_per_second));
                if let Some(ahead) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(ahead).await;
                }
            }
        }
        cp.done.insert(group);
        save_checkpoint(&options.checkpoint, &cp)?;
        progress(rows.len());
    }
    if plan.entity == Entity::Ad {
        store.bump_ad_version().await?;
    }
    cp.complete = true;
    save_checkpoint(&options.checkpoint, &cp)?;
    Ok(outcome)
}

/// Epoch milliseconds now (for callers stamping files).
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::{
        array::{Float64Array, Int64Array, StringArray, TimestampMillisecondArray},
        datatypes::{Field, Schema},
    };
    use parquet::{arrow::ArrowWriter, file::properties::WriterProperties};

    use adserve_features::Source;

    use super::*;

    fn user_attrs() -> Vec<String> {
        let r = adserve_features::registry();
        let set: BTreeSet<String> =
            r.select(Entity::User, Source::Dynamodb).map(|(_, f)| f.attribute.clone()).collect();
        set.into_iter().collect()
    }

    /// The registry's user attributes stored as strings (categoricals): the
    /// files below give them as null string columns.
    fn user_text_attrs() -> Vec<String> {
        crate::batch::stored_attributes(adserve_features::registry(), Entity::User)
            .into_iter()
            .filter_map(|(a, c)| (c == crate::batch::Column::Text).then_some(a))
            .collect()
    }

    /// Null string columns for [`user_text_attrs`], `rows` long.
    fn null_text_columns(fields: &mut Vec<Field>, columns: &mut Vec<Arc<dyn Array>>, rows: usize) {
        for a in user_text_attrs() {
            fields.push(Field::new(a, DataType::Utf8, true));
            columns.push(Arc::new(StringArray::from(vec![None::<&str>; rows])));
        }
    }

    /// A user file: `(id, ms, value for every attribute)`, `rows_per_group` rows per row group.
    fn write_users(path: &Path, rows: &[(&str, i64, Option<f64>)], rows_per_group: usize) {
        let attrs = user_attrs();
        let mut fields = vec![Field::new("user_id", DataType::Utf8, false)];
        fields.push(Field::new(EVENT_TIMESTAMP, DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())), false));
        fields.extend(attrs.iter().map(|a| Field::new(a, DataType::Float64, true)));
        let mut columns: Vec<Arc<dyn Array>> = vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.1)).with_timezone("UTC")),
        ];
        for _ in &attrs {
            columns.push(Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.2))));
        }
        null_text_columns(&mut fields, &mut columns, rows.len());
        let schema = Arc::new(Schema::new(fields));
        let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
        let props = WriterProperties::builder().set_max_row_group_row_count(Some(rows_per_group)).build();
        let mut w = ArrowWriter::try_new(File::create(path).unwrap(), schema, Some(props)).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    /// The embedded registry plus a user categorical (`segment`) and a
    /// user embedding (`vec`, 3 long) from the batch tier.
    fn typed_registry() -> &'static FeatureRegistry {
        let extra = |body: &str| {
            format!(
                "\n[[feature]]\n{body}entity = \"user\"\nsource = \"dynamodb\"\ndescription = \"t\"\nowner = \"t\"\n"
            )
        };
        let text = format!(
            "{}{}{}",
            adserve_features::REGISTRY_TOML,
            extra(
                "name = \"user_segment\"\nattribute = \"segment\"\ntype = \"categorical\"\nbuckets = 10\ndefault = 0\n"
            ),
            extra("name = \"user_vec\"\nattribute = \"vec\"\ntype = \"embedding\"\ndim = 3\ndefault = 0.0\n"),
        );
        Box::leak(Box::new(FeatureRegistry::parse(&text).expect("valid")))
    }

    /// One typed user row: id, segment, vec (`None` elements are nulls).
    type TypedUser<'a> = (&'a str, Option<&'a str>, Option<Vec<Option<f32>>>);

    /// A typed user file, dense attributes 0.5, `segment` of the given type.
    fn write_typed_users(path: &Path, rows: &[TypedUser<'_>], segment: DataType) {
        use arrow::array::{
            ListArray,
            builder::{Float32Builder, ListBuilder},
        };
        let attrs = user_attrs();
        let mut fields =
            vec![Field::new("user_id", DataType::Utf8, false), Field::new(EVENT_TIMESTAMP, DataType::Int64, false)];
        fields.extend(attrs.iter().map(|a| Field::new(a, DataType::Float64, true)));
        fields.push(Field::new("segment", segment.clone(), true));
        let mut vecs = ListBuilder::new(Float32Builder::new());
        for (_, _, v) in rows {
            match v {
                Some(v) => {
                    for x in v {
                        vecs.values().append_option(*x);
                    }
                    vecs.append(true);
                }
                None => vecs.append(false),
            }
        }
        let vecs: ListArray = vecs.finish();
        fields.push(Field::new("vec", vecs.data_type().clone(), true));
        let mut columns: Vec<Arc<dyn Array>> = vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|_| 7))),
        ];
        for _ in &attrs {
            columns.push(Arc::new(Float64Array::from_iter(rows.iter().map(|_| Some(0.5)))));
        }
        let segments: Arc<dyn Array> = Arc::new(StringArray::from_iter(rows.iter().map(|r| r.1)));
        columns.push(cast(&segments, &segment).unwrap());
        columns.push(Arc::new(vecs));
        null_text_columns(&mut fields, &mut columns, rows.len());
        let schema = Arc::new(Schema::new(fields));
        let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
        let mut w = ArrowWriter::try_new(File::create(path).unwrap(), schema, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    #[test]
    fn categorical_and_embedding_columns_are_written_as_strings_and_vectors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("u.parquet");
        let registry = typed_registry();
        let rows = [("a", Some("sports"), Some(vec![Some(0.1), Some(0.2), Some(0.3)])), ("b", None, None)];
        write_typed_users(&p, &rows, DataType::Utf8);
        let got: Vec<BatchRow> = plan(&p, Entity::User, registry).unwrap().rows_of(0).unwrap();
        let by_id: HashMap<&str, &BatchRow> = got.iter().map(|r| (r.id.as_str(), r)).collect();
        assert_eq!(by_id["a"].text, HashMap::from([("segment".to_string(), "sports".to_string())]));
        assert_eq!(by_id["a"].vectors, HashMap::from([("vec".to_string(), vec![0.1, 0.2, 0.3])]));
        assert_eq!(by_id["a"].values.len(), user_attrs().len(), "the dense attributes beside them");
        assert!(by_id["b"].text.is_empty() && by_id["b"].vectors.is_empty(), "nulls are left out of the item");

        // A vector of the wrong length, or with a null element: refused, naming the row.
        write_typed_users(&p, &[("a", None, Some(vec![Some(0.1)]))], DataType::Utf8);
        let err = plan(&p, Entity::User, registry).unwrap().rows_of(0).unwrap_err().to_string();
        assert!(err.contains("column vec, row 0: 1 numbers (0 null), the embedding has 3"), "{err}");
        write_typed_users(&p, &[("a", None, Some(vec![Some(0.1), None, Some(f32::NAN)]))], DataType::Utf8);
        let err = plan(&p, Entity::User, registry).unwrap().rows_of(0).unwrap_err().to_string();
        assert!(err.contains("3 numbers (1 null)"), "{err}");
        // A categorical column that is not a string.
        write_typed_users(&p, &[("a", Some("7"), None)], DataType::Int64);
        let err = plan(&p, Entity::User, registry).unwrap_err().to_string();
        assert!(err.contains("column segment: a string (a categorical's raw value), not Int64"), "{err}");
        // The compiled-in registry has no such attributes.
        write_typed_users(&p, &rows, DataType::Utf8);
        let err = plan(&p, Entity::User, adserve_features::registry()).unwrap_err().to_string();
        assert!(err.contains("column segment: not a batch attribute"), "{err}");
    }

    #[test]
    fn the_latest_row_of_each_entity_wins_and_the_last_one_on_a_tie() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("u.parquet");
        let rows = [
            ("a", 20, Some(0.1)),
            ("b", 10, Some(0.2)),
            ("a", 10, Some(0.3)), // older: loses
            ("b", 10, Some(0.4)), // tie: the later row wins
            ("c", 5, None),
        ];
        write_users(&p, &rows, 2);
        let plan = plan(&p, Entity::User, adserve_features::registry()).unwrap();
        assert_eq!((plan.rows, plan.entities, plan.groups()), (5, 3, 3));
        let got: Vec<BatchRow> = (0..plan.groups()).flat_map(|g| plan.rows_of(g).unwrap()).collect();
        let by_id: HashMap<&str, &BatchRow> = got.iter().map(|r| (r.id.as_str(), r)).collect();
        assert_eq!(got.len(), 3);
        let attr = &user_attrs()[0];
        assert_eq!(by_id["a"].values[attr], 0.1f64 as f32);
        assert_eq!((by_id["b"].values[attr], by_id["b"].as_of_ms), (0.4f64 as f32, Some(10)));
        assert!(by_id["c"].values.is_empty(), "nulls are left out of the item");
    }

    #[test]
    fn files_that_are_not_the_entitys_batch_rows_are_refused_naming_the_column_or_row() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("u.parquet");
        write_users(&p, &[("a", 1, Some(0.1))], 10);
        let err = plan(&p, Entity::Ad, adserve_features::registry()).unwrap_err().to_string();
        assert!(err.contains("column user_id: not a batch attribute of ad features"), "{err}");

        write_users(&p, &[("a", 1, Some(0.1)), ("", 2, Some(0.1))], 10);
        let err = plan(&p, Entity::User, adserve_features::registry()).unwrap_err().to_string();
        assert!(err.contains("column user_id, row 1: empty"), "{err}");

        write_users(&p, &[("a", 1, Some(f64::NAN))], 10);
        let plan_ok = plan(&p, Entity::User, adserve_features::registry()).unwrap();
        let err = plan_ok.rows_of(0).unwrap_err().to_string();
        assert!(err.contains("row 0: NaN is not a finite f32"), "{err}");

        // A missing attribute column.
        let schema = Arc::new(Schema::new(vec![
            Field::new("user_id", DataType::Utf8, false),
            Field::new(EVENT_TIMESTAMP, DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(StringArray::from(vec!["a"])), Arc::new(Int64Array::from(vec![1]))],
        )
        .unwrap();
        let mut w = ArrowWriter::try_new(File::create(&p).unwrap(), schema, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let err = plan(&p, Entity::User, adserve_features::registry()).unwrap_err().to_string();
        assert!(err.contains("missing columns") && err.contains("ctr_30d"), "{err}");

        std::fs::write(&p, b"not parquet").unwrap();
        assert!(plan(&p, Entity::User, adserve_features::registry()).unwrap_err().to_string().contains("not Parquet"));
    }

    #[test]
    fn a_checkpoint_survives_a_round_trip_and_a_torn_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cp.json");
        let fp = Fingerprint { size: 1, modified_ns: 2, entity: "user".into(), table: "t".into() };
        save_checkpoint(&p, &Checkpoint { fingerprint: Some(fp.clone()), done: [0, 2].into(), complete: false })
            .unwrap();
        let back = load_checkpoint(&p).unwrap();
        assert_eq!((back.fingerprint, back.done, back.complete), (Some(fp), [0, 2].into(), false));
        std::fs::write(&p, b"{\"fingerprint\": nu").unwrap();
        assert!(load_checkpoint(&p).unwrap_err().to_string().contains("--restart"));
        assert!(load_checkpoint(&dir.path().join("none")).unwrap().done.is_empty());
    }
}
