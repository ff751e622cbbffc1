//! The ETL pipeline's built-in functions, and how stages hand data to each other.
//!
//! Transport (`ETL_TRANSPORT` in the function's environment), the thesis's three ways:
//! - `inline`: a stage answers its data; the flow engine hands it to the next stage.
//! - `state`: a stage puts its data into the run's job in the state store (bucket `etl`) and
//!   answers a reference `{"ref":"state","key":STAGE}`; the next stage reads and deletes it.
//! - `s3`: the same through the operator's S3-compatible bucket (`--etl-s3-url`), under the
//!   tenant's folder: PUT, then GET and DELETE — the block-storage baseline. A reference names
//!   the object's URL; a stage reads only URLs in its own tenant's folder.
//!
//! `etl-load` loads into the operator's database for the tenant (`--etl-database-url`). Neither
//! location comes from a tenant: see [`super::EtlConfig`].
//!
//! The data between stages: `{"batch","received","rejected":{reason:n},"records":[...]}`.
//! Bad records go to the tenant's `etl-rejects` bucket (persistent), one object per batch and
//! stage, as JSON lines `{"stage","reason","record"}`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{EtlConfig, MALFORMED, Totals, WINDOW_MS};
use stateful_faas_core::function::builtin::BuiltinContext;

/// One step's builtin, with the operator's settings.
pub type Step = fn(&BuiltinContext<'_>, &EtlConfig) -> Result<Bytes, String>;
use stateful_faas_core::state::{ObjectKey, PutOptions, StateError};

/// What flows between stages.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Batch<R> {
    pub batch: String,
    pub received: u64,
    #[serde(default)]
    pub rejected: BTreeMap<String, u64>,
    pub records: Vec<R>,
}

/// A record after cleaning and enrichment.
#[derive(Debug, Deserialize)]
pub struct Clean {
    pub ts: i64,
    pub distance_km: String,
    pub fare: String,
    pub passengers: i64,
    pub borough: String,
}

/// One window's change, as `etl-aggregate` answers it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WindowDelta {
    pub window_start_ms: i64,
    pub borough: String,
    #[serde(flatten)]
    pub totals: Totals,
}

const BUCKET: &str = "etl";
const REJECTS: &str = "etl-rejects";
const WINDOWS: &str = "etl-windows";
const SUMMARY: &str = "etl-summary";
/// Window state outlives its batches by this much (late records of a window still add up).
const WINDOW_TTL: Duration = Duration::from_secs(2 * 3600);
/// A load database's connections close after this long unused.
const IDLE: Duration = Duration::from_secs(60);

enum Transport {
    Inline,
    State,
    S3(String),
}

fn transport(context: &BuiltinContext<'_>, etl: &EtlConfig) -> Result<Transport, String> {
    match context.env.get("ETL_TRANSPORT").map(String::as_str).unwrap_or("inline") {
        "inline" => Ok(Transport::Inline),
        "state" => Ok(Transport::State),
        "s3" => match etl.s3_prefix(context.tenant.as_str()) {
            Some(prefix) => Ok(Transport::S3(prefix)),
            None => Err("ETL_TRANSPORT=s3 needs an S3 bucket, which the operator has not set (--etl-s3-url)".into()),
        },
        other => Err(format!("ETL_TRANSPORT {other:?}: use inline, state or s3")),
    }
}

/// The batch's id: the flow run (the state store job), or the call when run alone.
fn batch_id(context: &BuiltinContext<'_>) -> String {
    context.invocation.job.clone().unwrap_or_else(|| context.invocation.call_id.clone())
}

/// The client of the S3 transport. Idle connections are dropped after 4 s: S3-compatible
/// servers close theirs after a few seconds (Node's, s3rver's, after 5), and a request sent on a
/// connection the server is closing fails without an answer.
fn http() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .no_proxy()
            .pool_idle_timeout(std::time::Duration::from_secs(4))
            .build()
            .expect("a plain HTTP client builds")
    })
}

