//! Users' secrets: named values each user sets (`SetSecret`, `ListSecrets`), encrypted at rest (`store.rs`), and
//! given to every worker of that user as environment variables ([`Secrets::variables`], which every call the server
//! builds asks: see `service::for_user`).
//!
//! A value is never logged, never in an error message and never in `workers` output: it lives in a
//! [`SecretValue`] (whose `Debug` prints `***`) from the request to the worker's environment, where the engine keeps
//! it in a `WorkerVariables` (names only in `Debug`). A change reaches new workers at once, and the user's warm
//! workers are replaced: idle ones stopped now, busy ones when their calls end (`Engine::replace_workers`), an app's
//! replicas as soon as they are idle (`Apps::replace_replicas`); the pool's key holds a digest of the variables, so a
//! warm worker with the old values is never handed a call in between.

pub mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fal_engine::WorkerVariables;
use fal_proto::controller::{ListSecretsRequest, ListSecretsResponse, Secret, SetSecretRequest};
use tonic::Status;
use zeroize::Zeroizing;

pub use self::store::SecretStore;
use crate::store::{Caller, Scope};

/// The longest name a secret may have.
pub const MAX_NAME: usize = 128;

/// `[secrets]` in the server's config.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretsConfig {
    /// The key file; `None`: `<data dir>/secrets.key`.
    pub key_file: Option<std::path::PathBuf>,
    /// Secrets one user may hold.
    pub max_per_user: u32,
    /// The largest value, in bytes.
    pub max_value_bytes: usize,
}

impl Default for SecretsConfig {
    /// 50 secrets of at most 16 KiB each: together well within what `execve` takes (about 2 MiB of arguments and
    /// environment, the agent's own source included).
    fn default() -> Self {
        Self { key_file: None, max_per_user: 50, max_value_bytes: 16 << 10 }
    }
}

/// A secret's value: printed as `***`, wiped from memory when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<String>);

