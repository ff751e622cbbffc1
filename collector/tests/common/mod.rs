//! Shared helpers of the collector's tests: a collector on loopback over SQLite or over a real
//! PostgreSQL server started in a temp dir, and a token resolver with fixed tokens.
#![allow(dead_code, unused_imports)]

use std::sync::Arc;

use collector::auth::{Credential, TokenResolver};
use collector::{Collector, CollectorConfig, RunningCollector};
pub use testkit::{Backend, PgServer, backends};

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
pub async fn start(backend: &Backend, configure: impl FnOnce(&mut CollectorConfig)) -> RunningCollector {
    let mut config = CollectorConfig::new(backend.url());
    config.blocks_dir = Some(backend.blocks());
    config.otlp_grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.otlp_http_addr = "127.0.0.1:0".parse().unwrap();
    config.jaeger_addr = "127.0.0.1:0".parse().unwrap();
    // Test data has fixed, old timestamps: keep it from the retention passes (each minute).
    config.retention = std::time::Duration::from_secs(100 * 365 * 24 * 3600);
    configure(&mut config);
    Collector::start(config, Arc::new(FixedTokens)).await.unwrap()
}
