//! The in-process ad-feature table: the batch tier's ad rows, held in memory
//! and swapped whole when the table's version item changes.
//!
//! Ads change far less often than they are scored, so a request must not
//! pay a DynamoDB round trip per ad. A background task ([`AdTable::refresh`])
//! reads the version item every `refresh` (one consistent GetItem), and
//! re-reads the table (a Scan) when it moved or the copy is older than
//! `max_age`; requests read the current copy through an `ArcSwap`, so a
//! reload never blocks or tears a request. Writers bump the version after
//! writing (`BatchStore::put_ads`).
//!
//! An ad the copy does not hold (created since the last reload, or the copy
//! not loaded yet) is looked up in DynamoDB for that request, only that ad;
//! an id DynamoDB does not know is remembered as absent until the next
//! reload, so unknown ids cost one lookup per reload, not one per request.
//! When DynamoDB fails, the last good copy keeps serving.
//!
//! The copy is dense: one `Option<f32>` per ad and batch attribute in the
//! registry's slot order ([`adserve_features::Plan::ad_batch_attributes`]),
//! id → row index, so a request borrows rows instead of copying maps. A
//! registry with typed ad features (categoricals, embeddings from DynamoDB)
//! also gets one [`AdTypedRow`] per ad.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use adserve_features::{AdRow, AdTypedRow, FeatureRegistry, Plan};
use arc_swap::ArcSwap;

use crate::{BatchStore, batch::BatchItem};

/// Most ids remembered as absent per copy (a flood of garbage ids clears it).
const MAX_ABSENT: usize = 100_000;

/// One loaded copy of the ad table.
#[derive(Debug, Default)]
struct Snapshot {
    /// The version item when the copy was read (`None`: nothing loaded yet).
    version: Option<i64>,
    /// Ad id → row index.
    index: HashMap<i64, u32>,
    /// Rows of `stride` raw values each ([`AdRow`] layout).
    values: Vec<Option<f32>>,
    stride: usize,
    /// Per row: when its values became true (epoch ms), if the item says.
    as_of: Vec<Option<i64>>,
    /// Per row: its typed values (empty when the registry has no typed ad
    /// features).
    typed: Vec<AdTypedRow>,
    loaded_at: Option<Instant>,
    /// Ids DynamoDB answered "no such item" for since this copy was read.
    absent: Mutex<HashSet<i64>>,
}

impl Snapshot {
    fn row(&self, at: u32) -> &AdRow {
        let start = at as usize * self.stride;
        &self.values[start..start + self.stride]
    }
}

/// What the table holds for one request's ads.
#[derive(Debug)]
pub struct TableLookup {
    /// The copy the rows are in (kept alive by the lookup).
    snapshot: Arc<Snapshot>,
    /// Per requested ad, in request order: its row in the copy, if any.
    rows: Vec<Option<u32>>,
    /// Ads to look up in DynamoDB (neither in the copy nor known absent).
    pub misses: Vec<i64>,
}

impl TableLookup {
    /// The batch row of the `i`-th requested ad, if the copy holds it.
    pub fn row(&self, i: usize) -> Option<&AdRow> {
        self.rows.get(i).copied().flatten().map(|at| self.snapshot.row(at))
    }

    /// The typed values of the `i`-th requested ad, if the copy holds it
    /// and the registry has typed ad features.
    pub fn typed(&self, i: usize) -> Option<&AdTypedRow> {
        self.rows.get(i).copied().flatten().and_then(|at| self.snapshot.typed.get(at as usize))
    }

    /// When the `i`-th requested ad's row became true (epoch ms), if the
    /// copy holds it and its item says.
    pub fn as_of(&self, i: usize) -> Option<i64> {
        self.rows.get(i).copied().flatten().and_then(|at| self.snapshot.as_of.get(at as usize).copied().flatten())
    }

    /// Requested ads the copy holds.
    pub fn found(&self) -> usize {
        self.rows.iter().filter(|r| r.is_some()).count()
    }
}

