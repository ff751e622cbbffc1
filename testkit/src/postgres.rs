//! A PostgreSQL server of its own, for tests and benchmarks.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// A PostgreSQL server of its own in a temp dir (tests and benchmarks), stopped on drop. As
/// root, `initdb` and `postgres` run as the `postgres` system user.
pub struct PgServer {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl PgServer {
    /// A folder for the span blocks of a store on this server (gone with it).
    pub fn blocks_dir(&self) -> PathBuf {
        self.dir.join("blocks")
    }
}

fn as_postgres_user(program: &std::path::Path, args: &[&std::ffi::OsStr]) -> Command {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program).args(args);
        return command;
    }
    let mut command = Command::new(program);
    command.args(args);
    command
}

impl PgServer {
    /// Starts a server, or `None` when PostgreSQL's server binaries are not installed.
    pub fn start() -> Option<Self> {
        let output = Command::new("pg_config").arg("--bindir").output().ok()?;
        let bin = PathBuf::from(String::from_utf8(output.stdout).ok()?.trim());
        if !bin.join("initdb").exists() {
            return None;
        }
        let dir = std::env::temp_dir().join(format!(
            "sfaas-pg-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).ok()?;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let id = |flag: &str| -> Option<u32> {
                String::from_utf8(Command::new("id").args([flag, "postgres"]).output().ok()?.stdout)
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            };
            std::os::unix::fs::chown(&dir, Some(id("-u")?), Some(id("-g")?)).ok()?;
        }
        let data = dir.join("data");
        let status = as_postgres_user(
            &bin.join("initdb"),
            &[
                "-A".as_ref(),
                "trust".as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--no-sync".as_ref(),
                "-D".as_ref(),
                data.as_os_str(),
            ],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .ok()?;
        if !status.success() {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let options = format!("-p {port} -k {} -c listen_addresses=127.0.0.1", dir.display());
        let log = dir.join("server.log");
        let status = as_postgres_user(
            &bin.join("pg_ctl"),
            &[
                "-w".as_ref(),
                "-o".as_ref(),
                options.as_ref(),
                "-l".as_ref(),
                log.as_os_str(),
                "-D".as_ref(),
                data.as_os_str(),
                "start".as_ref(),
            ],
        )
        .stdout(std::process::Stdio::null())
        .status()
        .ok()?;
        status.success().then_some(Self { dir, bin, port })
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = as_postgres_user(
            &self.bin.join("pg_ctl"),
            &["-m".as_ref(), "immediate".as_ref(), "-D".as_ref(), data.as_os_str(), "stop".as_ref()],
        )
        .stdout(std::process::Stdio::null())
        .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