impl SecretValue {
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    /// The value itself, for the worker's environment and the cipher only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// What went wrong with a secret. No variant holds a value.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("{0}")]
    InvalidName(String),
    #[error(
        "the value of secret {name} is {size} bytes; this server takes at most {limit} bytes ([secrets] max_value_kb)"
    )]
    ValueTooLarge { name: String, size: usize, limit: usize },
    #[error(
        "the value of secret {name} holds a NUL byte, which no environment variable can carry; encode it (base64, \
         say) and decode it in your function"
    )]
    NulInValue { name: String },
    #[error("user {user:?} has no secret {name:?}; `fal-serverless secrets list` lists yours")]
    NotFound { user: String, name: String },
    #[error(
        "user {user:?} already has {cap} secrets, the most this server allows per user; delete one no longer used \
         (`fal-serverless secrets delete NAME`), or ask the server's admin to raise [secrets] max_per_user"
    )]
    TooMany { user: String, cap: u32 },
    #[error("invalid user name {0:?}: use letters, digits, '-' and '_' (at most 64)")]
    InvalidUser(String),
    #[error("only an admin key can read or change another user's secrets")]
    NotYours,
    #[error(
        "secret {name:?} of user {user:?} cannot be decrypted: the database was altered, or it was stored with \
         another key file. Set it again (`fal-serverless secrets set {name} ...`)"
    )]
    Undecryptable { user: String, name: String },
    #[error("the secrets' key file {path} cannot be used: {reason}")]
    KeyFile { path: std::path::PathBuf, reason: String },
    #[error(
        "the secrets' key file {path} is missing, and the database holds {count} secrets encrypted with it. Restore \
         it from your backup (or point [secrets] key_file at it); without it they cannot be read. To drop them all \
         instead, delete the rows of the `secrets` table"
    )]
    KeyMissing { path: std::path::PathBuf, count: i64 },
    #[error(
        "the secrets' key file {path} is not the key the database's {count} secrets were stored with. Restore the \
         right one (or point [secrets] key_file at it); with another, they cannot be read"
    )]
    WrongKey { path: std::path::PathBuf, count: i64 },
    #[error("a secret could not be encrypted")]
    Encrypt,
    #[error("the secrets store failed: {0}")]
    Database(#[from] rusqlite::Error),
    #[error(transparent)]
    Task(#[from] crate::db::TaskFailed),
}

impl SecretsError {
    pub fn status(&self) -> Status {
        let message = self.to_string();
        match self {
            SecretsError::InvalidName(_)
            | SecretsError::ValueTooLarge { .. }
            | SecretsError::NulInValue { .. }
            | SecretsError::InvalidUser(_) => Status::invalid_argument(message),
            SecretsError::NotFound { .. } => Status::not_found(message),
            SecretsError::TooMany { .. } => Status::resource_exhausted(message),
            SecretsError::NotYours => Status::permission_denied(message),
            SecretsError::Undecryptable { .. } => Status::failed_precondition(message),
            _ => Status::internal(message),
        }
    }
}

/// Why a secret may not be named as one of glibc's unsecure variables.
const GLIBC_UNSECURE: &str = "the C library reads it in every program (files to load, how to run), and drops it \
                              for privileged ones as unsafe";

/// Why `name` cannot be a secret's name, if it cannot: it must be an environment variable's name, and not one the
/// platform sets in workers itself (where the secret would be ignored, or would change how the worker runs).
pub fn invalid_name(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("a secret needs a name".into());
    }
    if name.len() > MAX_NAME {
        return Some(format!("a secret's name is at most {MAX_NAME} characters; this one has {}", name.len()));
    }
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Some(format!(
            "{name:?} is not an environment variable name: use letters, digits and '_', not starting with a digit \
             (API_TOKEN, say)"
        ));
    }
    let upper = name.to_ascii_uppercase();
    let why = match upper.as_str() {
        "PATH" | "HOME" | "LANG" | "LANGUAGE" | "USER" | "LOGNAME" | "SHELL" | "PWD" | "OLDPWD" | "TERM" | "TMPDIR"
        | "HOSTNAME" | "IFS" | "BASH_ENV" | "ENV" => "the worker's system environment uses it",
        "VIRTUAL_ENV" | "CUDA_VISIBLE_DEVICES" | "CUDA_DEVICE_ORDER" => {
            "the platform sets it in every worker (its environment, its GPUs)"
        }
        "IS_ISOLATE_AGENT" => "the platform sets it in every worker (functions read it to know they run on one)",
        // glibc's "unsecure" variables (unsecvars.h), which it drops for setuid programs: they name files it loads
        // (character set converters, locales, message catalogs, time zones, resolver settings) or change how it
        // runs, in every program that starts with them.
        "GCONV_PATH" | "GETCONF_DIR" | "GLIBC_TUNABLES" | "HOSTALIASES" | "LOCALDOMAIN" | "LOCPATH" | "NIS_PATH"
        | "NLSPATH" | "RESOLV_HOST_CONF" | "RES_OPTIONS" | "TZDIR" => GLIBC_UNSECURE,
        _ if upper.starts_with("MALLOC_") => GLIBC_UNSECURE,
        _ if upper.starts_with("PYTHON") => "Python reads PYTHON* variables at start-up, and they change how it runs",
        _ if upper.starts_with("LD_") => "the dynamic loader reads LD_* variables (libraries to preload, say)",
        _ if upper.starts_with("LC_") => "the worker's system environment uses the LC_* variables",
        _ if upper.starts_with("FAL_") || upper.starts_with("ISOLATE_") => {
            "the platform sets FAL_* and ISOLATE_* variables in workers (the host and key of nested calls)"
        }
        _ if upper.starts_with("SLURM_") => "Slurm sets SLURM_* variables in the jobs workers run in",
        _ => return None,
    };
    Some(format!("{name} cannot be a secret's name: {why}. Choose another name"))
}

/// Why `value` cannot be secret `name`'s value, if it cannot.
fn check_value(name: &str, value: &str, limit: usize) -> Result<(), SecretsError> {
    if value.len() > limit {
        return Err(SecretsError::ValueTooLarge { name: name.to_string(), size: value.len(), limit });
    }
    if value.contains('\0') {
        return Err(SecretsError::NulInValue { name: name.to_string() });
    }
    Ok(())
}

/// The secrets of every user, and what their workers get of them.
#[derive(Debug)]
pub struct Secrets {
    store: Arc<SecretStore>,
    config: SecretsConfig,
    /// Each user's variables as last read, so that a warm call reads no SQLite and decrypts nothing.
    cache: Mutex<Cache>,
}

#[derive(Debug, Default)]
struct Cache {
    variables: HashMap<String, WorkerVariables>,
    /// Counts changes: a read that began before one is not cached (it may hold what the change replaced).
    version: u64,
}

