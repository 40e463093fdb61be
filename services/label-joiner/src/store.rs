//! Object storage (S3 or S3-compatible) for the training-row dataset.
//!
//! The sink is called from synchronous code (the join loop's flush and
//! librdkafka's rebalance callback), so object-store calls run on a small
//! runtime of their own and the caller waits for them. A PUT is atomic:
//! readers see the whole object or nothing, so no temporary name is needed.
//! When a PUT fails without a clear answer (a timeout, a dropped
//! connection), a HEAD decides whether the object landed; only when neither
//! can say is the write ambiguous.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, OnceLock},
};

use bytes::Bytes;
use futures::TryStreamExt as _;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload, aws::AmazonS3Builder, path::Path as ObjectPath};
use parquet::file::metadata::ParquetMetaDataReader;
use serde::{Deserialize, Serialize};

use crate::sink::SinkError;

/// S3 connection settings. Credentials come from the environment, as for
/// any AWS client: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (and
/// `AWS_SESSION_TOKEN`), a web identity token (`AWS_WEB_IDENTITY_TOKEN_FILE`
/// with `AWS_ROLE_ARN`, i.e. IRSA), ECS/EKS container credentials, or the
/// instance metadata service.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct S3Options {
    /// Endpoint of an S3-compatible service (MinIO, Ceph, moto); empty: AWS.
    pub endpoint: String,
    /// Region; empty: `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: String,
    /// Allow plain-HTTP endpoints (local test servers only).
    pub allow_http: bool,
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static IO: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    IO.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("object-store-io")
            .enable_all()
            .build()
            .expect("starting the object-store IO runtime")
    })
}

