//! The span store's queries over the head and the blocks: the same answers as the row store's
//! (`store/spans.rs`), by the same semantics.

use std::collections::{BTreeSet, HashMap, HashSet};

use sqlx::AssertSqlSafe;

use super::format::Filter;
use super::{Bind, Pool, SpanBlocks, blocking, rows};
use crate::model::SpanRow;
use crate::store::StoreError;
use crate::store::spans::{Details, METERED_NAMES, MeteredSpan, TraceSearch};

fn is_metered_name(name: &str) -> bool {
    name.starts_with(contract::semconv::INVOKE_SPAN_PREFIX) || METERED_NAMES.contains(&name)
}

impl SpanBlocks {
    /// Every tenant with spans.
    pub async fn span_tenants(&self) -> Result<Vec<String>, StoreError> {
        let text = "SELECT DISTINCT tenant FROM span_blocks WHERE retired_ms IS NULL";
        let mut tenants: BTreeSet<String> =
            rows!(&self.pool, text, &[], |row| row.try_get::<String, _>(0)?).into_iter().collect();
        self.unsealed_tenants(&mut tenants)?;
        Ok(tenants.into_iter().collect())
    }

    /// A tenant's service names, from the catalog and the head.
    pub async fn services(&self, tenant: &str) -> Result<Vec<String>, StoreError> {
        let text = "SELECT services FROM span_blocks WHERE retired_ms IS NULL AND tenant = ?";
        let listed = rows!(&self.pool, text, &[Bind::Str(tenant)], |row| row.try_get::<String, _>(0)?);
        let mut services = BTreeSet::new();
        for json in listed {
            services.extend(serde_json::from_str::<Vec<String>>(&json).unwrap_or_default());
        }
        self.unsealed_services(tenant, &mut services)?;
        Ok(services.into_iter().collect())
    }

    /// A tenant's (operation, span kind) pairs of one service, gathered a row group at a time.
    pub async fn operations(&self, tenant: &str, service: &str) -> Result<Vec<(String, i64)>, StoreError> {
        let filter = Filter { service: Some(service), ..Filter::default() };
        let mut pairs = BTreeSet::new();
        self.each_batch(tenant, &filter, &mut |spans| {
            pairs.extend(spans.into_iter().map(|s| (s.span.name, s.span.kind)));
        })
        .await?;
        Ok(pairs.into_iter().collect())
    }

    /// The spans of some traces of one tenant, by trace id, each trace's spans by start time:
    /// at most [`MAX_TRACE_SPANS`] of each, the earliest. A trace is whatever a tenant's code
    /// makes; one of millions of spans is not held whole to answer.
    pub async fn traces(&self, tenant: &str, trace_ids: &[&str]) -> Result<HashMap<String, Vec<SpanRow>>, StoreError> {
        let mut traces: HashMap<String, Vec<SpanRow>> = HashMap::new();
        if trace_ids.is_empty() {
            return Ok(traces);
        }
        // All at once: a row group is decoded once for every trace it holds.
        let filter = Filter { trace_ids, ..Filter::default() };
        self.each_batch(tenant, &filter, &mut |spans| {
            for stored in spans {
                let spans = traces.entry(stored.span.trace_id.clone()).or_default();
                spans.push(stored.span);
                if spans.len() >= 2 * MAX_TRACE_SPANS {
                    earliest(spans, MAX_TRACE_SPANS);
                }
            }
        })
        .await?;
        for spans in traces.values_mut() {
            earliest(spans, MAX_TRACE_SPANS);
        }
        Ok(traces)
    }

