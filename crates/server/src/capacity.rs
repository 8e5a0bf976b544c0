//! The server's capacity: a running call holds its machine type's CPUs; a worker holds its memory and GPUs for as
//! long as it lives, warm idle time included (a warm worker holding a model is not free memory, though it uses no
//! CPU). A call that finds no room waits; while it waits for memory or GPUs, idle workers are stopped, longest idle
//! first, to make room.
//!
//! Shared fairly between users:
//! * no user holds more than `user_share` of the server's CPUs or memory (default 0.75), so one user's calls never
//!   take all of it while another's wait; a machine type larger than that share (L on a 2-core host) still runs,
//!   holding that share, and the others' calls run beside it;
//! * a user has at most `max_workers_per_user` live workers;
//! * waiting calls are served user by user: the next turn goes to the user holding the least (their larger share of
//!   CPUs or memory), each user's calls in their order of arrival; the call whose turn it is is never overtaken by
//!   smaller ones of other users, so a large call is not starved;
//! * the payloads of a user's waiting calls total at most `max_queued_bytes_per_user`; a call beyond it is refused
//!   at once, clearly, rather than held in memory.
//!
//! GPUs are strict: a machine type needing more GPUs than the server has can never run and is refused at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fal_engine::MachineType;
use tokio::sync::oneshot;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resources {
    pub cpus: f64,
    pub memory_bytes: u64,
    pub gpus: u32,
}

impl Resources {
    const NONE: Self = Self { cpus: 0.0, memory_bytes: 0, gpus: 0 };

    /// More than any call asks for: a cluster's scheduler does the queueing.
    pub fn unbounded() -> Self {
        Self { cpus: 1e9, memory_bytes: 1 << 60, gpus: 1 << 20 }
    }

    /// This host: its cores, its memory, its NVIDIA GPUs.
    pub fn of_host(gpus: u32) -> Self {
        let cpus = std::thread::available_parallelism().map(|n| n.get() as f64).unwrap_or(1.0);
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .map(|kib| kib * 1024)
            .unwrap_or(u64::MAX);
        Self { cpus, memory_bytes, gpus }
    }

    fn add(&mut self, other: Self) {
        self.cpus += other.cpus;
        self.memory_bytes = self.memory_bytes.saturating_add(other.memory_bytes);
        self.gpus = self.gpus.saturating_add(other.gpus);
    }

    fn sub(&mut self, other: Self) {
        self.cpus = (self.cpus - other.cpus).max(0.0);
        self.memory_bytes = self.memory_bytes.saturating_sub(other.memory_bytes);
        self.gpus = self.gpus.saturating_sub(other.gpus);
    }

    /// Whether `self + more` stays within `limit` (CPUs and memory; GPUs only where `gpus`).
    fn within(&self, more: Self, limit: Self, gpus: bool) -> bool {
        self.cpus + more.cpus <= limit.cpus + 1e-9
            && self.memory_bytes.saturating_add(more.memory_bytes) <= limit.memory_bytes
            && (!gpus || self.gpus.saturating_add(more.gpus) <= limit.gpus)
    }

    /// The larger of its shares of `total`'s CPUs and memory.
    fn share_of(&self, total: Self) -> f64 {
        (self.cpus / total.cpus.max(1e-9)).max(self.memory_bytes as f64 / total.memory_bytes.max(1) as f64)
    }
}

/// How the capacity is shared between users (`[capacity]` and `[limits]` in the config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sharing {
    /// The most of the server's CPUs and of its memory one user holds, as a fraction.
    pub user_share: f64,
    pub max_workers_per_user: usize,
    pub max_queued_bytes_per_user: usize,
}

impl Default for Sharing {
    fn default() -> Self {
        Self { user_share: 0.75, max_workers_per_user: 64, max_queued_bytes_per_user: 1 << 30 }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CapacityError {
    #[error(
        "{user}'s calls waiting for capacity already hold {queued} bytes of payload, and this one adds {bytes}: \
         the limit per user is {limit} bytes ([limits] max_queued_gb_per_user). Wait for some to finish, or send \
         large inputs by reference (a URL, a path on shared storage) rather than in the call"
    )]
    QueueFull { user: String, queued: usize, bytes: usize, limit: usize },
}

