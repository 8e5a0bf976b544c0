//! The server's capacity: calls reserve their machine type's CPUs, memory and GPUs while they run; calls beyond
//! what is free wait their turn.
//!
//! GPUs are strict: a machine type needing more GPUs than the server has can never run and is refused at once.
//! CPUs and memory are ceilings for sharing: a machine type larger than the whole server (L on a 2-core host) still
//! runs, alone, with the whole server reserved for it. Waiting calls get their turn in order of arrival.

use std::collections::VecDeque;
use std::sync::Mutex;

use fal_engine::MachineType;
use tokio::sync::oneshot;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resources {
    pub cpus: f64,
    pub memory_bytes: u64,
    pub gpus: u32,
}

impl Resources {
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
}

#[derive(Debug)]
pub struct Capacity {
    total: Resources,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    used: Resources,
    /// Calls waiting for room, in order of arrival; only the first may take what is freed.
    waiting: VecDeque<Waiter>,
    next_ticket: u64,
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    demand: Resources,
    grant: oneshot::Sender<()>,
}

impl State {
    fn fits(&self, demand: Resources, total: Resources) -> bool {
        self.used.cpus + demand.cpus <= total.cpus + 1e-9
            && self.used.memory_bytes.saturating_add(demand.memory_bytes) <= total.memory_bytes
            && self.used.gpus + demand.gpus <= total.gpus
    }

    fn take(&mut self, demand: Resources) {
        self.used.cpus += demand.cpus;
        self.used.memory_bytes += demand.memory_bytes;
        self.used.gpus += demand.gpus;
    }

    /// Gives back `held`, then hands what is free to waiting calls in order of arrival. The first waiter that does
    /// not fit stops the hand-out: a large call is never overtaken for ever by small ones.
    fn release(&mut self, held: Resources, total: Resources) {
        self.used.cpus = (self.used.cpus - held.cpus).max(0.0);
        self.used.memory_bytes = self.used.memory_bytes.saturating_sub(held.memory_bytes);
        self.used.gpus = self.used.gpus.saturating_sub(held.gpus);
        self.grant_waiting(total);
    }

    fn grant_waiting(&mut self, total: Resources) {
        while let Some(first) = self.waiting.front() {
            if !self.fits(first.demand, total) {
                break;
            }
            let Some(waiter) = self.waiting.pop_front() else { break };
            self.take(waiter.demand);
            // The receiver lives as long as the waiter's `Queued`, which takes the waiter out of the queue (under
            // this lock) before it goes: a waiter still queued can always be told.
            let _ = waiter.grant.send(());
        }
    }
}

/// Resources held by one running call; released when dropped.
#[derive(Debug)]
pub struct Reservation<'a> {
    capacity: &'a Capacity,
    held: Resources,
}

/// A call in the queue. Dropped before its turn (its client went away, its timeout passed), it leaves the queue; dropped
/// after its turn came but before it took the reservation, it gives the resources back.
struct Queued<'a> {
    capacity: &'a Capacity,
    ticket: u64,
    demand: Resources,
    reserved: bool,
}

impl<'a> Queued<'a> {
    fn into_reservation(mut self) -> Reservation<'a> {
        self.reserved = true;
        Reservation { capacity: self.capacity, held: self.demand }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.reserved {
            return;
        }
        let mut state = self.capacity.lock();
        let before = state.waiting.len();
        state.waiting.retain(|w| w.ticket != self.ticket);
        if state.waiting.len() == before {
            state.release(self.demand, self.capacity.total);
        } else {
            // The call that left may have been the first one that did not fit.
            state.grant_waiting(self.capacity.total);
        }
    }
}

