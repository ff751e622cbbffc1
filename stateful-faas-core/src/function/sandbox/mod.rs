//! The sandbox every `exec` process and managed `http` instance runs in.
//!
//! The gateway starts the process as `posix_spawn` does: a `clone` that shares its memory and
//! suspends the calling thread until the child execs, here with new mount, pid, ipc and uts
//! namespaces (the child is pid 1 of its own pid namespace). Before it execs, the child:
//! - joins its cgroups (`cgroup.rs`: limits and metering);
//! - enters its network namespace: one per tenant for exec invocations, one per managed
//!   instance, each with only a loopback interface on which the gateway serves the state store
//!   (`SFAAS_STATE_URL`) for that namespace alone;
//! - builds its root on a tmpfs: the host's system directories (`/usr`, `/etc`, the `/bin` and
//!   `/lib` links) and the function's own folder read-only, a fresh `/proc`, a few devices, a
//!   private `/tmp` with a size cap; nothing else of the host (no data directory, no other
//!   tenant's folder) exists there; then `pivot_root`s into it;
//! - drops every capability (bounding set included), becomes its tenant's uid and gid, sets
//!   `no_new_privs` and installs a seccomp filter that refuses what a function has no business
//!   doing (see `seccomp.rs`);
//! - and execs the function.
//!
//! Everything the child does is a raw syscall on memory prepared before the clone (it shares
//! the gateway's memory, so it may not allocate or take a lock). Why this and not bubblewrap:
//! docs/decisions.md.

use std::collections::{BTreeSet, HashMap};
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

mod net;
mod seccomp;

use net::socket_in;
pub use net::{NetNs, StateServers};
use seccomp::seccomp_filter;

use super::cgroup::{CgroupConfig, CgroupError, Cgroups, Group};
use crate::tenant::TenantId;

/// What the sandbox is allowed and given.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub limits: CgroupConfig,
    /// The uids (and gids, the same numbers) tenants' processes run as, one per tenant.
    pub uids: std::ops::RangeInclusive<u32>,
    /// Size of each sandbox's private `/tmp` (it counts against the function's memory).
    pub tmp_bytes: u64,
    /// Tenants whose functions share the host's network instead of a namespace of their own
    /// (outside egress; they also reach the host's loopback services).
    pub egress: BTreeSet<String>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self { limits: CgroupConfig::default(), uids: 200_000..=265_535, tmp_bytes: 64 << 20, egress: BTreeSet::new() }
    }
}

/// Why the sandbox cannot run.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(
        "the sandbox cannot run here: {0} (it needs root: namespaces, mounts and a uid per tenant; pass --sandbox off \
         to run functions as plain child processes, see the README's threat model)"
    )]
    Unavailable(String),
    #[error("sandbox: {0}")]
    Io(String),
    #[error("{0}")]
    Refused(String),
}

/// The gateway's sandbox: its cgroups, the root every jail is built from, and each tenant's
/// uid and network.
pub struct Sandbox {
    pub cgroups: Cgroups,
    /// The gateway's data directory, which no jail may hold.
    data_dir: PathBuf,
    /// An empty directory each jail mounts its root on (in its own mount namespace).
    root: PathBuf,
    /// The host's system entries every root has.
    system: Vec<(PathBuf, SystemEntry)>,
    tmp_bytes: u64,
    uids: std::ops::RangeInclusive<u32>,
    egress: BTreeSet<String>,
    tenants: Mutex<HashMap<TenantId, TenantBox>>,
    filter: Arc<[libc::sock_filter]>,
    cap_last: u32,
    /// The state store's routes, served in each network namespace.
    state: OnceLock<StateServers>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox").field("cgroups", &self.cgroups).field("root", &self.root).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
enum SystemEntry {
    Dir,
    Symlink(PathBuf),
}

struct TenantBox {
    uid: u32,
    /// `None`: the tenant may reach outside (`egress`).
    net: Option<Arc<NetNs>>,
}

/// The host directories (or links to them) a function's programs need.
const SYSTEM: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "opt"];

/// Devices a function may open, bound from the host's.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom"];

/// `PATH` inside a sandbox (the gateway's own may name folders that are not there).
const SANDBOX_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The port a managed instance listens on inside its own network namespace.
pub const INSTANCE_PORT: u16 = 8080;

