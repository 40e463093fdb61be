//! The adserve wire contracts: prost messages, tonic clients and servers for
//! every service, and the Kafka event payloads, all generated from
//! `proto/adserve/v1`. Depend on this crate to call any adserve service.

/// Package `adserve.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("adserve.v1");
}

/// Encoded `FileDescriptorSet` of every adserve proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/adserve_descriptor.bin"));

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

    /// Checks that `values` holds exactly `num_rows x num_cols` numbers and
    /// that names are unique and non-empty; returns a message naming the field.
    pub fn check_shape(&self) -> Result<(), String> {
        let want = self.num_rows as usize * self.num_cols();
        if self.values.len() != want {
            return Err(format!(
                "matrix.values has {} numbers, expected num_rows ({}) x feature_names ({}) = {want}",
                self.values.len(),
                self.num_rows,
                self.num_cols()
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for name in &self.feature_names {
            if name.is_empty() {
                return Err("matrix.feature_names contains an empty name".into());
            }
            if !seen.insert(name) {
                return Err(format!("matrix.feature_names repeats {name:?}"));
            }
        }
        Ok(())
    }
}
