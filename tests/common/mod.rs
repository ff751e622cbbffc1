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
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addresses = serde_json::from_str(&line).expect("the first stdout line is the addresses JSON");
    (child, addresses)
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
