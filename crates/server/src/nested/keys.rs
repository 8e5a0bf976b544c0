//! Worker keys: a key per worker, valid only while that worker lives, in memory only (a restarted server has no
//! workers of its previous run, so none of their keys either).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::store::{random_hex, Caller, Scope};

/// Every worker key's id starts with this, so an id that is not in the key store is told apart from a worker's
/// key that has expired.
pub(crate) const WORKER_KEY_PREFIX: &str = "worker-";

#[derive(Debug, Default)]
pub struct WorkerKeys {
    live: Mutex<HashMap<String, Live>>,
}

#[derive(Debug)]
struct Live {
    secret_sha256: [u8; 32],
    caller: Caller,
}

/// A worker key, revoked when dropped (with the worker that holds it).
#[derive(Debug)]
pub(crate) struct WorkerKey {
    pub key_id: String,
    pub secret: String,
    keys: Arc<WorkerKeys>,
}

impl Drop for WorkerKey {
    fn drop(&mut self) {
        self.keys.live.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.key_id);
    }
}

/// Why a worker key was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Not (or no longer) a live worker's: the worker has ended.
    Ended,
    WrongSecret,
}

impl WorkerKeys {
    /// A new key for a worker of `user_id` whose calls are `depth` nested calls deep. Never an admin's: what a
    /// function calls runs as its user, with no power over keys or other users.
    pub(crate) fn mint(self: &Arc<Self>, user_id: &str, depth: u32) -> WorkerKey {
        let key_id = format!("{WORKER_KEY_PREFIX}{}", random_hex(12));
        let secret = random_hex(32);
        let caller = Caller { user_id: user_id.to_string(), key_id: key_id.clone(), scope: Scope::Api, depth };
        let live = Live { secret_sha256: Sha256::digest(secret.as_bytes()).into(), caller };
        self.live.lock().unwrap_or_else(|e| e.into_inner()).insert(key_id.clone(), live);
        WorkerKey { key_id, secret, keys: self.clone() }
    }

    pub(crate) fn verify(&self, key_id: &str, secret: &str) -> Result<Caller, Refused> {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let found = live.get(key_id).ok_or(Refused::Ended)?;
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        if !bool::from(digest.as_slice().ct_eq(&found.secret_sha256)) {
            return Err(Refused::WrongSecret);
        }
        Ok(found.caller.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_key_verifies_as_its_user_at_its_depth_until_dropped() {
        let keys = Arc::new(WorkerKeys::default());
        let key = keys.mint("alice", 2);
        assert!(key.key_id.starts_with(WORKER_KEY_PREFIX));
        let caller = keys.verify(&key.key_id, &key.secret).expect("live");
        assert_eq!((caller.user_id.as_str(), caller.depth, caller.scope), ("alice", 2, Scope::Api));
        assert_eq!(keys.verify(&key.key_id, "nope"), Err(Refused::WrongSecret));
        let (id, secret) = (key.key_id.clone(), key.secret.clone());
        drop(key);
        assert_eq!(keys.verify(&id, &secret), Err(Refused::Ended));
    }
}