/// Runs `f` on the object-store runtime and waits for it (from any thread,
/// async context or not: this thread only blocks).
fn block<F>(f: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match futures::executor::block_on(runtime().spawn(f)) {
        Ok(out) => out,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// A bucket and key prefix.
#[derive(Debug, Clone)]
pub struct ObjectTarget {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    url: String,
}

/// Splits `s3://bucket/prefix` into its bucket and prefix.
pub fn parse_s3_url(url: &str) -> Result<(String, String), String> {
    let rest = url.strip_prefix("s3://").ok_or_else(|| format!("{url:?}: only s3:// URLs are supported"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(format!("{url:?}: no bucket"));
    }
    Ok((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

impl ObjectTarget {
    /// The dataset at `url` (`s3://bucket/prefix`).
    pub fn s3(url: &str, options: &S3Options) -> Result<Self, String> {
        let (bucket, prefix) = parse_s3_url(url)?;
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket).with_allow_http(options.allow_http);
        if !options.endpoint.is_empty() {
            builder = builder.with_endpoint(&options.endpoint);
        }
        if !options.region.is_empty() {
            builder = builder.with_region(&options.region);
        }
        let store = builder.build().map_err(|e| format!("{url}: {e}"))?;
        Ok(Self {
            store: Arc::new(store),
            prefix: ObjectPath::from(prefix),
            url: url.trim_end_matches('/').to_string(),
        })
    }

    /// The dataset's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, relative: &str) -> ObjectPath {
        let mut path = self.prefix.clone();
        for part in relative.split('/').filter(|p| !p.is_empty()) {
            path = path.join(part);
        }
        path
    }

    fn location(&self, path: &ObjectPath) -> String {
        let (bucket, _) = parse_s3_url(&self.url).unwrap_or_default();
        format!("s3://{bucket}/{path}")
    }

    /// Stores `bytes` at `relative` (below the prefix); returns its URL once
    /// the store has acknowledged it.
    pub fn put(&self, relative: &str, bytes: Vec<u8>) -> Result<String, SinkError> {
        let path = self.path(relative);
        let location = self.location(&path);
        let len = bytes.len() as u64;
        let (store, p) = (Arc::clone(&self.store), path.clone());
        let Err(put) = block(async move { store.put(&p, PutPayload::from(bytes)).await }) else {
            return Ok(location);
        };
        // The PUT failed, or its answer was lost: did the object land?
        let (store, p) = (Arc::clone(&self.store), path);
        match block(async move { store.head(&p).await }) {
            Ok(meta) if meta.size == len => {
                tracing::warn!(%location, error = %put, "put reported an error but the object is there, whole");
                Ok(location)
            }
            Err(object_store::Error::NotFound { .. }) => Err(SinkError::Object(format!("put {location}: {put}"))),
            Ok(meta) => Err(SinkError::Ambiguous {
                location,
                reason: format!("put failed ({put}) and an object of {} bytes, not {len}, is there", meta.size),
            }),
            Err(head) => {
                Err(SinkError::Ambiguous { location, reason: format!("put failed ({put}); head failed ({head})") })
            }
        }
    }

    /// Every `*.parquet` object below the prefix: (path, size).
    pub fn files(&self) -> Result<Vec<(ObjectPath, u64)>, SinkError> {
        let (store, prefix) = (Arc::clone(&self.store), self.prefix.clone());
        let metas: Vec<object_store::ObjectMeta> = block(async move {
            let prefix = (!prefix.as_ref().is_empty()).then_some(prefix);
            store.list(prefix.as_ref()).try_collect().await
        })
        .map_err(|e| SinkError::Object(format!("list {}: {e}", self.url)))?;
        let mut files: Vec<(ObjectPath, u64)> = metas
            .into_iter()
            .filter(|m| m.location.extension() == Some("parquet"))
            .map(|m| (m.location, m.size))
            .collect();
        files.sort();
        Ok(files)
    }

    /// A file's footer key/values (only the end of the file is fetched).
    pub fn footer(&self, path: &ObjectPath, size: u64) -> Result<HashMap<String, String>, SinkError> {
        let location = self.location(path);
        let fail = |why: String| SinkError::Object(format!("footer of {location}: {why}"));
        if size < 12 {
            return Err(fail(format!("{size} bytes is too short for Parquet")));
        }
        // Most footers fit in the last 64 KiB; fetch more only when not.
        let tail_len = size.min(64 << 10);
        let tail = self.range(path, size - tail_len..size).map_err(|e| fail(e.to_string()))?;
        let end = tail.len();
        if &tail[end - 4..] != b"PAR1" {
            return Err(fail("no Parquet magic at the end".into()));
        }
        let meta_len = u64::from(u32::from_le_bytes([tail[end - 8], tail[end - 7], tail[end - 6], tail[end - 5]]));
        if meta_len + 8 > size {
            return Err(fail(format!("footer length {meta_len} exceeds the file")));
        }
        let meta = if meta_len + 8 <= tail_len {
            tail.slice(end - 8 - meta_len as usize..end - 8)
        } else {
            self.range(path, size - 8 - meta_len..size - 8).map_err(|e| fail(e.to_string()))?
        };
        let metadata = ParquetMetaDataReader::decode_metadata(&meta).map_err(|e| fail(e.to_string()))?;
        Ok(metadata
            .file_metadata()
            .key_value_metadata()
            .map(|kv| kv.iter().filter_map(|k| Some((k.key.clone(), k.value.clone()?))).collect())
            .unwrap_or_default())
    }

    fn range(&self, path: &ObjectPath, range: std::ops::Range<u64>) -> object_store::Result<Bytes> {
        let (store, p) = (Arc::clone(&self.store), path.clone());
        block(async move { store.get_range(&p, range).await })
    }

    /// A whole file.
    pub fn get(&self, path: &ObjectPath) -> Result<Bytes, SinkError> {
        let (store, p) = (Arc::clone(&self.store), path.clone());
        block(async move { store.get(&p).await?.bytes().await })
            .map_err(|e| SinkError::Object(format!("get {}: {e}", self.location(path))))
    }

    /// The URL of `path`.
    pub fn url_of(&self, path: &ObjectPath) -> String {
        self.location(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls_name_a_bucket_and_an_optional_prefix() {
        assert_eq!(parse_s3_url("s3://b/rows/v3/").unwrap(), ("b".into(), "rows/v3".into()));
        assert_eq!(parse_s3_url("s3://b").unwrap(), ("b".into(), String::new()));
        assert!(parse_s3_url("s3:///x").unwrap_err().contains("no bucket"));
        assert!(parse_s3_url("gs://b/x").unwrap_err().contains("only s3://"));
    }
}
