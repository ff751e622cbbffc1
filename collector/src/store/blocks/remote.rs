//! Span blocks on an S3-compatible object store (`--blocks-url s3://BUCKET/PREFIX`).
//!
//! A block is written to the local folder first (as without a remote), uploaded to
//! `PREFIX/spans/<name>`, and only then listed in the catalog: a listed block is always in the
//! object store. The local folder is each host's cache: a reader opens a block from it, and
//! downloads the block into it first when it is not there (a block another host sealed or
//! merged). The cache holds at most [`CACHE_BYTES`] (or the limit given) besides the block
//! being read: the blocks used longest ago are removed from it (a reader that still has one
//! open reads on; the next opens it again from the store). Removing a block removes the object
//! and the cached file.
//!
//! With PostgreSQL as the catalog, collectors and dashboards on several hosts share one store:
//! each writes its own log on its own disk and seals into the shared bucket; a span another
//! host acknowledged is visible once it is sealed (within [`super::SEAL_AGE`] of its arrival,
//! plus the seal's upload).

use std::sync::Arc;

use futures_util::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::format::BlockError;

/// An object store and the prefix under which blocks go, with this host's cache of them.
#[derive(Clone)]
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    url: String,
    cache: Arc<std::sync::Mutex<Cache>>,
}

/// What the cache folder should hold at most by default.
pub const CACHE_BYTES: u64 = 4 << 30;

/// The blocks in this host's cache folder, their sizes and when each was last used.
#[derive(Debug)]
pub struct Cache {
    limit: u64,
    /// Location → (bytes, the use counter when last used).
    files: std::collections::HashMap<String, (u64, u64)>,
    total: u64,
    uses: u64,
}

impl Cache {
    /// Counts the block files already in `<dir>/<folder>` (oldest first, by modification time).
    pub fn scan(&mut self, dir: &std::path::Path, folder: &str) -> std::io::Result<()> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir.join(folder))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".parquet") {
                let meta = entry.metadata()?;
                found.push((meta.modified()?, name, meta.len()));
            }
        }
        found.sort();
        for (_, name, bytes) in found {
            self.used(&format!("{folder}/{name}"), bytes);
        }
        Ok(())
    }

    /// Records a use of the block at `location` (`bytes` long); returns the blocks to remove,
    /// those used longest ago, until the rest fits the limit (never this one).
    pub fn used(&mut self, location: &str, bytes: u64) -> Vec<String> {
        self.uses += 1;
        if let Some((old, _)) = self.files.insert(location.to_string(), (bytes, self.uses)) {
            self.total -= old;
        }
        self.total += bytes;
        let mut evicted = Vec::new();
        while self.total > self.limit {
            let oldest = self.files.iter().filter(|(l, _)| l.as_str() != location).min_by_key(|(_, (_, used))| *used);
            let Some(oldest) = oldest.map(|(l, _)| l.clone()) else { break };
            self.forget(&oldest);
            evicted.push(oldest);
        }
        evicted
    }

    /// Records a use of a block already counted (read again while open).
    pub fn touch(&mut self, location: &str) {
        if let Some((_, used)) = self.files.get_mut(location) {
            self.uses += 1;
            *used = self.uses;
        }
    }

    /// Forgets a block (removed).
    pub fn forget(&mut self, location: &str) {
        if let Some((bytes, _)) = self.files.remove(location) {
            self.total -= bytes;
        }
    }
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

fn error(url: &str, error: object_store::Error) -> BlockError {
    match error {
        object_store::Error::NotFound { .. } => {
            BlockError::Io(std::io::Error::new(std::io::ErrorKind::NotFound, format!("{url}: {error}")))
        }
        error => BlockError::Io(std::io::Error::other(format!("blocks at {url}: {error}"))),
    }
}

