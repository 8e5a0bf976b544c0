//! Warm workers, kept per (tenant, environment, machine type, worker variables) for `keep_alive` after each call.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::Worker;
use crate::engine::WorkerInfo;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub tenant: String,
    pub env_key: String,
    pub machine_type: String,
    /// The class of the call's [`WorkerLink`](super::WorkerLink) (empty without one).
    pub link_class: String,
    /// The [digest](crate::WorkerVariables::digest) of the variables the worker was started with: a call with other
    /// ones (a user's changed secret) never gets it.
    pub variables: String,
}

#[derive(Debug, Default)]
struct State {
    /// Idle workers by key, most recently used last; each with the id its keep_alive timer looks for.
    idle: HashMap<PoolKey, Vec<(u64, Worker)>>,
    /// Every live worker, idle or busy, for listings.
    live: BTreeMap<u64, WorkerInfo>,
    next_id: u64,
    /// Per tenant, how many times its workers were replaced ([`WorkerPool::replace`]): a lease taken before the
    /// last time is not kept warm when its call ends.
    generations: HashMap<String, u64>,
    /// Busy workers (by lease id) asked to stop ([`WorkerPool::take_by_pid`]): stopped when their call ends.
    doomed: std::collections::HashSet<u64>,
}

/// What [`WorkerPool::take_by_pid`] found.
#[derive(Debug)]
pub(crate) enum Taken {
    /// It was idle: taken out, for the caller to stop.
    Idle(Box<Worker>),
    /// It is busy with a call: it stops when that call ends instead of staying warm.
    Busy,
    NotFound,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct WorkerPool(Arc<Mutex<State>>, Arc<Stopping>);

/// Workers being stopped in tasks of their own (a dropped lease's, an expired one's): what shutdown waits for, so a
/// server's stop leaves no worker, cgroup or namespace behind, busy workers included (a cancelled call's, a web
/// endpoint's replica's).
#[derive(Debug, Default)]
struct Stopping {
    count: std::sync::atomic::AtomicUsize,
    done: tokio::sync::Notify,
}

/// How long shutdown waits for workers being stopped.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// A worker taken from the pool for one call. Dropped without [`WorkerPool::release`] (a cancelled call), it is
/// stopped and forgotten.
#[derive(Debug)]
pub(crate) struct Leased {
    id: u64,
    worker: Option<Worker>,
    pool: WorkerPool,
    /// Its tenant's generation when it was leased.
    generation: u64,
}

impl Leased {
    pub fn worker(&mut self) -> &mut Worker {
        self.worker.as_mut().expect("a lease holds its worker until released")
    }

    /// Takes the worker out of the pool's books, for a worker that failed.
    pub fn retire(mut self) -> Worker {
        let mut state = self.pool.state();
        state.live.remove(&self.id);
        state.doomed.remove(&self.id);
        drop(state);
        self.worker.take().expect("a lease holds its worker until released")
    }
}

impl Drop for Leased {
    fn drop(&mut self) {
        if let Some(worker) = self.worker.take() {
            let mut state = self.pool.state();
            state.live.remove(&self.id);
            state.doomed.remove(&self.id);
            drop(state);
            self.pool.spawn_stop(worker);
        }
    }
}

impl WorkerPool {
    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle, living worker for `key`, if there is one.
    pub fn checkout(&self, key: &PoolKey) -> Option<Leased> {
        let mut dead = Vec::new();
        let leased = {
            let mut state = self.state();
            let mut found = None;
            while let Some((id, mut worker)) = state.idle.get_mut(key).and_then(Vec::pop) {
                if worker.has_exited() {
                    state.live.remove(&id);
                    dead.push(worker);
                    continue;
                }
                if let Some(info) = state.live.get_mut(&id) {
                    info.busy = true;
                }
                found = Some((id, worker));
                break;
            }
            found
        };
        dead.into_iter().for_each(|worker| self.spawn_stop(worker));
        let generation = self.generation(&key.tenant);
        leased.map(|(id, worker)| Leased { id, worker: Some(worker), pool: self.clone(), generation })
    }