/// Why a waiting call cannot start yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Crowded {
    /// The user's running calls hold their share of the CPUs: one of them must end.
    UserBusy,
    /// The server's CPUs are held by running calls.
    ServerBusy,
    /// The user's workers hold their share of memory, or their worker count is used up: stopping one of their idle
    /// workers helps.
    ByOwnWorkers(String),
    /// The server's memory or GPUs are held by workers: stopping anyone's idle worker helps.
    ByAnyone,
}

impl Crowded {
    /// Whether only this user's own calls or workers stand in the way (others' calls may go first).
    fn by_user(&self) -> bool {
        matches!(self, Self::UserBusy | Self::ByOwnWorkers(_))
    }
}

#[derive(Debug)]
pub struct Capacity {
    total: Resources,
    /// What one user may hold: `user_share` of `total`.
    per_user: Resources,
    sharing: Sharing,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    used: Resources,
    users: HashMap<String, UserState>,
    /// Calls waiting for room, in order of arrival.
    waiting: Vec<Waiter>,
    next_ticket: u64,
}

impl Default for Resources {
    fn default() -> Self {
        Self::NONE
    }
}

#[derive(Debug, Default)]
struct UserState {
    held: Resources,
    workers: usize,
    queued_bytes: usize,
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    user: String,
    demand: Resources,
    /// It needs a new worker (which holds the memory and GPUs of `demand`, and one of the user's worker places).
    worker: bool,
    bytes: usize,
    grant: oneshot::Sender<()>,
}

