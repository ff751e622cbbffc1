//! Process plumbing shared by `exec` and managed `http` functions.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;

use super::sandbox::{self, Io, Jail, Spawned};

/// Starts `sh -c COMMAND` in its own process group, with a clean environment (the gateway's
/// own secrets never reach a function): in a sandbox `jail` when there is one (its cgroup,
/// which limits its memory, namespaces, uid and seccomp filter; it enters `workdir` itself),
/// else as a plain child with `memory_bytes` as its address-space limit.
pub fn spawn(
    command: &str,
    env: &BTreeMap<String, String>,
    extra_env: &[(String, String)],
    workdir: Option<&Path>,
    memory_bytes: Option<u64>,
    jail: Option<&Jail>,
    io: Io,
) -> std::io::Result<Spawned> {
    let inherited: &[&str] =
        if jail.is_some() { &["LANG", "LC_ALL", "TZ"] } else { &["PATH", "LANG", "LC_ALL", "TZ", "HOME"] };
    let mut vars: BTreeMap<String, String> =
        inherited.iter().filter_map(|key| Some((key.to_string(), std::env::var(key).ok()?))).collect();
    if jail.is_some() {
        vars.extend(sandbox::base_env().map(|(k, v)| (k.to_string(), v.to_string())));
    }
    vars.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
    vars.extend(extra_env.iter().cloned());
    if let Some(jail) = jail {
        if let Some(url) = &jail.state_url {
            vars.insert(crate::semconv::ENV_STATE_URL.to_string(), url.clone());
        }
        let redis_url = vars.get_mut(crate::semconv::ENV_STATE_REDIS_URL);
        match (&jail.state_redis, redis_url) {
            (Some(address), Some(url)) => *url = super::redis_url_at(url, address),
            // Only what listens in the jail's own network is reachable from it.
            (None, Some(_)) if jail.has_own_network() => {
                vars.remove(crate::semconv::ENV_STATE_REDIS_URL);
            }
            _ => {}
        }
        let c = |text: String| CString::new(text).map_err(std::io::Error::other);
        let argv = [c("/bin/sh".into())?, c("-c".into())?, c(command.into())?];
        let envp = vars.into_iter().map(|(k, v)| c(format!("{k}={v}"))).collect::<Result<Vec<_>, _>>()?;
        return jail.spawn(&argv, &envp, io);
    }
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c").arg(command).env_clear().envs(vars);
    if let Some(dir) = workdir {
        cmd.current_dir(dir);
    }
    match io {
        Io::Piped => cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()),
        Io::Logged => cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()),
    };
    // SAFETY: only async-signal-safe calls (setpgid, prctl, setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // If the gateway dies (even by SIGKILL), its functions die with it instead of
            // lingering as orphans. Spawns happen on the runtime's long-lived worker threads.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if let Some(limit) = memory_bytes {
                let rlimit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                if libc::setrlimit(libc::RLIMIT_AS, &rlimit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    // The child is reaped by `wait4` (or `Running`'s drop), never by std: dropping it does not wait.
    let mut child = cmd.spawn()?;
    Ok(Spawned {
        pid: child.id() as i32,
        stdin: child.stdin.take().map(OwnedFd::from),
        stdout: child.stdout.take().map(OwnedFd::from),
        stderr: child.stderr.take().map(OwnedFd::from),
    })
}

/// A long-running process (a managed instance): killed, with its group, and reaped when dropped.
#[derive(Debug)]
pub struct Running {
    pub pid: i32,
    /// Its exit status once reaped (its pid may then be another process's).
    exited: Option<i32>,
    /// Its CPU time to its end (with the children it waited for), once reaped.
    exit_cpu_ns: u64,
}

impl Running {
    pub fn new(pid: i32) -> Self {
        Self { pid, exited: None, exit_cpu_ns: 0 }
    }