    /// Whether `key` has an idle worker now (living or not: [`WorkerPool::checkout`] says).
    pub fn has_idle(&self, key: &PoolKey) -> bool {
        self.state().idle.get(key).is_some_and(|workers| !workers.is_empty())
    }

    /// Registers a newly started worker as busy with a call.
    pub fn lease_new(&self, key: &PoolKey, worker: Worker) -> Leased {
        let mut state = self.state();
        state.next_id += 1;
        let id = state.next_id;
        let info = WorkerInfo {
            pid: worker.pid(),
            tenant: key.tenant.clone(),
            env_key: key.env_key.clone(),
            machine_type: key.machine_type.clone(),
            busy: true,
            calls: 0,
            hostname: worker.hostname().map(str::to_string),
            address: worker.address(),
            started: std::time::SystemTime::now(),
        };
        state.live.insert(id, info);
        let generation = state.generations.get(&key.tenant).copied().unwrap_or(0);
        Leased { id, worker: Some(worker), pool: self.clone(), generation }
    }

    /// Returns a worker after a successful call. It stays warm for `keep_alive` (each call restarts the timer:
    /// the timer only removes the worker if it is still idle under the same lease id), or stops now if zero.
    pub fn release(&self, key: PoolKey, mut leased: Leased, keep_alive: Duration) {
        let id = leased.id;
        let Some(worker) = leased.worker.take() else { return };
        {
            let mut state = self.state();
            if let Some(info) = state.live.get_mut(&id) {
                info.calls += 1;
                info.busy = false;
            }
            let doomed = state.doomed.remove(&id);
            let replaced = state.generations.get(&key.tenant).copied().unwrap_or(0) != leased.generation || doomed;
            if keep_alive.is_zero() || replaced {
                state.live.remove(&id);
            } else {
                // A fresh id per idle period: a timer of an earlier period finds nothing to remove.
                state.next_id += 1;
                let idle_id = state.next_id;
                if let Some(info) = state.live.remove(&id) {
                    state.live.insert(idle_id, info);
                }
                state.idle.entry(key.clone()).or_default().push((idle_id, worker));
                drop(state);
                let pool = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(keep_alive).await;
                    pool.expire(&key, idle_id);
                });
                return;
            }
        }
        self.spawn_stop(worker);
    }

    fn expire(&self, key: &PoolKey, idle_id: u64) {
        let expired = {
            let mut state = self.state();
            let workers = state.idle.get_mut(key);
            let position = workers.as_ref().and_then(|w| w.iter().position(|(id, _)| *id == idle_id));
            let expired = position.and_then(|p| workers.map(|w| w.remove(p).1));
            if expired.is_some() {
                state.live.remove(&idle_id);
            }
            if state.idle.get(key).is_some_and(Vec::is_empty) {
                state.idle.remove(key);
            }
            expired
        };
        if let Some(worker) = expired {
            self.spawn_stop(worker);
        }
    }

    /// Takes out of the pool the worker idle longest (idle ids grow with each release), of `tenant` or of anyone.
    pub fn take_least_recently_used(&self, tenant: Option<&str>) -> Option<Worker> {
        let mut state = self.state();
        let (key, position) = state
            .idle
            .iter()
            .filter(|(key, _)| tenant.is_none_or(|t| key.tenant == t))
            .flat_map(|(key, workers)| workers.iter().enumerate().map(move |(i, (id, _))| (*id, key, i)))
            .min_by_key(|(id, _, _)| *id)
            .map(|(_, key, i)| (key.clone(), i))?;
        let workers = state.idle.get_mut(&key)?;
        let (id, worker) = workers.remove(position);
        if workers.is_empty() {
            state.idle.remove(&key);
        }
        state.live.remove(&id);
        Some(worker)
    }

    /// The live worker with process id `pid` (of `tenant`, or of anyone), taken out if idle, or marked to stop
    /// when its call ends if busy.
    pub fn take_by_pid(&self, pid: u32, tenant: Option<&str>) -> Taken {
        let mut state = self.state();
        let Some((&id, info)) =
            state.live.iter().find(|(_, info)| info.pid == pid && tenant.is_none_or(|t| info.tenant == t))
        else {
            return Taken::NotFound;
        };
        if info.busy {
            state.doomed.insert(id);
            return Taken::Busy;
        }
        state.live.remove(&id);
        for workers in state.idle.values_mut() {
            if let Some(position) = workers.iter().position(|(idle_id, _)| *idle_id == id) {
                let (_, worker) = workers.remove(position);
                state.idle.retain(|_, workers| !workers.is_empty());
                return Taken::Idle(Box::new(worker));
            }
        }
        Taken::NotFound
    }

    fn generation(&self, tenant: &str) -> u64 {
        self.state().generations.get(tenant).copied().unwrap_or(0)
    }

    /// Takes every idle worker of `tenant` out of the pool, for the caller to stop, and marks the tenant's busy ones
    /// to be stopped when their calls end rather than kept warm: for when what its workers were started with
    /// changed.
    pub fn replace(&self, tenant: &str) -> Vec<Worker> {
        let mut state = self.state();
        *state.generations.entry(tenant.to_string()).or_default() += 1;
        let keys: Vec<PoolKey> = state.idle.keys().filter(|key| key.tenant == tenant).cloned().collect();
        let mut taken = Vec::new();
        for key in keys {
            for (id, worker) in state.idle.remove(&key).unwrap_or_default() {
                state.live.remove(&id);
                taken.push(worker);
            }
        }
        taken
    }

    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.state().live.values().cloned().collect()
    }

    /// Stops every idle worker and waits until they are gone.
    pub async fn shutdown(&self) {
        let idle: Vec<Worker> = {
            let mut state = self.state();
            let idle: Vec<Worker> = state.idle.drain().flat_map(|(_, ws)| ws.into_iter().map(|(_, w)| w)).collect();
            state.live.retain(|_, info| info.busy);
            idle
        };
        for worker in idle {
            worker.stop().await;
        }
        self.stopped().await;
    }
}

