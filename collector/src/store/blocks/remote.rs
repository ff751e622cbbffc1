//! Span blocks on an S3-compatible object store (`--blocks-url s3://BUCKET/PREFIX`).
//!
//! A block is written to the local folder first (as without a remote), uploaded to
//! `PREFIX/spans/<name>`, and only then listed in the catalog: a listed block is always in the
//! object store. The local folder is each host's cache: a reader opens a block from it, and
//! downloads the block into it first when it is not there (a block another host sealed or
//! merged). Removing a block removes the object and the cached file.
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

/// An object store and the prefix under which blocks go.
#[derive(Clone)]
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    url: String,
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
        error => BlockError::Io(std::io::Error::other(format!("span blocks at {url}: {error}"))),
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
        Ok(Self { store: Arc::new(store), prefix, url: url.to_string() })
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

    /// The locations of the blocks under `spans/` whose names start with `name_prefix`.
    pub async fn list(&self, name_prefix: &str) -> Result<Vec<String>, BlockError> {
        let spans = self.key("spans");
        let objects: Vec<_> = self.store.list(Some(&spans)).try_collect().await.map_err(|e| error(&self.url, e))?;
        Ok(objects
            .into_iter()
            .filter_map(|o| o.location.filename().map(str::to_string))
            .filter(|name| name.starts_with(name_prefix))
            .map(|name| format!("spans/{name}"))
            .collect())
    }
}
