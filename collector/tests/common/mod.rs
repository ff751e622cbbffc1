//! Shared helpers of the collector's tests: a collector on loopback over SQLite or over a real
//! PostgreSQL server started in a temp dir, and a token resolver with fixed tokens.
#![allow(dead_code)]

use std::sync::Arc;

use collector::auth::{Credential, TokenResolver};
pub use collector::bench::PgServer;
use collector::{Collector, CollectorConfig, RunningCollector};

/// Tokens: `acme-token`, `globex-token` (ingest), `meter-token` (meter).
pub struct FixedTokens;

impl TokenResolver for FixedTokens {
    fn resolve(&self, token: &str) -> Option<Credential> {
        match token {
            "acme-token" => Some(Credential::Ingest { tenant: "acme".into() }),
            "globex-token" => Some(Credential::Ingest { tenant: "globex".into() }),
            "meter-token" => Some(Credential::Meter),
            _ => None,
        }
    }
}

/// Where a test's telemetry goes.
pub enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres(PgServer),
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    pub fn url(&self) -> String {
        match self {
            Backend::Sqlite(dir) => format!("sqlite://{}", dir.path().join("telemetry.db").display()),
            Backend::Postgres(server) => server.url(),
        }
    }

    /// Where the store's span blocks go.
    pub fn blocks(&self) -> std::path::PathBuf {
        match self {
            Backend::Sqlite(dir) => dir.path().join("telemetry.db.blocks"),
            Backend::Postgres(server) => server.blocks_dir(),
        }
    }
}

/// SQLite always; PostgreSQL when its server binaries are here (required in CI).
pub fn backends() -> Vec<Backend> {
    let mut backends = vec![Backend::Sqlite(tempfile::tempdir().unwrap())];
    match PgServer::start() {
        Some(server) => backends.push(Backend::Postgres(server)),
        None if std::env::var("SFAAS_TEST_REQUIRE_ALL").as_deref() == Ok("1") => {
            panic!("PostgreSQL server binaries are required (SFAAS_TEST_REQUIRE_ALL=1): see `pg_config --bindir`")
        }
        None => eprintln!("SKIPPED on PostgreSQL: no server binaries (pg_config --bindir)"),
    }
    backends
}

pub async fn start(backend: &Backend, configure: impl FnOnce(&mut CollectorConfig)) -> RunningCollector {
    let mut config = CollectorConfig::new(backend.url());
    config.blocks_dir = Some(backend.blocks());
    config.otlp_grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.otlp_http_addr = "127.0.0.1:0".parse().unwrap();
    config.jaeger_addr = "127.0.0.1:0".parse().unwrap();
    // Test data has fixed, old timestamps: keep it from the retention pass that runs at start.
    config.retention = std::time::Duration::from_secs(100 * 365 * 24 * 3600);
    configure(&mut config);
    Collector::start(config, Arc::new(FixedTokens)).await.unwrap()
}