/// An S3 request (GET, PUT and DELETE are idempotent), tried up to three times, as S3 clients
/// do, when it got no answer or a 500 or 503 (S3's "try again"); the last answer or error.
async fn s3(method: reqwest::Method, url: &str, body: Option<&[u8]>) -> Result<reqwest::Response, String> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut request = http().request(method.clone(), url);
        if let Some(body) = body {
            request = request.body(body.to_vec());
        }
        match request.send().await {
            Ok(response) if attempt == 3 || !matches!(response.status().as_u16(), 500 | 503) => return Ok(response),
            Err(error) if attempt == 3 => return Err(format!("S3 {method} {url}: {error}")),
            Ok(response) => tracing::debug!(status = %response.status(), url, attempt, "S3 asks to try again"),
            Err(error) => tracing::debug!(%error, url, attempt, "S3 request got no answer; trying again"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50 << attempt)).await;
    }
}

/// Runs async work from a builtin (always on a blocking thread: these are `Blocking`).
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Handle::current().block_on(future)
}

fn state_key(context: &BuiltinContext<'_>, key: &str) -> Result<ObjectKey, String> {
    let job = context.invocation.job.as_deref().ok_or("ETL_TRANSPORT=state needs a flow run (a state-store job)")?;
    ObjectKey::new(Some(job), BUCKET, key).map_err(|e| e.to_string())
}

/// A reference is a small JSON object with a `ref` member; anything else is the data itself.
const REFERENCE_MAX_BYTES: usize = 4096;

#[derive(Deserialize)]
struct Reference {
    #[serde(rename = "ref")]
    kind: String,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    url: Option<String>,
}

/// The stage's input data, fetched if the previous stage passed a reference.
fn receive(context: &BuiltinContext<'_>, etl: &EtlConfig) -> Result<Bytes, String> {
    let body = &context.invocation.body;
    let reference = match body.len() {
        0..REFERENCE_MAX_BYTES => serde_json::from_slice::<Reference>(body).ok(),
        _ => None,
    };
    let Some(reference) = reference else { return Ok(body.clone()) };
    match (reference.kind.as_str(), reference.key, reference.url) {
        ("state", Some(key), _) => {
            context.state.get(context.tenant, &state_key(context, &key)?, true).map_err(|e| e.to_string())
        }
        ("s3", _, Some(url)) => block_on(async {
            let url = s3_object(context, etl, &url)?;
            let response = s3(reqwest::Method::GET, &url, None).await?;
            if !response.status().is_success() {
                return Err(format!("S3 GET {url}: {}", response.status()));
            }
            let data = response.bytes().await.map_err(|e| format!("S3 GET {url}: {e}"))?;
            let _ = s3(reqwest::Method::DELETE, &url, None).await;
            Ok(data)
        }),
        _ => Err("a reference names `state` with a key, or `s3` with a url".into()),
    }
}