/// Host folders no function's `workdir` may be in.
const HOST_FOLDERS: [&str; 4] = ["/proc", "/sys", "/dev", "/run"];

impl Sandbox {
    /// Sets up the cgroups and the jail's parts, and proves they work by running `/bin/true`
    /// in a jail: a host where the sandbox cannot work is refused at start, not at a call.
    pub async fn start(config: SandboxConfig, data_dir: &Path) -> Result<Self, SandboxError> {
        // SAFETY: plain syscall.
        if unsafe { libc::geteuid() } != 0 {
            return Err(SandboxError::Unavailable("the gateway does not run as root".into()));
        }
        if *config.uids.start() == 0 || config.uids.is_empty() {
            return Err(SandboxError::Unavailable(format!("the uid range {:?} is empty or holds root", config.uids)));
        }
        let cgroups = Cgroups::start(config.limits)?;
        let data_dir =
            std::fs::canonicalize(data_dir).map_err(|e| SandboxError::Io(format!("{}: {e}", data_dir.display())))?;
        let root = data_dir.join("sandbox-root");
        std::fs::create_dir_all(&root).map_err(|e| SandboxError::Io(format!("{}: {e}", root.display())))?;
        let system = SYSTEM
            .iter()
            .filter_map(|name| {
                let path = Path::new("/").join(name);
                let meta = std::fs::symlink_metadata(&path).ok()?;
                if meta.file_type().is_symlink() {
                    Some((path.clone(), SystemEntry::Symlink(std::fs::read_link(&path).ok()?)))
                } else {
                    meta.is_dir().then_some((path, SystemEntry::Dir))
                }
            })
            .collect();
        let cap_last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(40);
        let sandbox = Self {
            cgroups,
            data_dir,
            root,
            system,
            tmp_bytes: config.tmp_bytes,
            uids: config.uids,
            egress: config.egress,
            tenants: Mutex::new(HashMap::new()),
            filter: seccomp_filter().into(),
            cap_last,
            state: OnceLock::new(),
        };
        sandbox.probe().await?;
        tracing::info!(layout = ?sandbox.cgroups.layout, "functions run in sandboxes (namespaces, a uid per tenant, seccomp, cgroups)");
        Ok(sandbox)
    }

    /// Runs `/bin/true` in a jail with a network namespace of its own.
    async fn probe(&self) -> Result<(), SandboxError> {
        let net = NetNs::new(None).map_err(|e| SandboxError::Unavailable(format!("a network namespace: {e}")))?;
        let plan = self.plan(*self.uids.start(), Some(Arc::new(net)), None);
        let spawned = plan
            .spawn(&[], &[c"/bin/true".into()], &[], Io::Logged)
            .map_err(|e| SandboxError::Unavailable(format!("a test jail did not start: {e}")))?;
        let reaped = tokio::task::spawn_blocking(move || super::process::wait4(spawned.pid))
            .await
            .map_err(|e| SandboxError::Unavailable(e.to_string()))?
            .map_err(|e| SandboxError::Unavailable(e.to_string()))?;
        if reaped.exit_code() != Some(0) {
            return Err(SandboxError::Unavailable(format!(
                "a test jail running /bin/true ended with {}",
                reaped.status
            )));
        }
        Ok(())
    }

    /// Hands the sandbox the state store's servers, served in each network namespace it makes.
    pub fn serve_state(&self, servers: StateServers) {
        let _ = self.state.set(servers);
    }

