//! SQLite's C API on a connection of sqlx's pool, for the paths where sqlx's binding (a copy and
//! an allocation per value, a statement of thousands of parameters per multi-row insert) or its
//! per-row handoff from its worker thread costs more than SQLite's own work: the telemetry
//! store's inserts, billing's extraction and the Prometheus API's series reads. [`run`] locks a
//! connection (sqlx's `LockedSqliteHandle`, so nothing else uses it meanwhile) and hands it to
//! synchronous work as a [`Connection`]; statements are finalized when dropped, and a
//! [`Transaction`] not committed is rolled back when dropped.

use std::ffi::{CStr, CString};
use std::marker::PhantomData;

use libsqlite3_sys as ffi;
use sqlx::sqlite::LockedSqliteHandle;

/// A failure of SQLite's C API: its extended result code and message, or a statement that
/// could not be handed to it (`code` [`ffi::SQLITE_MISUSE`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (SQLite result code {code})")]
pub struct SqliteError {
    pub code: i32,
    pub message: String,
}

/// A connection locked for this task.
pub struct Connection<'h> {
    raw: *mut ffi::sqlite3,
    _locked: PhantomData<&'h mut ()>,
}

/// A prepared statement, finalized when dropped.
pub struct Statement<'c> {
    db: &'c Connection<'c>,
    raw: *mut ffi::sqlite3_stmt,
}

/// A value bound for one execution of a statement.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    Null,
    Int(i64),
    Real(f64),
    Text(&'a str),
}

/// Locks `connection` and runs `work` on its raw handle, off the async workers' queue where the
/// runtime allows it (multi-threaded: `block_in_place`; on a current-thread runtime, inline):
/// the work is milliseconds of CPU without an await.
pub async fn run<T>(
    connection: &mut sqlx::SqliteConnection,
    work: impl FnOnce(&Connection<'_>) -> Result<T, SqliteError>,
) -> Result<T, SqliteError> {
    let mut handle = connection.lock_handle().await.map_err(|error| SqliteError {
        code: ffi::SQLITE_BUSY,
        message: format!("cannot lock the connection: {error}"),
    })?;
    let db = Connection::new(&mut handle);
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(|| work(&db)),
        _ => work(&db),
    }
}

impl<'h> Connection<'h> {
    fn new(handle: &'h mut LockedSqliteHandle<'_>) -> Self {
        Self { raw: handle.as_raw_handle().as_ptr(), _locked: PhantomData }
    }

    /// SQLite's code and message for the last failure on this connection.
    pub fn error(&self) -> SqliteError {
        // SAFETY: a live connection; sqlite3_errmsg returns a NUL-terminated string it owns.
        unsafe {
            SqliteError {
                code: ffi::sqlite3_extended_errcode(self.raw),
                message: CStr::from_ptr(ffi::sqlite3_errmsg(self.raw)).to_string_lossy().into_owned(),
            }
        }
    }

    pub fn prepare(&self, sql: &str) -> Result<Statement<'_>, SqliteError> {
        let sql = CString::new(sql).map_err(|e| SqliteError { code: ffi::SQLITE_MISUSE, message: e.to_string() })?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: a live connection, locked for this task; `sql` outlives the call.
        let rc = unsafe { ffi::sqlite3_prepare_v2(self.raw, sql.as_ptr(), -1, &mut raw, std::ptr::null_mut()) };
        if rc != ffi::SQLITE_OK {
            return Err(self.error());
        }
        Ok(Statement { db: self, raw })
    }

    /// Runs statements without parameters or results (`BEGIN`, `COMMIT`, ...).
    pub fn execute_batch(&self, sql: &str) -> Result<(), SqliteError> {
        let sql = CString::new(sql).map_err(|e| SqliteError { code: ffi::SQLITE_MISUSE, message: e.to_string() })?;
        // SAFETY: a live connection; no callback, so no callback argument; the error message
        // is read through sqlite3_errmsg instead of the out-parameter.
        let rc = unsafe { ffi::sqlite3_exec(self.raw, sql.as_ptr(), None, std::ptr::null_mut(), std::ptr::null_mut()) };
        if rc == ffi::SQLITE_OK { Ok(()) } else { Err(self.error()) }
    }

    /// Begins a write transaction (taking the write lock now, waiting up to the connection's
    /// busy timeout).
    pub fn begin(&self) -> Result<Transaction<'_, 'h>, SqliteError> {
        self.execute_batch("BEGIN IMMEDIATE")?;
        Ok(Transaction { db: self, done: false })
    }
}