/// A referenced S3 object's URL, if it is an object in the tenant's own folder of the operator's
/// bucket: a reference is input, and must not make the gateway call any other URL.
fn s3_object(context: &BuiltinContext<'_>, etl: &EtlConfig, url: &str) -> Result<String, String> {
    let refused = || format!("S3 reference {url:?} is not an object of this namespace's folder in the ETL bucket");
    let prefix = etl.s3_prefix(context.tenant.as_str()).ok_or_else(refused)?;
    let object = url.strip_prefix(&prefix).and_then(|rest| rest.strip_prefix('/')).ok_or_else(refused)?;
    let safe = |segment: &str| {
        !segment.is_empty()
            && segment != "."
            && segment != ".."
            && segment.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    match object.split('/').all(safe) {
        true => Ok(url.to_string()),
        false => Err(refused()),
    }
}

/// Hands the stage's data on, as the transport says.
fn send(context: &BuiltinContext<'_>, etl: &EtlConfig, stage: &str, data: Vec<u8>) -> Result<Bytes, String> {
    match transport(context, etl)? {
        Transport::Inline => Ok(Bytes::from(data)),
        Transport::State => {
            context
                .state
                .put(context.tenant, state_key(context, stage)?, Bytes::from(data), PutOptions::default())
                .map_err(|e| e.to_string())?;
            Ok(Bytes::from(serde_json::json!({"ref": "state", "key": stage}).to_string()))
        }
        Transport::S3(bucket) => {
            let url = s3_object(context, etl, &format!("{bucket}/{}/{stage}", batch_id(context)))?;
            block_on(async {
                let response = s3(reqwest::Method::PUT, &url, Some(&data)).await?;
                if !response.status().is_success() {
                    return Err(format!("S3 PUT {url}: {}", response.status()));
                }
                Ok(())
            })?;
            Ok(Bytes::from(serde_json::json!({"ref": "s3", "url": url}).to_string()))
        }
    }
}

fn reject_lines(stage: &str, rejects: &[(&'static str, String)]) -> Vec<u8> {
    let mut text = Vec::new();
    for (reason, record) in rejects {
        let line = serde_json::json!({"stage": stage, "reason": reason, "record": record});
        serde_json::to_writer(&mut text, &line).expect("JSON writes to memory");
        text.push(b'\n');
    }
    text
}

/// `etl-extract`: parses a batch of JSON lines, or CSV under a header line, into records;
/// lines that do not parse are rejected as `malformed`.
pub fn extract(context: &BuiltinContext<'_>, etl: &EtlConfig) -> Result<Bytes, String> {
    let text = std::str::from_utf8(&context.invocation.body).map_err(|_| "the batch is not UTF-8")?;
    let mut lines = text.lines().filter(|line| !line.trim().is_empty()).peekable();
    let csv_header: Option<Vec<&str>> = match lines.peek() {
        Some(first) if !first.trim_start().starts_with('{') => lines.next().map(|h| h.split(',').collect()),
        _ => None,
    };
    let mut batch = Batch { batch: batch_id(context), ..Batch::default() };
    let mut rejects = Vec::new();
    for line in lines {
        batch.received += 1;
        let record = match &csv_header {
            None => match serde_json::from_str::<Value>(line) {
                Ok(Value::Object(object)) => Some(object),
                _ => None,
            },
            Some(header) => csv_record(header, line),
        };
        match record {
            Some(record) => batch.records.push(Value::Object(record)),
            None => rejects.push((MALFORMED, line.to_string())),
        }
    }
    if !rejects.is_empty() {
        batch.rejected.insert(MALFORMED.to_string(), rejects.len() as u64);
        let key = ObjectKey::new(None, REJECTS, &format!("{}.extract", batch.batch)).map_err(|e| e.to_string())?;
        let options = PutOptions { persist: true, ttl: None };
        context
            .state
            .put(context.tenant, key, Bytes::from(reject_lines("extract", &rejects)), options)
            .map_err(|e| e.to_string())?;
    }
    send(context, etl, "extract", serde_json::to_vec(&batch).expect("JSON writes to memory"))
}

/// A CSV row (no quoting) as a record; integers become numbers, empty cells are left out.
fn csv_record(header: &[&str], line: &str) -> Option<Map<String, Value>> {
    let cells: Vec<&str> = line.split(',').collect();
    if cells.len() != header.len() {
        return None;
    }
    let mut record = Map::new();
    for (name, cell) in header.iter().zip(cells) {
        let cell = cell.trim();
        if cell.is_empty() {
            continue;
        }
        let value = match cell.parse::<i64>() {
            Ok(number) if !cell.contains('.') => Value::from(number),
            _ => Value::from(cell),
        };
        record.insert(name.trim().to_string(), value);
    }
    Some(record)
}

/// Hundredths from a two-place decimal string (`"12.50"` → 1250).
fn hundredths(text: &str) -> Result<i64, String> {
    let (whole, fraction) = text.split_once('.').ok_or_else(|| format!("{text:?} is not a two-place decimal"))?;
    let negative = whole.starts_with('-');
    let whole: i64 = whole.parse().map_err(|_| format!("{text:?} is not a two-place decimal"))?;
    if fraction.len() != 2 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{text:?} is not a two-place decimal"));
    }
    let fraction: i64 = fraction.parse().expect("two digits parse");
    Ok(whole * 100 + if negative { -fraction } else { fraction })
}

/// One lock for the read-modify-write of a tenant's window state and summary (builtins run in
/// this process, so a process-wide lock makes concurrent batches add up exactly).
fn state_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read_json<T: serde::de::DeserializeOwned + Default>(
    context: &BuiltinContext<'_>,
    key: &ObjectKey,
) -> Result<T, String> {
    match context.state.get(context.tenant, key, false) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("{}/{}: {e}", key.bucket, key.key)),
        Err(StateError::NotFound { .. }) => Ok(T::default()),
        Err(e) => Err(e.to_string()),
    }
}