impl Secrets {
    pub fn new(store: SecretStore, config: SecretsConfig) -> Arc<Self> {
        Arc::new(Self { store: Arc::new(store), config, cache: Mutex::default() })
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `user`'s secrets as worker variables (by name), for every call of theirs.
    pub async fn variables(&self, user: &str) -> Result<WorkerVariables, SecretsError> {
        let version = {
            let cache = self.cache();
            if let Some(variables) = cache.variables.get(user) {
                return Ok(variables.clone());
            }
            cache.version
        };
        let owner = user.to_string();
        let values = self.store.blocking(move |store| store.values(&owner)).await?;
        let mut variables = WorkerVariables::new();
        for (name, value) in &values {
            variables.push(name.as_str(), value.expose());
        }
        let mut cache = self.cache();
        if cache.version == version {
            cache.variables.insert(user.to_string(), variables.clone());
        }
        Ok(variables)
    }

    /// Forgets what was read of `user`'s secrets: after a change.
    fn changed(&self, user: &str) {
        let mut cache = self.cache();
        cache.version += 1;
        cache.variables.remove(user);
    }

    /// Whose secrets `caller` asks for with `user_id`: their own, or (admin keys only) another user's.
    fn whose(caller: &Caller, user_id: Option<String>) -> Result<String, SecretsError> {
        match user_id.filter(|u| !u.is_empty()) {
            None => Ok(caller.user_id.clone()),
            Some(user) if user == caller.user_id => Ok(user),
            Some(_) if caller.scope != Scope::Admin => Err(SecretsError::NotYours),
            Some(user) => {
                let plain = !user.is_empty()
                    && user.len() <= 64
                    && user.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                if plain {
                    Ok(user)
                } else {
                    Err(SecretsError::InvalidUser(user))
                }
            }
        }
    }

    /// `SetSecret`: sets, or with no value deletes, a secret; returns whose it was, for the caller to replace that
    /// user's workers.
    pub async fn set(&self, caller: &Caller, request: SetSecretRequest) -> Result<String, SecretsError> {
        let SetSecretRequest { name, value, user_id } = request;
        let value = value.map(SecretValue::new);
        let user = Self::whose(caller, user_id)?;
        if let Some(why) = invalid_name(&name) {
            // A delete of a name that could never be set is just not there.
            return Err(match value {
                None => SecretsError::NotFound { user, name },
                Some(_) => SecretsError::InvalidName(why),
            });
        }
        if let Some(value) = &value {
            check_value(&name, value.expose(), self.config.max_value_bytes)?;
        }
        let (owner, secret, cap) = (user.clone(), name.clone(), self.config.max_per_user);
        let deleting = value.is_none();
        self.store
            .blocking(move |store| match value {
                Some(value) => store.set(&owner, &secret, &value, cap),
                None => store.delete(&owner, &secret),
            })
            .await?;
        self.changed(&user);
        let what = if deleting { "secret deleted" } else { "secret set" };
        tracing::info!(by = %caller.user_id, user = %user, name = %name, "{what}");
        Ok(user)
    }

    /// `ListSecrets`: names and times, never values.
    pub async fn list(
        &self,
        caller: &Caller,
        request: ListSecretsRequest,
    ) -> Result<ListSecretsResponse, SecretsError> {
        let user = match request.user_id.filter(|u| !u.is_empty()) {
            // An admin's plain list is every user's, as with keys.
            None if caller.scope == Scope::Admin => None,
            asked => Some(Self::whose(caller, asked)?),
        };
        let listed = self.store.blocking(move |store| store.list(user.as_deref())).await?;
        let secrets = listed
            .into_iter()
            .map(|secret| Secret {
                name: secret.name,
                created_time: Some(prost_types::Timestamp { seconds: secret.created_at, nanos: 0 }),
                user_id: secret.user_id,
            })
            .collect();
        Ok(ListSecretsResponse { secrets })
    }

    /// The key file the store uses, for the server's start-up log.
    pub fn key_file(&self) -> &std::path::Path {
        self.store.key_file()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_environment_variable_names_the_platform_does_not_set() {
        for ok in ["API_TOKEN", "_private", "a1", "OPENAI_API_KEY", "Path_To_Model", "HF_TOKEN"] {
            assert_eq!(invalid_name(ok), None, "{ok}");
        }
        for (bad, says) in [
            ("", "needs a name"),
            ("1ABC", "not an environment variable name"),
            ("A-B", "not an environment variable name"),
            ("A=B", "not an environment variable name"),
            ("ÄPI", "not an environment variable name"),
            ("PATH", "system environment"),
            ("path", "system environment"),
            ("HOME", "system environment"),
            ("PYTHONPATH", "PYTHON*"),
            ("PYTHONSTARTUP", "PYTHON*"),
            ("LD_PRELOAD", "dynamic loader"),
            ("FAL_KEY_SECRET", "nested calls"),
            ("IS_ISOLATE_AGENT", "run on one"),
            ("CUDA_VISIBLE_DEVICES", "GPUs"),
            ("SLURM_JOB_ID", "Slurm"),
            ("GCONV_PATH", "C library"),
            ("GETCONF_DIR", "C library"),
            ("GLIBC_TUNABLES", "C library"),
            ("HOSTALIASES", "C library"),
            ("LOCALDOMAIN", "C library"),
            ("LOCPATH", "C library"),
            ("MALLOC_TRACE", "C library"),
            ("malloc_arena_max", "C library"),
            ("NIS_PATH", "C library"),
            ("NLSPATH", "C library"),
            ("RESOLV_HOST_CONF", "C library"),
            ("RES_OPTIONS", "C library"),
            ("TZDIR", "C library"),
            ("TMPDIR", "system environment"),
        ] {
            let why = invalid_name(bad).unwrap_or_else(|| panic!("{bad:?} was taken"));
            assert!(why.contains(says), "{bad:?}: {why}");
        }
        assert!(invalid_name(&"A".repeat(MAX_NAME)).is_none());
        assert!(invalid_name(&"A".repeat(MAX_NAME + 1)).unwrap().contains("at most 128"));
    }

    #[test]
    fn values_are_never_printed() {
        let value = SecretValue::new("hunter2".into());
        assert_eq!(format!("{value:?}"), "***");
        let error = check_value("TOKEN", "hunter2\0", 100).unwrap_err().to_string();
        assert!(error.contains("TOKEN") && !error.contains("hunter2"), "{error}");
        let error = check_value("TOKEN", "hunter2", 3).unwrap_err().to_string();
        assert!(error.contains("7 bytes") && !error.contains("hunter2"), "{error}");
    }

    fn caller(user: &str, scope: Scope) -> Caller {
        Caller { user_id: user.into(), key_id: "k".into(), scope, depth: 0 }
    }

    #[tokio::test]
    async fn users_see_and_change_only_their_own_and_admins_any() {
        let dir = tempfile::tempdir().unwrap();
        let store = SecretStore::open(&dir.path().join("s.sqlite3"), &dir.path().join("secrets.key")).unwrap();
        let secrets = Secrets::new(store, SecretsConfig::default());
        let (alice, bob, admin) =
            (caller("alice", Scope::Api), caller("bob", Scope::Api), caller("admin", Scope::Admin));
        let set = |name: &str, value: Option<&str>, user: Option<&str>| SetSecretRequest {
            name: name.into(),
            value: value.map(str::to_string),
            user_id: user.map(str::to_string),
        };
        secrets.set(&alice, set("TOKEN", Some("a"), None)).await.unwrap();
        assert_eq!(secrets.variables("alice").await.unwrap().iter().collect::<Vec<_>>(), [("TOKEN", "a")]);
        assert!(secrets.variables("bob").await.unwrap().is_empty());
        let denied = secrets.set(&bob, set("TOKEN", Some("b"), Some("alice"))).await.unwrap_err();
        assert!(matches!(denied, SecretsError::NotYours));
        let denied = secrets.list(&bob, ListSecretsRequest { user_id: Some("alice".into()) }).await.unwrap_err();
        assert!(matches!(denied, SecretsError::NotYours));
        assert!(secrets.list(&bob, ListSecretsRequest::default()).await.unwrap().secrets.is_empty());
        // An admin sets another's; the cached variables follow the change.
        secrets.set(&admin, set("TOKEN", Some("a2"), Some("alice"))).await.unwrap();
        assert_eq!(secrets.variables("alice").await.unwrap().iter().collect::<Vec<_>>(), [("TOKEN", "a2")]);
        let all = secrets.list(&admin, ListSecretsRequest::default()).await.unwrap().secrets;
        assert_eq!(all.iter().map(|s| s.user_id.as_str()).collect::<Vec<_>>(), ["alice"]);
        // Deleting: gone, and a second time an error naming it.
        secrets.set(&alice, set("TOKEN", None, None)).await.unwrap();
        assert!(secrets.variables("alice").await.unwrap().is_empty());
        let missing = secrets.set(&alice, set("TOKEN", None, None)).await.unwrap_err();
        assert!(missing.to_string().contains("no secret \"TOKEN\""), "{missing}");
        assert_eq!(missing.status().code(), tonic::Code::NotFound);
        let bad = secrets.set(&alice, set("LD_PRELOAD", Some("x"), None)).await.unwrap_err();
        assert_eq!(bad.status().code(), tonic::Code::InvalidArgument);
    }
}