/// The shared, swappable copy.
#[derive(Debug, Clone)]
pub struct AdTable {
    current: Arc<ArcSwap<Snapshot>>,
    /// The registry's ad batch attributes, in row (slot) order.
    plan: &'static Plan,
}

impl Default for AdTable {
    fn default() -> Self {
        Self::new()
    }
}

impl AdTable {
    /// An empty table for the registry compiled in: every ad is a miss
    /// until the first load.
    pub fn new() -> Self {
        Self::for_registry(adserve_features::registry())
    }

    /// An empty table laid out for `registry`'s ad batch features.
    pub fn for_registry(registry: &'static FeatureRegistry) -> Self {
        let plan = registry.plan();
        Self {
            current: Arc::new(ArcSwap::from_pointee(Snapshot {
                stride: plan.ad_batch_attributes.len(),
                ..Default::default()
            })),
            plan,
        }
    }

    /// The copy's rows for `ad_ids`, and the ids it cannot answer for.
    pub fn lookup(&self, ad_ids: &[i64]) -> TableLookup {
        let snapshot = self.current.load_full();
        // The absent set is locked only once an id is not in the copy: the
        // common request (every ad loaded) takes no lock.
        let mut absent = None;
        let mut rows = Vec::with_capacity(ad_ids.len());
        let mut misses = Vec::new();
        for id in ad_ids {
            let at = snapshot.index.get(id).copied();
            rows.push(at);
            match at {
                Some(_) => {}
                None => {
                    let absent = absent.get_or_insert_with(|| {
                        snapshot.absent.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
                    });
                    if !absent.contains(id) {
                        misses.push(*id);
                    }
                }
            }
        }
        drop(absent);
        TableLookup { snapshot, rows, misses }
    }

    /// Ids DynamoDB answered for (`looked_up`) without a row in `found`:
    /// absent until the next reload.
    pub fn remember_absent<V>(&self, looked_up: &[i64], found: &HashMap<i64, V>) {
        let snap = self.current.load();
        let mut absent = snap.absent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if absent.len() > MAX_ABSENT {
            absent.clear();
        }
        absent.extend(looked_up.iter().filter(|id| !found.contains_key(id)));
    }

    /// Replaces the copy with `rows` (`ad id -> attribute -> value`), no
    /// item saying when it became true.
    pub fn swap(&self, version: i64, rows: HashMap<i64, HashMap<String, f32>>) {
        self.swap_items(
            version,
            rows.into_iter().map(|(id, values)| (id, BatchItem { values, ..Default::default() })).collect(),
        );
    }

    /// Replaces the copy with `rows` (as DynamoDB items read), laid out dense.
    pub fn swap_items(&self, version: i64, rows: HashMap<i64, BatchItem>) {
        metrics::gauge!("adserve_feature_ad_table_rows").set(rows.len() as f64);
        metrics::gauge!("adserve_feature_ad_table_version").set(version as f64);
        let stride = self.plan.ad_batch_attributes.len();
        let mut index = HashMap::with_capacity(rows.len());
        let mut values = Vec::with_capacity(rows.len() * stride);
        let mut as_of = Vec::with_capacity(rows.len());
        let typed_features = self.plan.has_typed_ad_features();
        let mut typed = Vec::with_capacity(if typed_features { rows.len() } else { 0 });
        for (at, (id, item)) in rows.into_iter().enumerate() {
            index.insert(id, at as u32);
            values.extend(self.plan.ad_row(&item.values));
            as_of.push(item.as_of_ms);
            if typed_features {
                typed.push(self.plan.ad_typed_row(&item.text, &item.vectors));
            }
        }
        self.current.store(Arc::new(Snapshot {
            version: Some(version),
            index,
            values,
            stride,
            as_of,
            typed,
            loaded_at: Some(Instant::now()),
            absent: Mutex::new(HashSet::new()),
        }));
    }

    /// The loaded copy's version, if any.
    pub fn version(&self) -> Option<i64> {
        self.current.load().version
    }