impl Remote {
    /// The S3 bucket and prefix of `url` (`s3://BUCKET/PREFIX`), with the credentials and region
    /// of the usual AWS variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, …);
    /// `endpoint` for an S3-compatible store other than AWS (plain `http://` is allowed then),
    /// and `credentials` (key id, secret) instead of the variables'.
    pub fn s3(url: &str, endpoint: Option<&str>, credentials: Option<(&str, &str)>) -> Result<Self, BlockError> {
        let invalid = |what: String| BlockError::Io(std::io::Error::new(std::io::ErrorKind::InvalidInput, what));
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| invalid(format!("{url:?}: blocks URL must be s3://BUCKET/PREFIX")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(invalid(format!("{url:?}: no bucket (s3://BUCKET/PREFIX)")));
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(endpoint) = endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        if let Some((key, secret)) = credentials {
            builder = builder.with_access_key_id(key).with_secret_access_key(secret);
        }
        let store = builder.build().map_err(|e| error(url, e))?;
        let prefix = ObjectPath::parse(prefix.trim_matches('/')).map_err(|e| invalid(format!("{url:?}: {e}")))?;
        let cache = Cache { limit: CACHE_BYTES, files: Default::default(), total: 0, uses: 0 };
        Ok(Self { store: Arc::new(store), prefix, url: url.to_string(), cache: Arc::new(std::sync::Mutex::new(cache)) })
    }

    /// This store with a cache folder of at most `bytes` (beyond the block being read).
    pub fn with_cache_limit(self, bytes: u64) -> Self {
        self.cache().limit = bytes;
        self
    }

    /// This host's cache of blocks.
    pub fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the block at `location` (relative, as the catalog lists it) is in the store.
    fn key(&self, location: &str) -> ObjectPath {
        location.split('/').fold(self.prefix.clone(), |path, part| path.clone().join(part))
    }

    /// Uploads the local file `file` as the block at `location`.
    pub async fn upload(&self, file: &std::path::Path, location: &str) -> Result<(), BlockError> {
        let bytes = tokio::fs::read(file).await?;
        self.store.put(&self.key(location), PutPayload::from(bytes)).await.map_err(|e| error(&self.url, e))?;
        Ok(())
    }

    /// Downloads the block at `location` to the local file `file` (through a temporary file:
    /// a reader never sees half of it). An absent block is a `NotFound` I/O error.
    pub async fn download(&self, location: &str, file: &std::path::Path) -> Result<(), BlockError> {
        let bytes = self.store.get(&self.key(location)).await.map_err(|e| error(&self.url, e))?;
        let bytes = bytes.bytes().await.map_err(|e| error(&self.url, e))?;
        let temporary = file.with_extension(format!("download-{}", uuid::Uuid::now_v7().simple()));
        tokio::fs::write(&temporary, &bytes).await?;
        tokio::fs::rename(&temporary, file).await?;
        Ok(())
    }

    /// Deletes the block at `location` (nothing when it is gone already).
    pub async fn delete(&self, location: &str) -> Result<(), BlockError> {
        match self.store.delete(&self.key(location)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(error(&self.url, e)),
        }
    }

    /// The locations of the blocks under `<folder>/` whose names start with `name_prefix`.
    pub async fn list(&self, folder: &str, name_prefix: &str) -> Result<Vec<String>, BlockError> {
        let under = self.key(folder);
        let objects: Vec<_> = self.store.list(Some(&under)).try_collect().await.map_err(|e| error(&self.url, e))?;
        Ok(objects
            .into_iter()
            .filter_map(|o| o.location.filename().map(str::to_string))
            .filter(|name| name.starts_with(name_prefix))
            .map(|name| format!("{folder}/{name}"))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_removes_the_blocks_used_longest_ago_and_never_the_one_in_use() {
        let mut cache = Cache { limit: 250, files: Default::default(), total: 0, uses: 0 };
        assert!(cache.used("a", 100).is_empty());
        assert!(cache.used("b", 100).is_empty());
        cache.touch("a");
        assert_eq!(cache.used("c", 100), ["b"], "a was used again: b is the oldest");
        assert_eq!(cache.total, 200);
        assert_eq!(cache.used("huge", 1000), ["a", "c"], "oldest first; the one in use stays");
        assert_eq!(cache.total, 1000);
        cache.forget("huge");
        assert_eq!(cache.total, 0);
    }
}
