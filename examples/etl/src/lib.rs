//! The streaming ETL pipeline's Rust side (examples/etl/): taxi-trip records, a seeded
//! generator with a known share of bad records, the aggregates a correct pipeline must load
//! (computed from the generator's own truth, not by re-running the pipeline's code), and the
//! built-in functions `etl-extract`, `etl-aggregate` and `etl-load` ([`functions`]).
//!
//! A record, as a JSON line (CSV has the same columns, in this order, under a header line):
//! `{"trip_id":7,"ts":1764151200123,"zone":17,"distance_km":"3.20","fare":"12.50","passengers":2}`.
//! Money and distance are decimal strings with two places, so every aggregate is exact.

pub mod functions;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use stateful_faas_core::function::builtin::{Builtins, Cost};

/// Zones 1..=ZONES exist in the lookup table; each belongs to one borough.
pub const ZONES: u32 = 40;
pub const BOROUGHS: [&str; 5] = ["Manhattan", "Brooklyn", "Queens", "Bronx", "Staten Island"];
/// Tumbling windows of one minute, by the trip's time.
pub const WINDOW_MS: i64 = 60_000;
/// CSV columns, in order.
pub const CSV_HEADER: &str = "trip_id,ts,zone,distance_km,fare,passengers";

/// Reasons a record is rejected, as the pipeline writes them.
pub const MALFORMED: &str = "malformed";
pub const MISSING_FIELD: &str = "missing_field";
pub const NEGATIVE_DISTANCE: &str = "negative_distance";
pub const NO_PASSENGERS: &str = "no_passengers";
pub const UNKNOWN_ZONE: &str = "unknown_zone";

/// Where the ETL builtins load and stage data: the operator's settings, never a tenant's (a
/// tenant's environment naming a database or a bucket would make the gateway open any SQLite
/// path or call any URL).
#[derive(Debug, Clone, PartialEq)]
pub struct EtlConfig {
    /// Where `etl-load` loads when no tenant is named in `tenants` (`sqlite://PATH` or
    /// `postgres://…`; `{tenant}` becomes the tenant's name). Default:
    /// `sqlite://DATA_DIR/etl/{tenant}.db`, a database per tenant.
    pub database_url: String,
    /// Tenants that load elsewhere (`--etl-database-url TENANT=URL`).
    pub tenants: BTreeMap<String, String>,
    /// The S3-compatible bucket of the `s3` transport (`http://HOST:PORT/BUCKET`); each
    /// tenant's objects are under `TENANT/` in it. None: the `s3` transport is refused.
    pub s3_url: Option<String>,
}

/// The environment variables a tenant may not set on the ETL builtins, and the flags that
/// replace them.
pub const OPERATOR_SETTINGS: [(&str, &str); 2] =
    [("ETL_DATABASE_URL", "--etl-database-url"), ("ETL_S3_URL", "--etl-s3-url")];

/// Registers `etl-extract`, `etl-aggregate` and `etl-load`, loading and staging where `config`
/// says.
pub fn register(builtins: &mut Builtins, config: EtlConfig) {
    let config = Arc::new(config);
    let steps: [(&'static str, functions::Step); 3] =
        [("etl-extract", functions::extract), ("etl-aggregate", functions::aggregate), ("etl-load", functions::load)];
    for (name, step) in steps {
        let config = config.clone();
        builtins.register(
            name,
            Cost::Blocking,
            &OPERATOR_SETTINGS,
            Arc::new(move |context| Ok(step(context, &config)?)),
        );
    }
}

impl EtlConfig {
    pub fn new(data_dir: &std::path::Path) -> Self {
        let dir = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf()).join("etl");
        Self {
            database_url: format!("sqlite://{}/{{tenant}}.db", dir.display()),
            tenants: BTreeMap::new(),
            s3_url: None,
        }
    }

    /// Applies one `--etl-database-url` value: `URL` (every tenant, `{tenant}` substituted)
    /// or `TENANT=URL` (that tenant).
    pub fn set_database_url(&mut self, value: &str) -> Result<(), String> {
        let (tenant, url) = match value.split_once('=') {
            Some((tenant, url)) if !tenant.contains(':') => (Some(tenant), url),
            _ => (None, value),
        };
        if !(url.starts_with("sqlite:") || url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(format!("--etl-database-url {value:?}: the URL is sqlite://PATH or postgres://…"));
        }
        match tenant {
            Some(tenant) if stateful_faas_core::tenant::TenantId::new(tenant).is_err() => {
                Err(format!("--etl-database-url {value:?}: {tenant:?} is not a tenant name"))
            }
            Some(tenant) => {
                self.tenants.insert(tenant.to_string(), url.to_string());
                Ok(())
            }
            None => {
                self.database_url = url.to_string();
                Ok(())
            }
        }
    }

    /// Applies `--etl-s3-url`: an http(s) bucket URL.
    pub fn set_s3_url(&mut self, url: &str) -> Result<(), String> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!("--etl-s3-url {url:?}: a bucket URL is http(s)://HOST:PORT/BUCKET"));
        }
        self.s3_url = Some(url.to_string());
        Ok(())
    }

    /// The database `etl-load` loads a tenant's batches into.
    pub fn database_url(&self, tenant: &str) -> String {
        match self.tenants.get(tenant) {
            Some(url) => url.clone(),
            None => self.database_url.replace("{tenant}", tenant),
        }
    }

    /// The tenant's folder in the S3 bucket, if there is a bucket.
    pub fn s3_prefix(&self, tenant: &str) -> Option<String> {
        self.s3_url.as_ref().map(|url| format!("{}/{tenant}", url.trim_end_matches('/')))
    }
}