    /// Rows in the copy.
    pub fn len(&self) -> usize {
        self.current.load().index.len()
    }

    /// Whether the copy holds no row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One refresh step: reloads when the version item moved, nothing is
    /// loaded yet, or the copy is older than `max_age`. Returns whether it
    /// reloaded. On error the current copy stays.
    pub async fn refresh_once(&self, store: &BatchStore, max_age: Duration) -> Result<bool, crate::batch::BatchError> {
        let version = store.ad_version().await?;
        let snap = self.current.load();
        let stale = snap.loaded_at.is_none_or(|t| t.elapsed() >= max_age);
        if snap.version == Some(version) && !stale {
            return Ok(false);
        }
        // Read the version before the rows: a write during the scan bumps it
        // again afterwards, and the next step reloads.
        let started = Instant::now();
        let rows = store.scan_ads().await?;
        tracing::info!(
            version,
            rows = rows.len(),
            ms = started.elapsed().as_millis() as u64,
            "ad feature table loaded"
        );
        metrics::histogram!("adserve_feature_ad_table_load_seconds").record(started.elapsed().as_secs_f64());
        self.swap_items(version, rows);
        Ok(true)
    }

    /// Runs [`AdTable::refresh_once`] every `every` until the process ends;
    /// failures are logged and counted, and the last good copy serves.
    pub async fn refresh(self, store: BatchStore, every: Duration, max_age: Duration) {
        loop {
            match self.refresh_once(&store, max_age).await {
                Ok(true) => metrics::counter!("adserve_feature_ad_table_reloads_total", "result" => "ok").increment(1),
                Ok(false) => {}
                Err(e) => {
                    metrics::counter!("adserve_feature_ad_table_reloads_total", "result" => "error").increment(1);
                    tracing::warn!(error = %e, rows = self.len(), "ad feature table not refreshed; the last copy serves");
                }
            }
            if let Some(t) = self.current.load().loaded_at {
                metrics::gauge!("adserve_feature_ad_table_age_seconds").set(t.elapsed().as_secs_f64());
            }
            tokio::time::sleep(every).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: f32) -> HashMap<String, f32> {
        HashMap::from([("ctr_7d".to_string(), v)])
    }

    #[test]
    fn before_the_first_load_every_ad_is_a_miss() {
        let t = AdTable::new();
        let l = t.lookup(&[1, 2]);
        assert_eq!(l.found(), 0);
        assert_eq!(l.misses, [1, 2]);
        assert_eq!(t.version(), None);
    }

    fn ctr(l: &TableLookup, i: usize) -> Option<f32> {
        let slot = adserve_features::registry().plan().ad_batch_attributes.iter().position(|a| a == "ctr_7d")?;
        l.row(i)?[slot]
    }

    #[test]
    fn loaded_ads_are_served_from_memory_and_only_the_others_are_misses() {
        let t = AdTable::new();
        t.swap(3, HashMap::from([(1, row(0.1)), (2, row(0.2))]));
        let l = t.lookup(&[2, 7, 1]);
        assert_eq!((ctr(&l, 0), ctr(&l, 1), ctr(&l, 2)), (Some(0.2), None, Some(0.1)));
        assert_eq!(l.found(), 2);
        assert_eq!(l.misses, [7]);
        assert_eq!((t.version(), t.len()), (Some(3), 2));
    }

    #[test]
    fn ids_dynamodb_does_not_know_are_not_looked_up_again_until_the_next_reload() {
        let t = AdTable::new();
        t.swap(1, HashMap::new());
        // 7 was found (a new ad since the load), 8 is unknown.
        t.remember_absent(&[7, 8], &HashMap::from([(7, row(0.3))]));
        assert_eq!(t.lookup(&[7, 8]).misses, [7], "the new ad is asked again; the unknown one is not");
        t.swap(2, HashMap::from([(7, row(0.3))]));
        let l = t.lookup(&[7, 8]);
        assert_eq!(l.misses, [8], "a reload forgets what was absent");
        assert_eq!(ctr(&l, 0), Some(0.3));
    }
}
