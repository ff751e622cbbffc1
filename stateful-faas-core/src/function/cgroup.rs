//! Control groups: one per exec invocation and per managed instance, under a parent per
//! tenant. They are the boundary that limits a function (memory, processes) and that meters it:
//! the CPU of everything that ran in the group, descendants and detached processes included,
//! and its peak memory. When the invocation or instance ends, whatever is left in its group is
//! killed, so nothing a function starts outlives it.
//!
//! Two layouts are supported, picked at start:
//! - cgroup v2 (`/sys/fs/cgroup` is a `cgroup2` mount): one hierarchy with the `memory` and
//!   `pids` controllers enabled below the gateway's own group (the gateway moves itself into a
//!   leaf `gateway` first, as v2 allows processes only in leaves of controlled groups);
//! - hybrid (v1 `memory` and `pids` hierarchies beside a v2 one at `/sys/fs/cgroup/unified`):
//!   limits in the v1 hierarchies, CPU accounting (`cpu.stat`) and `cgroup.kill` in the v2 one,
//!   which has both without any controller.
//!
//! Groups are made under the gateway's own group of each hierarchy, in `sfaas-<pid>-<n>` (n: the
//! process's n-th gateway), removed at exit; groups left by a gateway that died are removed at
//! the next start.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::tenant::TenantId;

/// Why control groups cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no usable cgroup hierarchy: {0} (the sandbox meters and limits functions by cgroup; run as root on a host \
         with cgroup v2, or the hybrid v1 memory/pids + v2 layout, or pass --sandbox off)"
    )]
    Unavailable(String),
    #[error("cgroup {path}: {error}")]
    Io { path: String, error: std::io::Error },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |error| CgroupError::Io { path: path.display().to_string(), error }
}

/// Limits of one group.
#[derive(Debug, Clone, Copy)]
pub struct GroupLimits {
    pub memory_bytes: u64,
    pub pids: u64,
}

/// Limits of every group: per invocation or instance, and per tenant (all of its groups).
#[derive(Debug, Clone, Copy)]
pub struct CgroupConfig {
    /// Default per invocation or instance when the function sets no `limits.memory`.
    pub function: GroupLimits,
    pub tenant: GroupLimits,
}

