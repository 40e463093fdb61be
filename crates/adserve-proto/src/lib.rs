//! The adserve wire contracts: prost messages, tonic clients and servers for
//! every service, and the Kafka event payloads, all generated from
//! `proto/adserve/v1`. Depend on this crate to call any adserve service.

/// Package `adserve.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    pub use crate::matrix::FeatureMatrix;
    tonic::include_proto!("adserve.v1");
}

pub mod matrix;

impl v1::ScoreLevel {
    /// The level as metric labels (`adserve_ranker_fallbacks_total{level}`)
    /// and the training rows' `score_level` column spell it.
    pub fn label(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Model => "model",
            Self::FallbackModel => "fallback_model",
            Self::Prior => "prior",
        }
    }

    /// The level an event's `score_level` field holds (an unknown value,
    /// from a newer writer, reads as unspecified).
    pub fn of(value: i32) -> Self {
        Self::try_from(value).unwrap_or(Self::Unspecified)
    }
}

/// prost-derive's code for every message, `FeatureMatrix` included: what
/// [`matrix`]'s codec is checked against.
#[cfg(test)]
mod reference {
    pub mod adserve {
        pub mod v1 {
            #![allow(clippy::all, missing_docs, dead_code)]
            include!(concat!(env!("OUT_DIR"), "/reference/adserve.v1.rs"));
        }
    }
}

/// Encoded `FileDescriptorSet` of every adserve proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/adserve_descriptor.bin"));

/// Size limits of the wire contracts, defined once: every service that
/// receives these messages checks them, and every config bound derives from them.
pub mod limits {
    /// Most candidate ads in one request anywhere on the path: eligible ads
    /// per ad request, ads per GetFeatures, rows per Score, candidates per
    /// RunAuction.
    pub const MAX_CANDIDATES: usize = 5000;
    /// Most slots one ad request (and so one auction) fills.
    pub const MAX_SLOTS: usize = 10;
}

/// The closed set of `Degradation.component` values. Clients may match on
/// them; adding one is a contract change (documented in docs/api.md).
pub mod degraded {
    /// The gateway served registry defaults: the feature-service failed.
    pub const FEATURE_SERVICE: &str = "feature-service";
    /// The feature-service served defaults for the batch tier.
    pub const DYNAMODB: &str = "dynamodb";
    /// The feature-service served defaults for the real-time tier.
    pub const REDIS: &str = "redis";
    /// The gateway priced with the prior pCTR: the ranker failed.
    pub const RANKER: &str = "ranker";
    /// The gateway ran the auction in-process: the auction service failed.
    pub const AUCTION: &str = "auction";
    /// The gateway served eligibility from a catalog index older than
    /// `catalog_index.max_staleness`: PostgreSQL could not be read.
    pub const CATALOG: &str = "catalog";
    /// Every value.
    pub const ALL: [&str; 6] = [FEATURE_SERVICE, DYNAMODB, REDIS, RANKER, AUCTION, CATALOG];
}

/// The closed set of `GetAdsResponse.no_fill_reason` values (empty when filled).
pub mod no_fill {
    /// No ad matched the targeting.
    pub const NO_ELIGIBLE_ADS: &str = "no_eligible_ads";
    /// Every candidate's eCPM fell below the reserve.
    pub const BELOW_RESERVE: &str = "below_reserve";
    /// Ads matched, but every one was frequency-capped for this user,
    /// throttled by its campaign's budget pacing, or out of budget today.
    pub const CAPPED_OR_PACED: &str = "capped_or_paced";
    /// Every value.
    pub const ALL: [&str; 3] = [NO_ELIGIBLE_ADS, BELOW_RESERVE, CAPPED_OR_PACED];
}

