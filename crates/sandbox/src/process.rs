//! Process attributes applied in the child between `fork` and `exec`.

use std::os::fd::{AsRawFd, RawFd};

use crate::WorkerCgroup;

/// The descriptor number the worker finds its frame socket on.
pub const FRAME_FD: RawFd = 3;

/// Everything the child does to itself before `exec`. Built in the parent; [`ProcessSetup::apply`] runs in the
/// child and only makes system calls (no allocation), as code between `fork` and `exec` must.
#[derive(Debug)]
pub struct ProcessSetup {
    parent: libc::pid_t,
    frame_fd: Option<RawFd>,
    cgroup_procs: Vec<RawFd>,
    netns: Option<RawFd>,
    inherited: Option<RawFd>,
}

impl ProcessSetup {
    /// `frame_fd` is the child's end of the frame socket (none for a process that speaks no frames, a build);
    /// `cgroup` the cgroup to join, if limits apply. Both must stay open until the child has been spawned.
    pub fn new(frame_fd: Option<RawFd>, cgroup: Option<&WorkerCgroup>) -> Self {
        Self {
            // SAFETY: getpid cannot fail.
            parent: unsafe { libc::getpid() },
            frame_fd,
            cgroup_procs: cgroup.map(|c| c.procs_files().map(|f| f.as_raw_fd()).collect()).unwrap_or_default(),
            netns: None,
            inherited: None,
        }
    }

    /// Also enter the network namespace open on `netns` (it must stay open until the child has been spawned).
    pub fn in_network(mut self, netns: Option<RawFd>) -> Self {
        self.netns = netns;
        self
    }

    /// Also let the program inherit `fd`, at its own number (a jail's seccomp filter, [`crate::seccomp_filter_fd`]).
    /// It must stay open until the child has been spawned, and be above [`FRAME_FD`], which the frame socket is
    /// moved to.
    pub fn inheriting(mut self, fd: Option<RawFd>) -> Self {
        self.inherited = fd;
        self
    }

    /// Runs in the child after `fork`. Async-signal-safe: system calls and stack buffers only.
    pub fn apply(&self) -> std::io::Result<()> {
        // SAFETY: plain system calls on descriptors this struct was built with; no memory is allocated or freed.
        unsafe {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl; then no signal would ever come.
            if libc::getppid() != self.parent {
                libc::_exit(1);
            }
            let mut digits = [0u8; 20];
            let pid = format_decimal(libc::getpid() as u64, &mut digits);
            for &fd in &self.cgroup_procs {
                if libc::write(fd, pid.as_ptr().cast(), pid.len()) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(netns) = self.netns {
                if libc::setns(netns, libc::CLONE_NEWNET) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(fd) = self.inherited {
                // The frame socket's dup2 below would close a descriptor at its number.
                if fd <= FRAME_FD {
                    return Err(std::io::Error::from_raw_os_error(libc::EBADF));
                }
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            match self.frame_fd {
                None => {}
                Some(FRAME_FD) => {
                    let flags = libc::fcntl(FRAME_FD, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(FRAME_FD, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Some(fd) if libc::dup2(fd, FRAME_FD) < 0 => return Err(std::io::Error::last_os_error()),
                Some(_) => {}
            }
        }
        Ok(())
    }
}

fn format_decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_formatting_without_allocation() {
        let mut buf = [0u8; 20];
        assert_eq!(format_decimal(0, &mut buf), b"0");
        assert_eq!(format_decimal(4_194_304, &mut buf), b"4194304");
        assert_eq!(format_decimal(u64::MAX, &mut buf), b"18446744073709551615");
    }
}
