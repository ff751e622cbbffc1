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