impl Capacity {
    pub fn new(total: Resources) -> Self {
        let used = Resources { cpus: 0.0, memory_bytes: 0, gpus: 0 };
        Self { total, state: Mutex::new(State { used, waiting: VecDeque::new(), next_ticket: 0 }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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

    fn demand(&self, machine: &MachineType) -> Resources {
        Resources {
            cpus: machine.cpus.min(self.total.cpus),
            memory_bytes: machine.memory_bytes.min(self.total.memory_bytes),
            gpus: machine.gpus,
        }
    }

    /// Waits until `machine` fits and every call that arrived before has its turn, calling `on_wait` once if it
    /// has to wait. The caller must have checked [`Capacity::never_fits`].
    pub async fn reserve(&self, machine: &MachineType, on_wait: impl FnOnce()) -> Reservation<'_> {
        let demand = self.demand(machine);
        let (queued, turn) = {
            let mut state = self.lock();
            if state.waiting.is_empty() && state.fits(demand, self.total) {
                state.take(demand);
                return Reservation { capacity: self, held: demand };
            }
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            let (grant, turn) = oneshot::channel();
            state.waiting.push_back(Waiter { ticket, demand, grant });
            (Queued { capacity: self, ticket, demand, reserved: false }, turn)
        };
        on_wait();
        // The sender is only dropped by granting (see `State::grant_waiting`), so this returns at our turn.
        let _ = turn.await;
        queued.into_reservation()
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.capacity.lock().release(self.held, self.capacity.total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fal_engine::MachineTypes;

    #[tokio::test]
    async fn calls_beyond_capacity_wait_and_oversized_types_run_alone() {
        let types = MachineTypes::builtin();
        let capacity = Capacity::new(Resources { cpus: 2.0, memory_bytes: 24 << 30, gpus: 0 });
        let m = types.get("M").unwrap();
        let first = capacity.reserve(m, || panic!("the first M fits")).await;
        let mut waited = false;
        let second = tokio::time::timeout(std::time::Duration::from_millis(50), capacity.reserve(m, || waited = true));
        assert!(second.await.is_err(), "a second M must wait while the first holds both cores");
        assert!(waited);
        drop(first);
        let large = capacity.reserve(types.get("L").unwrap(), || panic!("L fits an idle server")).await;
        drop(large);
        assert!(capacity.never_fits(types.get("GPU").unwrap()).unwrap().contains("this server has 0"));
        assert!(capacity.never_fits(types.get("XS").unwrap()).is_none());
    }

    #[tokio::test]
    async fn waiting_calls_get_their_turn_in_order_of_arrival_and_leaving_the_queue_loses_nothing() {
        let types = MachineTypes::builtin();
        let (m, s) = (types.get("M").unwrap(), types.get("S").unwrap());
        let capacity = std::sync::Arc::new(Capacity::new(Resources { cpus: 2.0, memory_bytes: 24 << 30, gpus: 0 }));
        let running = capacity.reserve(m, || panic!("fits")).await;
        let (order_tx, mut order) = tokio::sync::mpsc::unbounded_channel();
        let mut waiting = Vec::new();
        for i in 0..4 {
            let (capacity, order_tx) = (capacity.clone(), order_tx.clone());
            let machine = if i == 1 { m.clone() } else { s.clone() };
            waiting.push(tokio::spawn(async move {
                let held = capacity.reserve(&machine, || ()).await;
                order_tx.send(i).unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                drop(held);
            }));
            tokio::task::yield_now().await; // arrive one after the other
        }
        // One more that arrives, then leaves before its turn (its client went away).
        let leaver = tokio::spawn({
            let (capacity, machine) = (capacity.clone(), s.clone());
            async move {
                let _never = capacity.reserve(&machine, || ()).await;
            }
        });
        tokio::task::yield_now().await;
        leaver.abort();
        drop(running);
        for task in waiting {
            task.await.unwrap();
        }
        let mut started = Vec::new();
        while let Ok(i) = order.try_recv() {
            started.push(i);
        }
        assert_eq!(started, [0, 1, 2, 3], "turns follow arrival, the M (1) included");
        // Everything came back: the whole server fits again, at once.
        let l = types.get("L").unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), capacity.reserve(l, || panic!("must not wait")))
            .await
            .unwrap();
    }
}