    /// A jail for one exec invocation (in its tenant's network) or managed instance (in a
    /// network of its own): its cgroup, and the plan its child follows.
    pub fn jail(&self, tenant: &TenantId, spec: &super::FunctionSpec, own_network: bool) -> Result<Jail, SandboxError> {
        // The folder itself, links and `..` resolved, is what the jail binds.
        let workdir = match spec.workdir.as_deref() {
            Some(dir) => Some(
                std::fs::canonicalize(dir)
                    .map_err(|e| SandboxError::Refused(format!("its workdir {}: {e}", dir.display())))?,
            ),
            None => None,
        };
        if let Some(dir) = workdir.as_ref() {
            if dir.starts_with(&self.data_dir) {
                return Err(SandboxError::Refused(format!(
                    "its workdir {} is inside the gateway's data directory, which no function may see",
                    dir.display()
                )));
            }
            // The host's root, processes, devices and runtime files (the gateway's own command
            // line with its flags is in /proc), and writable mounts below them. (A folder that
            // holds the data directory shows its name only: the folder is bound alone, and the
            // data directory is the gateway's user's alone.)
            if dir == Path::new("/") || HOST_FOLDERS.iter().any(|host| dir.starts_with(host)) {
                return Err(SandboxError::Refused(format!(
                    "its workdir {} is the host's root or in one of its folders {}, which no function may see",
                    dir.display(),
                    HOST_FOLDERS.join(", ")
                )));
            }
        }
        let group = self.cgroups.create(tenant, &spec.name, spec.limits.memory_bytes, spec.limits.cpu_millis)?;
        let (uid, tenant_net) = self.tenant(tenant)?;
        let net = match (own_network, tenant_net) {
            (_, None) => None,
            (true, Some(_)) => Some(Arc::new(
                NetNs::new(self.state.get()).map_err(|e| SandboxError::Io(format!("network namespace: {e}")))?,
            )),
            (false, Some(net)) => Some(net),
        };
        let state_url = net.as_ref().and_then(|net| net.state_url.clone());
        let state_redis = net.as_ref().and_then(|net| net.state_redis.clone());
        let plan = self.plan(uid, net.clone(), workdir.as_deref());
        Ok(Jail { group, plan: Arc::new(plan), net, state_url, state_redis })
    }

    /// The tenant's uid and network, made on its first call.
    fn tenant(&self, tenant: &TenantId) -> Result<(u32, Option<Arc<NetNs>>), SandboxError> {
        let mut tenants = self.tenants.lock().unwrap();
        if let Some(known) = tenants.get(tenant) {
            return Ok((known.uid, known.net.clone()));
        }
        let uid = self
            .uids
            .start()
            .checked_add(tenants.len() as u32)
            .filter(|uid| self.uids.contains(uid))
            .ok_or_else(|| SandboxError::Io(format!("no uid left in {:?} for another tenant", self.uids)))?;
        let net = if self.egress.contains(tenant.as_str()) {
            None
        } else {
            let net = NetNs::new(self.state.get()).map_err(|e| SandboxError::Io(format!("network namespace: {e}")))?;
            Some(Arc::new(net))
        };
        tenants.insert(tenant.clone(), TenantBox { uid, net: net.clone() });
        Ok((uid, net))
    }

    /// Everything the child does, prepared before the fork.
    fn plan(&self, uid: u32, net: Option<Arc<NetNs>>, workdir: Option<&Path>) -> Plan {
        let at = |path: &Path| cstring(&self.root.join(path.strip_prefix("/").unwrap_or(path)));
        let mut ops = Vec::new();
        for (path, entry) in &self.system {
            match entry {
                SystemEntry::Dir => {
                    ops.push(Op::Dir(at(path)));
                    ops.push(Op::BindReadOnly(cstring(path), at(path)));
                }
                SystemEntry::Symlink(target) => ops.push(Op::Symlink(cstring(target), at(path))),
            }
        }
        ops.push(Op::Dir(at(Path::new("/proc"))));
        ops.push(Op::Proc(at(Path::new("/proc"))));
        ops.push(Op::Dir(at(Path::new("/dev"))));
        ops.push(Op::Tmpfs(at(Path::new("/dev")), c"size=64k,nr_inodes=64,mode=0755".into()));
        for device in DEVICES {
            let path = Path::new("/dev").join(device);
            ops.push(Op::File(at(&path)));
            ops.push(Op::BindDevice(cstring(&path), at(&path)));
        }
        for (link, target) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ] {
            ops.push(Op::Symlink(cstring(Path::new(target)), at(&Path::new("/dev").join(link))));
        }
        ops.push(Op::Dir(at(Path::new("/tmp"))));
        let tmp_options = format!("size={},nr_inodes=16384,mode=1777", self.tmp_bytes);
        ops.push(Op::Tmpfs(at(Path::new("/tmp")), CString::new(tmp_options).expect("no NUL")));
        // The function's own folder, read-only at its own path (unless a system folder holds it).
        let workdir = workdir.filter(|dir| dir.is_absolute());
        if let Some(dir) = workdir.filter(|dir| !self.system.iter().any(|(path, _)| dir.starts_with(path))) {
            let mut prefix = PathBuf::from("/");
            for part in dir.components().skip(1) {
                prefix.push(part);
                ops.push(Op::Dir(at(&prefix)));
            }
            ops.push(Op::BindReadOnly(cstring(dir), at(dir)));
        }
        Plan {
            root: cstring(&self.root),
            ops,
            workdir: cstring(workdir.unwrap_or(Path::new("/tmp"))),
            uid,
            net,
            cap_last: self.cap_last,
            filter: self.filter.clone(),
        }
    }
}

