//! The jail: a worker's view of the system, built with bubblewrap.
//!
//! Granted, read-only: the system's programs and libraries (`/usr`, and `/bin`, `/lib`, `/lib64`, `/sbin` as the
//! usual links into it), `/etc`, and the paths the caller names, each at its real path: the engine names the
//! interpreter's installation, the worker's own environment and, for dill workers, the dill layer's packages.
//! Granted, writable: a private, empty `/tmp` (also `HOME`; mode 1777), which vanishes with the worker. Granted: a
//! fresh `/proc` of its own PID namespace, a minimal `/dev`, and the host's network.
//!
//! Denied: every other path (the server's data dir, other environments, users' homes), the host's processes (a PID
//! namespace of its own: nothing outside can be seen or signalled), IPC and hostname namespaces of the host, every
//! capability, and the server's identity: bubblewrap sets up the view as root, then `setpriv` switches to an
//! unprivileged user (`nobody` by default), clears the capability bounding set and inheritable capabilities, and
//! sets no-new-privileges before the interpreter starts.

use std::path::{Path, PathBuf};

/// How to jail a worker: bubblewrap, the user to run as, and what is granted beyond the fixed set above.
#[derive(Debug, Clone)]
pub struct Jail {
    pub bwrap: PathBuf,
    pub setpriv: PathBuf,
    pub uid: u32,
    pub gid: u32,
}

impl Jail {
    /// bubblewrap and setpriv from `PATH`, running workers as `nobody` (65534).
    pub fn from_path() -> Option<Self> {
        Some(Self { bwrap: which("bwrap")?, setpriv: which("setpriv")?, uid: 65534, gid: 65534 })
    }

    /// The program and arguments that run `program args...` inside the jail, with `read_only` (the interpreter's
    /// installation and the environment) visible at their real paths.
    pub fn wrap(&self, read_only: &[&Path], program: &Path, args: &[&str]) -> (PathBuf, Vec<String>) {
        let mut argv: Vec<String> = [
            "--die-with-parent",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--ro-bind",
            "/usr",
            "/usr",
            "--ro-bind",
            "/etc",
            "/etc",
            // Writable by the unprivileged user as on any host (tempfile, which dill imports, needs it).
            "--perms",
            "01777",
            "--tmpfs",
            "/tmp",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--chdir",
            "/tmp",
            "--setenv",
            "HOME",
            "/tmp",
        ]
        .map(String::from)
        .to_vec();
        for link in ["bin", "lib", "lib64", "sbin"] {
            let path = Path::new("/").join(link);
            if let Ok(target) = std::fs::read_link(&path) {
                argv.extend(["--symlink".into(), target.display().to_string(), path.display().to_string()]);
            } else if path.is_dir() {
                argv.extend(["--ro-bind".into(), path.display().to_string(), path.display().to_string()]);
            }
        }
        // Bound paths show their whole subtree; created directories (and the /tmp tmpfs) are empty but for what is
        // bound below them.
        let mut bound: Vec<PathBuf> = ["/usr", "/etc"].map(PathBuf::from).to_vec();
        let mut created: Vec<PathBuf> = Vec::new();
        for path in read_only {
            // bubblewrap would create missing parents as root-only directories; the unprivileged worker must be able
            // to walk through them, and see nothing else there.
            for ancestor in path.ancestors().skip(1).collect::<Vec<_>>().into_iter().rev().skip(1) {
                if created.iter().any(|c| c == ancestor) || bound.iter().any(|b| ancestor.starts_with(b)) {
                    continue;
                }
                argv.extend(["--perms".into(), "0755".into(), "--dir".into(), ancestor.display().to_string()]);
                created.push(ancestor.to_path_buf());
            }
            argv.extend(["--ro-bind".into(), path.display().to_string(), path.display().to_string()]);
            bound.push(path.to_path_buf());
        }
        argv.extend([
            "--".into(),
            self.setpriv.display().to_string(),
            format!("--reuid={}", self.uid),
            format!("--regid={}", self.gid),
            "--clear-groups".into(),
            "--inh-caps=-all".into(),
            "--bounding-set=-all".into(),
            "--no-new-privs".into(),
            program.display().to_string(),
        ]);
        argv.extend(args.iter().map(|a| a.to_string()));
        (self.bwrap.clone(), argv)
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|dir| Path::new(dir).join(name)).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_parents_walkable_and_each_path_read_only_once() {
        let jail = Jail { bwrap: "bwrap".into(), setpriv: "setpriv".into(), uid: 65534, gid: 65534 };
        let python = Path::new("/opt/py/3.11");
        let env = Path::new("/var/lib/fal/envs/u1/abc");
        let (_, argv) = jail.wrap(&[python, env], Path::new("/var/lib/fal/envs/u1/abc/bin/python"), &["-I"]);
        let text = argv.join(" ");
        assert!(text.contains("--perms 0755 --dir /opt --perms 0755 --dir /opt/py --ro-bind /opt/py/3.11 /opt/py/3.11"));
        assert!(text.contains("--dir /var/lib/fal/envs/u1 --ro-bind /var/lib/fal/envs/u1/abc /var/lib/fal/envs/u1/abc"));
        assert_eq!(text.matches("--dir /var ").count(), 1);
        assert!(text.ends_with(
            "--reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --bounding-set=-all \
                                --no-new-privs /var/lib/fal/envs/u1/abc/bin/python -I"
        ));
        // The private /tmp is writable by the unprivileged user.
        assert!(text.contains("--perms 01777 --tmpfs /tmp"));
        // Nothing of the data dir beyond the environment itself is bound.
        assert!(!text.contains("--bind /var/lib/fal "));
        // Below the private /tmp, parents are created walkable too (a data dir may live there).
        let (_, argv) = jail.wrap(&[Path::new("/tmp/data/envs/u1/abc")], Path::new("/x"), &[]);
        assert!(argv.join(" ").contains("--dir /tmp/data --perms 0755 --dir /tmp/data/envs"));
    }
}