    /// How it ended (its wait status), if it has.
    pub fn try_wait(&mut self) -> Option<i32> {
        if self.exited.is_none() {
            let mut status = 0;
            // SAFETY: rusage is plain old data, fully written by wait4 on success.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: plain syscall on our own child.
            if unsafe { libc::wait4(self.pid, &mut status, libc::WNOHANG, &mut usage) } == self.pid {
                self.exited = Some(status);
                self.exit_cpu_ns = rusage_cpu_ns(&usage);
            }
        }
        self.exited
    }

    /// CPU time it used so far: its threads' (`/proc`) while it runs, the kernel's whole
    /// account once it is reaped (its pid may be another process's then).
    pub fn cpu_ns(&self) -> u64 {
        match self.exited {
            Some(_) => self.exit_cpu_ns,
            None => process_cpu_ns(self.pid as u32),
        }
    }

    /// Kills it and its group, unless it has been reaped (its pid may be another's then); it
    /// is reaped when dropped.
    pub fn kill(&mut self) {
        if self.exited.is_some() {
            return;
        }
        kill_group(self.pid);
        // SAFETY: plain syscall; the process may be gone already.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.exited.is_some() {
            return;
        }
        self.kill();
        let pid = self.pid;
        // Reaped off the caller's thread: dying takes the kernel a moment.
        std::thread::spawn(move || wait4(pid));
    }
}

/// Kills a whole process group (the function and anything it started).
pub fn kill_group(pgid: i32) {
    // SAFETY: plain syscall; a group that is already gone gives ESRCH, which is fine.
    unsafe {
        libc::killpg(pgid, libc::SIGKILL);
    }
}

/// How a reaped child ended, with its resource usage.
pub struct Reaped {
    pub status: i32,
    pub cpu_ns: u64,
    pub max_rss_bytes: u64,
}

impl Reaped {
    pub fn exit_code(&self) -> Option<i32> {
        libc::WIFEXITED(self.status).then(|| libc::WEXITSTATUS(self.status))
    }

    pub fn signal(&self) -> Option<i32> {
        libc::WIFSIGNALED(self.status).then(|| libc::WTERMSIG(self.status))
    }
}

/// Waits for `pid` with wait4, which returns the kernel's own CPU and memory accounting of the
/// child (including the children it waited for). Blocking: call from a blocking thread.
pub fn wait4(pid: i32) -> std::io::Result<Reaped> {
    let mut status = 0;
    // SAFETY: rusage is plain old data, fully written by wait4 on success.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        let result = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if result == pid {
            break;
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
    Ok(Reaped { status, cpu_ns: rusage_cpu_ns(&usage), max_rss_bytes: usage.ru_maxrss as u64 * 1024 })
}

/// User + system CPU time of a `wait4` rusage, in nanoseconds.
fn rusage_cpu_ns(usage: &libc::rusage) -> u64 {
    let micros = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000 + tv.tv_usec as u64;
    (micros(usage.ru_utime) + micros(usage.ru_stime)) * 1000
}

/// CPU time consumed so far by every thread of a running process, in nanoseconds, from
/// `/proc/PID/task/*/schedstat` (nanosecond resolution, unlike the tick counts of `stat`).
pub fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|text| text.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Peak resident set size of a running process (`VmHWM`), in bytes.
pub fn process_peak_rss(pid: u32) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// The CPU time of the calling thread, in nanoseconds (CLOCK_THREAD_CPUTIME_ID).
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: plain syscall writing into a local timespec.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Watchdog-style environment name of a request header: `x-call-id` → `Http_X_Call_Id`.
pub fn header_env_name(header: &str) -> String {
    let words: Vec<String> = header
        .split('-')
        .map(|word| {
            let mut chars = word.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + &chars.as_str().to_ascii_lowercase(),
                None => String::new(),
            }
        })
        .collect();
    format!("Http_{}", words.join("_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_follow_the_watchdog() {
        assert_eq!(header_env_name("x-call-id"), "Http_X_Call_Id");
        assert_eq!(header_env_name("content-type"), "Http_Content_Type");
    }

    #[test]
    fn thread_clock_advances_with_work() {
        let before = thread_cpu_ns();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu_ns() > before);
    }
}
