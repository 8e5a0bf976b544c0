//! The jail's system call filter: a seccomp denylist, loaded by bubblewrap (`--seccomp FD`) just before the jailed
//! program starts, for it and everything it starts (a filter cannot be removed, and no-new-privileges is set).
//!
//! Taken away, with `EPERM`: the btrfs ioctls that make a subvolume or a snapshot, [`DENIED_IOCTLS`]. A user's
//! `/data` is a btrfs subvolume whose qgroup holds the user's quota (the server's `storage` module); a subvolume made
//! inside it gets a level-0 qgroup of its own, without a limit, and what is written there counts against no quota.
//! Unprivileged users may make subvolumes (and snapshots of subvolumes they own) anywhere they can write, so the
//! kernel alone does not stop it. Every other system call, and every other ioctl, is allowed.
//!
//! The command is compared on its low 32 bits, as the kernel reads it (`unsigned int cmd` in `do_vfs_ioctl`): high
//! bits set in the 64-bit register do not get a command past the filter. On x86_64 the x32 ABI's `ioctl` numbers are
//! denied the same commands; a system call of another ABI than the filter's (i386's `int 0x80` on x86_64, AArch32
//! on aarch64) kills the process, as seccompiler's architecture check does, since the filter cannot read its
//! numbers. The filter is compiled once per process, for the architecture the server was built for: x86_64, aarch64
//! or riscv64 (what seccompiler supports). On another architecture no filter can be made, and a jail that needs one
//! is refused with an error saying so.

use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

use seccompiler::{SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule};

use crate::process::FRAME_FD;
use crate::SandboxError;

/// The ioctl commands the filter refuses, from the kernel's `include/uapi/linux/btrfs.h`: each is
/// `_IOW(BTRFS_IOCTL_MAGIC = 0x94, nr, 4096-byte args)` (`struct btrfs_ioctl_vol_args` or `_v2`), the same on every
/// architecture (asm-generic's ioctl encoding).
pub const DENIED_IOCTLS: &[(&str, u32)] = &[
    ("BTRFS_IOC_SNAP_CREATE", 0x5000_9401),
    ("BTRFS_IOC_SUBVOL_CREATE", 0x5000_940E),
    ("BTRFS_IOC_SNAP_CREATE_V2", 0x5000_9417),
    ("BTRFS_IOC_SUBVOL_CREATE_V2", 0x5000_9418),
];

/// x86_64's x32 ABI: its system calls carry this bit in their number, under the x86_64 audit architecture.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: i64 = 0x4000_0000;

/// Where bubblewrap finds the filter is never below this: [`ProcessSetup`](crate::ProcessSetup) moves the frame
/// socket to [`FRAME_FD`] in the child, which must not land on the filter's descriptor.
const LOWEST_FD: RawFd = 10;
const _: () = assert!(LOWEST_FD > FRAME_FD);

/// The numbers `ioctl` has for this architecture's native ABI (and x32's, on x86_64): each is denied the commands of
/// [`DENIED_IOCTLS`].
fn ioctl_numbers() -> Vec<i64> {
    #[cfg(target_arch = "x86_64")]
    {
        // x32's own ioctl (`__NR_ioctl` of asm/unistd_x32.h: 514 with the bit), and the native number with the bit,
        // which kernels before the x32 table was split (5.4) also ran as ioctl.
        vec![libc::SYS_ioctl, X32_SYSCALL_BIT | 514, X32_SYSCALL_BIT | libc::SYS_ioctl]
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        vec![libc::SYS_ioctl]
    }
}

/// The filter as `struct sock_filter` entries in this machine's byte order: what bubblewrap's `--seccomp` reads.
fn compile() -> Result<Vec<u8>, String> {
    let arch = std::env::consts::ARCH;
    let target = arch.try_into().map_err(|_| {
        format!(
            "seccompiler compiles filters for x86_64, aarch64 and riscv64, not {arch}; without one a jailed process \
             could escape its user's storage quota"
        )
    })?;
    let rule = |cmd: u32| {
        SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, u64::from(cmd))
            .and_then(|condition| SeccompRule::new(vec![condition]))
    };
    let rules: Vec<SeccompRule> =
        DENIED_IOCTLS.iter().map(|&(_, cmd)| rule(cmd)).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    let by_number: BTreeMap<i64, Vec<SeccompRule>> =
        ioctl_numbers().into_iter().map(|number| (number, rules.clone())).collect();
    let filter = SeccompFilter::new(by_number, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), target)
        .map_err(|e| e.to_string())?;
    let program: seccompiler::BpfProgram = filter.try_into().map_err(|e: seccompiler::BackendError| e.to_string())?;
    Ok(program
        .iter()
        .flat_map(|f| {
            let mut entry = [0u8; 8];
            entry[..2].copy_from_slice(&f.code.to_ne_bytes());
            entry[2] = f.jt;
            entry[3] = f.jf;
            entry[4..].copy_from_slice(&f.k.to_ne_bytes());
            entry
        })
        .collect())
}

