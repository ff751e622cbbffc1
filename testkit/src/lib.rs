//! What the tests and benchmarks share, kept out of the product's crates: a PostgreSQL server
//! of their own ([`PgServer`]), the telemetry store's backends to run a test on
//! ([`backends`]), and outside programs that a test needs ([`required`], [`require_program`]).
//! Under `SFAAS_TEST_REQUIRE_ALL=1` (as in CI) a missing program fails the test; elsewhere the
//! test says it is skipped, and why.

pub mod postgres;

use std::path::PathBuf;

pub use postgres::PgServer;

/// Whether every outside program must be there (`SFAAS_TEST_REQUIRE_ALL=1`, as in CI).
pub fn require_all() -> bool {
    std::env::var("SFAAS_TEST_REQUIRE_ALL").as_deref() == Ok("1")
}

/// A missing program or service: a failure under [`require_all`], else the test is skipped
/// with the reason (`None`).
pub fn required<T>(what: &str) -> Option<T> {
    if require_all() {
        panic!("{what} is required (SFAAS_TEST_REQUIRE_ALL=1)");
    }
    eprintln!("SKIPPED: {what} is not installed");
    None
}

/// Finds an outside program on `PATH` ([`required`] when it is not there).
pub fn require_program(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join(name)).find(|path| path.is_file()));
    found.or_else(|| required(&format!("{name} (on PATH)")))
}

/// A telemetry store to run a test on.
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
    pub fn blocks(&self) -> PathBuf {
        match self {
            Backend::Sqlite(dir) => dir.path().join("telemetry.db.blocks"),
            Backend::Postgres(server) => server.blocks_dir(),
        }
    }
}

/// SQLite always; PostgreSQL when its server binaries are here (required in CI).
pub fn backends() -> Vec<Backend> {
    let mut backends = vec![Backend::Sqlite(tempfile::tempdir().expect("a temp dir"))];
    match PgServer::start() {
        Some(server) => backends.push(Backend::Postgres(server)),
        None => {
            let _: Option<()> = required("PostgreSQL's server binaries (pg_config --bindir)");
        }
    }
    backends
}

/// A Python virtualenv in the workspace's `target/test-venvs/NAME` with `packages` from PyPI,
/// made on first use, and its `python` once `import` runs in it ([`required`] when it cannot
/// be made). One test of a process makes it at a time: a second `venv` over a half-made one
/// breaks both.
pub fn python_venv(name: &str, import: &str, packages: &[&str]) -> Option<PathBuf> {
    use std::process::Command;
    static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = MAKING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-venvs").join(name);
    let python = venv.join("bin/python");
    let imports = || Command::new(&python).args(["-c", import]).status().is_ok_and(|s| s.success());
    if python.exists() && imports() {
        return Some(python);
    }
    let made = Command::new("python3").arg("-m").arg("venv").arg(&venv).status().is_ok_and(|s| s.success())
        && Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet"])
            .args(packages)
            .status()
            .is_ok_and(|s| s.success());
    if made && imports() {
        return Some(python);
    }
    required(&format!("a virtualenv with {} (python3 -m venv, pip install from PyPI)", packages.join(" ")))
}

/// The s3rver executable (npm package `s3rver`): `SFAAS_S3RVER`, or `s3rver` on `PATH`
/// ([`required`] when neither).
pub fn s3rver() -> Option<PathBuf> {
    match std::env::var_os("SFAAS_S3RVER") {
        Some(path) => Some(PathBuf::from(path)),
        None => require_program("s3rver"),
    }
}