/// `etl-aggregate`: sums clean records per one-minute window and borough, adds them to the
/// per-key window state (bucket `etl-windows`), and hands on the batch's changes.
pub fn aggregate(context: &BuiltinContext<'_>, etl: &EtlConfig) -> Result<Bytes, String> {
    let input: Batch<Clean> = serde_json::from_slice(&receive(context, etl)?).map_err(|e| format!("bad batch: {e}"))?;
    let mut deltas: BTreeMap<(i64, String), Totals> = BTreeMap::new();
    for record in &input.records {
        let window = record.ts - record.ts.rem_euclid(WINDOW_MS);
        deltas.entry((window, record.borough.clone())).or_default().add(&Totals {
            trips: 1,
            fare_cents: hundredths(&record.fare)?,
            distance_m: hundredths(&record.distance_km)? * 10,
            passengers: record.passengers,
        });
    }
    {
        let _lock = state_lock();
        for ((window, borough), delta) in &deltas {
            let key = ObjectKey::new(None, WINDOWS, &format!("{window}.{borough}")).map_err(|e| e.to_string())?;
            let mut totals: Totals = read_json(context, &key)?;
            totals.add(delta);
            let value = Bytes::from(serde_json::to_vec(&totals).expect("JSON writes to memory"));
            let options = PutOptions { persist: true, ttl: Some(WINDOW_TTL) };
            context.state.put(context.tenant, key, value, options).map_err(|e| e.to_string())?;
        }
    }
    let output = Batch {
        batch: input.batch,
        received: input.received,
        rejected: input.rejected,
        records: deltas
            .into_iter()
            .map(|((window_start_ms, borough), totals)| WindowDelta { window_start_ms, borough, totals })
            .collect(),
    };
    send(context, etl, "aggregate", serde_json::to_vec(&output).expect("JSON writes to memory"))
}

/// The summary object (`etl-summary/summary`): everything loaded so far.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    pub batches: u64,
    pub received: u64,
    pub loaded: u64,
    pub rejected: BTreeMap<String, u64>,
}

/// `etl-load`: adds the batch's window changes to the `etl_windows` table of the tenant's
/// database (SQLite or PostgreSQL, as the operator set it) exactly once per batch
/// (`etl_batches` records it in the same transaction), then updates the summary object.
pub fn load(context: &BuiltinContext<'_>, etl: &EtlConfig) -> Result<Bytes, String> {
    let url = &etl.database_url(context.tenant.as_str());
    let input: Batch<WindowDelta> =
        serde_json::from_slice(&receive(context, etl)?).map_err(|e| format!("bad batch: {e}"))?;
    let loaded: i64 = input.records.iter().map(|w| w.totals.trips).sum();
    let rejected: u64 = input.rejected.values().sum();
    let fresh = block_on(database(url)?.load(context.tenant.as_str(), &input, loaded, rejected))
        .map_err(|e| format!("loading into {}: {e}", redact(url)))?;
    if fresh {
        let _lock = state_lock();
        let key = ObjectKey::new(None, SUMMARY, "summary").map_err(|e| e.to_string())?;
        let mut summary: Summary = read_json(context, &key)?;
        summary.batches += 1;
        summary.received += input.received;
        summary.loaded += loaded as u64;
        for (reason, count) in &input.rejected {
            *summary.rejected.entry(reason.clone()).or_default() += count;
        }
        let value = Bytes::from(serde_json::to_vec(&summary).expect("JSON writes to memory"));
        let options = PutOptions { persist: true, ttl: None };
        context.state.put(context.tenant, key, value, options).map_err(|e| e.to_string())?;
    }
    let answer = serde_json::json!({
        "batch": input.batch,
        "received": input.received,
        "loaded": loaded,
        "rejected": input.rejected,
        "windows": input.records.len(),
        "duplicate": !fresh,
    });
    Ok(Bytes::from(answer.to_string()))
}

fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

/// The load target.
#[derive(Clone)]
enum Database {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

const SCHEMA: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS etl_batches (tenant TEXT NOT NULL, batch_id TEXT NOT NULL, \
     received BIGINT NOT NULL, loaded BIGINT NOT NULL, rejected BIGINT NOT NULL, \
     loaded_at_ms BIGINT NOT NULL, PRIMARY KEY (tenant, batch_id))",
    "CREATE TABLE IF NOT EXISTS etl_windows (tenant TEXT NOT NULL, window_start_ms BIGINT NOT NULL, \
     borough TEXT NOT NULL, trips BIGINT NOT NULL, fare_cents BIGINT NOT NULL, distance_m BIGINT NOT NULL, \
     passengers BIGINT NOT NULL, PRIMARY KEY (tenant, window_start_ms, borough))",
];
const INSERT_BATCH: &str = "INSERT INTO etl_batches (tenant, batch_id, received, loaded, rejected, loaded_at_ms) \
     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant, batch_id) DO NOTHING";