/// A write transaction, rolled back when dropped uncommitted (an error or a panic on the way).
pub struct Transaction<'c, 'h> {
    db: &'c Connection<'h>,
    done: bool,
}

impl Transaction<'_, '_> {
    pub fn commit(mut self) -> Result<(), SqliteError> {
        self.done = true;
        self.db.execute_batch("COMMIT").inspect_err(|_| {
            let _ = self.db.execute_batch("ROLLBACK");
        })
    }
}

impl Drop for Transaction<'_, '_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.db.execute_batch("ROLLBACK");
        }
    }
}

impl Statement<'_> {
    pub fn reset(&mut self) {
        // SAFETY: a prepared statement.
        unsafe { ffi::sqlite3_reset(self.raw) };
    }

    /// Binds a value for the next steps (SQLite copies text).
    pub fn bind(&mut self, index: i32, value: Value<'_>) -> Result<(), SqliteError> {
        // SAFETY: SQLITE_TRANSIENT makes SQLite copy text before the call returns.
        unsafe { self.bind_with(index, value, ffi::SQLITE_TRANSIENT()) }
    }

    /// # Safety
    /// With `SQLITE_STATIC`, text must stay valid until the statement is reset or rebound.
    unsafe fn bind_with(
        &mut self,
        index: i32,
        value: Value<'_>,
        destructor: ffi::sqlite3_destructor_type,
    ) -> Result<(), SqliteError> {
        // SAFETY: a prepared statement; the text's lifetime is the caller's contract.
        let rc = unsafe {
            match value {
                Value::Null => ffi::sqlite3_bind_null(self.raw, index),
                Value::Int(v) => ffi::sqlite3_bind_int64(self.raw, index, v),
                Value::Real(v) => ffi::sqlite3_bind_double(self.raw, index, v),
                Value::Text(v) => ffi::sqlite3_bind_text64(
                    self.raw,
                    index,
                    v.as_ptr().cast(),
                    v.len() as u64,
                    destructor,
                    ffi::SQLITE_UTF8 as u8,
                ),
            }
        };
        if rc != ffi::SQLITE_OK { Err(self.db.error()) } else { Ok(()) }
    }

    /// Runs the statement once with `values` bound to `?1`, `?2`, ... and returns the rows it
    /// changed (0 for an insert that `ON CONFLICT DO NOTHING` skipped). The values are bound in
    /// place, without a copy: the bindings are cleared before this returns.
    pub fn execute(&mut self, values: &[Value<'_>]) -> Result<u64, SqliteError> {
        let result = self.bind_in_place(values).and_then(|()| {
            // SAFETY: a prepared statement whose bound values are alive until it is reset below.
            match unsafe { ffi::sqlite3_step(self.raw) } {
                // SAFETY: a live connection.
                ffi::SQLITE_DONE | ffi::SQLITE_ROW => Ok(unsafe { ffi::sqlite3_changes64(self.db.raw) } as u64),
                _ => Err(self.db.error()),
            }
        });
        // SAFETY: a prepared statement; after this, SQLite holds no pointer into `values`.
        unsafe {
            ffi::sqlite3_reset(self.raw);
            ffi::sqlite3_clear_bindings(self.raw);
        }
        result
    }

    fn bind_in_place(&mut self, values: &[Value<'_>]) -> Result<(), SqliteError> {
        for (index, value) in (1..).zip(values) {
            // SAFETY: SQLITE_STATIC: `execute` resets the statement and clears its bindings
            // before `values` goes out of its borrow.
            unsafe { self.bind_with(index, *value, ffi::SQLITE_STATIC())? };
        }
        Ok(())
    }

    /// Steps to the next row: true on a row, false when done.
    pub fn step(&mut self) -> Result<bool, SqliteError> {
        // SAFETY: a prepared, bound statement.
        match unsafe { ffi::sqlite3_step(self.raw) } {
            ffi::SQLITE_ROW => Ok(true),
            ffi::SQLITE_DONE => Ok(false),
            _ => Err(self.db.error()),
        }
    }

    /// A text column of the current row (None for NULL), valid until the next step.
    pub fn text(&self, column: i32) -> Option<&[u8]> {
        // SAFETY: the statement is on a row; the pointer and length describe one value.
        unsafe {
            let pointer = ffi::sqlite3_column_text(self.raw, column);
            let length = ffi::sqlite3_column_bytes(self.raw, column) as usize;
            (!pointer.is_null()).then(|| std::slice::from_raw_parts(pointer, length))
        }
    }

    pub fn int(&self, column: i32) -> i64 {
        // SAFETY: the statement is on a row.
        unsafe { ffi::sqlite3_column_int64(self.raw, column) }
    }

    pub fn double(&self, column: i32) -> Option<f64> {
        // SAFETY: the statement is on a row.
        unsafe {
            (ffi::sqlite3_column_type(self.raw, column) != ffi::SQLITE_NULL)
                .then(|| ffi::sqlite3_column_double(self.raw, column))
        }
    }
}

impl Drop for Statement<'_> {
    fn drop(&mut self) {
        // SAFETY: prepared once, finalized once.
        unsafe { ffi::sqlite3_finalize(self.raw) };
    }
}

