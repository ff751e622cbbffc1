//! SQL on either backend for the Prometheus API: SQL is written once with `?` placeholders
//! (`TelemetryStore::sql` numbers them for PostgreSQL) and computed integers are written into
//! the text; only strings are bound.

use collector::store::TelemetryStore;

use super::eval::QueryError;

pub fn is_sqlite(store: &TelemetryStore) -> bool {
    matches!(store, TelemetryStore::Sqlite(_))
}

impl From<sqlx::Error> for QueryError {
    fn from(error: sqlx::Error) -> Self {
        tracing::error!(%error, "prometheus query failed");
        QueryError::Internal(format!("telemetry store: {error}"))
    }
}

impl From<billing::BillingError> for QueryError {
    fn from(error: billing::BillingError) -> Self {
        tracing::error!(%error, "prometheus query failed");
        QueryError::Internal(error.to_string())
    }
}

/// Runs `$sql` binding the strings `$binds` on whichever pool `$store` holds, and decodes every
/// row with `$decode` (compiled once per backend).
macro_rules! fetch {
    ($store:expr, $sql:expr, $binds:expr, |$row:ident| $decode:expr) => {
        $crate::prometheus::db::fetch!($store, $sql, $binds, pg_setup = None, |$row| $decode)
    };
    // `pg_setup`: a statement run first in the same transaction on PostgreSQL (`SET LOCAL`).
    ($store:expr, $sql:expr, $binds:expr, pg_setup = $setup:expr, |$row:ident| $decode:expr) => {{
        let setup: Option<&'static str> = $setup;
        let store: &collector::store::TelemetryStore = $store;
        let text = store.sql($sql);
        let binds: &[&str] = $binds;
        macro_rules! run {
            ($pool:expr) => {{
                let mut query = sqlx::query(text);
                for bind in binds {
                    query = query.bind(*bind);
                }
                query
                    .fetch_all($pool)
                    .await?
                    .iter()
                    .map(|$row| -> std::result::Result<_, sqlx::Error> {
                        #[allow(unused_imports)]
                        use sqlx::Row as _;
                        Ok($decode)
                    })
                    .collect::<std::result::Result<Vec<_>, sqlx::Error>>()?
            }};
        }
        match (store, setup) {
            (collector::store::TelemetryStore::Sqlite(pool), _) => run!(pool),
            (collector::store::TelemetryStore::Postgres(pool), None) => run!(pool),
            (collector::store::TelemetryStore::Postgres(pool), Some(setup)) => {
                let mut tx = pool.begin().await?;
                sqlx::query(setup).execute(&mut *tx).await?;
                let rows = run!(&mut *tx);
                tx.commit().await?;
                rows
            }
        }
    }};
}
pub(crate) use fetch;

/// The stored samples of one series, in time order: (ts_ns, value, histogram JSON).
pub struct SeriesRows {
    pub tenant: String,
    pub labels: String,
    pub samples: Vec<(i64, Option<f64>, Option<String>)>,
}

/// The samples of `metric` in `(lo_ns, hi_ns]` of these tenants, grouped by series (in tenant
/// and labels order). On SQLite they are read through the C API on a connection of the pool,
/// one primary-key range per series (found by a skip scan): sqlx hands every row from its worker
/// thread over a channel, about 3 µs a row, and one query over all series lets SQLite pick the
/// time index and sort, so a 30-day read of ten per-minute series took two seconds.
pub async fn series_rows(
    store: &TelemetryStore,
    tenants: &[String],
    metric: &str,
    lo_ns: i64,
    hi_ns: i64,
) -> Result<Vec<SeriesRows>, QueryError> {
    let TelemetryStore::Sqlite(pool) = store else {
        let placeholders = vec!["?"; tenants.len()].join(", ");
        let text = format!(
            "SELECT tenant, labels, ts_ns, value, histogram FROM metric_samples \
             WHERE tenant IN ({placeholders}) AND metric = ? AND ts_ns > {lo_ns} AND ts_ns <= {hi_ns} \
             ORDER BY tenant, labels, ts_ns"
        );
        let mut binds: Vec<&str> = tenants.iter().map(String::as_str).collect();
        binds.push(metric);
        let rows = fetch!(store, &text, &binds, |row| (
            row.try_get::<String, _>(0)?,
            row.try_get::<String, _>(1)?,
            row.try_get::<i64, _>(2)?,
            row.try_get::<Option<f64>, _>(3)?,
            row.try_get::<Option<String>, _>(4)?,
        ));
        let mut out: Vec<SeriesRows> = Vec::new();
        for (tenant, labels, ts_ns, value, histogram) in rows {
            match out.last_mut() {
                Some(last) if last.tenant == tenant && last.labels == labels => {
                    last.samples.push((ts_ns, value, histogram))
                }
                _ => out.push(SeriesRows { tenant, labels, samples: vec![(ts_ns, value, histogram)] }),
            }
        }
        return Ok(out);
    };
    let mut connection = pool.acquire().await?;
    let mut handle = connection.lock_handle().await?;
    let db = Connection(handle.as_raw_handle().as_ptr());
    let read = || -> Result<Vec<SeriesRows>, String> {
        let mut tenants: Vec<&String> = tenants.iter().collect();
        tenants.sort();
        let mut series = db.prepare(
            "WITH RECURSIVE s(labels) AS (\
               SELECT (SELECT labels FROM metric_samples WHERE tenant = ?1 AND metric = ?2 ORDER BY labels LIMIT 1) \
               UNION ALL \
               SELECT (SELECT labels FROM metric_samples WHERE tenant = ?1 AND metric = ?2 AND labels > s.labels \
                       ORDER BY labels LIMIT 1) FROM s WHERE s.labels IS NOT NULL) \
             SELECT labels FROM s WHERE labels IS NOT NULL",
        )?;
        let mut samples = db.prepare(&format!(
            "SELECT ts_ns, value, histogram FROM metric_samples \
             WHERE tenant = ?1 AND metric = ?2 AND labels = ?3 AND ts_ns > {lo_ns} AND ts_ns <= {hi_ns} ORDER BY ts_ns"
        ))?;
        let mut out = Vec::new();
        for tenant in tenants {
            series.reset();
            series.bind(1, tenant)?;
            series.bind(2, metric)?;
            let mut labels_of_tenant = Vec::new();
            while series.step()? {
                labels_of_tenant.push(String::from_utf8_lossy(series.text(0).unwrap_or_default()).into_owned());
            }
            for labels in labels_of_tenant {
                samples.reset();
                samples.bind(1, tenant)?;
                samples.bind(2, metric)?;
                samples.bind(3, &labels)?;
                let mut rows = Vec::new();
                while samples.step()? {
                    let histogram = samples.text(2).map(|h| String::from_utf8_lossy(h).into_owned());
                    rows.push((samples.int(0), samples.double(1), histogram));
                }
                if !rows.is_empty() {
                    out.push(SeriesRows { tenant: tenant.clone(), labels, samples: rows });
                }
            }
        }
        Ok(out)
    };
    // Tens of milliseconds of CPU: off the async workers where the runtime allows.
    let rows = match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(read),
        _ => read(),
    };
    rows.map_err(|error| {
        tracing::error!(%error, "prometheus query failed");
        QueryError::Internal(format!("telemetry store: {error}"))
    })
}

