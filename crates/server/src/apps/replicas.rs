//! The replicas of one revision, and the requests waiting for one.
//!
//! A replica is a worker running the app's serving call (a web server on port 8080 of its own network namespace);
//! it is ready once that port accepts connections and `GET /health` answers other than a server error (an app
//! without that route answers 404). Requests take a replica in arrival order: each replica serves `multiplexing`
//! requests at once (1 unless the app says more). When every replica is full and fewer than `max` run, another is
//! started for the requests that wait; an idle replica stops after `keep_alive`, down to `min`. A replica whose call
//! ends (its function returned, raised, or its worker died) is gone, and the requests it was serving are told why.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use fal_engine::{BoxFuture, LogLine, LogSink, LogSource};
use tokio::sync::{oneshot, watch};
use tokio::task::AbortHandle;

use super::logs::{app_line, AppLogs, RequestLogs};

/// Starts a replica's call. It is given where the replica's output goes and a sender for the replica's address
/// (sent once its worker runs); it resolves, with what ended it, when the call ends. Dropping it stops the worker.
pub type Launch = Arc<dyn Fn(LogSink, oneshot::Sender<SocketAddr>) -> BoxFuture<'static, String> + Send + Sync>;

/// How often idle replicas are looked at, and a replica's port while it starts.
const REAP_EVERY: Duration = Duration::from_millis(250);
const READY_POLL: Duration = Duration::from_millis(10);
/// After a failed start, the least time before `min` replicas are started again (requests start them at once).
const RESTART_BACKOFF: Duration = Duration::from_secs(5);

/// How a revision scales.
#[derive(Debug, Clone, Copy)]
pub struct Scaling {
    pub min: u32,
    pub max: u32,
    pub multiplexing: u32,
    pub keep_alive: Duration,
    /// How long a replica may take from its start to a port that answers (its environment's build included).
    pub start_timeout: Duration,
}

/// Why a request got no replica.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoReplica {
    #[error("no replica of the app was free within {seconds}s (it runs at most {max} at once); try again later")]
    Timeout { seconds: u64, max: u32 },
    #[error("the app's replica failed to start: {0}")]
    StartFailed(String),
    #[error("the app was deleted")]
    Closed,
}

/// A counted view of a revision's replicas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicaCounts {
    pub ready: u32,
    pub starting: u32,
    /// Requests being served.
    pub in_flight: u32,
    /// Requests waiting for a replica.
    pub waiting: u32,
}

#[derive(Debug)]
struct Replica {
    address: SocketAddr,
    in_flight: u32,
    idle_since: Instant,
    task: AbortHandle,
    /// The request it serves, when it serves exactly one: where its output goes besides the app's log.
    current: Option<(String, Arc<RequestLogs>)>,
    /// Set to why it ended, for the requests it was serving.
    ended: watch::Sender<Option<String>>,
}

type Waiter = oneshot::Sender<Result<Lease, NoReplica>>;

#[derive(Debug, Default)]
struct State {
    replicas: BTreeMap<u64, Replica>,
    starting: BTreeMap<u64, AbortHandle>,
    /// Every replica's task, starting or ready, for waiting on them at close.
    tasks: BTreeMap<u64, tokio::task::JoinHandle<()>>,
    /// Requests waiting, in arrival order, each with its id and its log.
    waiters: VecDeque<(Waiter, String, Arc<RequestLogs>)>,
    next_id: u64,
    last_failure: Option<Instant>,
    closed: bool,
}

pub struct ReplicaSet {
    /// The app's name, for logs.
    name: String,
    scaling: Scaling,
    launch: Launch,
    logs: Arc<AppLogs>,
    state: Mutex<State>,
    /// A newer revision took the alias: this one keeps no replica up when idle (its `min` no longer holds), though
    /// its id still answers.
    superseded: std::sync::atomic::AtomicBool,
    /// Replicas with ids up to this one started with what their owner has since changed (a secret): they take no
    /// new request, and stop once idle ([`ReplicaSet::replace`]).
    stale_through: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for ReplicaSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaSet").field("name", &self.name).field("scaling", &self.scaling).finish()
    }
}