impl WorkerPool {
    /// Stops `worker` in a task of its own, counted until it is gone.
    fn spawn_stop(&self, worker: Worker) {
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let stopping = self.1.clone();
                stopping.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                handle.spawn(async move {
                    worker.stop().await;
                    if stopping.count.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
                        stopping.done.notify_waiters();
                    }
                });
            }
            // Outside a runtime (process teardown): dropping kills the process (kill_on_drop); the cgroup is removed
            // by the next engine that starts and finds it empty.
            Err(_) => drop(worker),
        }
    }

    /// Waits (at most SHUTDOWN_WAIT) until no worker is being stopped.
    async fn stopped(&self) {
        let wait = async {
            loop {
                let done = self.1.done.notified();
                if self.1.count.load(std::sync::atomic::Ordering::Acquire) == 0 {
                    return;
                }
                done.await;
            }
        };
        let _ = tokio::time::timeout(SHUTDOWN_WAIT, wait).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::error::CallError;
    use crate::worker::{BoxFuture, Placement};

    /// A placement that counts its stops.
    #[derive(Debug)]
    struct Counted(Arc<AtomicUsize>);

    impl Placement for Counted {
        fn id(&self) -> u32 {
            1
        }
        fn has_ended(&mut self) -> bool {
            false
        }
        fn ended<'a>(&'a mut self, _: &'a str, _: &'a str) -> BoxFuture<'a, CallError> {
            Box::pin(async { CallError::WorkerDied { how: "ended".into() } })
        }
        fn stop(&mut self) -> BoxFuture<'_, ()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async {})
        }
    }

    /// A worker whose agent end is returned with it (dropping that end would make the worker look dead).
    fn worker(stops: &Arc<AtomicUsize>) -> (Worker, tokio::net::UnixStream) {
        let (ours, agent) = tokio::net::UnixStream::pair().expect("socket pair");
        let (stdout, _) = super::super::output::pipe().expect("pipe");
        let (stderr, _) = super::super::output::pipe().expect("pipe");
        let placement = Box::new(Counted(stops.clone()));
        (Worker::connected(placement, Box::new(ours), stdout, stderr, 1024).expect("worker"), agent)
    }

    fn key(tenant: &str, variables: &str) -> PoolKey {
        PoolKey {
            tenant: tenant.into(),
            env_key: "e".into(),
            machine_type: "XS".into(),
            variables: variables.into(),
            link_class: String::new(),
        }
    }

    #[tokio::test]
    async fn replacing_a_tenants_workers_stops_its_idle_ones_and_its_busy_ones_when_released() {
        let stops = Arc::new(AtomicUsize::new(0));
        let pool = WorkerPool::default();
        let keep = Duration::from_secs(3600);
        let (idle, _a) = worker(&stops);
        let (busy, _b) = worker(&stops);
        let (other, _c) = worker(&stops);
        let (idle_lease, busy_lease) = (pool.lease_new(&key("t", "v1"), idle), pool.lease_new(&key("t", "v1"), busy));
        pool.release(key("t", "v1"), idle_lease, keep);
        let other_lease = pool.lease_new(&key("u", "v1"), other);
        pool.release(key("u", "v1"), other_lease, keep);
        // Other variables, another key: the warm worker is not handed out.
        assert!(pool.checkout(&key("t", "v2")).is_none());
        assert!(pool.has_idle(&key("t", "v1")));

        let taken = pool.replace("t");
        assert_eq!(taken.len(), 1);
        for worker in taken {
            worker.stop().await;
        }
        assert!(!pool.has_idle(&key("t", "v1")));
        // The busy one, leased before, is stopped when its call ends instead of kept warm.
        pool.release(key("t", "v1"), busy_lease, keep);
        pool.stopped().await;
        assert_eq!(stops.load(Ordering::SeqCst), 2);
        assert!(!pool.has_idle(&key("t", "v1")));
        assert_eq!(pool.workers().iter().filter(|w| w.tenant == "t").count(), 0);
        // Another tenant's warm worker stays; a worker leased after the replacement is kept warm again.
        assert!(pool.has_idle(&key("u", "v1")));
        let (fresh, _d) = worker(&stops);
        let fresh_lease = pool.lease_new(&key("t", "v2"), fresh);
        pool.release(key("t", "v2"), fresh_lease, keep);
        assert!(pool.checkout(&key("t", "v2")).is_some());
    }

    #[tokio::test]
    async fn a_worker_asked_to_stop_by_pid_goes_now_if_idle_and_after_its_call_if_busy() {
        let stops = Arc::new(AtomicUsize::new(0));
        let pool = WorkerPool::default();
        let keep = Duration::from_secs(3600);
        let (idle, _a) = worker(&stops);
        let lease = pool.lease_new(&key("t", "v"), idle);
        pool.release(key("t", "v"), lease, keep);
        // Another user's stop finds nothing; the owner's (or an admin's) takes it out.
        assert!(matches!(pool.take_by_pid(1, Some("u")), Taken::NotFound));
        assert!(matches!(pool.take_by_pid(2, None), Taken::NotFound));
        match pool.take_by_pid(1, Some("t")) {
            Taken::Idle(worker) => worker.stop().await,
            other => panic!("expected the idle worker, got {other:?}"),
        }
        assert!(!pool.has_idle(&key("t", "v")) && pool.workers().is_empty());
        // A busy one is marked: its release stops it instead of keeping it warm.
        let (busy, _b) = worker(&stops);
        let lease = pool.lease_new(&key("t", "v"), busy);
        assert!(matches!(pool.take_by_pid(1, None), Taken::Busy));
        pool.release(key("t", "v"), lease, keep);
        pool.stopped().await;
        assert_eq!(stops.load(Ordering::SeqCst), 2);
        assert!(!pool.has_idle(&key("t", "v")) && pool.workers().is_empty());
    }
}