/// One invocation's or instance's place: its cgroup, what its child does, and its network.
pub struct Jail {
    pub group: Group,
    plan: Arc<Plan>,
    net: Option<Arc<NetNs>>,
    /// The state store as the function reaches it (`None`: the gateway's own address).
    pub state_url: Option<String>,
    /// The state store's Redis listener as the function reaches it, `HOST:PORT`.
    pub state_redis: Option<String>,
}

impl Jail {
    /// Starts `argv` (with `envp`, `KEY=VALUE`s) in the jail.
    pub fn spawn(&self, argv: &[CString], envp: &[CString], io: Io) -> io::Result<Spawned> {
        self.plan.spawn(&self.group.join_fds(), argv, envp, io)
    }

    /// Connects to `port` on the jail's loopback, or on the host's (with egress), where the
    /// server must be the jail's own: another tenant's process may be listening on the port.
    pub async fn connect(&self, port: u16) -> io::Result<tokio::net::TcpStream> {
        match &self.net {
            Some(net) => socket_in(net.fd.as_raw_fd())?.connect((std::net::Ipv4Addr::LOCALHOST, port).into()).await,
            None => {
                let stream = tokio::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port)).await?;
                net::served_by(port, stream.local_addr()?.port(), self.plan.uid)?;
                Ok(stream)
            }
        }
    }

    /// Whether the jail has a network of its own (else it shares the host's).
    pub fn has_own_network(&self) -> bool {
        self.net.is_some()
    }
}

/// One step of building a root.
enum Op {
    Dir(CString),
    File(CString),
    Symlink(CString, CString),
    BindReadOnly(CString, CString),
    BindDevice(CString, CString),
    Tmpfs(CString, CString),
    Proc(CString),
}

/// What a jailed child does between fork and exec.
pub struct Plan {
    root: CString,
    ops: Vec<Op>,
    workdir: CString,
    uid: u32,
    /// Kept open as long as a child may still enter it.
    net: Option<Arc<NetNs>>,
    cap_last: u32,
    filter: Arc<[libc::sock_filter]>,
}

// SAFETY: sock_filter is plain data; nothing in a Plan is mutated after it is built.
unsafe impl Send for Plan {}
unsafe impl Sync for Plan {}

/// A jailed process's standard streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    /// Pipes to the gateway for all three (an exec invocation).
    Piped,
    /// stdin from `/dev/null`; stdout and stderr pipes to the gateway, which logs their lines
    /// (a managed server: see `output`).
    Logged,
}

/// A started process and the gateway's ends of its pipes.
#[derive(Debug)]
pub struct Spawned {
    pub pid: libc::pid_t,
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// What the jailed child reads (in the gateway's memory, which it shares until it execs).
struct Child<'a> {
    plan: &'a Plan,
    join_fds: &'a [RawFd],
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    /// Descriptors to become 0, 1 and 2.
    stdio: [RawFd; 3],
    /// The errno of the step that failed, for the gateway to report.
    error: std::sync::atomic::AtomicI32,
}