/// A replica taken for one request; given back when dropped.
#[derive(Debug)]
pub struct Lease {
    set: Arc<ReplicaSet>,
    replica: u64,
    pub address: SocketAddr,
    pub request_id: String,
    pub logs: Arc<RequestLogs>,
    ended: watch::Receiver<Option<String>>,
}

impl Lease {
    /// Whether the replica is known to have ended.
    pub fn has_ended(&self) -> bool {
        self.ended.borrow().is_some()
    }

    /// Why the replica ended, if it ends within `within` (a request that lost its connection to the replica asks,
    /// to tell its client why).
    pub async fn ended(&mut self, within: Duration) -> Option<String> {
        let ended = tokio::time::timeout(within, self.ended.wait_for(Option::is_some)).await;
        match ended {
            Ok(Ok(reason)) => reason.clone(),
            _ => None,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.set.release(self.replica, &self.request_id);
    }
}

impl ReplicaSet {
    pub fn new(name: String, scaling: Scaling, launch: Launch, logs: Arc<AppLogs>) -> Arc<Self> {
        let superseded = std::sync::atomic::AtomicBool::new(false);
        let stale_through = std::sync::atomic::AtomicU64::new(0);
        let set = Arc::new(Self { name, scaling, launch, logs, state: Mutex::default(), superseded, stale_through });
        let weak = Arc::downgrade(&set);
        tokio::spawn(reap(weak));
        set
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn counts(&self) -> ReplicaCounts {
        let state = self.state();
        ReplicaCounts {
            ready: state.replicas.len() as u32,
            starting: state.starting.len() as u32,
            in_flight: state.replicas.values().map(|r| r.in_flight).sum(),
            waiting: state.waiters.iter().filter(|(w, ..)| !w.is_closed()).count() as u32,
        }
    }

    /// A replica for request `request_id`, waiting at most `wait` for one (in arrival order), starting one if the
    /// app may run another. The request takes its place in line when this is called, not when the future is first
    /// polled: the queue's dispatcher hands several requests over in their order before it awaits any of them.
    pub fn acquire(
        self: &Arc<Self>,
        request_id: String,
        logs: Arc<RequestLogs>,
        wait: Duration,
    ) -> impl std::future::Future<Output = Result<Lease, NoReplica>> + Send + 'static {
        let max = self.scaling.max;
        let registered = {
            let mut state = self.state();
            if state.closed {
                Err(Err(NoReplica::Closed))
            } else {
                state.waiters.retain(|(w, ..)| !w.is_closed());
                match state.waiters.is_empty().then(|| self.lease_locked(&mut state, request_id.clone(), logs.clone()))
                {
                    Some(Some(lease)) => Err(Ok(lease)),
                    _ => {
                        let (sender, receiver) = oneshot::channel();
                        state.waiters.push_back((sender, request_id, logs));
                        self.scale_up_locked(&mut state);
                        Ok(receiver)
                    }
                }
            }
        };
        async move {
            let receiver = match registered {
                Ok(receiver) => receiver,
                Err(outcome) => return outcome,
            };
            match tokio::time::timeout(wait, receiver).await {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(_)) => Err(NoReplica::Closed),
                Err(_) => Err(NoReplica::Timeout { seconds: wait.as_secs(), max }),
            }
        }
    }

    /// The least busy ready replica with room, taken for `request_id`.
    fn lease_locked(self: &Arc<Self>, state: &mut State, request_id: String, logs: Arc<RequestLogs>) -> Option<Lease> {
        let multiplexing = self.scaling.multiplexing.max(1);
        let stale_through = self.stale_through.load(std::sync::atomic::Ordering::Relaxed);
        let (&id, replica) = state
            .replicas
            .iter_mut()
            .filter(|(&id, r)| r.in_flight < multiplexing && id > stale_through)
            .min_by_key(|(_, r)| r.in_flight)?;
        replica.in_flight += 1;
        // Output is the request's only while the replica serves it alone.
        replica.current = (replica.in_flight == 1).then(|| (request_id.clone(), logs.clone()));
        Some(Lease {
            set: self.clone(),
            replica: id,
            address: replica.address,
            request_id,
            logs,
            ended: replica.ended.subscribe(),
        })
    }