const UPSERT_WINDOW: &str = "INSERT INTO etl_windows \
     (tenant, window_start_ms, borough, trips, fare_cents, distance_m, passengers) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (tenant, window_start_ms, borough) DO UPDATE SET \
     trips = etl_windows.trips + excluded.trips, fare_cents = etl_windows.fare_cents + excluded.fare_cents, \
     distance_m = etl_windows.distance_m + excluded.distance_m, \
     passengers = etl_windows.passengers + excluded.passengers";

/// One pool per database URL, opened (and the tables created) on first use; its connections
/// close when idle, so a tenant's SQLite file is not held open between its batches.
fn database(url: &str) -> Result<Database, String> {
    static POOLS: OnceLock<Mutex<HashMap<String, Database>>> = OnceLock::new();
    let pools = POOLS.get_or_init(Default::default);
    if let Some(database) = pools.lock().unwrap().get(url) {
        return Ok(database.clone());
    }
    let database = block_on(async {
        let database = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(4)
                .min_connections(0)
                .idle_timeout(IDLE)
                .connect(url)
                .await?;
            for statement in SCHEMA {
                sqlx::query(statement).execute(&pool).await?;
            }
            Database::Postgres(pool)
        } else if url.starts_with("sqlite:") {
            use std::str::FromStr;
            let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(10));
            if let Some(dir) = options.get_filename().parent() {
                std::fs::create_dir_all(dir)?;
            }
            let pool = sqlx::sqlite::SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(0)
                .idle_timeout(IDLE)
                .connect_with(options)
                .await?;
            for statement in SCHEMA {
                sqlx::query(statement).execute(&pool).await?;
            }
            Database::Sqlite(pool)
        } else {
            return Err(sqlx::Error::Configuration("the ETL database is sqlite://PATH or postgres://...".into()));
        };
        Ok::<_, sqlx::Error>(database)
    })
    .map_err(|e| format!("opening {}: {e}", redact(url)))?;
    pools.lock().unwrap().insert(url.to_string(), database.clone());
    Ok(database)
}

macro_rules! load_in {
    ($pool:expr, $tenant:expr, $input:expr, $loaded:expr, $rejected:expr) => {{
        let mut tx = $pool.begin().await?;
        let inserted = sqlx::query(INSERT_BATCH)
            .bind($tenant)
            .bind(&$input.batch)
            .bind($input.received as i64)
            .bind($loaded)
            .bind($rejected as i64)
            .bind(stateful_faas_core::database::now_ms())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if inserted == 1 {
            for window in &$input.records {
                sqlx::query(UPSERT_WINDOW)
                    .bind($tenant)
                    .bind(window.window_start_ms)
                    .bind(&window.borough)
                    .bind(window.totals.trips)
                    .bind(window.totals.fare_cents)
                    .bind(window.totals.distance_m)
                    .bind(window.totals.passengers)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(inserted == 1)
    }};
}

impl Database {
    /// Loads a batch; false when it was loaded before (a retry or a resumed run).
    async fn load(
        &self,
        tenant: &str,
        input: &Batch<WindowDelta>,
        loaded: i64,
        rejected: u64,
    ) -> Result<bool, sqlx::Error> {
        match self {
            Database::Sqlite(pool) => load_in!(pool, tenant, input, loaded, rejected),
            Database::Postgres(pool) => load_in!(pool, tenant, input, loaded, rejected),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_become_exact_hundredths() {
        assert_eq!(hundredths("12.50").unwrap(), 1250);
        assert_eq!(hundredths("-1.05").unwrap(), -105);
        assert_eq!(hundredths("0.07").unwrap(), 7);
        assert!(hundredths("1.5").is_err());
        assert!(hundredths("1e3").is_err());
    }

    #[test]
    fn csv_rows_become_records_or_are_malformed() {
        let header: Vec<&str> = super::super::CSV_HEADER.split(',').collect();
        let record = csv_record(&header, "7,1000,3,1.20,,2").unwrap();
        assert_eq!(record["trip_id"], 7);
        assert_eq!(record["distance_km"], "1.20");
        assert!(!record.contains_key("fare"), "an empty cell is a missing field");
        assert!(csv_record(&header, "7;1000;3,1.20,,2").is_none());
    }
}
