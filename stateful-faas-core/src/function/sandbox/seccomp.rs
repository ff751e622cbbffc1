//! The seccomp filter a jailed process runs under: what a function has no business doing is
//! refused with EPERM.

/// Syscalls a function is refused (EPERM): tracing other processes, mounting, the kernel's
/// keyrings, modules, BPF, new namespaces, clocks, swap, reboot, and the like.
const DENIED: &[libc::c_long] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kcmp,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_personality,
    libc::SYS_vhangup,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_iopl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_ioperm,
];

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

/// The seccomp program: the native architecture only; [`DENIED`] and `clone` with namespace
/// flags refused with EPERM; `clone3` answered ENOSYS (its flags are out of the filter's reach,
/// and libc then falls back to `clone`); everything else allowed.
pub(super) fn seccomp_filter() -> Vec<libc::sock_filter> {
    const LOAD: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JGE: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const JSET: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let op = |code: u16, k: u32, jt: u8, jf: u8| libc::sock_filter { code, jt, jf, k };
    let errno = |e: i32| libc::SECCOMP_RET_ERRNO | e as u32;
    const NR: u32 = 0; // offsetof(seccomp_data, nr)
    const ARCH: u32 = 4;
    const ARG0: u32 = 16;
    let namespaces = (libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWUSER
        | libc::CLONE_NEWCGROUP) as u32;
    let mut program = vec![
        op(LOAD, ARCH, 0, 0),
        op(JEQ, AUDIT_ARCH, 1, 0),
        op(RET, libc::SECCOMP_RET_KILL_PROCESS, 0, 0),
        op(LOAD, NR, 0, 0),
    ];
    #[cfg(target_arch = "x86_64")]
    program.extend([op(JGE, 0x4000_0000, 0, 1), op(RET, errno(libc::EPERM), 0, 0)]); // the x32 ABI
    for nr in DENIED {
        program.extend([op(JEQ, *nr as u32, 0, 1), op(RET, errno(libc::EPERM), 0, 0)]);
    }
    program.extend([op(JEQ, libc::SYS_clone3 as u32, 0, 1), op(RET, errno(libc::ENOSYS), 0, 0)]);
    program.extend([
        op(JEQ, libc::SYS_clone as u32, 0, 4),
        op(LOAD, ARG0, 0, 0),
        op(JSET, namespaces, 0, 1),
        op(RET, errno(libc::EPERM), 0, 0),
        op(RET, libc::SECCOMP_RET_ALLOW, 0, 0),
    ]);
    program.push(op(RET, libc::SECCOMP_RET_ALLOW, 0, 0));
    program
}
