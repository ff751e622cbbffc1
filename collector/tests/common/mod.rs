//! Shared helpers of the collector's tests: a collector on loopback over SQLite or over a real
//! PostgreSQL server started in a temp dir, and a token resolver with fixed tokens.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use base64::Engine;
use collector::auth::{Credential, TokenResolver};
use collector::{Collector, CollectorConfig, RunningCollector};

/// Tokens: `acme-token`, `globex-token` (ingest), `meter-token` (meter).
pub struct FixedTokens;

impl TokenResolver for FixedTokens {
    fn resolve(&self, authorization: &str) -> Option<Credential> {
        let (scheme, value) = authorization.split_once(' ')?;
        let token = match scheme {
            "Bearer" => value.to_string(),
            "Basic" => {
                let decoded = base64::engine::general_purpose::STANDARD.decode(value).ok()?;
                String::from_utf8(decoded).ok()?.split_once(':')?.1.to_string()
            }
            _ => return None,
        };
        match token.as_str() {
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

    fn url(&self) -> String {
        match self {
            Backend::Sqlite(dir) => format!("sqlite://{}", dir.path().join("telemetry.db").display()),
            Backend::Postgres(server) => server.url(),
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
    config.otlp_grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.otlp_http_addr = "127.0.0.1:0".parse().unwrap();
    configure(&mut config);
    Collector::start(config, Arc::new(FixedTokens)).await.unwrap()
}

/// A PostgreSQL server of its own, in a temp dir, stopped on drop.
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

fn as_postgres_user(command: &mut Command) -> Command {
    // initdb and postgres refuse to run as root: run them as the `postgres` system user then.
    if unsafe { libc::geteuid() } == 0 {
        let mut wrapped = Command::new("runuser");
        wrapped.args(["-u", "postgres", "--"]).arg(command.get_program()).args(command.get_args());
        return wrapped;
    }
    let mut same = Command::new(command.get_program());
    same.args(command.get_args());
    same
}

impl PgServer {
    pub fn start() -> Option<Self> {
        let output = Command::new("pg_config").arg("--bindir").output().ok()?;
        let bin = PathBuf::from(String::from_utf8(output.stdout).ok()?.trim());
        if !bin.join("initdb").exists() || !bin.join("pg_ctl").exists() {
            return None;
        }
        let dir = tempfile::Builder::new().prefix("sfaas-pg").tempdir().ok()?;
        if unsafe { libc::geteuid() } == 0 {
            let uid: u32 = String::from_utf8(Command::new("id").args(["-u", "postgres"]).output().ok()?.stdout)
                .ok()?
                .trim()
                .parse()
                .ok()?;
            let gid: u32 = String::from_utf8(Command::new("id").args(["-g", "postgres"]).output().ok()?.stdout)
                .ok()?
                .trim()
                .parse()
                .ok()?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).ok()?;
        }
        let data = dir.path().join("data");
        let status = as_postgres_user(
            Command::new(bin.join("initdb")).args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"]).arg(&data),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .ok()?;
        assert!(status.success(), "initdb failed");
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let options = format!("-p {port} -k {} -c listen_addresses=127.0.0.1", dir.path().display());
        let status = as_postgres_user(
            Command::new(bin.join("pg_ctl"))
                .args(["-w", "-o", &options, "-l"])
                .arg(dir.path().join("server.log"))
                .arg("-D")
                .arg(&data)
                .arg("start"),
        )
        .stdout(std::process::Stdio::null())
        .status()
        .ok()?;
        assert!(status.success(), "pg_ctl start failed: see {}/server.log", dir.path().display());
        Some(Self { dir, bin, port })
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = as_postgres_user(
            Command::new(self.bin.join("pg_ctl"))
                .args(["-m", "immediate", "-D"])
                .arg(self.dir.path().join("data"))
                .arg("stop"),
        )
        .stdout(std::process::Stdio::null())
        .status();
    }
}
