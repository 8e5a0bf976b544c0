//! Applications: functions deployed as web endpoints.
//!
//! `RegisterApplication` stores a revision (`store.rs`); the gateway finds it by alias or revision id and takes one
//! of its replicas for each request (`replicas.rs`), started on demand as warm workers of the app's machine type
//! whose call serves HTTP on port 8080 of the worker's own network namespace, holding the same capacity as plain
//! calls. What replicas print is kept per app and per request (`logs.rs`).

pub mod logs;
pub mod replicas;
pub mod rpc;
pub mod store;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fal_engine::{options, CallError, CallReply, Engine, LogSink, LogSource};
use fal_proto::controller::{HostedRun, RegisterApplicationRequest};
use prost::Message;

use self::logs::AppLogs;
use self::replicas::{Launch, ReplicaSet, Scaling};
pub use self::store::{AppStore, AppStoreError, AuthMode, Revision};
use crate::capacity::Capacity;
use crate::nested::Nested;
use crate::secrets::Secrets;
use crate::service::{call_request, for_user, CapacityRoom};
use crate::store::{Caller, Scope, Store, StoreError};

/// The port a replica serves on, in its own network namespace (the original's `exposed_port`, which it fixes too).
pub const APP_PORT: u16 = 8080;
/// An alias: what fits in a URL path segment and a log line.
const MAX_ALIAS: usize = 64;
const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(10);

/// `[apps]` in the server's config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AppsConfig {
    /// How long a request waits for a replica when it names no timeout (`X-Fal-Request-Timeout`): an app's first
    /// request builds its environment.
    pub request_timeout: Duration,
    /// Replicas an app runs at most when it names no `max_concurrency`.
    pub default_max_concurrency: u32,
    /// The most replicas any app may ask for.
    pub max_concurrency: u32,
    /// How long a replica may take to answer on its port from its start (its environment's build included).
    pub start_timeout: Duration,
    /// How long the queue keeps a finished request's result.
    pub result_retention: Duration,
    /// Attempts at delivering a webhook, with backoff between them.
    pub webhook_attempts: u32,
}

impl Default for AppsConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(300),
            default_max_concurrency: 2,
            max_concurrency: 64,
            start_timeout: Duration::from_secs(900),
            result_retention: Duration::from_secs(24 * 3600),
            webhook_attempts: 5,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "user {user:?} has no app {name:?} (no such alias or revision id); `fal-serverless apps list` lists yours"
    )]
    NotFound { user: String, name: String },
    /// Why this server cannot run apps.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] AppStoreError),
    #[error(transparent)]
    Keys(#[from] StoreError),
}

/// Everything the server knows of apps: their records, replicas and logs.
#[derive(Debug)]
pub struct Apps {
    pub store: Arc<AppStore>,
    keys: Arc<Store>,
    secrets: Arc<Secrets>,
    engine: Engine,
    capacity: Arc<Capacity>,
    uids: (u32, u32),
    storage: Arc<crate::storage::Storage>,
    max_keep_alive: Duration,
    pub config: AppsConfig,
    /// Why this server cannot run apps, if it cannot (its workers are not jailed, or run on a cluster).
    unavailable: Option<String>,
    nested: Arc<Nested>,
    /// Replica sets by revision id, made on the first request.
    running: Mutex<HashMap<String, Arc<ReplicaSet>>>,
    /// Logs by revision id, made on first use (a follower's, before any replica runs): kept apart from the sets, so
    /// that reading an app's logs starts nothing.
    logs: Mutex<HashMap<String, Arc<AppLogs>>>,
    /// What (user, alias or revision id) stood for when last asked: a warm request reads no SQLite. Emptied for a
    /// user whenever their aliases change.
    resolved: Mutex<HashMap<(String, String), Revision>>,
    /// The owner of each revision in `running`.
    owners: Mutex<HashMap<String, String>>,
}

/// Entries `Apps::resolved` holds before it starts again.
const RESOLVED_CACHE: usize = 10_000;

/// An alias with its revision and how many replicas it runs now.
#[derive(Debug, Clone)]
pub struct AliasState {
    pub revision: Revision,
    pub replicas: replicas::ReplicaCounts,
}

/// What [`Apps`] is made of.
pub struct AppsParts {
    pub store: Arc<AppStore>,
    pub keys: Arc<Store>,
    pub secrets: Arc<Secrets>,
    pub engine: Engine,
    pub capacity: Arc<Capacity>,
    pub uids: (u32, u32),
    /// Users' persistent storage: a replica sees its owner's at /data.
    pub storage: Arc<crate::storage::Storage>,
    pub max_keep_alive: Duration,
    pub config: AppsConfig,
    pub unavailable: Option<String>,
    /// How replicas' workers reach the server, for the calls they make.
    pub nested: Arc<Nested>,
}

