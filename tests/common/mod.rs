//! Shared by the end-to-end tests of the `sfaas` binary.
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::process::Command;

pub const SFAAS: &str = env!("CARGO_BIN_EXE_sfaas");

/// `sfaas ARGS`, as a process that dies with the test that started it, even when the test
/// fails before it could stop it.
pub fn sfaas() -> Command {
    let mut command = Command::new(SFAAS);
    // SAFETY: prctl is async-signal-safe; the child gets SIGKILL when the test thread ends.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    command
}

/// Starts a server (`sfaas core`, `up` or `collector`) on `data_dir`; returns the process and
/// the addresses JSON it prints as its first line on stdout.
pub fn serve(component: &str, args: &[&str], data_dir: &std::path::Path) -> (std::process::Child, serde_json::Value) {
    use std::io::BufRead;
    let mut child = sfaas()
        .arg(component)
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("SFAAS_ADMIN_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(server_log(component, data_dir))
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addresses = serde_json::from_str(&line).expect("the first stdout line is the addresses JSON");
    (child, addresses)
}

/// Where a server's stderr goes: `DATA_DIR/<component>.log` (read by [`log_tail`]).
fn server_log(component: &str, data_dir: &std::path::Path) -> std::process::Stdio {
    std::fs::create_dir_all(data_dir).unwrap();
    let file = std::fs::OpenOptions::new().create(true).append(true).open(data_dir.join(format!("{component}.log")));
    file.map_or_else(|_| std::process::Stdio::null(), std::process::Stdio::from)
}

/// The last lines a server started by [`serve`] wrote to stderr, for a failing assertion's
/// message.
pub fn log_tail(component: &str, data_dir: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(data_dir.join(format!("{component}.log"))).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    format!("last lines of {component}'s log:\n{}", all[all.len().saturating_sub(lines)..].join("\n"))
}

/// `sfaas up` with every listener on a free port, plus `args`.
pub fn up(args: &[&str], data_dir: &std::path::Path) -> (std::process::Child, serde_json::Value) {
    let any = "127.0.0.1:0";
    let mut all = vec![
        "--gateway-addr",
        any,
        "--otlp-grpc-addr",
        any,
        "--otlp-http-addr",
        any,
        "--jaeger-addr",
        any,
        "--ui-addr",
        any,
    ];
    all.extend_from_slice(args);
    serve("up", &all, data_dir)
}

/// Another program, dying with the test like [`sfaas`].
pub fn sfaas_like(program: &str) -> Command {
    let mut command = Command::new(program);
    // SAFETY: prctl is async-signal-safe; the child gets SIGKILL when the test thread ends.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    command
}

/// `sfaas ARGS --data-dir DATA_DIR` with `stdin`, the environment's tokens removed: success,
/// stdout, stderr.
pub fn cli(data_dir: &std::path::Path, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = sfaas()
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("SFAAS_ADMIN_TOKEN")
        .env_remove("SFAAS_TOKEN")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    (output.status.success(), String::from_utf8(output.stdout).unwrap(), String::from_utf8(output.stderr).unwrap())
}

/// [`cli`] that must succeed: its stdout.
pub fn cli_ok(data_dir: &std::path::Path, args: &[&str], stdin: &str) -> String {
    let (success, stdout, stderr) = cli(data_dir, args, stdin);
    assert!(success, "sfaas {args:?} failed: {stderr}");
    stdout
}
