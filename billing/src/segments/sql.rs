//! The statements on `usage_segments` (the catalog, keys and records of every segment), on
//! either backend; the snapshot reads of segments with the watermark and totals; and the
//! one-time move of usage records stored as rows into segments.

use rust_decimal::Decimal;
use sqlx::Row;

use super::format::{Stored, encode};
use super::keys::keys_of;
use super::{FANOUT, level};
use crate::Result;
use crate::db::{Db, on_pool};
use crate::usage::{Kind, Totals, TotalsKey, UsageRecord};

/// What a catalog row says of a segment.
#[derive(Debug, Clone)]
pub struct Listed {
    pub id: i64,
    pub tenant: String,
    pub billed_period: String,
    pub first_start_ns: i64,
    pub last_start_ns: i64,
    pub last_received_ms: i64,
}

/// The statements on segments, on one connection of either backend (the same code, compiled
/// for each by [`impl_conn`]); the logic above them ([`store`](super::store),
/// [`merge`](super::merge)) is written once.
pub(crate) trait Conn {
    /// The catalog rows of `tenant`'s segments (or every tenant's), by id.
    async fn list(&mut self, tenant: Option<&str>) -> Result<Vec<Listed>>;
    /// The segments of these tenants: (id, tenant, billed period, level).
    async fn segments_of(&mut self, tenants: &[&str]) -> Result<Vec<(i64, String, String, i64)>>;
    /// The ids of an invoice's segments of one level.
    async fn level_ids(&mut self, tenant: &str, billed_period: &str, level: i64) -> Result<Vec<i64>>;
    /// The (tenant, billed period, level) with [`FANOUT`] segments or more, for levels in
    /// `levels`.
    async fn full_levels(&mut self, levels: std::ops::Range<i64>) -> Result<Vec<(String, String, i64)>>;
    /// A segment's keys column.
    async fn keys(&mut self, id: i64) -> Result<Vec<u8>>;
    /// A segment's records' bytes.
    async fn data(&mut self, id: i64) -> Result<Vec<u8>>;
    /// Writes one segment of an invoice's records (in billing's order); returns its id and keys.
    async fn insert(&mut self, tenant: &str, billed_period: &str, records: &[Stored<'_>]) -> Result<(i64, Vec<u64>)>;
    async fn delete(&mut self, id: i64) -> Result<()>;
    /// Billing's watermark (0 before the first run).
    async fn watermark(&mut self) -> Result<i64>;
    /// The running totals of `tenant` (or every tenant).
    async fn totals(&mut self, tenant: Option<&str>) -> Result<Vec<(TotalsKey, Totals)>>;
}

const LIST: &str =
    "SELECT id, tenant, billed_period, first_start_ns, last_start_ns, last_received_ms FROM usage_segments";

macro_rules! impl_conn {
    ($conn:ty, $postgres:expr) => {
        impl Conn for $conn {
            async fn list(&mut self, tenant: Option<&str>) -> Result<Vec<Listed>> {
                let rows = match tenant {
                    Some(tenant) => {
                        let text = sql($postgres, &format!("{LIST} WHERE tenant = ? ORDER BY id"));
                        sqlx::query(text).bind(tenant).fetch_all(&mut *self).await?
                    }
                    None => sqlx::query(sql($postgres, &format!("{LIST} ORDER BY id"))).fetch_all(&mut *self).await?,
                };
                let listed = rows.iter().map(|row| {
                    Ok(Listed {
                        id: row.try_get(0)?,
                        tenant: row.try_get(1)?,
                        billed_period: row.try_get(2)?,
                        first_start_ns: row.try_get(3)?,
                        last_start_ns: row.try_get(4)?,
                        last_received_ms: row.try_get(5)?,
                    })
                });
                Ok(listed.collect::<Result<_, sqlx::Error>>()?)
            }

            async fn segments_of(&mut self, tenants: &[&str]) -> Result<Vec<(i64, String, String, i64)>> {
                let mut out = Vec::new();
                for part in tenants.chunks(500) {
                    let text = format!(
                        "SELECT id, tenant, billed_period, level FROM usage_segments WHERE tenant IN ({}) ORDER BY id",
                        vec!["?"; part.len()].join(", ")
                    );
                    let mut query = sqlx::query_as(sql($postgres, &text));
                    for tenant in part {
                        query = query.bind(*tenant);
                    }
                    out.extend(query.fetch_all(&mut *self).await?);
                }
                Ok(out)
            }

            async fn level_ids(&mut self, tenant: &str, billed_period: &str, level: i64) -> Result<Vec<i64>> {
                let text = sql(
                    $postgres,
                    "SELECT id FROM usage_segments WHERE tenant = ? AND billed_period = ? AND level = ? ORDER BY id",
                );
                Ok(sqlx::query_scalar(text).bind(tenant).bind(billed_period).bind(level).fetch_all(&mut *self).await?)
            }

            async fn full_levels(&mut self, levels: std::ops::Range<i64>) -> Result<Vec<(String, String, i64)>> {
                let text = sql(
                    $postgres,
                    "SELECT tenant, billed_period, level FROM usage_segments WHERE level >= ? AND level < ? \
                     GROUP BY tenant, billed_period, level HAVING COUNT(*) >= ?",
                );
                let query = sqlx::query_as(text).bind(levels.start).bind(levels.end).bind(FANOUT as i64);
                Ok(query.fetch_all(&mut *self).await?)
            }

            async fn keys(&mut self, id: i64) -> Result<Vec<u8>> {
                let text = sql($postgres, "SELECT keys FROM usage_segments WHERE id = ?");
                Ok(sqlx::query_scalar(text).bind(id).fetch_one(&mut *self).await?)
            }

            async fn data(&mut self, id: i64) -> Result<Vec<u8>> {
                let text = sql($postgres, "SELECT data FROM usage_segments WHERE id = ?");
                Ok(sqlx::query_scalar(text).bind(id).fetch_one(&mut *self).await?)
            }

            async fn insert(
                &mut self,
                tenant: &str,
                billed_period: &str,
                records: &[Stored<'_>],
            ) -> Result<(i64, Vec<u64>)> {
                let (hashes, keys) = keys_of(records);
                let starts = records.iter().map(|r| r.start_ns);
                let arrivals = records.iter().map(|r| r.received_ms);
                let text = sql(
                    $postgres,
                    "INSERT INTO usage_segments (tenant, billed_period, level, records, first_start_ns, last_start_ns, \
                     first_received_ms, last_received_ms, keys, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                );
                let id: i64 = sqlx::query_scalar(text)
                    .bind(tenant)
                    .bind(billed_period)
                    .bind(level(records.len()))
                    .bind(records.len() as i64)
                    .bind(starts.clone().min().unwrap_or(0))
                    .bind(starts.max().unwrap_or(0))
                    .bind(arrivals.clone().min().unwrap_or(0))
                    .bind(arrivals.max().unwrap_or(0))
                    .bind(keys)
                    .bind(encode(records))
                    .fetch_one(&mut *self)
                    .await?;
                Ok((id, hashes))
            }

            async fn delete(&mut self, id: i64) -> Result<()> {
                let text = sql($postgres, "DELETE FROM usage_segments WHERE id = ?");
                sqlx::query(text).bind(id).execute(&mut *self).await?;
                Ok(())
            }

            async fn watermark(&mut self) -> Result<i64> {
                let text = "SELECT value FROM billing_settings WHERE key = 'watermark_ms'";
                let value: Option<String> = sqlx::query_scalar(text).fetch_optional(&mut *self).await?;
                Ok(value.and_then(|v| v.parse().ok()).unwrap_or(0))
            }

            async fn totals(&mut self, tenant: Option<&str>) -> Result<Vec<(TotalsKey, Totals)>> {
                let text = format!(
                    "SELECT tenant, billed_period, period, plan, function, records, invocations, errors, cpu_ms, \
                     wall_ms, bytes_out, log_bytes, state_byte_seconds FROM usage_totals{}",
                    if tenant.is_some() { " WHERE tenant = ?" } else { "" }
                );
                let mut query = sqlx::query(sql($postgres, &text));
                if let Some(tenant) = tenant {
                    query = query.bind(tenant);
                }
                let rows = query.fetch_all(&mut *self).await?;
                rows.iter()
                    .map(|row| Ok((crate::totals::key_of(row)?, crate::totals::totals_of(row)?)))
                    .collect()
            }
        }
    };
}

/// `text` with `?` placeholders in the backend's syntax.
fn sql(postgres: bool, text: &str) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(if postgres { collector::store::numbered_placeholders(text) } else { text.to_string() })
}

impl_conn!(sqlx::SqliteConnection, false);
impl_conn!(sqlx::PgConnection, true);

/// What a snapshot read besides the records: billing's watermark and, if asked, the running
/// totals.
pub struct Snapshot {
    pub watermark: i64,
    pub totals: Vec<(TotalsKey, Totals)>,
}

/// Reads in one snapshot: the catalog of `tenant`'s segments (or every tenant's), the records
/// of those `keep` chooses (their bytes to `f`, one segment at a time, in id order; read them
/// with [`each`](super::each)), billing's watermark,
/// and with `totals` the running totals. Billing commits records, totals and watermark
/// together, so they agree.
pub async fn scan(
    db: &Db,
    tenant: Option<&str>,
    totals: bool,
    keep: impl Fn(&Listed) -> bool,
    mut f: impl FnMut(&Listed, &[u8], &Snapshot) -> Result<()>,
) -> Result<Snapshot> {
    let begin = match db {
        Db::Sqlite(_) => "BEGIN",
        Db::Postgres(_) => "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
    };
    on_pool!(db, pool => {
        let mut tx = pool.begin_with(begin).await?;
        let watermark = tx.watermark().await?;
        let totals = if totals { tx.totals(tenant).await? } else { Vec::new() };
        let snapshot = Snapshot { watermark, totals };
        for listed in tx.list(tenant).await? {
            if keep(&listed) {
                f(&listed, &tx.data(listed.id).await?, &snapshot)?;
            }
        }
        tx.commit().await?;
        Ok(snapshot)
    })
}

/// Rows converted per transaction (a segment each).
const CONVERT_ROWS: i64 = 65_536;

/// Moves the rows of `usage_records` (the layout before segments), if that table is there,
/// into segments: an invoice at a time, [`CONVERT_ROWS`] rows per transaction (written as a
/// segment and deleted together, so an interrupted conversion resumes where it stopped), then
/// drops the table. The running totals already count those records and stay as they are.
/// Returns how many records were moved.
pub async fn convert_rows(db: &Db) -> Result<u64> {
    let exists = match db {
        Db::Sqlite(_) => "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'usage_records'",
        Db::Postgres(_) => {
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = 'usage_records' \
             AND table_schema = current_schema()"
        }
    };
    let postgres = matches!(db, Db::Postgres(_));
    let mut moved = 0u64;
    on_pool!(db, pool => {
        let found: i64 = sqlx::query_scalar(exists).fetch_one(pool).await?;
        if found == 0 {
            return Ok(0);
        }
        let invoices: Vec<(String, String)> =
            sqlx::query_as("SELECT DISTINCT tenant, billed_period FROM usage_records").fetch_all(pool).await?;
        for (tenant, billed_period) in invoices {
            loop {
                let mut tx = pool.begin().await?;
                let text = sql(
                    postgres,
                    &format!(
                        "SELECT usage_id, kind, function, flow_run, call_id, trace_id, span_id, start_ns, end_ns, cpu_ms, \
                         wall_ms, memory_peak_bytes, bytes_in, bytes_out, status_code, state_byte_seconds, period, plan, \
                         received_ms FROM usage_records WHERE tenant = ? AND billed_period = ? \
                         ORDER BY start_ns, usage_id LIMIT {CONVERT_ROWS}"
                    ),
                );
                let rows = sqlx::query(text).bind(&tenant).bind(&billed_period).fetch_all(&mut *tx).await?;
                if rows.is_empty() {
                    break;
                }
                let records = rows
                    .iter()
                    .map(|row| {
                        Ok(UsageRecord {
                            tenant: tenant.clone(),
                            usage_id: row.try_get(0)?,
                            kind: Kind::parse(&row.try_get::<String, _>(1)?),
                            function: row.try_get(2)?,
                            flow_run: row.try_get(3)?,
                            call_id: row.try_get(4)?,
                            trace_id: row.try_get(5)?,
                            span_id: row.try_get(6)?,
                            start_ns: row.try_get(7)?,
                            end_ns: row.try_get(8)?,
                            cpu_ms: row.try_get(9)?,
                            wall_ms: row.try_get(10)?,
                            memory_peak_bytes: row.try_get(11)?,
                            bytes_in: row.try_get(12)?,
                            bytes_out: row.try_get(13)?,
                            // The table is from before log bytes were billed.
                            log_bytes: 0,
                            status_code: row.try_get(14)?,
                            // Kept as stored (its text), below.
                            state_byte_seconds: Decimal::ZERO,
                            period: row.try_get(16)?,
                            billed_period: billed_period.clone(),
                            plan: row.try_get(17)?,
                            received_ms: row.try_get(18)?,
                        })
                    })
                    .collect::<Result<Vec<_>, sqlx::Error>>()?;
                let states =
                    rows.iter().map(|row| row.try_get::<String, _>(15)).collect::<Result<Vec<_>, sqlx::Error>>()?;
                for state in &states {
                    crate::records::decimal_of(state)?;
                }
                let stored: Vec<Stored> = records.iter().zip(&states).map(|(r, s)| Stored::of(r, s)).collect();
                tx.insert(&tenant, &billed_period, &stored).await?;
                for r in &records {
                    let text = sql(postgres, "DELETE FROM usage_records WHERE tenant = ? AND usage_id = ?");
                    sqlx::query(text).bind(&tenant).bind(&r.usage_id).execute(&mut *tx).await?;
                }
                tx.commit().await?;
                moved += records.len() as u64;
                tracing::info!(%tenant, %billed_period, records = moved, "moving usage records into segments");
            }
        }
        sqlx::query("DROP TABLE usage_records").execute(pool).await?;
    });
    Ok(moved)
}