    /// A tenant's spans whose name starts with `prefix`, started in `[since_ns, until_ns)`, that
    /// pass `keep`: the newest `limit`, newest first (ties by span id).
    ///
    /// The head, then blocks and their row groups from the latest start down, until `limit`
    /// spans are found that started after everything not yet read: what is held is at most
    /// about `4 * limit` spans and one row group, however many the tenant has.
    pub async fn spans_named(
        &self,
        tenant: &str,
        prefix: &str,
        (since_ns, until_ns): (i64, i64),
        limit: usize,
        keep: &(dyn Fn(&SpanRow) -> bool + Sync),
    ) -> Result<Vec<SpanRow>, StoreError> {
        if until_ns <= since_ns || limit == 0 {
            return Ok(Vec::new());
        }
        let named = Filter { start_ns: Some((since_ns, until_ns - 1)), name_prefix: Some(prefix), ..Filter::default() };
        let no_traces = named.trace_set();
        let prune_at = limit.saturating_mul(4).saturating_add(256);
        // The start of the `limit`-th span found so far: nothing older can enter the answer.
        // Taken again only when spans were found since (it sorts what is found).
        let mut known = (usize::MAX, None);
        let mut bar = |found: &mut Vec<SpanRow>| -> Option<i64> {
            if found.len() != known.0 {
                newest(found, limit);
                known = (found.len(), (found.len() == limit).then(|| found[limit - 1].start_ns));
            }
            known.1
        };
        let mut found = Vec::new();
        let mut head_bar = None;
        self.each_unsealed(Some(tenant), &mut |s| {
            if head_bar.is_none_or(|bar| s.span.start_ns >= bar) && named.keeps(s, &no_traces) && keep(&s.span) {
                found.push(s.span.clone());
                if found.len() >= prune_at {
                    head_bar = bar(&mut found);
                }
            }
        })?;
        let mut listed = super::blocks_of(&self.pool, Some(tenant), &named).await?;
        listed.sort_by_key(|l| std::cmp::Reverse(l.max_start_ns));
        'blocks: for listed in listed {
            if bar(&mut found).is_some_and(|bar| listed.max_start_ns < bar) {
                break;
            }
            let Some(block) = self.listed_block(&listed.location).await? else { continue };
            for (group, latest) in block.groups_newest_first() {
                if bar(&mut found).is_some_and(|bar| latest < bar) {
                    continue 'blocks;
                }
                let spans = blocking(|| block.read_group(group, &named)).map_err(StoreError::Blocks)?;
                found.extend(
                    spans.into_iter().filter(|s| s.span.tenant == listed.tenant && keep(&s.span)).map(|s| s.span),
                );
            }
        }
        newest(&mut found, limit);
        Ok(found)
    }

    /// Up to `search.limit` traces of `tenant` (or of every tenant) matching the search, most
    /// recently matched first, with their tenant and the start of their latest matching span:
    /// (start, trace id, tenant).
    ///
    /// The head, then blocks and their row groups from the latest start down, until `limit`
    /// traces are found that started after everything not yet read. Every tenant's blocks are
    /// read in one order, so a search over all tenants stops as early as a tenant's does.
    pub async fn find_traces(
        &self,
        tenant: Option<&str>,
        search: &TraceSearch,
    ) -> Result<Vec<(i64, String, String)>, StoreError> {
        let window = Filter {
            service: Some(&search.service),
            start_ns: Some((search.start_ns, search.end_ns)),
            ..Filter::default()
        };
        let matches = |span: &SpanRow| {
            let duration = span.duration_ns();
            span.service_name == search.service
                && (search.start_ns..=search.end_ns).contains(&span.start_ns)
                && search.operation.as_deref().is_none_or(|op| span.name == op)
                && (search.min_ns == 0 || duration >= search.min_ns)
                && (search.max_ns == 0 || duration <= search.max_ns)
                && (search.tags.is_empty() || Details::of(span).matches(&search.tags))
        };
        // The start of the `limit`-th trace found so far (nothing older can enter the answer),
        // with what is older dropped: each trace once (its latest match), newest first, ties
        // by trace id, and never more than `limit` kept. A trace of many matching spans, or
        // many traces starting at one instant, so cost a sort of at most `4 * limit + 256`
        // entries per prune, not one per match.
        let limit = search.limit.max(1);
        let bar = |found: &mut Vec<(i64, String, String)>| -> Option<i64> {
            found.sort_unstable_by(|a, b| b.cmp(a));
            let mut seen = HashSet::new();
            found.retain(|(_, trace, tenant)| seen.insert((trace.clone(), tenant.clone())));
            if found.len() < limit {
                return None;
            }
            found.truncate(limit);
            Some(found[limit - 1].0)
        };
        // (start, trace id, tenant) of the matches: a trace's spans are not copied to find it.
        let mut found: Vec<(i64, String, String)> = Vec::new();
        let mut head_bar = None;
        self.each_unsealed(tenant, &mut |s| {
            if matches(&s.span) && head_bar.is_none_or(|bar| s.span.start_ns >= bar) {
                found.push((s.span.start_ns, s.span.trace_id.clone(), s.span.tenant.clone()));
                if found.len() >= 4 * limit + 256 {
                    head_bar = bar(&mut found);
                }
            }
        })?;
        let mut listed = super::blocks_of(&self.pool, tenant, &window).await?;
        listed.sort_by_key(|l| std::cmp::Reverse(l.max_start_ns));
        'blocks: for listed in listed {
            if bar(&mut found).is_some_and(|bar| listed.max_start_ns < bar) {
                break;
            }
            let Some(block) = self.listed_block(&listed.location).await? else { continue };
            for (group, latest) in block.groups_newest_first() {
                if bar(&mut found).is_some_and(|bar| latest < bar) {
                    continue 'blocks;
                }
                if search.tags.is_empty() {
                    // Name, times and ids are all a search without tags looks at.
                    let light = blocking(|| block.search_group(group, &window)).map_err(StoreError::Blocks)?;
                    found.extend(
                        light
                            .into_iter()
                            .filter(|s| {
                                let duration = s.end_ns.saturating_sub(s.start_ns).max(0);
                                s.tenant == listed.tenant
                                    && search.operation.as_deref().is_none_or(|op| s.name == op)
                                    && (search.min_ns == 0 || duration >= search.min_ns)
                                    && (search.max_ns == 0 || duration <= search.max_ns)
                            })
                            .map(|s| (s.start_ns, s.trace_id, s.tenant)),
                    );
                    continue;
                }
                let spans = blocking(|| block.read_group(group, &window)).map_err(StoreError::Blocks)?;
                found.extend(
                    spans
                        .into_iter()
                        .filter(|s| s.span.tenant == listed.tenant && matches(&s.span))
                        .map(|s| (s.span.start_ns, s.span.trace_id, s.span.tenant)),
                );
            }
        }
        found.sort_unstable_by(|a, b| b.cmp(a));
        let mut seen = HashSet::new();
        Ok(found
            .into_iter()
            .filter(|(_, trace, tenant)| seen.insert((trace.clone(), tenant.clone())))
            .take(search.limit)
            .collect())
    }

    /// A tenant's (parent service, child service, calls) for spans started in
    /// `start_ns..=end_ns` whose parent, wherever it is, is of another service.
    pub async fn dependencies(
        &self,
        tenant: &str,
        start_ns: i64,
        end_ns: i64,
    ) -> Result<Vec<(String, String, i64)>, StoreError> {
        // (trace, span) → (service, parent): what the graph needs of a span, not the span.
        type Ends = HashMap<(String, String), (String, Option<String>)>;
        let mut spans: Ends = HashMap::new();
        let window = Filter { start_ns: Some((start_ns, end_ns)), ..Filter::default() };
        let mut over = false;
        self.each_batch(tenant, &window, &mut |batch| {
            for s in batch {
                if spans.len() >= MAX_DEPENDENCY_SPANS {
                    over = true;
                    return;
                }
                let ends = (s.span.service_name, s.span.parent_span_id);
                spans.entry((s.span.trace_id, s.span.span_id)).or_insert(ends);
            }
        })
        .await?;
        if over {
            return Err(StoreError::OverBudget);
        }
        // Parents that started outside the window: found by their traces.
        let mut outside: HashMap<(String, String), String> = spans
            .iter()
            .filter_map(|((trace, _), (_, parent))| {
                let key = (trace.clone(), parent.clone()?);
                (!spans.contains_key(&key)).then_some((key, String::new()))
            })
            .collect();
        let missing: BTreeSet<&str> = outside.keys().map(|(trace, _)| trace.as_str()).collect();
        let missing: Vec<String> = missing.into_iter().map(str::to_string).collect();
        let missing: Vec<&str> = missing.iter().map(String::as_str).collect();
        if !missing.is_empty() {
            let traces = Filter { trace_ids: &missing, ..Filter::default() };
            self.each_batch(tenant, &traces, &mut |batch| {
                for s in batch {
                    if let Some(service) = outside.get_mut(&(s.span.trace_id, s.span.span_id))
                        && service.is_empty()
                    {
                        *service = s.span.service_name;
                    }
                }
            })
            .await?;
        }
        let mut counts: HashMap<(String, String), i64> = HashMap::new();
        for ((trace, _), (service, parent)) in &spans {
            let Some(parent) = parent else { continue };
            let key = (trace.clone(), parent.clone());
            let parent_service = match spans.get(&key) {
                Some((service, _)) => service,
                None => outside.get(&key).filter(|s| !s.is_empty()).unwrap_or(service),
            };
            if parent_service != service {
                *counts.entry((parent_service.clone(), service.clone())).or_default() += 1;
            }
        }
        let mut out: Vec<(String, String, i64)> = counts.into_iter().map(|((p, c), n)| (p, c, n)).collect();
        out.sort();
        Ok(out)
    }

    /// The metered spans of every tenant that arrived in `(after_ms, upto_ms]`, one per
    /// identity (the first found, as [`Self::read`] keeps).
    pub async fn metered_spans(&self, after_ms: i64, upto_ms: i64) -> Result<Vec<MeteredSpan>, StoreError> {
        let arrived = Filter { received_ms: Some((after_ms, upto_ms)), ..Filter::default() };
        let no_traces = arrived.trace_set();
        let mut out = Vec::new();
        self.each_unsealed(None, &mut |s| {
            if s.span.metered && arrived.keeps(s, &no_traces) && is_metered_name(&s.span.name) {
                out.push(MeteredSpan {
                    tenant: s.span.tenant.clone(),
                    trace_id: s.span.trace_id.clone(),
                    span_id: s.span.span_id.clone(),
                    name: s.span.name.clone(),
                    start_ns: s.span.start_ns,
                    end_ns: s.span.end_ns,
                    received_ms: s.received_ms,
                    attributes: s.span.attributes.clone(),
                });
            }
        })?;
        for listed in super::blocks_of(&self.pool, None, &arrived).await? {
            let Some(block) = self.listed_block(&listed.location).await? else { continue };
            let found = blocking(|| block.metered((after_ms, upto_ms), is_metered_name)).map_err(StoreError::Blocks)?;
            // The catalog says whose a block is; the rows say it again.
            out.extend(found.into_iter().filter(|s| s.tenant == listed.tenant));
        }
        let first: Vec<bool> = {
            let mut seen = HashSet::new();
            out.iter().map(|s| seen.insert((s.tenant.as_str(), s.trace_id.as_str(), s.span_id.as_str()))).collect()
        };
        let mut i = 0;
        out.retain(|_| {
            i += 1;
            first[i - 1]
        });
        Ok(out)
    }

    /// Where a chunk of `spans` metered spans after `watermark_ms` ends (ms of arrival; the rest
    /// of that millisecond is in the chunk too), never past `upto_ms`.
    ///
    /// A chunk that reaches into a block ends where that block's arrivals end, so that each
    /// block is read once however many spans it holds (a block is at most [`super::SEAL_ROWS`]).
    pub async fn metered_chunk_end(&self, watermark_ms: i64, upto_ms: i64, spans: i64) -> Result<i64, StoreError> {
        let text = "SELECT MIN(max_received_ms) FROM span_blocks WHERE retired_ms IS NULL AND max_received_ms > ? \
                    AND min_received_ms <= ?";
        let binds = [Bind::Int(watermark_ms), Bind::Int(upto_ms)];
        let first_block =
            rows!(&self.pool, text, &binds, |row| row.try_get::<Option<i64>, _>(0)?).into_iter().flatten().next();
        if let Some(end) = first_block {
            return Ok(end.min(upto_ms));
        }
        let mut times: Vec<i64> = Vec::new();
        self.each_unsealed(None, &mut |s| {
            if s.span.metered && s.received_ms > watermark_ms && s.received_ms <= upto_ms {
                times.push(s.received_ms);
            }
        })?;
        times.sort_unstable();
        Ok(usize::try_from(spans).ok().and_then(|n| times.get(n)).copied().unwrap_or(upto_ms))
    }

    /// How many spans a tenant has.
    pub async fn count(&self, tenant: &str) -> Result<u64, StoreError> {
        let mut seen = HashSet::new();
        self.each_batch(tenant, &Filter::default(), &mut |batch| {
            seen.extend(batch.iter().map(|s| super::key(&s.span)));
        })
        .await?;
        Ok(seen.len() as u64)
    }

    /// Deletes a tenant's blocks whose spans all started before `before_ns` or all arrived
    /// before it, and such spans of the head; returns the spans deleted. A block stays whole
    /// until all of it is old by one of the two: retention is by block. Arrival bounds it: a
    /// tenant's span dated in the far future still goes a period after it arrived.
    pub async fn delete_before(&self, tenant: &str, before_ns: i64) -> Result<u64, StoreError> {
        let before_ms = before_ns.div_euclid(1_000_000);
        let text = "SELECT location, rows FROM span_blocks WHERE retired_ms IS NULL AND tenant = ? \
                    AND (max_start_ns < ? OR max_received_ms < ?)";
        let binds = [Bind::Str(tenant), Bind::Int(before_ns), Bind::Int(before_ms)];
        let old = rows!(&self.pool, text, &binds, |row| (row.try_get::<String, _>(0)?, row.try_get::<i64, _>(1)?));
        Ok(self.unlist("span_blocks", old).await? + self.forget_head_before(tenant, before_ns))
    }

    /// Unlists the blocks at `old`'s locations from the catalog `table`, then removes them;
    /// returns their rows (`old`'s counts) summed.
    pub(super) async fn unlist(&self, table: &str, old: Vec<(String, i64)>) -> Result<u64, StoreError> {
        let unlist = self.pool.sql(&format!("DELETE FROM {table} WHERE location = ?")).0;
        let mut deleted = 0;
        for (location, rows) in old {
            match &self.pool {
                Pool::Sqlite(p) => {
                    sqlx::query(AssertSqlSafe(unlist.clone())).bind(&location).execute(p).await.map(drop)?
                }
                Pool::Postgres(p) => {
                    sqlx::query(AssertSqlSafe(unlist.clone())).bind(&location).execute(p).await.map(drop)?
                }
            }
            // Unlisted first: a reader never opens a listed block that is gone.
            self.remove(&location).await?;
            deleted += rows as u64;
        }
        Ok(deleted)
    }
}