/// Fully-qualified gRPC service names, as registered with the health service.
pub mod service_names {
    /// `adserve.v1.GatewayService`
    pub const GATEWAY: &str = "adserve.v1.GatewayService";
    /// `adserve.v1.FeatureService`
    pub const FEATURE_SERVICE: &str = "adserve.v1.FeatureService";
    /// `adserve.v1.RankerService`
    pub const RANKER: &str = "adserve.v1.RankerService";
    /// `adserve.v1.AuctionService`
    pub const AUCTION: &str = "adserve.v1.AuctionService";
    /// `adserve.v1.LabelJoinerService`
    pub const LABEL_JOINER: &str = "adserve.v1.LabelJoinerService";
}

impl v1::FeatureMatrix {
    /// Number of columns.
    pub fn num_cols(&self) -> usize {
        self.feature_names.len()
    }

    /// Row `i` as a slice, or `None` when out of range or the matrix is ragged.
    pub fn row(&self, i: usize) -> Option<&[f32]> {
        let cols = self.num_cols();
        self.values.get(i * cols..(i + 1) * cols)
    }

    /// Row `i`'s categorical ids, or `None` when out of range or ragged.
    pub fn categorical_row(&self, i: usize) -> Option<&[i64]> {
        let cols = self.categorical_names.len();
        self.categorical_ids.get(i * cols..(i + 1) * cols)
    }

    /// Values of one row's embeddings (all of them, in column order).
    pub fn embedding_width(&self) -> usize {
        self.embedding_dims.iter().map(|d| *d as usize).sum()
    }

    /// Row `i`'s embeddings, one after the other, or `None` when out of
    /// range or ragged.
    pub fn embedding_row(&self, i: usize) -> Option<&[f32]> {
        let width = self.embedding_width();
        self.embedding_values.get(i * width..(i + 1) * width)
    }

    /// A matrix of only `rows` (indices into this one, in the order given),
    /// with the same columns. Rows out of range are skipped.
    pub fn select_rows(&self, rows: &[usize]) -> Self {
        let (cols, cats, width) = (self.num_cols(), self.categorical_names.len(), self.embedding_width());
        let mut out = Self {
            feature_names: self.feature_names.clone(),
            num_rows: 0,
            values: Vec::with_capacity(rows.len() * cols),
            categorical_names: self.categorical_names.clone(),
            categorical_ids: Vec::with_capacity(rows.len() * cats),
            embedding_names: self.embedding_names.clone(),
            embedding_dims: self.embedding_dims.clone(),
            embedding_values: Vec::with_capacity(rows.len() * width),
        };
        for &i in rows.iter().filter(|i| **i < self.num_rows as usize) {
            let (Some(v), Some(c), Some(e)) = (self.row(i), self.categorical_row(i), self.embedding_row(i)) else {
                continue;
            };
            out.values.extend_from_slice(v);
            out.categorical_ids.extend_from_slice(c);
            out.embedding_values.extend_from_slice(e);
            out.num_rows += 1;
        }
        out
    }