impl Capacity {
    pub fn new(total: Resources, sharing: Sharing) -> Self {
        let share = sharing.user_share.clamp(0.0, 1.0);
        let per_user =
            Resources { cpus: total.cpus * share, memory_bytes: (total.memory_bytes as f64 * share) as u64, gpus: 0 };
        Self { total, per_user, sharing, state: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What calls and workers hold now, and the total.
    pub fn usage(&self) -> (Resources, Resources) {
        (self.lock().used, self.total)
    }

    /// Why `machine` can never run here, if it cannot.
    pub fn never_fits(&self, machine: &MachineType) -> Option<String> {
        (machine.gpus > self.total.gpus).then(|| {
            format!(
                "machine type {} needs {} GPU(s) and this server has {}; use a CPU machine type or a server with GPUs",
                machine.name, machine.gpus, self.total.gpus
            )
        })
    }

    /// How many workers of `machine` one user's share holds at once, within the per-user worker cap (at least 1): a
    /// map's concurrency when it asks for none.
    pub fn fitting(&self, machine: &MachineType) -> usize {
        let demand = self.demand(machine, true);
        let by_cpu = self.per_user.cpus / demand.cpus.max(1e-9);
        let by_memory = self.per_user.memory_bytes as f64 / demand.memory_bytes.max(1) as f64;
        let fits = by_cpu.min(by_memory).floor().min(self.sharing.max_workers_per_user as f64);
        (fits as usize).max(1)
    }

    /// What a call of `machine` holds (its CPUs) and, on a new worker, what the worker holds (its memory and GPUs):
    /// its size, at most one user's share.
    fn demand(&self, machine: &MachineType, new_worker: bool) -> Resources {
        Resources {
            cpus: machine.cpus.min(self.per_user.cpus),
            memory_bytes: if new_worker { machine.memory_bytes.min(self.per_user.memory_bytes) } else { 0 },
            gpus: if new_worker { machine.gpus } else { 0 },
        }
    }

    /// Waits until a call of `machine` for `user` (on a new worker, if `new_worker`) fits and it is its turn;
    /// calls `on_wait` once if it has to wait, and `make_room` (which stops an idle worker, returning whether there
    /// was one) as long as that may help. The caller must have checked [`Capacity::never_fits`]. `bytes`: the call's
    /// payload, held while it waits. Returns what the call holds, and what the new worker holds.
    pub async fn reserve<F: std::future::Future<Output = bool>>(
        self: &Arc<Self>,
        user: &str,
        machine: &MachineType,
        new_worker: bool,
        bytes: usize,
        on_wait: impl FnOnce(),
        mut make_room: impl FnMut(Crowded) -> F,
    ) -> Result<(Reservation, Option<Reservation>), CapacityError> {
        let demand = self.demand(machine, new_worker);
        let (queued, mut turn) = {
            let mut state = self.lock();
            if state.waiting.is_empty() && self.crowded(&state, user, demand, new_worker).is_none() {
                state.take(user, demand, new_worker);
                return Ok(self.reservations(user, demand, new_worker));
            }
            let limit = self.sharing.max_queued_bytes_per_user;
            let queued = state.users.get(user).map_or(0, |u| u.queued_bytes);
            if queued.saturating_add(bytes) > limit && queued > 0 {
                return Err(CapacityError::QueueFull { user: user.to_string(), queued, bytes, limit });
            }
            state.users.entry(user.to_string()).or_default().queued_bytes += bytes;
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            let (grant, turn) = oneshot::channel();
            state.waiting.push(Waiter { ticket, user: user.to_string(), demand, worker: new_worker, bytes, grant });
            self.grant_waiting(&mut state);
            let queued = Queued {
                capacity: self.clone(),
                ticket,
                user: user.to_string(),
                demand,
                worker: new_worker,
                reserved: false,
            };
            (queued, turn)
        };
        on_wait();
        loop {
            if turn.try_recv().is_ok() {
                break;
            }
            // Stopping an idle worker frees what it held; whoever's turn it is may then fit.
            let crowded = {
                let state = self.lock();
                self.crowded(&state, user, demand, new_worker)
            };
            let stopped = match crowded {
                Some(crowded @ (Crowded::ByOwnWorkers(_) | Crowded::ByAnyone)) => make_room(crowded).await,
                _ => false,
            };
            if !stopped {
                // The sender is only dropped by granting (see `Capacity::grant_waiting`): this returns at our turn.
                let _ = (&mut turn).await;
                break;
            }
        }
        Ok(queued.into_reservations())
    }

    /// What a call holds (its CPUs) and what its new worker holds (memory and GPUs, and a worker place).
    fn reservations(
        self: &Arc<Self>,
        user: &str,
        demand: Resources,
        new_worker: bool,
    ) -> (Reservation, Option<Reservation>) {
        let call = Resources { cpus: demand.cpus, ..Resources::NONE };
        let worker = Resources { cpus: 0.0, ..demand };
        let reservation = |held, worker| Reservation { capacity: self.clone(), user: user.to_string(), held, worker };
        (reservation(call, false), new_worker.then(|| reservation(worker, true)))
    }

    /// Why `demand` of `user` does not fit now, if it does not.
    fn crowded(&self, state: &State, user: &str, demand: Resources, new_worker: bool) -> Option<Crowded> {
        let mine = state.users.get(user);
        let held = mine.map_or(Resources::NONE, |u| u.held);
        let workers = mine.map_or(0, |u| u.workers);
        if held.cpus + demand.cpus > self.per_user.cpus + 1e-9 {
            return Some(Crowded::UserBusy);
        }
        if new_worker
            && (workers >= self.sharing.max_workers_per_user
                || held.memory_bytes.saturating_add(demand.memory_bytes) > self.per_user.memory_bytes)
        {
            return Some(Crowded::ByOwnWorkers(user.to_string()));
        }
        if state.used.cpus + demand.cpus > self.total.cpus + 1e-9 {
            return Some(Crowded::ServerBusy);
        }
        (!state.used.within(demand, self.total, true)).then_some(Crowded::ByAnyone)
    }

    /// Hands what is free to waiting calls: the first waiting call of the user holding least goes first; a user
    /// at their own limit is passed over; the first call that does not fit the server stops the hand-out.
    fn grant_waiting(&self, state: &mut State) {
        loop {
            let mut candidates: Vec<(f64, u64, usize)> = Vec::new();
            let mut seen: Vec<&str> = Vec::new();
            for (index, waiter) in state.waiting.iter().enumerate() {
                if seen.contains(&waiter.user.as_str()) {
                    continue;
                }
                seen.push(&waiter.user);
                let held = state.users.get(&waiter.user).map_or(Resources::NONE, |u| u.held);
                candidates.push((held.share_of(self.total), waiter.ticket, index));
            }
            candidates.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let mut granted = false;
            for (_, _, index) in candidates {
                let waiter = &state.waiting[index];
                match self.crowded(state, &waiter.user, waiter.demand, waiter.worker) {
                    Some(crowded) if crowded.by_user() => continue,
                    Some(_) => return,
                    None => {
                        let waiter = state.waiting.remove(index);
                        state.take(&waiter.user, waiter.demand, waiter.worker);
                        if let Some(user) = state.users.get_mut(&waiter.user) {
                            user.queued_bytes = user.queued_bytes.saturating_sub(waiter.bytes);
                        }
                        // The receiver lives as long as the waiter's `Queued`, which takes the waiter out of the
                        // queue (under this lock) before it goes: a waiter still queued can always be told.
                        let _ = waiter.grant.send(());
                        granted = true;
                        break;
                    }
                }
            }
            if !granted {
                return;
            }
        }
    }

    fn release(&self, user: &str, held: Resources, worker: bool) {
        let mut state = self.lock();
        state.used.sub(held);
        if let Some(mine) = state.users.get_mut(user) {
            mine.held.sub(held);
            if worker {
                mine.workers = mine.workers.saturating_sub(1);
            }
        }
        state.forget_if_idle(user);
        self.grant_waiting(&mut state);
    }
}

impl State {
    /// Drops the books of a user with nothing held or queued.
    fn forget_if_idle(&mut self, user: &str) {
        if self.users.get(user).is_some_and(|u| u.workers == 0 && u.queued_bytes == 0 && u.held == Resources::NONE) {
            self.users.remove(user);
        }
    }

    fn take(&mut self, user: &str, demand: Resources, worker: bool) {
        self.used.add(demand);
        let mine = self.users.entry(user.to_string()).or_default();
        mine.held.add(demand);
        mine.workers += usize::from(worker);
    }
}

/// What one call (until it ends) or one worker (until it has stopped) holds; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    capacity: Arc<Capacity>,
    user: String,
    held: Resources,
    /// A worker's: it holds one of the user's worker places too.
    worker: bool,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.capacity.release(&self.user, self.held, self.worker);
    }
}