/// The compiled filter, made on first use.
pub fn program() -> Result<&'static [u8], SandboxError> {
    static PROGRAM: OnceLock<Result<Vec<u8>, String>> = OnceLock::new();
    match PROGRAM.get_or_init(compile) {
        Ok(program) => Ok(program),
        Err(message) => Err(SandboxError::Seccomp(message.clone())),
    }
}

/// A descriptor holding the filter for one jailed process: a sealed memfd, read from its start, close-on-exec here
/// and numbered at least 10 (above the child's stdio and [`FRAME_FD`]). The child must inherit it
/// ([`ProcessSetup::inheriting`](crate::ProcessSetup::inheriting)) and bubblewrap be told its number
/// ([`Grants::seccomp`](crate::Grants::seccomp)); bubblewrap reads it to its end and closes it, so each process needs
/// a descriptor of its own. Keep it open until the child has been spawned.
pub fn filter_fd() -> Result<OwnedFd, SandboxError> {
    let program = program()?;
    let io = |action: &'static str| move |source| SandboxError::Io { action, path: "memfd:fal-seccomp".into(), source };
    // SAFETY: a NUL-terminated name and flags; the kernel returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"fal-seccomp".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io("create")(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.write_all(program).map_err(io("write"))?;
    file.seek(SeekFrom::Start(0)).map_err(io("rewind"))?;
    // Sealed: nothing can change the program between here and bubblewrap's read.
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl on a descriptor `file` owns.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io("seal")(std::io::Error::last_os_error()));
    }
    // SAFETY: as above; the duplicate is a new descriptor, owned below, and `file` closes the original.
    let moved = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, LOWEST_FD) };
    if moved < 0 {
        return Err(io("move")(std::io::Error::last_os_error()));
    }
    // SAFETY: `moved` was just returned by fcntl and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(moved) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn the_filter_compiles_to_whole_instructions_and_its_descriptor_holds_it() {
        let program = program().expect("compiles on this architecture");
        // bubblewrap refuses data that is not whole 8-byte `struct sock_filter`s; the kernel takes at most 4096.
        assert!(
            !program.is_empty() && program.len().is_multiple_of(8) && program.len() / 8 < 4096,
            "{}",
            program.len()
        );
        let fd = filter_fd().expect("memfd");
        assert!(fd.as_raw_fd() >= LOWEST_FD);
        // SAFETY: fcntl on a descriptor we own.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC, "close-on-exec until the child clears it");
        let mut read = Vec::new();
        std::fs::File::from(fd).read_to_end(&mut read).expect("read");
        assert_eq!(read, program);
    }

    /// Installs the filter in a forked child, as bubblewrap does, and sees which ioctls fail how. On descriptor -1:
    /// a denied command fails with EPERM before the kernel looks at the descriptor, any other with EBADF.
    #[test]
    fn a_process_under_the_filter_cannot_make_subvolumes_but_may_make_other_ioctls() {
        let program = program().expect("compiles on this architecture");
        let filters: Vec<libc::sock_filter> = program
            .chunks_exact(8)
            .map(|c| libc::sock_filter {
                code: u16::from_ne_bytes([c[0], c[1]]),
                jt: c[2],
                jf: c[3],
                k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect();
        let fprog = libc::sock_fprog { len: filters.len() as u16, filter: filters.as_ptr().cast_mut() };
        let ioctl = |number: libc::c_long, cmd: u64| -> i32 {
            // SAFETY: ioctl on descriptor -1 fails before any argument is read.
            let result = unsafe { libc::syscall(number, -1, cmd, 0usize) };
            if result < 0 {
                // SAFETY: reading this thread's errno.
                unsafe { *libc::__errno_location() }
            } else {
                0
            }
        };
        // SAFETY: the child makes system calls only (no allocation) and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: prctl with a valid program that outlives the call; the parent's memory is the child's copy.
            let code = unsafe {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0
                    || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &raw const fprog) < 0
                {
                    10
                } else if DENIED_IOCTLS.iter().any(|&(_, cmd)| ioctl(libc::SYS_ioctl, u64::from(cmd)) != libc::EPERM) {
                    11
                } else if ioctl(libc::SYS_ioctl, (1 << 32) | 0x5000_940E) != libc::EPERM {
                    // The kernel reads the low 32 bits: this is BTRFS_IOC_SUBVOL_CREATE to it.
                    12
                } else if ioctl(libc::SYS_ioctl, 0x8008_6601) != libc::EBADF {
                    // FS_IOC_GETFLAGS: allowed.
                    13
                } else if cfg!(target_arch = "x86_64") && ioctl(0x4000_0000 | 514, 0x5000_940E) != libc::EPERM {
                    14
                } else {
                    0
                }
            };
            // SAFETY: leaves the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child, into a valid pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &raw mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "the child died: status {status:#x}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "10: not installed, 11: a denied ioctl, 12: high bits, 13: allowed, 14: x32"
        );
    }
}