pub fn borough(zone: u32) -> &'static str {
    BOROUGHS[((zone - 1) % BOROUGHS.len() as u32) as usize]
}

/// The enrichment table (zone → borough) as the pipeline keeps it in the state store.
pub fn lookup_table() -> String {
    let table: BTreeMap<String, &str> = (1..=ZONES).map(|zone| (zone.to_string(), borough(zone))).collect();
    serde_json::to_string(&table).expect("a map of strings serializes")
}

/// Totals of one window and borough.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub trips: i64,
    pub fare_cents: i64,
    pub distance_m: i64,
    pub passengers: i64,
}

impl Totals {
    pub fn add(&mut self, other: &Totals) {
        self.trips += other.trips;
        self.fare_cents += other.fare_cents;
        self.distance_m += other.distance_m;
        self.passengers += other.passengers;
    }
}

/// What a correct pipeline loads from a set of records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expected {
    pub received: u64,
    pub loaded: u64,
    pub rejected: BTreeMap<String, u64>,
    /// (window start in ms, borough) → totals.
    pub windows: BTreeMap<(i64, String), Totals>,
}

/// What is wrong with a generated record, if anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flaw {
    Malformed,
    MissingFare,
    NegativeDistance,
    UnknownZone,
    NoPassengers,
}

/// One generated trip, and the truth about it.
#[derive(Debug, Clone)]
pub struct Trip {
    pub trip_id: u64,
    pub ts: i64,
    pub zone: u32,
    /// Hundredths of a km (may be negative in a bad record).
    pub distance_hundredths: i64,
    pub fare_cents: i64,
    pub passengers: u32,
    flaw: Option<Flaw>,
}

fn decimal(hundredths: i64) -> String {
    let sign = if hundredths < 0 { "-" } else { "" };
    format!("{sign}{}.{:02}", hundredths.abs() / 100, hundredths.abs() % 100)
}

impl Trip {
    /// The reason the pipeline must reject it with, if it is bad.
    pub fn reject_reason(&self) -> Option<&'static str> {
        self.flaw.map(|flaw| match flaw {
            Flaw::Malformed => MALFORMED,
            Flaw::MissingFare => MISSING_FIELD,
            Flaw::NegativeDistance => NEGATIVE_DISTANCE,
            Flaw::UnknownZone => UNKNOWN_ZONE,
            Flaw::NoPassengers => NO_PASSENGERS,
        })
    }

    pub fn json_line(&self) -> String {
        let fare = if self.flaw == Some(Flaw::MissingFare) {
            String::new()
        } else {
            format!(",\"fare\":\"{}\"", decimal(self.fare_cents))
        };
        let line = format!(
            "{{\"trip_id\":{},\"ts\":{},\"zone\":{},\"distance_km\":\"{}\"{fare},\"passengers\":{}}}",
            self.trip_id,
            self.ts,
            self.zone,
            decimal(self.distance_hundredths),
            self.passengers
        );
        if self.flaw == Some(Flaw::Malformed) { line[..line.len() / 2].to_string() } else { line }
    }

    pub fn csv_line(&self) -> String {
        let fare = if self.flaw == Some(Flaw::MissingFare) { String::new() } else { decimal(self.fare_cents) };
        let line = format!(
            "{},{},{},{},{fare},{}",
            self.trip_id,
            self.ts,
            self.zone,
            decimal(self.distance_hundredths),
            self.passengers
        );
        if self.flaw == Some(Flaw::Malformed) { line.replacen(',', ";", 2) } else { line }
    }
}

/// A deterministic stream of trips: the same seed gives the same records.
#[derive(Debug, Clone)]
pub struct Generator {
    state: u64,
    next_id: u64,
    ts: i64,
    bad_per_mille: u64,
}