#[cfg(test)]
mod tests {
    use sqlx::sqlite::SqlitePoolOptions;

    use super::*;

    /// Inserts count what they changed, a failed transaction leaves nothing behind, and the
    /// connection goes back to the pool usable (not inside a transaction).
    #[tokio::test]
    async fn inserts_commit_whole_or_roll_back() {
        let pool = SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await.unwrap();
        sqlx::query("CREATE TABLE t (k TEXT PRIMARY KEY, n INTEGER NOT NULL, x REAL)").execute(&pool).await.unwrap();
        let mut connection = pool.acquire().await.unwrap();
        let seen = run(&mut connection, |db| Ok(inserts_and_a_rollback(db))).await.unwrap();
        assert_eq!(seen, [("a".to_string(), 1, Some(0.5)), ("b".to_string(), 3, None)]);
        drop(connection);
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t").fetch_one(&pool).await.unwrap();
        assert_eq!(count, 2, "the pool's connection is usable and not left inside a transaction");
    }

    fn inserts_and_a_rollback(db: &Connection<'_>) -> Vec<(String, i64, Option<f64>)> {
        let insert = "INSERT INTO t (k, n, x) VALUES (?1, ?2, ?3) ON CONFLICT (k) DO NOTHING";

        let tx = db.begin().unwrap();
        let mut statement = db.prepare(insert).unwrap();
        let key = String::from("a");
        assert_eq!(statement.execute(&[Value::Text(&key), Value::Int(1), Value::Real(0.5)]).unwrap(), 1);
        assert_eq!(statement.execute(&[Value::Text("a"), Value::Int(2), Value::Null]).unwrap(), 0);
        assert_eq!(statement.execute(&[Value::Text("b"), Value::Int(3), Value::Null]).unwrap(), 1);
        drop(statement);
        tx.commit().unwrap();

        let tx = db.begin().unwrap();
        let mut statement = db.prepare(insert).unwrap();
        assert_eq!(statement.execute(&[Value::Text("c"), Value::Int(4), Value::Null]).unwrap(), 1);
        let error = statement.execute(&[Value::Text("d"), Value::Null, Value::Null]).unwrap_err();
        assert!(error.message.contains("NOT NULL") && error.code != 0, "{error}");
        drop(statement);
        drop(tx);

        let mut rows = db.prepare("SELECT k, n, x FROM t ORDER BY k").unwrap();
        let mut seen = Vec::new();
        while rows.step().unwrap() {
            seen.push((String::from_utf8(rows.text(0).unwrap().to_vec()).unwrap(), rows.int(1), rows.double(2)));
        }
        seen
    }
}