impl Plan {
    /// Starts a process in the jail the way `posix_spawn` does: a `clone` that shares the
    /// gateway's memory and suspends the calling thread until the child execs (no copy of the
    /// gateway's page tables, no copy-on-write faults while the function runs), with new
    /// mount, pid, ipc and uts namespaces. The child is pid 1 of its pid namespace; when it
    /// exits, the kernel kills whatever else runs there.
    pub fn spawn(&self, join_fds: &[RawFd], argv: &[CString], envp: &[CString], io: Io) -> io::Result<Spawned> {
        let pipe = || -> io::Result<(OwnedFd, OwnedFd)> {
            let mut fds = [0; 2];
            // SAFETY: pipe2 writes two descriptors into the array.
            check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
            // SAFETY: both are open and ours alone.
            Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
        };
        let (stdio, kept, gateway_ends) = match io {
            Io::Piped => {
                let ((in_r, in_w), (out_r, out_w), (err_r, err_w)) = (pipe()?, pipe()?, pipe()?);
                let stdio = [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
                (stdio, vec![in_r, out_w, err_w], (Some(in_w), Some(out_r), Some(err_r)))
            }
            Io::Logged => {
                let null = OwnedFd::from(std::fs::File::open("/dev/null")?);
                let ((out_r, out_w), (err_r, err_w)) = (pipe()?, pipe()?);
                let stdio = [null.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
                (stdio, vec![null, out_w, err_w], (None, Some(out_r), Some(err_r)))
            }
        };
        let argv_ptrs: Vec<_> = argv.iter().map(|a| a.as_ptr()).chain([std::ptr::null()]).collect();
        let envp_ptrs: Vec<_> = envp.iter().map(|e| e.as_ptr()).chain([std::ptr::null()]).collect();
        let child = Child {
            plan: self,
            join_fds,
            argv: &argv_ptrs,
            envp: &envp_ptrs,
            stdio,
            error: std::sync::atomic::AtomicI32::new(0),
        };
        let mut stack = vec![0u8; CHILD_STACK_BYTES];
        let flags = libc::CLONE_VM
            | libc::CLONE_VFORK
            | libc::CLONE_NEWNS
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS
            | libc::SIGCHLD;
        // SAFETY: every signal is blocked around the clone, so no handler of the gateway's runs
        // on the child's stack; the child only makes raw syscalls on `child`, which outlives it
        // (this thread is suspended until it execs or exits), and its stack is ours.
        let pid = unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            let top = stack.as_mut_ptr().add(stack.len() & !15);
            let pid = libc::clone(child_main, top.cast(), flags, (&child as *const Child).cast_mut().cast());
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            pid
        };
        drop(kept);
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        let errno = child.error.load(std::sync::atomic::Ordering::SeqCst);
        if errno != 0 {
            // It exited without exec: reap it and say why.
            let _ = super::process::wait4(pid);
            return Err(io::Error::from_raw_os_error(errno));
        }
        let (stdin, stdout, stderr) = gateway_ends;
        Ok(Spawned { pid, stdin, stdout, stderr })
    }

    unsafe fn build_root(&self) -> io::Result<()> {
        unsafe {
            let null = std::ptr::null::<libc::c_char>();
            // The gateway's umask (077) would make the root's folders unreadable to the function.
            libc::umask(0o022);
            check(libc::mount(null, c"/".as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()))?;
            let options = c"size=256k,nr_inodes=1024,mode=0755";
            mount_tmpfs(&self.root, options)?;
            for op in &self.ops {
                match op {
                    Op::Dir(path) => {
                        if libc::mkdir(path.as_ptr(), 0o755) != 0 && *libc::__errno_location() != libc::EEXIST {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    Op::File(path) => {
                        let fd = libc::open(path.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o644);
                        check(fd)?;
                        libc::close(fd);
                    }
                    Op::Symlink(target, path) => check(libc::symlink(target.as_ptr(), path.as_ptr()))?,
                    Op::BindReadOnly(source, target) => {
                        // The folder alone, not the mounts below it: the remount below makes
                        // only this mount read-only, and a writable one under it would stay so.
                        check(libc::mount(source.as_ptr(), target.as_ptr(), null, libc::MS_BIND, std::ptr::null()))?;
                        let flags =
                            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
                        check(libc::mount(null, target.as_ptr(), null, flags, std::ptr::null()))?;
                    }
                    Op::BindDevice(source, target) => {
                        check(libc::mount(source.as_ptr(), target.as_ptr(), null, libc::MS_BIND, std::ptr::null()))?;
                    }
                    Op::Tmpfs(path, options) => mount_tmpfs(path, options)?,
                    Op::Proc(path) => {
                        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
                        check(libc::mount(c"proc".as_ptr(), path.as_ptr(), c"proc".as_ptr(), flags, std::ptr::null()))?;
                    }
                }
            }
            // The new root on top of the old one, then the old one detached: nothing of the
            // host's tree is reachable any more.
            check(libc::chdir(self.root.as_ptr()))?;
            check(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int)?;
            check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
            check(libc::chdir(c"/".as_ptr()))?;
            let flags = libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
            check(libc::mount(null, c"/".as_ptr(), null, flags, std::ptr::null()))?;
            check(libc::chdir(self.workdir.as_ptr()))?;
            check(libc::sethostname(c"sfaas".as_ptr(), 5))?;
            Ok(())
        }
    }

    unsafe fn drop_privileges(&self) -> io::Result<()> {
        unsafe {
            for cap in 0..=self.cap_last {
                libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
            }
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setresgid(self.uid, self.uid, self.uid))?;
            // Leaving uid 0 clears the permitted, effective and ambient capabilities.
            check(libc::setresuid(self.uid, self.uid, self.uid))?;
            // A change of credentials clears the parent-death signal: set it again.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            let program = libc::sock_fprog { len: self.filter.len() as u16, filter: self.filter.as_ptr().cast_mut() };
            check(libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &program as *const libc::sock_fprog))?;
            Ok(())
        }
    }
}

unsafe fn mount_tmpfs(path: &CStr, options: &CStr) -> io::Result<()> {
    let flags = libc::MS_NOSUID | libc::MS_NODEV;
    // SAFETY: NUL-terminated strings that outlive the call.
    check(unsafe { libc::mount(c"sfaas".as_ptr(), path.as_ptr(), c"tmpfs".as_ptr(), flags, options.as_ptr().cast()) })
}

/// Stack of a jailed child until it execs.
const CHILD_STACK_BYTES: usize = 64 << 10;

/// The jailed child, from `clone` to `execve`: only raw syscalls on memory prepared before.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Child` the suspended gateway thread holds.
    let child = unsafe { &*(arg as *const Child) };
    // SAFETY: raw syscalls; see `Plan::spawn`.
    let result = unsafe { child.run() };
    let errno = result.err().and_then(|e| e.raw_os_error()).unwrap_or(libc::EINVAL);
    child.error.store(errno.max(1), std::sync::atomic::Ordering::SeqCst);
    // SAFETY: leaves without running anything of the gateway's.
    unsafe { libc::_exit(127) }
}