impl Apps {
    pub fn new(parts: AppsParts) -> Arc<Self> {
        Arc::new(Self {
            store: parts.store,
            keys: parts.keys,
            secrets: parts.secrets,
            engine: parts.engine,
            capacity: parts.capacity,
            uids: parts.uids,
            storage: parts.storage,
            max_keep_alive: parts.max_keep_alive,
            config: parts.config,
            unavailable: parts.unavailable,
            nested: parts.nested,
            running: Mutex::default(),
            logs: Mutex::default(),
            resolved: Mutex::default(),
            owners: Mutex::default(),
        })
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ReplicaSet>>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks and stores a new revision for `caller`; its alias (if any) moves to it. Says what it did in `logs`.
    pub async fn register(
        &self,
        caller: &Caller,
        mut request: RegisterApplicationRequest,
        logs: &LogSink,
    ) -> Result<Revision, AppError> {
        let alias = request.application_name.take().filter(|a| !a.is_empty());
        if let Some(alias) = &alias {
            validate_alias(alias)?;
        }
        let auth = match request.auth_mode {
            None => AuthMode::Private,
            Some(mode) => AuthMode::from_wire(mode).ok_or_else(|| {
                AppError::Invalid(format!("auth_mode {mode} is not one of PRIVATE (0), PUBLIC (1), SHARED (2)"))
            })?,
        };
        let machine = request.machine_requirements.clone().unwrap_or_default();
        // An anonymous registration of a function that does not serve is a plain function, for a schedule (the
        // 0.6.41 client's `function schedule` registers so, then calls RegisterCron with the revision id).
        let serves = machine.exposed_port.is_some() || alias.is_some();
        // A plain function runs as plain calls do, on any server; a web endpoint needs its replicas' namespaces.
        if let (true, Some(reason)) = (serves, &self.unavailable) {
            return Err(AppError::Unavailable(reason.clone()));
        }
        match machine.exposed_port {
            None if !serves => {}
            Some(port) if port == i32::from(APP_PORT) => {}
            Some(port) => {
                return Err(AppError::Invalid(format!(
                "exposed_port {port}: an app serves on port {APP_PORT} (serve=True does); use exposed_port={APP_PORT}"
            )))
            }
            None => {
                return Err(AppError::Invalid(format!(
                    "the function does not serve: deploy it with @isolated(serve=True), or start a web server on port \
                     {APP_PORT} in it and set exposed_port={APP_PORT}"
                )))
            }
        }
        let cap = self.config.max_concurrency;
        let max_concurrency = match request.max_concurrency {
            None => self.config.default_max_concurrency.min(cap),
            Some(n) if n >= 1 && n as u32 <= cap => n as u32,
            Some(n) => {
                return Err(AppError::Invalid(format!(
                    "max_concurrency {n} is out of range: from 1 to {cap} on this server ([apps] max_concurrency)"
                )))
            }
        };
        let min_concurrency = match request.min_concurrency {
            None => 0,
            Some(n) if n >= 0 && n as u32 <= max_concurrency => n as u32,
            Some(n) => {
                return Err(AppError::Invalid(format!(
                    "min_concurrency {n} is out of range: from 0 to max_concurrency ({max_concurrency})"
                )))
            }
        };
        let max_multiplexing = match request.max_multiplexing {
            None => 1,
            Some(n) if (1..=1000).contains(&n) => n as u32,
            Some(n) => return Err(AppError::Invalid(format!("max_multiplexing {n} is out of range: from 1 to 1000"))),
        };
        let mut keep_alive = match machine.keep_alive {
            None => DEFAULT_KEEP_ALIVE,
            Some(seconds) => options::whole_keep_alive(seconds).map_err(|e| AppError::Invalid(e.to_string()))?,
        };
        if keep_alive > self.max_keep_alive {
            logs.send(
                LogSource::Engine,
                format!(
                    "keep_alive {} s is more than this server keeps a replica up; idle replicas stop after {} s \
                     ([limits] max_keep_alive_seconds)",
                    keep_alive.as_secs(),
                    self.max_keep_alive.as_secs()
                ),
            );
            keep_alive = self.max_keep_alive;
        }
        // The serving call is checked now as a plain call would be (environment, serializer, machine type), so a
        // bad one fails the registration, not the first request.
        let call = call_request(caller, &mut hosted_run(request.clone()))
            .map_err(|status| AppError::Invalid(status.message().to_string()))?;
        let machine_type =
            self.engine.machine_types().get(&call.machine_type).map_err(|e| AppError::Invalid(e.to_string()))?.clone();
        if let Some(reason) = self.capacity.never_fits(&machine_type) {
            return Err(AppError::Invalid(reason));
        }
        let function_name = request.function_name.clone().unwrap_or_else(|| "<unnamed>".into());
        let mut revision = Revision {
            id: uuid::Uuid::new_v4().to_string(),
            user_id: caller.user_id.clone(),
            alias,
            auth,
            min_concurrency: if serves { min_concurrency } else { 0 },
            max_concurrency,
            max_multiplexing,
            machine_type: machine_type.name.clone(),
            keep_alive,
            function_name,
            definition: request.encode_to_vec().into(),
            created_at: 0,
            serves,
        };
        // The revision the alias leaves, if any: it keeps answering by id, but no longer keeps replicas up.
        let previous = match &revision.alias {
            Some(alias) => {
                let (user, alias) = (revision.user_id.clone(), alias.clone());
                self.store.blocking(move |store| store.resolve(&user, &alias)).await?.map(|r| r.id)
            }
            None => None,
        };
        let stored = {
            let mut revision = revision.clone();
            self.store.blocking(move |store| store.insert(&mut revision).map(|()| revision)).await?
        };
        revision.created_at = stored.created_at;
        self.forget(&revision.user_id);
        if let Some(replicas) = previous.and_then(|id| self.running().get(&id).cloned()) {
            replicas.supersede();
        }
        if !serves {
            logs.send(
                LogSource::Engine,
                format!(
                    "registered function revision {} (machine type {}): it is not a web endpoint (it does not serve \
                     on port {APP_PORT}); schedules run it (RegisterCron, `fal-serverless function schedule`)",
                    revision.id, revision.machine_type
                ),
            );
            tracing::info!(user = %revision.user_id, revision = %revision.id, "function registered");
            return Ok(revision);
        }
        logs.send(
            LogSource::Engine,
            format!(
                "registered revision {} of {} ({} auth, machine type {}, up to {} replicas)",
                revision.id,
                revision.name(),
                revision.auth.name(),
                revision.machine_type,
                revision.max_concurrency
            ),
        );
        tracing::info!(user = %revision.user_id, app = %revision.name(), revision = %revision.id, "app registered");
        if revision.min_concurrency > 0 {
            self.replicas(&revision);
        }
        Ok(revision)
    }

    /// The revision `owner`'s `name` (an alias, or a revision id) stands for.
    pub async fn resolve(&self, owner: &str, name: &str) -> Result<Revision, AppError> {
        let key = (owner.to_string(), name.to_string());
        if let Some(found) = self.resolved().get(&key) {
            return Ok(found.clone());
        }
        let (user, app) = key.clone();
        let found = self
            .store
            .blocking(move |store| store.resolve(&user, &app))
            .await?
            .ok_or_else(|| AppError::NotFound { user: owner.to_string(), name: name.to_string() })?;
        let mut resolved = self.resolved();
        if resolved.len() >= RESOLVED_CACHE {
            resolved.clear();
        }
        resolved.insert(key, found.clone());
        Ok(found)
    }

    fn resolved(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Revision>> {
        self.resolved.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets what `user`'s names stood for (their aliases changed).
    fn forget(&self, user: &str) {
        self.resolved().retain(|(owner, _), _| owner != user);
    }

    /// `caller`'s aliases (everyone's for an admin), with their replicas now.
    pub async fn aliases(&self, caller: &Caller) -> Result<Vec<AliasState>, AppError> {
        let user = (caller.scope != Scope::Admin).then(|| caller.user_id.clone());
        let revisions = self.store.blocking(move |store| store.aliases(user.as_deref())).await?;
        let running = self.running();
        Ok(revisions
            .into_iter()
            .map(|revision| {
                let replicas = running.get(&revision.id).map(|r| r.counts()).unwrap_or_default();
                AliasState { revision, replicas }
            })
            .collect())
    }

    /// Deletes `caller`'s `alias` and its revisions, stopping their replicas; returns the revision it pointed to.
    pub async fn delete(&self, caller: &Caller, alias: &str) -> Result<String, AppError> {
        let (user, name) = (caller.user_id.clone(), alias.to_string());
        let deleted = self.store.blocking(move |store| store.delete_alias(&user, &name)).await?;
        let Some((current, ids)) = deleted else {
            return Err(AppError::NotFound { user: caller.user_id.clone(), name: alias.to_string() });
        };
        self.forget(&caller.user_id);
        let mut running = self.running();
        for id in ids {
            self.logs_map().remove(&id);
            if let Some(gone) = running.remove(&id) {
                // Its tasks end as their workers start stopping; nothing waits on them here.
                drop(gone.close());
            }
        }
        tracing::info!(user = %caller.user_id, app = %alias, "app deleted");
        Ok(current)
    }

    fn logs_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AppLogs>>> {
        self.logs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What `revision`'s replicas printed (and will print: followers subscribe here).
    pub fn logs(&self, revision: &Revision) -> Arc<AppLogs> {
        self.logs_map().entry(revision.id.clone()).or_default().clone()
    }

    /// After `user` changed what their workers start with (a secret): each of their apps' replicas is replaced
    /// ([`ReplicaSet::replace`]).
    pub fn replace_replicas(&self, user: &str) {
        let sets: Vec<Arc<ReplicaSet>> = {
            // In the order `replicas` takes them.
            let running = self.running();
            let owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
            running
                .iter()
                .filter(|(id, _)| owners.get(*id).is_some_and(|o| o == user))
                .map(|(_, s)| s.clone())
                .collect()
        };
        for set in sets {
            set.replace();
        }
    }

    /// The replicas of `revision`, made on first use.
    pub fn replicas(&self, revision: &Revision) -> Arc<ReplicaSet> {
        let mut running = self.running();
        if let Some(found) = running.get(&revision.id) {
            return found.clone();
        }
        let logs = self.logs(revision);
        let scaling = Scaling {
            min: revision.min_concurrency,
            max: revision.max_concurrency,
            multiplexing: revision.max_multiplexing,
            keep_alive: revision.keep_alive,
            start_timeout: self.config.start_timeout,
        };
        let replicas = ReplicaSet::new(revision.name().to_string(), scaling, self.launcher(revision), logs.clone());
        // A revision kept up when idle that its alias has left (before a restart, say) keeps nothing up: asked once,
        // when its set is made (one indexed read; the set is made once per revision).
        if let (true, Some(alias)) = (revision.min_concurrency > 0, &revision.alias) {
            let current = self.store.resolve(&revision.user_id, alias).ok().flatten().map(|r| r.id);
            if current.as_deref() != Some(revision.id.as_str()) {
                replicas.supersede();
            }
        }
        running.insert(revision.id.clone(), replicas.clone());
        self.owners.lock().unwrap_or_else(|e| e.into_inner()).insert(revision.id.clone(), revision.user_id.clone());
        replicas
    }

    /// How a replica of `revision` starts: its serving call, run by the engine with the owner's capacity, on a
    /// worker of its own (no keep_alive: a replica's worker serves nothing else).
    fn launcher(&self, revision: &Revision) -> Launch {
        let (engine, capacity, keys, uids) = (self.engine.clone(), self.capacity.clone(), self.keys.clone(), self.uids);
        let (secrets, nested) = (self.secrets.clone(), self.nested.clone());
        let (definition, owner) = (revision.definition.clone(), revision.user_id.clone());
        let storage = self.storage.clone();
        Arc::new(move |logs: LogSink, address| {
            let (engine, capacity, keys, storage) = (engine.clone(), capacity.clone(), keys.clone(), storage.clone());
            let (secrets, nested) = (secrets.clone(), nested.clone());
            let (definition, owner) = (definition.clone(), owner.clone());
            Box::pin(async move {
                let request = match RegisterApplicationRequest::decode(definition.as_ref()) {
                    Ok(request) => request,
                    Err(e) => return format!("its stored definition cannot be read ({e}): register it again"),
                };
                let caller = Caller { user_id: owner.clone(), key_id: String::new(), scope: Scope::Api, depth: 0 };
                let mut call = match call_request(&caller, &mut hosted_run(request)) {
                    Ok(call) => call,
                    Err(status) => return status.message().to_string(),
                };
                // A replica is started for requests, not by a function: the calls it makes are one level deep.
                call.link = Some(nested.link(&owner, 0, None));
                if let Err(status) = for_user(&mut call, &owner, &keys, &secrets, uids).await {
                    return status.message().to_string();
                }
                if let Some(uid) = call.uid {
                    call.data_dir = match crate::storage::data_dir(&storage, &owner, uid).await {
                        Ok(dir) => Some(dir),
                        Err(e) => return e,
                    };
                }
                call.keep_alive = Duration::ZERO;
                call.timeout = None;
                call.room = Some(Arc::new(CapacityRoom {
                    capacity,
                    engine: engine.clone(),
                    user: owner,
                    payload_bytes: call.payload.len(),
                }));
                let (worker_sender, mut worker) = tokio::sync::mpsc::unbounded_channel();
                call.on_worker = Some(worker_sender);
                let calling = engine.call(call, &logs);
                tokio::pin!(calling);
                let mut address = Some(address);
                loop {
                    tokio::select! {
                        outcome = &mut calling => return ended(outcome),
                        Some(started) = worker.recv(), if address.is_some() => {
                            let Some(ip) = started.address else {
                                return "its worker has no network namespace of its own, so its port cannot be \
                                        reached"
                                    .into();
                            };
                            if let Some(address) = address.take() {
                                let _ = address.send(SocketAddr::new(ip, APP_PORT));
                            }
                        }
                    }
                }
            })
        })
    }

    /// The engine that runs apps' calls.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine's call of `revision`'s function, run once as a plain call by its owner (a schedule's activation):
    /// its environment, machine type and keep_alive as registered, the owner's uid, secrets, /data and capacity, and a link
    /// back to the server for the calls it makes. `Err`: why it
    /// cannot run.
    pub async fn plain_call(&self, revision: &Revision) -> Result<fal_engine::CallRequest, String> {
        let request = RegisterApplicationRequest::decode(revision.definition.as_ref())
            .map_err(|e| format!("its stored definition cannot be read ({e}): register it again"))?;
        let owner = &revision.user_id;
        let caller = Caller { user_id: owner.clone(), key_id: String::new(), scope: Scope::Api, depth: 0 };
        let mut call = call_request(&caller, &mut hosted_run(request)).map_err(|s| s.message().to_string())?;
        // Started by the schedule, not by a function: the calls it makes are one level deep.
        call.link = Some(self.nested.link(owner, 0, None));
        for_user(&mut call, owner, &self.keys, &self.secrets, self.uids).await.map_err(|s| s.message().to_string())?;
        if let Some(uid) = call.uid {
            call.data_dir = Some(crate::storage::data_dir(&self.storage, owner, uid).await?);
        }
        call.keep_alive = call.keep_alive.min(self.max_keep_alive);
        call.room = Some(Arc::new(CapacityRoom {
            capacity: self.capacity.clone(),
            engine: self.engine.clone(),
            user: revision.user_id.clone(),
            payload_bytes: call.payload.len(),
        }));
        Ok(call)
    }

    /// Stops every app's replicas, for the server's stop: returns once each replica's worker is being stopped (the
    /// engine's shutdown then waits until they are gone).
    pub async fn shutdown(&self) {
        let sets: Vec<Arc<ReplicaSet>> = self.running().drain().map(|(_, set)| set).collect();
        let tasks: Vec<_> = sets.iter().flat_map(|set| set.close()).collect();
        for task in tasks {
            let _ = task.await;
        }
    }

    /// Starts the replicas apps keep up when idle (`min_concurrency`), after a restart.
    pub async fn start_kept_warm(&self) {
        if self.unavailable.is_some() {
            return;
        }
        match self.store.blocking(|store| store.kept_warm()).await {
            Ok(revisions) => {
                for revision in revisions {
                    self.replicas(&revision);
                }
            }
            Err(error) => tracing::warn!(%error, "cannot read the apps to start"),
        }
    }
}

/// The serving call of a registration, as a `HostedRun`.
fn hosted_run(request: RegisterApplicationRequest) -> HostedRun {
    HostedRun {
        environments: request.environments,
        machine_requirements: request.machine_requirements,
        function: request.function,
        setup_func: request.setup_func,
        function_name: request.function_name,
        timeout_seconds: None,
    }
}

/// Why a replica's call ended, as its requests and its log say it.
fn ended(outcome: Result<CallReply, CallError>) -> String {
    match outcome {
        Ok(reply) if reply.raised => {
            "the app's function raised an exception (its traceback is in the app's logs: `fal-serverless logs`)".into()
        }
        Ok(_) => format!(
            "the app's function returned; it must keep serving on port {APP_PORT} (serve=True runs uvicorn until \
             stopped)"
        ),
        Err(error) => error.to_string(),
    }
}

fn validate_alias(alias: &str) -> Result<(), AppError> {
    let valid = !alias.is_empty()
        && alias.len() <= MAX_ALIAS
        && alias.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && !alias.starts_with('-');
    if valid {
        Ok(())
    } else {
        Err(AppError::Invalid(format!(
            "alias {alias:?} is not valid: use letters, digits, '-' and '_' (at most {MAX_ALIAS}, not starting with '-')"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_are_url_path_segments() {
        assert!(validate_alias("my-app_2").is_ok());
        for bad in ["", "a/b", "a b", "-x", "é", &"x".repeat(65)] {
            assert!(validate_alias(bad).is_err(), "{bad:?}");
        }
    }
}