/// A call in the queue. Dropped before its turn (its client went away, its timeout passed), it leaves the queue;
/// dropped after its turn came but before it took the reservation, it gives the resources back.
struct Queued {
    capacity: Arc<Capacity>,
    ticket: u64,
    user: String,
    demand: Resources,
    worker: bool,
    reserved: bool,
}

impl Queued {
    fn into_reservations(mut self) -> (Reservation, Option<Reservation>) {
        self.reserved = true;
        self.capacity.reservations(&self.user, self.demand, self.worker)
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        if self.reserved {
            return;
        }
        let capacity = self.capacity.clone();
        let mut state = capacity.lock();
        match state.waiting.iter().position(|w| w.ticket == self.ticket) {
            Some(index) => {
                let waiter = state.waiting.remove(index);
                if let Some(user) = state.users.get_mut(&waiter.user) {
                    user.queued_bytes = user.queued_bytes.saturating_sub(waiter.bytes);
                }
                state.forget_if_idle(&waiter.user);
                // The call that left may have been the one whose turn it was.
                capacity.grant_waiting(&mut state);
            }
            None => {
                // Its turn came: give back what was taken for it, the call's part and the worker's.
                drop(state);
                let (call, worker) = capacity.reservations(&self.user, self.demand, self.worker);
                drop((call, worker));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use fal_engine::MachineTypes;

    const HOST: Resources = Resources { cpus: 2.0, memory_bytes: 24 << 30, gpus: 0 };

    fn capacity(sharing: Sharing) -> Arc<Capacity> {
        Arc::new(Capacity::new(HOST, sharing))
    }

    /// A call on a new worker: what both hold.
    async fn reserve(capacity: &Arc<Capacity>, user: &str, machine: &str) -> (Reservation, Option<Reservation>) {
        let types = MachineTypes::builtin();
        let machine = types.get(machine).unwrap();
        capacity.reserve(user, machine, true, 0, || (), |_| async { false }).await.unwrap()
    }

    async fn must_wait(capacity: &Arc<Capacity>, user: &str, machine: &str) {
        let waiting = tokio::time::timeout(Duration::from_millis(50), reserve(capacity, user, machine));
        assert!(waiting.await.is_err(), "{user}'s {machine} must wait");
    }

    #[test]
    fn a_maps_default_concurrency_is_what_one_users_share_holds() {
        let types = MachineTypes::builtin();
        let fitting = |sharing: Sharing, machine: &str| capacity(sharing).fitting(types.get(machine).unwrap());
        // 3/4 of 2 CPUs: six XS (0.25 CPU), three S (0.5 CPU), and one XL whose size is cut to the share.
        assert_eq!(fitting(Sharing::default(), "XS"), 6);
        assert_eq!(fitting(Sharing::default(), "S"), 3);
        assert_eq!(fitting(Sharing::default(), "XL"), 1);
        let capped = Sharing { max_workers_per_user: 4, ..Sharing::default() };
        assert_eq!(fitting(capped, "XS"), 4);
    }

    #[tokio::test]
    async fn one_user_holds_at_most_their_share_and_a_big_type_leaves_room_for_others() {
        let capacity = capacity(Sharing::default());
        // L (4 CPUs, 32 GB) on a 2-core, 24 GB server holds mallory's share: 1.5 CPUs, 18 GB.
        let large = reserve(&capacity, "mallory", "L").await;
        must_wait(&capacity, "mallory", "XS").await;
        // alice's small calls run beside it.
        let small = tokio::time::timeout(Duration::from_millis(50), reserve(&capacity, "alice", "XS")).await;
        let small = small.expect("alice's XS runs beside mallory's L");
        drop((large, small));
        assert!(capacity.never_fits(MachineTypes::builtin().get("GPU").unwrap()).unwrap().contains("has 0"));
    }

    #[tokio::test]
    async fn the_next_turn_goes_to_the_user_holding_least_and_leaving_the_queue_loses_nothing() {
        let capacity = capacity(Sharing { user_share: 1.0, ..Sharing::default() });
        let running = reserve(&capacity, "bob", "M").await; // the whole server
        let (order_tx, mut order) = tokio::sync::mpsc::unbounded_channel();
        let mut waiting = Vec::new();
        // bob queues three S calls first, then alice one.
        for (i, user) in ["bob", "bob", "bob", "alice"].into_iter().enumerate() {
            let (capacity, order_tx) = (capacity.clone(), order_tx.clone());
            waiting.push(tokio::spawn(async move {
                let held = reserve(&capacity, user, "S").await;
                order_tx.send(i).unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
                drop(held);
            }));
            tokio::task::yield_now().await;
        }
        let leaver = tokio::spawn({
            let capacity = capacity.clone();
            async move {
                let _never = reserve(&capacity, "carol", "M").await;
            }
        });
        tokio::task::yield_now().await;
        leaver.abort();
        let _ = leaver.await;
        // bob's M ends and its worker goes (a warm one would keep its memory, and alice, holding nothing, would
        // then go first).
        let (call, worker) = running;
        drop(worker);
        drop(call);
        for task in waiting {
            task.await.unwrap();
        }
        let mut started = Vec::new();
        while let Ok(i) = order.try_recv() {
            started.push(i);
        }
        // 2 CPUs hold four S: bob's first, then alice's (she holds nothing), then bob's others in order.
        assert_eq!(started, [0, 3, 1, 2]);
        let state = capacity.lock();
        assert_eq!((state.used, state.users.len(), state.waiting.len()), (Resources::NONE, 0, 0));
    }

    #[tokio::test]
    async fn queued_payloads_are_capped_per_user() {
        let capacity = capacity(Sharing { max_queued_bytes_per_user: 1000, ..Sharing::default() });
        let types = MachineTypes::builtin();
        let m = types.get("M").unwrap();
        let _running = reserve(&capacity, "bob", "M").await;
        let first = tokio::spawn({
            let capacity = capacity.clone();
            let m = m.clone();
            async move { capacity.reserve("bob", &m, true, 800, || (), |_| async { false }).await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let refused = capacity.reserve("bob", m, true, 800, || (), |_| async { false }).await.unwrap_err();
        assert!(matches!(refused, CapacityError::QueueFull { queued: 800, bytes: 800, limit: 1000, .. }));
        assert!(refused.to_string().contains("max_queued_gb_per_user"));
        first.abort();
        let _ = first.await;
        assert_eq!(capacity.lock().users.get("bob").map(|u| u.queued_bytes), Some(0));
    }

    #[tokio::test]
    async fn a_waiting_call_stops_idle_workers_to_make_room() {
        let capacity = capacity(Sharing { max_workers_per_user: 2, ..Sharing::default() });
        let types = MachineTypes::builtin();
        let xs = types.get("XS").unwrap();
        // Two idle (warm) workers of bob's hold his worker limit: what each holds once its call has ended.
        let worker = |(_call, worker): (Reservation, Option<Reservation>)| worker.unwrap();
        let idle = vec![worker(reserve(&capacity, "bob", "XS").await), worker(reserve(&capacity, "bob", "XS").await)];
        let idle = Arc::new(Mutex::new(idle));
        let asked = Arc::new(Mutex::new(Vec::new()));
        let (idle2, asked2) = (idle.clone(), asked.clone());
        let third = capacity.reserve(
            "bob",
            xs,
            true,
            0,
            || (),
            move |crowded| {
                asked2.lock().unwrap().push(crowded);
                let stopped = idle2.lock().unwrap().pop().is_some();
                async move { stopped }
            },
        );
        let third = tokio::time::timeout(Duration::from_secs(1), third).await.expect("room was made").unwrap();
        assert_eq!(asked.lock().unwrap().as_slice(), [Crowded::ByOwnWorkers("bob".into())]);
        assert_eq!(idle.lock().unwrap().len(), 1);
        drop(third);
    }

    #[tokio::test]
    async fn warm_workers_hold_memory_not_cpus() {
        let capacity = Arc::new(Capacity::new(
            Resources { cpus: 2.0, memory_bytes: 10 << 30, gpus: 0 },
            Sharing { user_share: 1.0, ..Sharing::default() },
        ));
        let types = MachineTypes::builtin();
        let m = types.get("M").unwrap(); // 2 CPUs, 8 GB
        let (call, worker) = reserve(&capacity, "bob", "M").await;
        drop(call); // the call ended; its worker stays warm
                    // A call on the warm worker needs only CPUs: it runs at once.
        let warm = capacity.reserve("bob", m, false, 0, || panic!("no wait"), |_| async { false }).await.unwrap();
        assert!(warm.1.is_none());
        drop(warm);
        // A second M worker does not fit beside the warm one's 8 GB: it waits, and asks for an idle worker to go.
        let asked = Arc::new(Mutex::new(Vec::new()));
        let worker = Arc::new(Mutex::new(worker));
        let (asked2, worker2) = (asked.clone(), worker.clone());
        let second = capacity.reserve(
            "carol",
            m,
            true,
            0,
            || (),
            move |crowded| {
                asked2.lock().unwrap().push(crowded);
                let stopped = worker2.lock().unwrap().take().is_some();
                async move { stopped }
            },
        );
        tokio::time::timeout(Duration::from_secs(1), second).await.expect("room was made").unwrap();
        assert_eq!(asked.lock().unwrap().as_slice(), [Crowded::ByAnyone]);
    }
}