/// At most this many spans of one trace are read (the earliest by start); see
/// [`SpanBlocks::traces`].
pub const MAX_TRACE_SPANS: usize = 10_000;

/// Spans of its window a dependencies graph holds (a few strings each) before it is refused
/// as [`StoreError::OverBudget`]: a narrower window is asked for.
pub const MAX_DEPENDENCY_SPANS: usize = 5_000_000;

/// `spans` each once (by identity, the first found), ordered by `order`, at most `limit`.
fn distinct_first(spans: &mut Vec<SpanRow>, limit: usize, order: impl Fn(&SpanRow, &SpanRow) -> std::cmp::Ordering) {
    // Each span's key (ids decoded from hex) made once, not at every comparison.
    spans.sort_by_cached_key(super::key);
    spans.dedup_by_key(|s| super::key(s));
    spans.sort_by(order);
    spans.truncate(limit);
}

/// The `limit` earliest of `spans`, by start then span id.
fn earliest(spans: &mut Vec<SpanRow>, limit: usize) {
    distinct_first(spans, limit, |a, b| a.start_ns.cmp(&b.start_ns).then_with(|| a.span_id.cmp(&b.span_id)));
}

/// The `limit` newest of `spans`, newest first, ties by span id.
fn newest(spans: &mut Vec<SpanRow>, limit: usize) {
    distinct_first(spans, limit, |a, b| b.start_ns.cmp(&a.start_ns).then_with(|| a.span_id.cmp(&b.span_id)));
}