    /// Hands ready replicas to waiting requests, first come first served. The leases are sent by the caller once
    /// the lock is released (a lease whose request gave up is dropped, which takes the lock again).
    fn dispatch_locked(self: &Arc<Self>, state: &mut State) -> Vec<(Waiter, Lease)> {
        let mut handed = Vec::new();
        while let Some((waiter, request_id, logs)) = state.waiters.pop_front() {
            if waiter.is_closed() {
                continue;
            }
            match self.lease_locked(state, request_id.clone(), logs.clone()) {
                Some(lease) => handed.push((waiter, lease)),
                None => {
                    state.waiters.push_front((waiter, request_id, logs));
                    break;
                }
            }
        }
        handed
    }

    fn send(handed: Vec<(Waiter, Lease)>) {
        for (waiter, lease) in handed {
            let _ = waiter.send(Ok(lease));
        }
    }

    /// Starts replicas while the requests waiting outnumber what those starting will take, up to `max`.
    fn scale_up_locked(self: &Arc<Self>, state: &mut State) {
        let waiting = state.waiters.iter().filter(|(w, ..)| !w.is_closed()).count() as u64;
        let multiplexing = u64::from(self.scaling.multiplexing.max(1));
        while waiting > state.starting.len() as u64 * multiplexing
            && ((state.replicas.len() + state.starting.len()) as u32) < self.scaling.max
        {
            self.start_locked(state);
        }
    }

    fn start_locked(self: &Arc<Self>, state: &mut State) {
        state.next_id += 1;
        let id = state.next_id;
        let task = tokio::spawn(run_replica(self.clone(), id));
        state.starting.insert(id, task.abort_handle());
        state.tasks.insert(id, task);
    }

    fn release(self: &Arc<Self>, replica: u64, request_id: &str) {
        let handed = {
            let mut state = self.state();
            if let Some(r) = state.replicas.get_mut(&replica) {
                r.in_flight = r.in_flight.saturating_sub(1);
                if r.current.as_ref().is_some_and(|(id, _)| id == request_id) || r.in_flight == 0 {
                    r.current = None;
                }
                if r.in_flight == 0 {
                    r.idle_since = Instant::now();
                }
            }
            self.dispatch_locked(&mut state)
        };
        Self::send(handed);
    }

    fn ready(self: &Arc<Self>, id: u64, address: SocketAddr, task: AbortHandle) {
        let handed = {
            let mut state = self.state();
            if state.starting.remove(&id).is_none() || state.closed {
                return;
            }
            let replica = Replica {
                address,
                in_flight: 0,
                idle_since: Instant::now(),
                task,
                current: None,
                ended: watch::channel(None).0,
            };
            state.replicas.insert(id, replica);
            self.dispatch_locked(&mut state)
        };
        self.note(format!("replica {id} is ready at {address}"));
        Self::send(handed);
    }

    fn start_failed(self: &Arc<Self>, id: u64, reason: String) {
        let failed = {
            let mut state = self.state();
            state.starting.remove(&id);
            state.last_failure = Some(Instant::now());
            // Requests wait for a replica as long as one may still come; with none, they learn why.
            if state.replicas.is_empty() && state.starting.is_empty() {
                std::mem::take(&mut state.waiters)
            } else {
                VecDeque::new()
            }
        };
        tracing::warn!(app = %self.name, replica = id, %reason, "an app's replica failed to start");
        self.note(format!("replica {id} failed to start: {reason}"));
        for (waiter, ..) in failed {
            let _ = waiter.send(Err(NoReplica::StartFailed(reason.clone())));
        }
    }

    fn died(self: &Arc<Self>, id: u64, reason: String) {
        {
            let mut state = self.state();
            if let Some(replica) = state.replicas.remove(&id) {
                let _ = replica.ended.send(Some(reason.clone()));
            }
            if !state.closed {
                self.scale_up_locked(&mut state);
            }
        }
        tracing::warn!(app = %self.name, replica = id, %reason, "an app's replica ended");
        self.note(format!("replica {id} ended: {reason}"));
    }

    /// A line of the server's own in the app's log.
    fn note(&self, line: String) {
        self.logs.push(app_line(LogLine { source: LogSource::Engine, line }, ""));
    }