impl Default for CgroupConfig {
    fn default() -> Self {
        Self {
            function: GroupLimits { memory_bytes: 512 << 20, pids: 256 },
            tenant: GroupLimits { memory_bytes: 4 << 30, pids: 1024 },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    V2,
    Hybrid,
}

/// Where one group is in each hierarchy: the one with `cpu.stat` and `cgroup.kill` (v2), the
/// memory one and the pids one. On v2 the three are the same directory.
#[derive(Debug)]
struct Dirs {
    accounting: PathBuf,
    memory: PathBuf,
    pids: PathBuf,
}

impl Dirs {
    /// The same child in every hierarchy.
    fn join(&self, child: &str) -> Self {
        Self { accounting: self.accounting.join(child), memory: self.memory.join(child), pids: self.pids.join(child) }
    }

    /// The distinct directories (one on v2, three on hybrid).
    fn distinct(&self) -> Vec<&Path> {
        let mut dirs = vec![self.accounting.as_path(), self.memory.as_path(), self.pids.as_path()];
        dirs.dedup();
        dirs
    }
}

/// The gateway's groups: where they live in each hierarchy, and their limits.
#[derive(Debug)]
pub struct Cgroups {
    pub layout: Layout,
    /// `sfaas-<pid>-<n>` in each hierarchy.
    base: Dirs,
    /// Hybrid layout: `sfaas-<pid>-<n>` in the v1 `cpu` hierarchy, where groups of functions with
    /// a CPU limit are made (only those: joining a group costs each call). On v2 the limit is
    /// in the group's own directory.
    cpu_base: Option<PathBuf>,
    config: CgroupConfig,
    /// Tenants whose parent groups are made and limited.
    tenants: std::sync::Mutex<std::collections::HashSet<TenantId>>,
    next: AtomicU64,
}

impl Cgroups {
    /// Finds the layout and makes the gateway's groups.
    pub fn start(config: CgroupConfig) -> Result<Self, CgroupError> {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| CgroupError::Unavailable(format!("cannot read /proc/self/cgroup: {e}")))?;
        let own_path = |controller: &str| -> Option<String> {
            own.lines().find_map(|line| {
                let mut parts = line.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                controllers.split(',').any(|c| c == controller).then(|| path.to_string())
            })
        };
        let v2_own = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/").to_string();
        static STARTED: AtomicU64 = AtomicU64::new(0);
        let name = format!("sfaas-{}-{}", std::process::id(), STARTED.fetch_add(1, Ordering::Relaxed));
        let root = Path::new("/sys/fs/cgroup");
        let cgroups = if root.join("cgroup.controllers").exists() {
            let own_dir = join(root, &v2_own);
            enable_v2_controllers(&own_dir)?;
            let base = own_dir.join(&name);
            Self::new(Layout::V2, Dirs { accounting: base.clone(), memory: base.clone(), pids: base }, config)
        } else {
            let unified = root.join("unified");
            let (Some(memory), Some(pids)) = (own_path("memory"), own_path("pids")) else {
                return Err(CgroupError::Unavailable(
                    "neither cgroup v2 nor the v1 memory and pids controllers".into(),
                ));
            };
            if !unified.join("cgroup.procs").exists() {
                return Err(CgroupError::Unavailable("no cgroup v2 hierarchy at /sys/fs/cgroup/unified".into()));
            }
            let base = Dirs {
                accounting: join(&unified, &v2_own).join(&name),
                memory: join(&root.join("memory"), &memory).join(&name),
                pids: join(&root.join("pids"), &pids).join(&name),
            };
            let mut cgroups = Self::new(Layout::Hybrid, base, config);
            cgroups.cpu_base = own_path("cpu").map(|cpu| join(&root.join("cpu"), &cpu).join(&name));
            cgroups
        };
        for dir in cgroups.base.distinct().into_iter().chain(cgroups.cpu_base.as_deref()) {
            if let Some(parent) = dir.parent() {
                remove_stale(parent);
            }
            std::fs::create_dir_all(dir).map_err(|e| CgroupError::Unavailable(format!("{}: {e}", dir.display())))?;
        }
        // Each level passes the controllers down: the base to the tenants' groups, which pass
        // them to their invocations' (in `create`).
        cgroups.pass_controllers(&cgroups.base).map_err(|e| CgroupError::Unavailable(e.to_string()))?;
        tracing::info!(layout = ?cgroups.layout, accounting = %cgroups.base.accounting.display(), "functions run in cgroups");
        Ok(cgroups)
    }

    fn new(layout: Layout, base: Dirs, config: CgroupConfig) -> Self {
        Self { layout, base, config, cpu_base: None, tenants: Default::default(), next: AtomicU64::new(0) }
    }

    /// On v2, enables the memory and pids controllers (and cpu, where the host allows it) for
    /// the groups below `dirs`.
    fn pass_controllers(&self, dirs: &Dirs) -> Result<(), CgroupError> {
        match self.layout {
            Layout::V2 => {
                let _ = write(&dirs.accounting.join("cgroup.subtree_control"), "+cpu");
                write(&dirs.accounting.join("cgroup.subtree_control"), V2_CONTROLLERS)
            }
            Layout::Hybrid => Ok(()),
        }
    }

    /// A new group for one invocation or instance of `tenant`'s function `name`, limited to
    /// `memory_bytes` (default: the configured one) and to `cpu_millis` thousandths of a CPU.
    pub fn create(
        &self,
        tenant: &TenantId,
        name: &str,
        memory_bytes: Option<u64>,
        cpu_millis: Option<u64>,
    ) -> Result<Group, CgroupError> {
        let leaf = format!("{name}-{}", self.next.fetch_add(1, Ordering::Relaxed));
        let limits = GroupLimits {
            memory_bytes: memory_bytes.unwrap_or(self.config.function.memory_bytes),
            pids: self.config.function.pids,
        };
        let parent = self.base.join(tenant.as_str());
        if !self.tenants.lock().unwrap().contains(tenant) {
            for dir in parent.distinct() {
                std::fs::create_dir_all(dir).map_err(io_error(dir))?;
            }
            self.pass_controllers(&parent)?;
            self.limit(&parent, self.config.tenant)?;
            self.tenants.lock().unwrap().insert(tenant.clone());
        }
        let dirs = parent.join(&leaf);
        for dir in dirs.distinct() {
            std::fs::create_dir(dir).map_err(io_error(dir))?;
        }
        // From here on, dropping the group removes what was made.
        let mut group = Group { dirs, layout: self.layout, procs: Vec::new(), cpu: None };
        self.limit(&group.dirs, limits)?;
        if let Some(millis) = cpu_millis {
            // A quota per 100 ms period: 250 thousandths run 25 ms of each 100 ms.
            let quota = (millis * 100).to_string();
            match (self.layout, &self.cpu_base) {
                (Layout::V2, _) => write(&group.dirs.accounting.join("cpu.max"), &format!("{quota} 100000"))?,
                (Layout::Hybrid, Some(cpu_base)) => {
                    let dir = cpu_base.join(tenant.as_str()).join(&leaf);
                    std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
                    group.cpu = Some(dir.clone());
                    write(&dir.join("cpu.cfs_period_us"), "100000")?;
                    write(&dir.join("cpu.cfs_quota_us"), &quota)?;
                }
                (Layout::Hybrid, None) => {
                    let error = std::io::Error::other("no cpu controller for limits.cpu");
                    return Err(CgroupError::Io { path: "cpu".into(), error });
                }
            }
        }
        let dirs = group.dirs.distinct().into_iter().chain(group.cpu.as_deref());
        group.procs = dirs
            .map(|dir| {
                let path = dir.join("cgroup.procs");
                std::fs::OpenOptions::new().write(true).open(&path).map_err(io_error(&path))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(group)
    }

    /// Writes `limits` into a group.
    fn limit(&self, dirs: &Dirs, limits: GroupLimits) -> Result<(), CgroupError> {
        let memory = limits.memory_bytes.to_string();
        match self.layout {
            Layout::V2 => {
                write(&dirs.memory.join("memory.max"), &memory)?;
                write(&dirs.memory.join("memory.swap.max"), "0").ok();
            }
            Layout::Hybrid => {
                write(&dirs.memory.join("memory.limit_in_bytes"), &memory)?;
                // Without swap accounting the file is absent: the limit above is then the limit.
                write(&dirs.memory.join("memory.memsw.limit_in_bytes"), &memory).ok();
            }
        }
        write(&dirs.pids.join("pids.max"), &limits.pids.to_string())
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for dir in self.base.distinct().into_iter().chain(self.cpu_base.as_deref()) {
            remove_tree(dir);
        }
    }
}

/// One invocation's or instance's group. Dropping it kills what is left in it and removes it.
#[derive(Debug)]
pub struct Group {
    dirs: Dirs,
    layout: Layout,
    /// `cgroup.procs` of each of its directories, open for the child to write itself into before it execs.
    procs: Vec<File>,
    /// Its group in the v1 `cpu` hierarchy, when it has a CPU limit there.
    cpu: Option<PathBuf>,
}

impl Group {
    /// File descriptors a child writes `0` to (itself) between fork and exec.
    pub fn join_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// CPU time (user + system) of everything that ran in the group, in nanoseconds.
    pub fn cpu_ns(&self) -> u64 {
        read_key(&self.dirs.accounting.join("cpu.stat"), "usage_usec").map_or(0, |usec| usec.saturating_mul(1000))
    }

    /// Peak memory use of the group, in bytes.
    pub fn peak_memory_bytes(&self) -> u64 {
        match self.layout {
            Layout::V2 => read_number(&self.dirs.memory.join("memory.peak")).unwrap_or(0),
            Layout::Hybrid => read_number(&self.dirs.memory.join("memory.max_usage_in_bytes")).unwrap_or(0),
        }
    }

    /// Whether the kernel killed a process of the group for going over its memory limit.
    pub fn oom_killed(&self) -> bool {
        let count = match self.layout {
            Layout::V2 => read_key(&self.dirs.memory.join("memory.events"), "oom_kill"),
            Layout::Hybrid => read_key(&self.dirs.memory.join("memory.oom_control"), "oom_kill"),
        };
        count.unwrap_or(0) > 0
    }

    /// The memory limit, in bytes.
    pub fn memory_limit_bytes(&self) -> u64 {
        match self.layout {
            Layout::V2 => read_number(&self.dirs.memory.join("memory.max")).unwrap_or(0),
            Layout::Hybrid => read_number(&self.dirs.memory.join("memory.limit_in_bytes")).unwrap_or(0),
        }
    }

    /// Whether the process limit refused a fork.
    pub fn pids_exhausted(&self) -> bool {
        read_key(&self.dirs.pids.join("pids.events"), "max").unwrap_or(0) > 0
    }

    /// Kills every process in the group and waits (up to a second) until it is empty.
    pub fn kill(&self) {
        let populated = || read_key(&self.dirs.accounting.join("cgroup.events"), "populated").unwrap_or(0) != 0;
        if !populated() {
            return;
        }
        let _ = write(&self.dirs.accounting.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(1);
        while populated() {
            if Instant::now() > deadline {
                tracing::warn!(group = %self.dirs.accounting.display(), "processes still in a killed cgroup");
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
        for dir in self.dirs.distinct().into_iter().chain(self.cpu.as_deref()) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// The v2 controllers the groups use.
const V2_CONTROLLERS: &str = "+memory +pids";

/// Moves a child into its groups: call between fork and exec (async-signal-safe).
pub fn join_in_child(fds: &[RawFd]) -> std::io::Result<()> {
    for fd in fds {
        // SAFETY: write(2) on an open descriptor from a buffer that outlives the call.
        if unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) } != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// On v2, the memory and pids controllers for the groups below `own`: v2 allows processes
/// only in leaves of a group whose controllers are enabled, so the gateway moves itself into
/// `own/gateway` first when it has to.
fn enable_v2_controllers(own: &Path) -> Result<(), CgroupError> {
    let control = own.join("cgroup.subtree_control");
    if write(&control, V2_CONTROLLERS).is_ok() {
        return Ok(());
    }
    let leaf = own.join("gateway");
    std::fs::create_dir_all(&leaf).map_err(|e| CgroupError::Unavailable(format!("{}: {e}", leaf.display())))?;
    for pid in std::fs::read_to_string(own.join("cgroup.procs")).unwrap_or_default().lines() {
        let _ = write(&leaf.join("cgroup.procs"), pid);
    }
    write(&control, V2_CONTROLLERS).map_err(|e| CgroupError::Unavailable(format!("enabling memory and pids: {e}")))
}

/// Removes the groups of gateways that are no longer running (`sfaas-<pid>-<n>` beside ours).
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name.to_str().and_then(|n| n.strip_prefix("sfaas-")?.split('-').next()?.parse::<u32>().ok());
        let Some(pid) = pid else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            remove_tree(&entry.path());
        }
    }
}

/// Kills what runs in a tree of groups and removes it, leaves first.
fn remove_tree(dir: &Path) {
    let _ = write(&dir.join("cgroup.kill"), "1");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    for _ in 0..100 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn join(root: &Path, cgroup_path: &str) -> PathBuf {
    root.join(cgroup_path.trim_start_matches('/'))
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    let mut file = std::fs::OpenOptions::new().write(true).open(path).map_err(io_error(path))?;
    file.write_all(value.as_bytes()).map_err(io_error(path))
}

fn read_number(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The value of `key` in a flat-keyed file (`key value` lines).
fn read_key(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| line.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}
