//! The block files under `<dir>/spans/` and `<dir>/logs/`: opened once and kept open, uploaded to the object store
//! and kept in this host's cache of it when blocks go to one, and removed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::format::{Block, BlockError};
use super::log_format::LogBlock;
use super::{SpanBlocks, StoreError, blocking, io};

/// Most blocks kept open at once.
const OPEN_BLOCKS: usize = 1024;

impl SpanBlocks {
    /// Uploads the block just written at `location`, when blocks go to an object store.
    pub(super) async fn upload(&self, location: &str) -> Result<(), StoreError> {
        match &self.remote {
            Some(remote) => {
                remote.upload(&self.dir.join(location), location).await?;
                Ok(self.cached(location)?)
            }
            None => Ok(()),
        }
    }

    /// Removes the block at `location`: its file, and its object when blocks go to an object
    /// store (nothing of what is already gone).
    pub(super) async fn remove(&self, location: &str) -> Result<(), StoreError> {
        self.close(location);
        if let Some(remote) = &self.remote {
            remote.cache().forget(location);
        }
        match std::fs::remove_file(self.dir.join(location)) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(io(error)),
        }
        if let Some(remote) = &self.remote {
            remote.delete(location).await?;
        }
        Ok(())
    }

    /// A block the catalog listed, open; `None` when retention or a merge removed it since the
    /// catalog was read.
    pub(super) async fn listed_block(&self, location: &str) -> Result<Option<Arc<Block>>, StoreError> {
        match self.block(location).await {
            Ok(block) => Ok(Some(block)),
            Err(BlockError::Io(error)) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(StoreError::Blocks(error)),
        }
    }

    /// The block at `location`, opened once (and downloaded first from the object store, when
    /// blocks go to one and this host's cache does not hold it).
    pub(super) async fn block(&self, location: &str) -> Result<Arc<Block>, BlockError> {
        self.open_block(location, Block::open, &self.opened).await
    }

    /// A log block the catalog listed, open (as [`Self::listed_block`]).
    pub(super) async fn listed_log_block(&self, location: &str) -> Result<Option<Arc<LogBlock>>, StoreError> {
        match self.open_block(location, LogBlock::open, &self.opened_logs).await {
            Ok(block) => Ok(Some(block)),
            Err(BlockError::Io(error)) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(StoreError::Blocks(error)),
        }
    }

    async fn open_block<B>(
        &self,
        location: &str,
        open: fn(&std::path::Path) -> Result<B, BlockError>,
        opened: &Mutex<HashMap<String, Arc<B>>>,
    ) -> Result<Arc<B>, BlockError> {
        if let Some(block) = opened.lock().unwrap_or_else(|e| e.into_inner()).get(location) {
            if let Some(remote) = &self.remote {
                remote.cache().touch(location);
            }
            return Ok(block.clone());
        }
        let path = self.dir.join(location);
        let keep_open = |block: Arc<B>| {
            let mut opened = opened.lock().unwrap_or_else(|e| e.into_inner());
            if opened.len() >= OPEN_BLOCKS {
                opened.clear();
            }
            opened.insert(location.to_string(), block.clone());
            block
        };
        let Some(remote) = &self.remote else {
            return Ok(keep_open(Arc::new(blocking(|| open(&path))?)));
        };
        // Twice at most: another reader's trim may remove the file between download and open.
        let mut attempts = 0;
        let block = loop {
            if !path.exists() {
                remote.download(location, &path).await?;
            }
            match blocking(|| open(&path)) {
                Err(BlockError::Io(error)) if error.kind() == std::io::ErrorKind::NotFound && attempts == 0 => {
                    attempts += 1
                }
                opened => break Arc::new(opened?),
            }
        };
        self.cached(location)?;
        Ok(keep_open(block))
    }

    /// Records that the cached block at `location` was used (read or written here), and trims
    /// the cache to its size limit: the blocks used longest ago go first, never this one.
    fn cached(&self, location: &str) -> Result<(), BlockError> {
        let Some(remote) = &self.remote else { return Ok(()) };
        let bytes = std::fs::metadata(self.dir.join(location)).map(|m| m.len()).unwrap_or(0);
        for evicted in remote.cache().used(location, bytes) {
            self.close(&evicted);
            match std::fs::remove_file(self.dir.join(&evicted)) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(BlockError::Io(error)),
            }
        }
        Ok(())
    }

    /// Forgets an opened block (retired).
    fn close(&self, location: &str) {
        self.opened.lock().unwrap_or_else(|e| e.into_inner()).remove(location);
        self.opened_logs.lock().unwrap_or_else(|e| e.into_inner()).remove(location);
    }
}