    /// A line replica `id` printed: the app's, and the request's it serves alone.
    fn printed(&self, id: u64, line: LogLine) {
        let current = self.state().replicas.get(&id).and_then(|r| r.current.clone());
        let (request_id, request_logs) = match current {
            Some((request_id, logs)) => (request_id, Some(logs)),
            None => (String::new(), None),
        };
        let line = app_line(line, &request_id);
        if let Some(logs) = request_logs {
            logs.push(&line);
        }
        self.logs.push(line);
    }

    /// Stops idle replicas past their keep_alive (down to `min`) and idle stale ones, and starts replicas up to
    /// `min` (and for requests waiting, in place of stale ones).
    fn reap(self: &Arc<Self>) {
        let stale = self.stop_idle_stale();
        for id in stale {
            self.note(format!("replica {id} stopped: it started with secrets that have changed since"));
        }
        let stopped = {
            let mut state = self.state();
            if state.closed {
                return;
            }
            let keep =
                if self.superseded.load(std::sync::atomic::Ordering::Relaxed) { 0 } else { self.scaling.min as usize };
            let mut stopped = Vec::new();
            let idle: Vec<u64> = state
                .replicas
                .iter()
                .filter(|(_, r)| r.in_flight == 0 && r.idle_since.elapsed() >= self.scaling.keep_alive)
                .map(|(&id, _)| id)
                .collect();
            for id in idle {
                if state.replicas.len() + state.starting.len() <= keep {
                    break;
                }
                if let Some(replica) = state.replicas.remove(&id) {
                    replica.task.abort();
                    // An aborted task never reaches its own end, where it would forget its handle.
                    state.tasks.remove(&id);
                    stopped.push(id);
                }
            }
            let backing_off = state.last_failure.is_some_and(|t| t.elapsed() < RESTART_BACKOFF);
            if !backing_off {
                while state.replicas.len() + state.starting.len() < keep {
                    self.start_locked(&mut state);
                }
            }
            stopped
        };
        for id in stopped {
            self.note(format!("replica {id} stopped: idle for {}s (keep_alive)", self.scaling.keep_alive.as_secs()));
        }
    }

    /// Its owner changed what replicas start with (a secret): every replica running or starting now takes no new
    /// request and stops once idle (now, for those idle already); new ones start in their place as requests (or
    /// `min`) ask.
    pub fn replace(self: &Arc<Self>) {
        {
            let state = self.state();
            self.stale_through.store(state.next_id, std::sync::atomic::Ordering::Relaxed);
        }
        self.reap();
    }

    /// Stops the stale replicas no request is on, and starts others for the requests waiting; returns their ids.
    fn stop_idle_stale(self: &Arc<Self>) -> Vec<u64> {
        let stale_through = self.stale_through.load(std::sync::atomic::Ordering::Relaxed);
        let mut state = self.state();
        if state.closed || stale_through == 0 {
            return Vec::new();
        }
        let idle: Vec<u64> = state
            .replicas
            .iter()
            .filter(|(&id, r)| id <= stale_through && r.in_flight == 0)
            .map(|(&id, _)| id)
            .collect();
        for id in &idle {
            if let Some(replica) = state.replicas.remove(id) {
                replica.task.abort();
                let _ = replica.ended.send(Some("its secrets changed".into()));
                state.tasks.remove(id);
            }
        }
        if !idle.is_empty() {
            self.scale_up_locked(&mut state);
        }
        idle
    }

