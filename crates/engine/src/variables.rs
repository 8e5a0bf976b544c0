//! Environment variables a caller gives a call's workers, beyond the engine's own (`PATH`, `LANG`, `VIRTUAL_ENV`,
//! `CUDA_VISIBLE_DEVICES`, which always win).
//!
//! They are never in the environment the engine execs a worker with: that is the environment of the jailer too
//! (bubblewrap and setpriv, run as root, where glibc heeds `GCONV_PATH`, `GLIBC_TUNABLES` and the like as it does in
//! no setuid program). The engine sends them on the worker's socket instead, as a [message](WorkerVariables::message)
//! before the first frame, and the agent sets them in its environment before it imports or runs anything else.
//!
//! The engine does not know what they are (the server puts a user's secrets here); it treats every value as one
//! that must not leak: [`WorkerVariables`]'s `Debug` shows names only, and what makes a warm worker reusable is a
//! [digest](WorkerVariables::digest) keyed with a random key of this process, so that neither the pool's books nor
//! anything they are printed into can be checked against a guessed value.

use std::sync::OnceLock;

use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Variables for a call's worker, in the order they are set (a later one of the same name wins).
///
/// Part of what makes a warm worker reusable: a call is only handed a warm worker started with the same variables
/// (their [`digest`](WorkerVariables::digest) is in the pool's key). Variables computed for one worker when it is
/// spawned (a key valid only while that worker lives, say) do not belong here: they are not the call's, and would
/// make every worker a pool of its own.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct WorkerVariables(Vec<(String, Zeroizing<String>)>);

impl WorkerVariables {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `name=value` (a caller validates names: the engine only refuses what an environment cannot carry, at
    /// spawn).
    pub fn push(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.push((name.into(), Zeroizing::new(value.into())));
    }

    /// Adds every variable of `other` after this one's.
    pub fn extend(&mut self, other: &WorkerVariables) {
        self.0.extend(other.0.iter().cloned());
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// `(name, value)` pairs, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(name, value)| (name.as_str(), value.as_str()))
    }

    /// Names only, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(name, _)| name.as_str())
    }

    /// Identifies this set of variables within this process: equal sets, equal digests; a changed value, another
    /// digest. Keyed (HMAC-like) with a random key drawn once per process, so a digest says nothing of a value to
    /// whoever sees it. Empty for no variables.
    pub fn digest(&self) -> String {
        if self.0.is_empty() {
            return String::new();
        }
        static KEY: OnceLock<[u8; 32]> = OnceLock::new();
        let key = KEY.get_or_init(|| {
            let mut key = [0u8; 32];
            rand::rng().fill_bytes(&mut key);
            key
        });
        let mut hash = Sha256::new();
        hash.update(key);
        for (name, value) in &self.0 {
            // Lengths first: `A=BC` and `AB=C` (or two variables run together) never hash alike.
            hash.update((name.len() as u64).to_le_bytes());
            hash.update(name.as_bytes());
            hash.update((value.len() as u64).to_le_bytes());
            hash.update(value.as_bytes());
        }
        hex::encode(&hash.finalize()[..16])
    }

    /// What an environment (and the [message](WorkerVariables::message)) cannot carry: a name with `=` or NUL, or
    /// empty; a value with NUL. Named by the variable, never its value.
    pub(crate) fn unfit(&self) -> Option<String> {
        self.0.iter().find_map(|(name, value)| {
            if name.is_empty() || name.contains(['=', '\0']) {
                Some(format!("the worker variable name {name:?} is empty or holds '=' or NUL"))
            } else if value.contains('\0') {
                Some(format!("the value of worker variable {name} holds a NUL byte"))
            } else {
                None
            }
        })
    }

    /// The variables as the agent reads them from its socket before the first frame: `NAME=VALUE` each ended by a
    /// NUL, then an empty one (names are never empty, so the first empty one ends them). Those `skip` names are left
    /// out: the engine sets them itself, and its own win. Wiped from memory when dropped, as the values are.
    pub(crate) fn message(&self, skip: impl Fn(&str) -> bool) -> Zeroizing<Vec<u8>> {
        let sent = || self.iter().filter(|(name, _)| !skip(name));
        // Sized at once: a growing Vec would free (unwiped) the smaller buffers it moved the values out of.
        let size = sent().map(|(name, value)| name.len() + value.len() + 2).sum::<usize>() + 1;
        let mut message = Zeroizing::new(Vec::with_capacity(size));
        for (name, value) in sent() {
            message.extend_from_slice(name.as_bytes());
            message.push(b'=');
            message.extend_from_slice(value.as_bytes());
            message.push(0);
        }
        message.push(0);
        message
    }
}

impl std::fmt::Debug for WorkerVariables {
    /// Names only: values may be secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.0.iter().map(|(name, _)| (name, "***"))).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(pairs: &[(&str, &str)]) -> WorkerVariables {
        let mut variables = WorkerVariables::new();
        for (name, value) in pairs {
            variables.push(*name, *value);
        }
        variables
    }

    #[test]
    fn debug_shows_names_never_values() {
        let shown = format!("{:?}", of(&[("API_TOKEN", "hunter2-very-secret")]));
        assert!(shown.contains("API_TOKEN") && shown.contains("***"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn digests_follow_names_and_values_and_do_not_run_together() {
        assert_eq!(of(&[]).digest(), "");
        let one = of(&[("A", "1")]);
        assert_eq!(one.digest(), of(&[("A", "1")]).digest());
        assert_ne!(one.digest(), of(&[("A", "2")]).digest());
        assert_ne!(of(&[("A", "BC")]).digest(), of(&[("AB", "C")]).digest());
        assert_ne!(of(&[("A", "1"), ("B", "2")]).digest(), of(&[("A", "1B=2")]).digest());
        // Keyed: not the plain hash of what it covers.
        assert!(!one.digest().is_empty() && !one.digest().contains("A"));
    }

    #[test]
    fn the_message_is_nul_ended_pairs_in_order_then_an_empty_one_without_the_skipped_names() {
        assert_eq!(*of(&[]).message(|_| false), b"\0");
        let variables = of(&[("A", "1\n="), ("PATH", "/evil"), ("EMPTY", ""), ("A", "2")]);
        assert_eq!(*variables.message(|name| name == "PATH"), b"A=1\n=\0EMPTY=\0A=2\0\0");
    }

    #[test]
    fn what_execve_cannot_carry_is_named_without_its_value() {
        assert_eq!(of(&[("OK", "fine")]).unfit(), None);
        assert!(of(&[("A=B", "x")]).unfit().is_some());
        let why = of(&[("TOKEN", "sec\0ret")]).unfit().unwrap();
        assert!(why.contains("TOKEN") && !why.contains("sec"), "{why}");
    }
}
