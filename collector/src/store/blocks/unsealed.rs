//! The spans not in blocks yet: this writer's head (the spans written since its last seal, in
//! memory), the head being sealed, and the other writers' logs on this host, followed as they
//! grow.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use super::format::Stored;
use super::{SpanBlocks, StoreError, io, wal};
use crate::model::SpanRow;

/// The spans written since the last seal.
#[derive(Default)]
pub(super) struct Head {
    pub(super) tenants: HashMap<String, TenantHead>,
    pub(super) rows: usize,
    /// When its first span was written.
    pub(super) since: Option<std::time::Instant>,
}

/// One tenant's spans in the head.
#[derive(Default)]
pub(super) struct TenantHead {
    spans: Vec<Stored>,
    /// The identity ([`key`]) of every span in `spans`.
    keys: HashSet<[u8; 25]>,
    /// The service names of `spans`.
    services: std::collections::BTreeSet<String>,
}

/// A span's identity within its tenant: its trace and span ids' bytes (validated hex), and
/// whether the platform metered it. A tenant's own span never takes a metered span's identity:
/// a function knows its invocation span's ids (its `traceparent`), and a copy its tenant sent
/// first must not make the platform's metered span a duplicate, dropped unbilled.
pub(super) fn key(span: &SpanRow) -> [u8; 25] {
    let mut key = [0u8; 25];
    let _ = hex::decode_to_slice(&span.trace_id, &mut key[..16]);
    let _ = hex::decode_to_slice(&span.span_id, &mut key[16..24]);
    key[24] = u8::from(span.metered);
    key
}

impl Head {
    pub(super) fn contains(&self, span: &SpanRow) -> bool {
        self.tenants.get(&span.tenant).is_some_and(|t| t.keys.contains(&key(span)))
    }

    /// A tenant's spans (none when it has none).
    pub(super) fn spans(&self, tenant: &str) -> &[Stored] {
        self.tenants.get(tenant).map_or(&[], |t| &t.spans)
    }

    pub(super) fn all(&self) -> impl Iterator<Item = &Stored> {
        self.tenants.values().flat_map(|t| &t.spans)
    }

    pub(super) fn insert(&mut self, stored: Stored) -> bool {
        let tenant = match self.tenants.get_mut(&stored.span.tenant) {
            Some(tenant) => tenant,
            None => self.tenants.entry(stored.span.tenant.clone()).or_default(),
        };
        if !tenant.keys.insert(key(&stored.span)) {
            return false;
        }
        if !tenant.services.contains(&stored.span.service_name) {
            tenant.services.insert(stored.span.service_name.clone());
        }
        tenant.spans.push(stored);
        self.rows += 1;
        self.since.get_or_insert_with(std::time::Instant::now);
        true
    }
}

/// Another writer's log segment, read up to `offset`: its spans by tenant.
#[derive(Default)]
pub(super) struct Followed {
    offset: u64,
    pub(super) tenants: HashMap<String, Vec<Stored>>,
}