impl Generator {
    /// Trips from `start_ms` on, about 50 a second of trip time; `bad_per_mille` of them bad.
    pub fn new(seed: u64, start_ms: i64, bad_per_mille: u32) -> Self {
        Self { state: seed.max(1), next_id: 1, ts: start_ms, bad_per_mille: bad_per_mille.min(1000) as u64 }
    }

    fn next_u64(&mut self) -> u64 {
        // xorshift64*
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn trip(&mut self) -> Trip {
        let r = self.next_u64();
        self.ts += (r % 41) as i64;
        let flaw = if (self.next_u64() % 1000) < self.bad_per_mille {
            Some(match self.next_u64() % 5 {
                0 => Flaw::Malformed,
                1 => Flaw::MissingFare,
                2 => Flaw::NegativeDistance,
                3 => Flaw::UnknownZone,
                _ => Flaw::NoPassengers,
            })
        } else {
            None
        };
        let mut trip = Trip {
            trip_id: self.next_id,
            ts: self.ts,
            zone: 1 + (self.next_u64() % ZONES as u64) as u32,
            distance_hundredths: 10 + (self.next_u64() % 3000) as i64,
            fare_cents: 250 + (self.next_u64() % 6000) as i64,
            passengers: 1 + (self.next_u64() % 4) as u32,
            flaw,
        };
        match flaw {
            Some(Flaw::NegativeDistance) => trip.distance_hundredths = -trip.distance_hundredths,
            Some(Flaw::UnknownZone) => trip.zone += 900,
            Some(Flaw::NoPassengers) => trip.passengers = 0,
            _ => {}
        }
        self.next_id += 1;
        trip
    }

    pub fn trips(&mut self, count: usize) -> Vec<Trip> {
        (0..count).map(|_| self.trip()).collect()
    }
}

/// The aggregates a correct pipeline loads from these trips.
pub fn expected<'a>(trips: impl IntoIterator<Item = &'a Trip>) -> Expected {
    let mut expected = Expected::default();
    for trip in trips {
        expected.received += 1;
        if let Some(reason) = trip.reject_reason() {
            *expected.rejected.entry(reason.to_string()).or_default() += 1;
            continue;
        }
        expected.loaded += 1;
        let window = trip.ts - trip.ts.rem_euclid(WINDOW_MS);
        expected.windows.entry((window, borough(trip.zone).to_string())).or_default().add(&Totals {
            trips: 1,
            fare_cents: trip.fare_cents,
            distance_m: trip.distance_hundredths * 10,
            passengers: trip.passengers as i64,
        });
    }
    expected
}

/// Trips as a request body: JSON lines, or CSV under its header.
pub fn body(trips: &[Trip], csv: bool) -> String {
    let mut text = String::new();
    if csv {
        text.push_str(CSV_HEADER);
        text.push('\n');
    }
    for trip in trips {
        text.push_str(&if csv { trip.csv_line() } else { trip.json_line() });
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_is_deterministic_and_mixes_in_bad_records() {
        let a = Generator::new(7, 1_764_151_200_000, 50).trips(10_000);
        let b = Generator::new(7, 1_764_151_200_000, 50).trips(10_000);
        assert_eq!(body(&a, false), body(&b, false));
        let expected = expected(&a);
        let bad: u64 = expected.rejected.values().sum();
        assert!((300..=700).contains(&bad), "{bad} bad records of 10000 at 5%");
        assert_eq!(expected.rejected.len(), 5, "every kind of flaw occurs: {:?}", expected.rejected);
        assert_eq!(expected.loaded + bad, 10_000);
        let trips: i64 = expected.windows.values().map(|t| t.trips).sum();
        assert_eq!(trips as u64, expected.loaded);
        assert!(expected.windows.len() > 5, "several windows: {}", expected.windows.len());
    }

    #[test]
    fn the_committed_lookup_table_is_the_generators() {
        assert_eq!(include_str!("../../../examples/etl/zones.json"), lookup_table());
    }

    #[test]
    fn records_render_as_json_and_csv() {
        let mut generator = Generator::new(1, 0, 0);
        let trip = generator.trip();
        let json: serde_json::Value = serde_json::from_str(&trip.json_line()).unwrap();
        assert_eq!(json["trip_id"], 1);
        assert_eq!(json["fare"].as_str().unwrap(), decimal(trip.fare_cents));
        assert_eq!(trip.csv_line().split(',').count(), CSV_HEADER.split(',').count());
        assert_eq!(decimal(-150), "-1.50");
        assert_eq!(decimal(7), "0.07");
    }
}
