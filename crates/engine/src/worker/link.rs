//! A worker's way back to whoever started its call: what lets a function call other isolated functions.
//!
//! The engine knows nothing of servers or keys: a call may carry a [`WorkerLink`], and each new worker of that call
//! asks it for a [`LinkGrant`] before it starts (knowing the network namespace it will run in). The grant is
//! environment variables, files and paths to show the worker, and something to keep while the worker lives (a key
//! valid only that long, a listener in its namespace), dropped when it ends.

use std::any::Any;
use std::path::{Path, PathBuf};

/// Given to each new worker of a call, before it starts.
pub trait WorkerLink: Send + Sync + std::fmt::Debug {
    /// What a new worker gets. `netns`: the network namespace it will run in (`None`: the host's network, or a
    /// loopback-only one the jail makes). Called on a blocking thread; an error fails the worker's start.
    fn attach(&self, netns: Option<&Path>) -> Result<LinkGrant, String>;

    /// Workers whose links differ in this are never handed each other's calls (what a worker was given stays
    /// with it while it is kept warm).
    fn class(&self) -> String;
}

/// What a link gives one worker.
#[derive(Default)]
pub struct LinkGrant {
    /// Environment variables, set after the worker's own.
    pub env: Vec<(String, String)>,
    /// A file to show as the worker's `/etc/hosts` (jailed workers).
    pub hosts_file: Option<PathBuf>,
    /// Directories shown read-only at their real paths (jailed workers).
    pub read_only: Vec<PathBuf>,
    /// A directory the worker's Python looks in for modules after its environment's own.
    pub python_path: Option<PathBuf>,
    /// Kept until the worker has ended, then dropped.
    pub keep: Option<Box<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for LinkGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Variables may carry secrets (a key): their names only.
        let names: Vec<&str> = self.env.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("LinkGrant")
            .field("env", &names)
            .field("hosts_file", &self.hosts_file)
            .field("read_only", &self.read_only)
            .field("python_path", &self.python_path)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_shows_variable_names_but_never_their_values() {
        let grant = LinkGrant { env: vec![("FAL_KEY_SECRET".into(), "s3cr3t".into())], ..LinkGrant::default() };
        let shown = format!("{grant:?}");
        assert!(shown.contains("FAL_KEY_SECRET") && !shown.contains("s3cr3t"), "{shown}");
    }
}