impl SpanBlocks {
    /// The other writers' logs on this host, by segment, brought up to date: what each segment
    /// gained since it was last read (up to its last whole record), and nothing of segments since
    /// removed (sealed: their blocks were listed before they went).
    fn follow(&self) -> Result<std::sync::MutexGuard<'_, HashMap<PathBuf, Followed>>, StoreError> {
        let wals = self.dir.join("wal");
        let mut followed = self.followed.lock().unwrap_or_else(|e| e.into_inner());
        let mut present = HashSet::new();
        for entry in std::fs::read_dir(&wals).map_err(io)? {
            let id = entry.map_err(io)?.file_name().to_string_lossy().into_owned();
            if id == self.collector {
                continue;
            }
            let Ok(segments) = wal::segments(&wals.join(&id)) else { continue };
            for seq in segments {
                let path = wal::segment_path(&wals.join(&id), seq);
                let state = followed.entry(path.clone()).or_default();
                // Unchanged since the last read: nothing to open.
                if std::fs::metadata(&path).is_ok_and(|m| m.len() == state.offset) {
                    present.insert(path);
                    continue;
                }
                match wal::read_from(&path, state.offset) {
                    Ok((records, offset)) => {
                        for stored in records.into_iter().flatten() {
                            match state.tenants.get_mut(&stored.span.tenant) {
                                Some(spans) => spans.push(stored),
                                None => {
                                    state.tenants.insert(stored.span.tenant.clone(), vec![stored]);
                                }
                            }
                        }
                        state.offset = offset;
                    }
                    // Sealed and removed since it was listed.
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                    Err(error) => return Err(io(error)),
                }
                present.insert(path);
            }
        }
        followed.retain(|path, _| present.contains(path));
        Ok(followed)
    }

    /// The tenants with spans not in blocks yet.
    pub(super) fn unsealed_tenants(&self, tenants: &mut std::collections::BTreeSet<String>) -> Result<(), StoreError> {
        tenants.extend(self.writer.lock().unwrap_or_else(|e| e.into_inner()).head.tenants.keys().cloned());
        if let Some(sealing) = self.sealing.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            tenants.extend(sealing.tenants.keys().cloned());
        }
        for segment in self.follow()?.values() {
            tenants.extend(segment.tenants.keys().cloned());
        }
        Ok(())
    }

    /// The service names of a tenant's spans not in blocks yet.
    pub(super) fn unsealed_services(
        &self,
        tenant: &str,
        services: &mut std::collections::BTreeSet<String>,
    ) -> Result<(), StoreError> {
        let of_head = |head: &Head| head.tenants.get(tenant).map(|t| t.services.clone()).unwrap_or_default();
        services.extend(of_head(&self.writer.lock().unwrap_or_else(|e| e.into_inner()).head));
        if let Some(sealing) = self.sealing.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            services.extend(of_head(&sealing));
        }
        for spans in self.follow()?.values().filter_map(|segment| segment.tenants.get(tenant)) {
            for s in spans {
                if !services.contains(&s.span.service_name) {
                    services.insert(s.span.service_name.clone());
                }
            }
        }
        Ok(())
    }

    /// Runs `f` on the spans not in blocks yet, of `tenant` (or of every tenant): this writer's
    /// head, its head being sealed, and the other writers' logs on this host, in that order (a
    /// seal lists its blocks before it lets go of its head or removes its log, so a span is
    /// here or in the catalog read after this).
    pub(super) fn each_unsealed(&self, tenant: Option<&str>, f: &mut dyn FnMut(&Stored)) -> Result<(), StoreError> {
        let mut of_head = |head: &Head| match tenant {
            Some(tenant) => head.spans(tenant).iter().for_each(&mut *f),
            None => head.all().for_each(&mut *f),
        };
        of_head(&self.writer.lock().unwrap_or_else(|e| e.into_inner()).head);
        let sealing = self.sealing.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(sealing) = sealing {
            of_head(&sealing);
        }
        for segment in self.follow()?.values() {
            match tenant {
                Some(tenant) => segment.tenants.get(tenant).into_iter().flatten().for_each(&mut *f),
                None => segment.tenants.values().flatten().for_each(&mut *f),
            }
        }
        Ok(())
    }

    /// The spans not in blocks yet (as [`Self::each_unsealed`]) that pass `keep`.
    pub(super) fn unsealed(
        &self,
        tenant: Option<&str>,
        keep: impl Fn(&Stored) -> bool,
    ) -> Result<Vec<Stored>, StoreError> {
        let mut out = Vec::new();
        self.each_unsealed(tenant, &mut |s| {
            if keep(s) {
                out.push(s.clone())
            }
        })?;
        Ok(out)
    }

    /// Drops a tenant's spans that started before `before_ns` from the head (their log records
    /// stay until the next seal; a restart before it would bring them back until the next
    /// retention pass); returns how many.
    pub(super) fn forget_head_before(&self, tenant: &str, before_ns: i64) -> u64 {
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let head = &mut writer.head;
        let Some(TenantHead { spans, keys, .. }) = head.tenants.get_mut(tenant) else { return 0 };
        let before = spans.len();
        let before_ms = before_ns.div_euclid(1_000_000);
        spans.retain(|s| {
            let keep = s.span.start_ns >= before_ns && s.received_ms >= before_ms;
            if !keep {
                keys.remove(&key(&s.span));
            }
            keep
        });
        let gone = before - spans.len();
        head.rows -= gone;
        gone as u64
    }
}