    /// A newer revision took this one's alias: its idle replicas stop after keep_alive, `min` or not.
    pub fn supersede(&self) {
        self.superseded.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Stops every replica and fails every waiting request: the app is gone. Returns the replicas' tasks, which end
    /// once their workers are being stopped.
    pub fn close(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let (waiters, tasks) = {
            let mut state = self.state();
            state.closed = true;
            for (_, replica) in std::mem::take(&mut state.replicas) {
                replica.task.abort();
                let _ = replica.ended.send(Some("the app was deleted".into()));
            }
            for (_, task) in std::mem::take(&mut state.starting) {
                task.abort();
            }
            (std::mem::take(&mut state.waiters), std::mem::take(&mut state.tasks).into_values().collect())
        };
        for (waiter, ..) in waiters {
            let _ = waiter.send(Err(NoReplica::Closed));
        }
        tasks
    }
}

/// Whether `address` serves: its port accepts connections and `GET /health` answers other than a server error (an
/// app with that route says 200 once ready, 503 while it loads; one without answers 404 or another 4xx). Asked in
/// plain HTTP/1.1 by hand: only the status line matters, whatever else the app's server sends.
async fn answers(address: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        let request = format!("GET /health HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        // "HTTP/1.1 200"
        let status: u16 = std::str::from_utf8(head.get(9..12)?).ok()?.parse().ok()?;
        Some(status)
    };
    matches!(tokio::time::timeout(Duration::from_secs(5), probe).await, Ok(Some(status)) if status < 500)
}

/// Runs replica `id` of `set` from its start to its end.
async fn run_replica(set: Arc<ReplicaSet>, id: u64) {
    run(&set, id).await;
    set.state().tasks.remove(&id);
}

async fn run(set: &Arc<ReplicaSet>, id: u64) {
    let (address_sender, address) = oneshot::channel();
    let printed_by = Arc::downgrade(set);
    let logs = LogSink::new(move |line| {
        if let Some(set) = printed_by.upgrade() {
            set.printed(id, line);
        }
    });
    let mut running = (set.launch)(logs, address_sender);
    let started = Instant::now();
    let address = tokio::select! {
        address = address => match address {
            Ok(address) => address,
            Err(_) => return set.start_failed(id, running.await),
        },
        reason = &mut running => return set.start_failed(id, reason),
    };
    let ready = async {
        while !answers(address).await {
            tokio::time::sleep(READY_POLL).await;
        }
    };
    let left = set.scaling.start_timeout.saturating_sub(started.elapsed());
    tokio::select! {
        ready = tokio::time::timeout(left, ready) => if ready.is_err() {
            return set.start_failed(id, format!(
                "it did not answer on port {} within {}s of its start: the function must run a web server on \
                 0.0.0.0:{} (serve=True does) and keep running",
                address.port(), set.scaling.start_timeout.as_secs(), address.port()
            ));
        },
        reason = &mut running => return set.start_failed(id, reason),
    }
    // The task's own handle, for stopping it; `ready` records it with the replica.
    let Some(task) = set.state().starting.get(&id).cloned() else { return };
    set.ready(id, address, task);
    let reason = running.await;
    set.died(id, reason);
}

async fn reap(set: Weak<ReplicaSet>) {
    // The first look after REAP_EVERY, not at once: whoever made the set may still be telling it it is superseded.
    let mut every = tokio::time::interval_at(tokio::time::Instant::now() + REAP_EVERY, REAP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(set) = set.upgrade() else { return };
        set.reap();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body_util::Empty;

    use super::*;

    /// Replicas that are plain listeners of this test (each answers 404 to /health), counting how many started.
    fn listeners(started: Arc<AtomicUsize>) -> Launch {
        Arc::new(move |_logs, address| {
            let started = started.clone();
            Box::pin(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                started.fetch_add(1, Ordering::SeqCst);
                let _ = address.send(listener.local_addr().unwrap());
                loop {
                    let Ok((stream, _)) = listener.accept().await else { break };
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(|_| async {
                            http::Response::builder().status(404).body(Empty::<Bytes>::new())
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
                "the listener stopped".to_string()
            })
        })
    }

    fn scaling(min: u32, max: u32, keep_alive_ms: u64) -> Scaling {
        Scaling {
            min,
            max,
            multiplexing: 1,
            keep_alive: Duration::from_millis(keep_alive_ms),
            start_timeout: Duration::from_secs(10),
        }
    }

    #[tokio::test]
    async fn requests_beyond_the_replicas_wait_and_at_most_max_start_then_idle_ones_stop() {
        let started = Arc::new(AtomicUsize::new(0));
        let set = ReplicaSet::new("app".into(), scaling(0, 3, 300), listeners(started.clone()), Arc::default());
        let mut requests = Vec::new();
        for i in 0..10 {
            let set = set.clone();
            requests.push(tokio::spawn(async move {
                let lease = set.acquire(format!("r{i}"), RequestLogs::new(), Duration::from_secs(10)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
                lease.address
            }));
        }
        let mut addresses = std::collections::BTreeSet::new();
        for request in requests {
            addresses.insert(request.await.unwrap());
        }
        assert_eq!(started.load(Ordering::SeqCst), 3, "exactly max replicas started");
        assert_eq!(addresses.len(), 3, "and every one served");
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(set.counts(), ReplicaCounts::default(), "idle replicas stop after keep_alive");
        assert!(set.state().tasks.is_empty(), "and their tasks are forgotten");
    }

    #[tokio::test]
    async fn a_request_takes_its_place_in_line_when_acquire_is_called_not_when_it_is_polled() {
        let started = Arc::new(AtomicUsize::new(0));
        let set = ReplicaSet::new("app".into(), scaling(0, 1, 1000), listeners(started.clone()), Arc::default());
        let held = set.acquire("a".into(), RequestLogs::new(), Duration::from_secs(5)).await.unwrap();
        let first = set.acquire("b".into(), RequestLogs::new(), Duration::from_secs(5));
        let second = set.acquire("c".into(), RequestLogs::new(), Duration::from_secs(5));
        // Polled in the other order: the second waits while the first, called first, gets the replica.
        let second = tokio::spawn(second);
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(held);
        let first = first.await.unwrap();
        assert_eq!(first.request_id, "b");
        assert!(!second.is_finished(), "the later request still waits");
        drop(first);
        assert_eq!(second.await.unwrap().unwrap().request_id, "c");
    }

    #[tokio::test]
    async fn min_replicas_stay_up_and_a_request_that_waits_too_long_is_told() {
        let started = Arc::new(AtomicUsize::new(0));
        let set = ReplicaSet::new("app".into(), scaling(1, 1, 0), listeners(started.clone()), Arc::default());
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(set.counts().ready, 1, "min_concurrency keeps one up");
        let held = set.acquire("a".into(), RequestLogs::new(), Duration::from_secs(5)).await.unwrap();
        let waited = set.acquire("b".into(), RequestLogs::new(), Duration::from_millis(200)).await;
        assert_eq!(waited.unwrap_err(), NoReplica::Timeout { seconds: 0, max: 1 });
        drop(held);
        assert!(set.acquire("c".into(), RequestLogs::new(), Duration::from_secs(5)).await.is_ok());
        assert_eq!(started.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_superseded_revision_keeps_no_replica_up() {
        let started = Arc::new(AtomicUsize::new(0));
        let set = ReplicaSet::new("app".into(), scaling(1, 1, 0), listeners(started.clone()), Arc::default());
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(set.counts().ready, 1, "min_concurrency keeps one up");
        set.supersede();
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(set.counts(), ReplicaCounts::default());
        // Its id still answers: a request starts one again.
        assert!(set.acquire("a".into(), RequestLogs::new(), Duration::from_secs(5)).await.is_ok());
    }

    #[tokio::test]
    async fn a_replica_that_cannot_start_fails_the_requests_waiting_with_its_reason() {
        let launch: Launch = Arc::new(|_logs, _address| Box::pin(async { "the environment failed to build".into() }));
        let set = ReplicaSet::new("app".into(), scaling(0, 2, 0), launch, Arc::default());
        let error = set.acquire("a".into(), RequestLogs::new(), Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(error, NoReplica::StartFailed("the environment failed to build".into()));
        set.close();
        let error = set.acquire("b".into(), RequestLogs::new(), Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(error, NoReplica::Closed);
    }

    #[tokio::test]
    async fn a_lease_learns_why_its_replica_ended() {
        let stop = Arc::new(tokio::sync::Notify::new());
        let served = listeners(Arc::default());
        let stopper = stop.clone();
        let launch: Launch = Arc::new(move |logs, address| {
            let (serving, stop) = (served(logs, address), stopper.clone());
            Box::pin(async move {
                tokio::select! {
                    _ = serving => {},
                    () = stop.notified() => {},
                }
                "exceeded the memory of machine type XS".to_string()
            })
        });
        let set = ReplicaSet::new("app".into(), scaling(0, 1, 10_000), launch, Arc::default());
        let mut lease = set.acquire("a".into(), RequestLogs::new(), Duration::from_secs(5)).await.unwrap();
        assert_eq!(lease.ended(Duration::from_millis(50)).await, None, "it runs");
        stop.notify_one();
        let reason = lease.ended(Duration::from_secs(5)).await;
        assert_eq!(reason.as_deref(), Some("exceeded the memory of machine type XS"));
        assert_eq!(set.counts().ready, 0);
    }
}