/// A SQLite connection locked for this task (sqlx's `LockedSqliteHandle`).
struct Connection(*mut libsqlite3_sys::sqlite3);

/// A prepared statement, finalized when dropped.
struct Statement<'c> {
    db: &'c Connection,
    raw: *mut libsqlite3_sys::sqlite3_stmt,
}

impl Connection {
    fn error(&self) -> String {
        // SAFETY: sqlite3_errmsg returns a NUL-terminated string owned by the live connection.
        unsafe { std::ffi::CStr::from_ptr(libsqlite3_sys::sqlite3_errmsg(self.0)).to_string_lossy().into_owned() }
    }

    fn prepare(&self, sql: &str) -> Result<Statement<'_>, String> {
        let sql = std::ffi::CString::new(sql).map_err(|e| e.to_string())?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: a live connection, locked for this task; `sql` outlives the call.
        let rc =
            unsafe { libsqlite3_sys::sqlite3_prepare_v2(self.0, sql.as_ptr(), -1, &mut raw, std::ptr::null_mut()) };
        if rc != libsqlite3_sys::SQLITE_OK {
            return Err(self.error());
        }
        Ok(Statement { db: self, raw })
    }
}

impl Statement<'_> {
    fn reset(&mut self) {
        // SAFETY: a prepared statement.
        unsafe { libsqlite3_sys::sqlite3_reset(self.raw) };
    }

    fn bind(&mut self, index: i32, text: &str) -> Result<(), String> {
        // SAFETY: SQLITE_TRANSIENT makes SQLite copy the text before the call returns.
        let rc = unsafe {
            libsqlite3_sys::sqlite3_bind_text(
                self.raw,
                index,
                text.as_ptr().cast(),
                text.len() as i32,
                libsqlite3_sys::SQLITE_TRANSIENT(),
            )
        };
        if rc != libsqlite3_sys::SQLITE_OK { Err(self.db.error()) } else { Ok(()) }
    }

    /// Steps to the next row: true on a row, false when done.
    fn step(&mut self) -> Result<bool, String> {
        // SAFETY: a prepared, bound statement.
        match unsafe { libsqlite3_sys::sqlite3_step(self.raw) } {
            libsqlite3_sys::SQLITE_ROW => Ok(true),
            libsqlite3_sys::SQLITE_DONE => Ok(false),
            _ => Err(self.db.error()),
        }
    }

    /// A text column of the current row (None for NULL), valid until the next step.
    fn text(&self, column: i32) -> Option<&[u8]> {
        // SAFETY: the statement is on a row; the pointer and length describe one value.
        unsafe {
            let pointer = libsqlite3_sys::sqlite3_column_text(self.raw, column);
            let length = libsqlite3_sys::sqlite3_column_bytes(self.raw, column) as usize;
            (!pointer.is_null()).then(|| std::slice::from_raw_parts(pointer, length))
        }
    }

    fn int(&self, column: i32) -> i64 {
        // SAFETY: the statement is on a row.
        unsafe { libsqlite3_sys::sqlite3_column_int64(self.raw, column) }
    }

    fn double(&self, column: i32) -> Option<f64> {
        // SAFETY: the statement is on a row.
        unsafe {
            (libsqlite3_sys::sqlite3_column_type(self.raw, column) != libsqlite3_sys::SQLITE_NULL)
                .then(|| libsqlite3_sys::sqlite3_column_double(self.raw, column))
        }
    }
}

impl Drop for Statement<'_> {
    fn drop(&mut self) {
        // SAFETY: prepared once, finalized once.
        unsafe { libsqlite3_sys::sqlite3_finalize(self.raw) };
    }
}