impl Child<'_> {
    /// Returns only if a step failed.
    unsafe fn run(&self) -> io::Result<()> {
        unsafe {
            // The gateway's handlers live in memory this child shares: back to the defaults.
            for signal in 1..libc::SIGRTMAX() {
                libc::signal(signal, libc::SIG_DFL);
            }
            // Into its cgroups first, so that everything it starts is counted and limited.
            super::cgroup::join_in_child(self.join_fds)?;
            check(libc::setpgid(0, 0))?;
            // If the gateway dies (even by SIGKILL), its functions die with it.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            for (target, fd) in self.stdio.iter().enumerate() {
                if *fd != target as RawFd {
                    check(libc::dup2(*fd, target as RawFd))?;
                }
            }
            let plan = self.plan;
            if let Some(net) = &plan.net {
                check(libc::setns(net.fd.as_raw_fd(), libc::CLONE_NEWNET))?;
            }
            plan.build_root()?;
            plan.drop_privileges()?;
            let empty: libc::sigset_t = std::mem::zeroed();
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            libc::execve(self.argv[0], self.argv.as_ptr(), self.envp.as_ptr());
            Err(io::Error::last_os_error())
        }
    }
}

fn check(result: libc::c_int) -> io::Result<()> {
    if result < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn cstring(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("paths hold no NUL")
}

/// The environment a jailed process starts with besides its function's own: a `PATH` that
/// exists there and a writable `HOME`.
pub fn base_env() -> [(&'static str, &'static str); 2] {
    [("PATH", SANDBOX_PATH), ("HOME", "/tmp")]
}
