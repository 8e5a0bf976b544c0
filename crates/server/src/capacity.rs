//! The server's capacity: calls reserve their machine type's CPUs, memory and GPUs while they run; calls beyond
//! what is free wait their turn.
//!
//! GPUs are strict: a machine type needing more GPUs than the server has can never run and is refused at once.
//! CPUs and memory are ceilings for sharing: a machine type larger than the whole server (L on a 2-core host) still
//! runs, alone, with the whole server reserved for it.

use std::sync::Mutex;

use fal_engine::MachineType;
use tokio::sync::Notify;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resources {
    pub cpus: f64,
    pub memory_bytes: u64,
    pub gpus: u32,
}

impl Resources {
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
    used: Mutex<Resources>,
    freed: Notify,
}

/// Resources held by one running call; released when dropped.
#[derive(Debug)]
pub struct Reservation<'a> {
    capacity: &'a Capacity,
    held: Resources,
}

impl Capacity {
    pub fn new(total: Resources) -> Self {
        Self { total, used: Mutex::new(Resources { cpus: 0.0, memory_bytes: 0, gpus: 0 }), freed: Notify::new() }
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

    fn try_reserve(&self, demand: Resources) -> bool {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let fits = used.cpus + demand.cpus <= self.total.cpus + 1e-9
            && used.memory_bytes.saturating_add(demand.memory_bytes) <= self.total.memory_bytes
            && used.gpus + demand.gpus <= self.total.gpus;
        if fits {
            used.cpus += demand.cpus;
            used.memory_bytes += demand.memory_bytes;
            used.gpus += demand.gpus;
        }
        fits
    }

    /// Waits until `machine` fits, calling `on_wait` once if it has to wait. The caller must have checked
    /// [`Capacity::never_fits`].
    pub async fn reserve(&self, machine: &MachineType, on_wait: impl FnOnce()) -> Reservation<'_> {
        let demand = self.demand(machine);
        let mut on_wait = Some(on_wait);
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.try_reserve(demand) {
                return Reservation { capacity: self, held: demand };
            }
            if let Some(on_wait) = on_wait.take() {
                on_wait();
            }
            freed.await;
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        {
            let mut used = self.capacity.used.lock().unwrap_or_else(|e| e.into_inner());
            used.cpus = (used.cpus - self.held.cpus).max(0.0);
            used.memory_bytes = used.memory_bytes.saturating_sub(self.held.memory_bytes);
            used.gpus = used.gpus.saturating_sub(self.held.gpus);
        }
        self.capacity.freed.notify_waiters();
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
}
