//! `manifest.json`, written by the trainer next to `model.onnx`: the one
//! definition read by the ranker (to load and check a model) and by the
//! registry (to register it).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A model's manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelManifest {
    /// Unique model version, logged with every impression.
    pub model_version: String,
    /// Name of the `[N, F]` float32 input.
    pub input_name: String,
    /// Name of the `[N, 1]` (or `[N]`) float32 output.
    pub output_name: String,
    /// Feature names, in the model's column order.
    pub feature_order: Vec<String>,
    /// Hex SHA-256 of `model.onnx`; a file that does not match is refused.
    pub onnx_sha256: String,
    /// Anything else the trainer recorded (metrics, data, timestamps).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Why a manifest or its model file is refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The manifest cannot be read or is malformed.
    #[error("model manifest {path}: {why}")]
    Invalid {
        /// Manifest path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// `model.onnx` cannot be read.
    #[error("model file {path}: {source}")]
    File {
        /// Model path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `model.onnx` is not the file the manifest describes.
    #[error("model.onnx has sha256 {got}, its manifest says {want}: a torn copy or a swapped file")]
    Checksum {
        /// The manifest's `onnx_sha256`.
        want: String,
        /// The file's.
        got: String,
    },
}

impl ModelManifest {
    /// The trainer's offline metrics (`metrics` object), if any.
    pub fn metrics(&self) -> serde_json::Value {
        self.extra.get("metrics").cloned().unwrap_or_else(|| serde_json::json!({}))
    }
}

/// Reads and checks `path`: a version, registry features each named once,
/// a 64-hex-digit `onnx_sha256`.
pub fn read_manifest(path: &Path) -> Result<ModelManifest, ManifestError> {
    let bad = |why: String| ManifestError::Invalid { path: path.to_path_buf(), why };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let manifest: ModelManifest = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if manifest.model_version.is_empty() || manifest.model_version.len() > 128 {
        return Err(bad("model_version must be 1 to 128 bytes".into()));
    }
    if manifest.feature_order.is_empty() {
        return Err(bad("feature_order is empty".into()));
    }
    if manifest.onnx_sha256.len() != 64 || !manifest.onnx_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(format!("onnx_sha256 {:?} is not 64 hex digits", manifest.onnx_sha256)));
    }
    let registry = adserve_features::registry();
    for (i, name) in manifest.feature_order.iter().enumerate() {
        if registry.index_of(name).is_none() {
            return Err(bad(format!("feature {name:?} is not in the feature registry")));
        }
        if manifest.feature_order[..i].contains(name) {
            return Err(bad(format!("feature {name:?} is listed twice")));
        }
    }
    Ok(manifest)
}

/// Reads `dir/manifest.json` and `dir/model.onnx` and checks that the file
/// hashes to the manifest's `onnx_sha256`. Returns both, so the caller loads
/// exactly the bytes that were checked.
pub fn read_model_dir(dir: &Path) -> Result<(ModelManifest, Vec<u8>), ManifestError> {
    let manifest = read_manifest(&dir.join("manifest.json"))?;
    let path = dir.join("model.onnx");
    let bytes = std::fs::read(&path).map_err(|source| ManifestError::File { path, source })?;
    let got = hex::encode(Sha256::digest(&bytes));
    if !got.eq_ignore_ascii_case(&manifest.onnx_sha256) {
        return Err(ManifestError::Checksum { want: manifest.onnx_sha256.clone(), got });
    }
    Ok((manifest, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_json() -> String {
        format!(
            r#"{{"model_version":"v","input_name":"features","output_name":"pctr","feature_order":["user_ctr_30d"],
            "onnx_sha256":"{}","metrics":{{"auc":0.7}}}}"#,
            "ab".repeat(32)
        )
    }

    #[test]
    fn bad_manifests_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("manifest.json");
        for (from, to, want) in [
            (r#"["user_ctr_30d"]"#, r#"["nope"]"#, "\"nope\" is not in the feature registry"),
            (r#"["user_ctr_30d"]"#, r#"["user_ctr_30d","user_ctr_30d"]"#, "listed twice"),
            (&"ab".repeat(32), "xyz", "not 64 hex digits"),
            (r#""model_version":"v""#, r#""model_version":"""#, "model_version"),
            (r#""onnx_sha256""#, r#""other""#, "onnx_sha256"),
        ] {
            std::fs::write(&path, manifest_json().replace(from, to)).expect("write");
            let err = read_manifest(&path).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        std::fs::write(&path, manifest_json()).expect("write");
        let m = read_manifest(&path).expect("the untouched manifest reads");
        assert_eq!(m.metrics()["auc"], 0.7);
    }

    #[test]
    fn a_model_file_that_does_not_hash_to_its_manifest_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("model.onnx"), b"bytes").expect("write");
        std::fs::write(dir.path().join("manifest.json"), manifest_json()).expect("write");
        assert!(matches!(read_model_dir(dir.path()), Err(ManifestError::Checksum { .. })));
        let sha = hex::encode(Sha256::digest(b"bytes"));
        std::fs::write(dir.path().join("manifest.json"), manifest_json().replace(&"ab".repeat(32), &sha))
            .expect("write");
        let (m, bytes) = read_model_dir(dir.path()).expect("matching file");
        assert_eq!((m.onnx_sha256, bytes), (sha, b"bytes".to_vec()));
    }
}