    /// Checks that every block holds exactly `num_rows` rows of its columns
    /// and that names are unique (across blocks) and non-empty; returns a
    /// message naming the field.
    pub fn check_shape(&self) -> Result<(), String> {
        let rows = self.num_rows as usize;
        let blocks = [
            ("values", self.values.len(), "feature_names", self.num_cols()),
            ("categorical_ids", self.categorical_ids.len(), "categorical_names", self.categorical_names.len()),
            ("embedding_values", self.embedding_values.len(), "sum(embedding_dims)", self.embedding_width()),
        ];
        for (field, have, per_row, width) in blocks {
            let want = rows * width;
            if have != want {
                return Err(format!(
                    "matrix.{field} has {have} numbers, expected num_rows ({rows}) x {per_row} ({width}) = {want}"
                ));
            }
        }
        if self.embedding_dims.len() != self.embedding_names.len() {
            return Err(format!(
                "matrix.embedding_dims has {} lengths for {} embedding_names",
                self.embedding_dims.len(),
                self.embedding_names.len()
            ));
        }
        if self.embedding_dims.contains(&0) {
            return Err("matrix.embedding_dims holds a 0".into());
        }
        let names = || self.feature_names.iter().chain(&self.categorical_names).chain(&self.embedding_names);
        // Sorted, a repeated name is next to itself: no hashing, which cost
        // 4 % of the ranker's CPU on one-row calls. Only a bad matrix pays
        // for the ordered pass that names its first bad column.
        let mut sorted: Vec<&str> = names().map(String::as_str).collect();
        sorted.sort_unstable();
        if sorted.first().is_some_and(|n| n.is_empty()) || sorted.windows(2).any(|w| w[0] == w[1]) {
            let mut seen = std::collections::HashSet::new();
            for name in names() {
                if name.is_empty() {
                    return Err("matrix: a column name is empty".into());
                }
                if !seen.insert(name) {
                    return Err(format!("matrix: column {name:?} appears twice"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::v1::FeatureMatrix;

    #[test]
    fn select_rows_keeps_every_block_of_the_rows_asked_for_in_order() {
        let m = FeatureMatrix {
            feature_names: vec!["a".into(), "b".into()],
            num_rows: 3,
            values: vec![0.0, 0.1, 1.0, 1.1, 2.0, 2.1],
            categorical_names: vec!["c".into()],
            categorical_ids: vec![10, 11, 12],
            embedding_names: vec!["e".into()],
            embedding_dims: vec![2],
            embedding_values: vec![0.5, 0.6, 1.5, 1.6, 2.5, 2.6],
        };
        let s = m.select_rows(&[2, 0, 7]);
        assert_eq!(s.num_rows, 2, "row 7 does not exist");
        assert_eq!(s.values, vec![2.0, 2.1, 0.0, 0.1]);
        assert_eq!(s.categorical_ids, vec![12, 10]);
        assert_eq!(s.embedding_values, vec![2.5, 2.6, 0.5, 0.6]);
        assert!(s.check_shape().is_ok());
        assert_eq!((s.feature_names, s.embedding_dims), (m.feature_names.clone(), m.embedding_dims.clone()));
    }

    /// A column name used twice, in one block or across two, or an empty
    /// one, is named; distinct names in any order pass.
    #[test]
    fn repeated_and_empty_column_names_are_refused_by_name() {
        let m = |dense: &[&str], categorical: &[&str], embeddings: &[&str]| FeatureMatrix {
            feature_names: dense.iter().map(|s| s.to_string()).collect(),
            num_rows: 1,
            values: vec![0.0; dense.len()],
            categorical_names: categorical.iter().map(|s| s.to_string()).collect(),
            categorical_ids: vec![0; categorical.len()],
            embedding_names: embeddings.iter().map(|s| s.to_string()).collect(),
            embedding_dims: vec![1; embeddings.len()],
            embedding_values: vec![0.0; embeddings.len()],
        };
        assert!(m(&["z", "a", "m"], &["b", "y"], &["c"]).check_shape().is_ok());
        for (matrix, twice) in [
            (m(&["z", "a", "z"], &[], &[]), "z"),
            (m(&["a", "b"], &["c", "b"], &[]), "b"),
            (m(&["a"], &["c"], &["d", "a"]), "a"),
        ] {
            assert_eq!(matrix.check_shape(), Err(format!("matrix: column {twice:?} appears twice")));
        }
        assert_eq!(m(&["a"], &[""], &[]).check_shape(), Err("matrix: a column name is empty".into()));
        // The first bad column in wire order is the one named.
        assert_eq!(m(&["z", "a", "z", "a"], &[], &[]).check_shape(), Err("matrix: column \"z\" appears twice".into()));
        assert_eq!(m(&["b", "b"], &[""], &[]).check_shape(), Err("matrix: column \"b\" appears twice".into()));
        assert_eq!(m(&["b", ""], &["b"], &[]).check_shape(), Err("matrix: a column name is empty".into()));
    }
}
