//! GPUs assigned exclusively: a worker of a GPU machine type holds its own GPU(s) for its whole life, busy or warm,
//! and gives them back when it stops. A worker that needs GPUs while all are held waits for one to be given back,
//! within its call's timeout.
//!
//! Which GPUs a worker has reaches CUDA as `CUDA_VISIBLE_DEVICES`, with `CUDA_DEVICE_ORDER=PCI_BUS_ID` set too:
//! CUDA's default order (fastest first) is not the driver's, so without it an index could name another GPU.
//! * The GPUs' UUIDs where the driver reports them: they name one GPU whatever CUDA can see and in whatever order.
//! * Otherwise, in the jail, `0..n-1`: the jail shows the worker its own GPUs alone, which CUDA numbers from 0 in
//!   bus order.
//! * Otherwise (unjailed: the local host, or a server that is not root) their indices in bus order among all of this
//!   host's GPUs, which is how CUDA numbers them under `PCI_BUS_ID`. Unjailed, this is the only thing keeping a
//!   worker on its own GPUs: its process could still open any of the host's.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fal_sandbox::{GpuGrant, NvidiaGpus};
use tokio::sync::Notify;

/// This host's GPUs and which of them workers hold.
#[derive(Debug)]
pub(crate) struct GpuAssignment {
    gpus: NvidiaGpus,
    /// One flag per GPU of `gpus`, in the same (bus) order: held by a worker.
    held: Mutex<Vec<bool>>,
    /// Told whenever GPUs are given back.
    freed: Notify,
}

/// GPUs held by one worker; given back when dropped (once the worker's processes are gone).
#[derive(Debug)]
pub(crate) struct GpuLease {
    assignment: Arc<GpuAssignment>,
    indices: Vec<usize>,
}

/// Why a worker got no GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum GpuWaitError {
    /// More than this host has: no wait would help.
    TooMany { needed: usize, total: usize },
    /// None came free within the wait.
    TimedOut { needed: usize, total: usize, waited: Duration },
}

impl GpuAssignment {
    pub fn new(gpus: NvidiaGpus) -> Arc<Self> {
        let held = Mutex::new(vec![false; gpus.len()]);
        Arc::new(Self { gpus, held, freed: Notify::new() })
    }

    pub fn total(&self) -> usize {
        self.gpus.len()
    }

    fn held(&self) -> MutexGuard<'_, Vec<bool>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `count` free GPUs, taken now (the first free ones in bus order), if that many are free.
    pub fn try_take(self: &Arc<Self>, count: usize) -> Option<GpuLease> {
        let mut held = self.held();
        let free: Vec<usize> = (0..held.len()).filter(|&i| !held[i]).take(count).collect();
        if free.len() < count {
            return None;
        }
        for &i in &free {
            held[i] = true;
        }
        Some(GpuLease { assignment: self.clone(), indices: free })
    }

    /// `count` GPUs for a worker, waiting for others to be given back if they are all held, for at most `wait`
    /// (`None`: as long as it takes). `on_wait` is called once, if it has to wait.
    pub async fn take(
        self: &Arc<Self>,
        count: usize,
        wait: Option<Duration>,
        on_wait: impl FnOnce(),
    ) -> Result<GpuLease, GpuWaitError> {
        let total = self.total();
        if count > total {
            return Err(GpuWaitError::TooMany { needed: count, total });
        }
        let deadline = wait.map(|wait| tokio::time::Instant::now() + wait);
        let mut on_wait = Some(on_wait);
        loop {
            // Registered before looking, so GPUs given back between the look and the wait still wake us.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(lease) = self.try_take(count) {
                return Ok(lease);
            }
            if let Some(on_wait) = on_wait.take() {
                on_wait();
            }
            match deadline {
                Some(deadline) => {
                    if tokio::time::timeout_at(deadline, freed).await.is_err() {
                        let waited = wait.unwrap_or_default();
                        return Err(GpuWaitError::TimedOut { needed: count, total, waited });
                    }
                }
                None => freed.await,
            }
        }
    }
}

impl GpuLease {
    /// What the jail grants a worker holding these GPUs.
    pub fn grant(&self) -> GpuGrant {
        self.assignment.gpus.grant(&self.indices)
    }

    /// `CUDA_VISIBLE_DEVICES` for a worker holding these GPUs (the module doc says why each form).
    pub fn cuda_visible_devices(&self, jailed: bool) -> String {
        let gpus = self.assignment.gpus.gpus();
        let uuids: Option<Vec<&str>> = self.indices.iter().map(|&i| gpus.get(i)?.uuid.as_deref()).collect();
        let names: Vec<String> = match uuids {
            Some(uuids) => uuids.into_iter().map(str::to_string).collect(),
            None if jailed => (0..self.indices.len()).map(|i| i.to_string()).collect(),
            None => self.indices.iter().map(|i| i.to_string()).collect(),
        };
        names.join(",")
    }

    /// For logs: `GPU 0000:18:00.0 (NVIDIA H200)`, one per GPU.
    pub fn describe(&self) -> String {
        let gpus = self.assignment.gpus.gpus();
        let names: Vec<String> = self
            .indices
            .iter()
            .filter_map(|&i| gpus.get(i))
            .map(|gpu| format!("GPU {} ({})", gpu.bus_id, gpu.model))
            .collect();
        names.join(", ")
    }
}

impl Drop for GpuLease {
    fn drop(&mut self) {
        {
            let mut held = self.assignment.held();
            for &i in &self.indices {
                if let Some(flag) = held.get_mut(i) {
                    *flag = false;
                }
            }
        }
        self.assignment.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// A fake driver tree with GPUs at these (bus id, minor, uuid); an empty uuid: not known yet.
    fn fake(gpus: &[(&str, u32, &str)]) -> (tempfile::TempDir, Arc<GpuAssignment>) {
        let root = tempfile::tempdir().expect("temp dir");
        let driver = root.path().join("nvidia");
        for (bus, minor, uuid) in gpus {
            let dir = driver.join("gpus").join(bus);
            std::fs::create_dir_all(&dir).expect("fake /proc entry");
            let uuid = if uuid.is_empty() { "GPU-????????-????-????-????-????????????" } else { uuid };
            let info = format!("Model: \t\t NVIDIA H200\nGPU UUID: \t {uuid}\nDevice Minor: \t {minor}\n");
            std::fs::write(dir.join("information"), info).expect("fake information");
        }
        let gpus = NvidiaGpus::discover_at(&driver, Path::new("/nonexistent/dev"), Path::new("/nonexistent/sys"));
        (root, GpuAssignment::new(gpus))
    }

    #[tokio::test]
    async fn two_workers_never_share_a_gpu() {
        let (_root, gpus) = fake(&[("0000:18:00.0", 0, ""), ("0000:28:00.0", 1, "")]);
        let first = gpus.take(1, None, || panic!("a GPU is free")).await.unwrap();
        let second = gpus.take(1, None, || panic!("a GPU is free")).await.unwrap();
        assert_ne!(first.indices, second.indices);
        assert!(gpus.try_take(1).is_none(), "both GPUs are held");
        // Unjailed, each sees its own GPU by its bus-order index; jailed, as the only one (0).
        assert_eq!((first.cuda_visible_devices(false), second.cuda_visible_devices(false)), ("0".into(), "1".into()));
        assert_eq!(second.cuda_visible_devices(true), "0");
        assert_eq!(second.describe(), "GPU 0000:28:00.0 (NVIDIA H200)");
        drop(first);
        let third = gpus.try_take(1).expect("the GPU given back is free again");
        assert_eq!(third.indices, [0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_waits_for_a_gpu_to_be_given_back() {
        let (_root, gpus) = fake(&[("0000:18:00.0", 0, "GPU-1111")]);
        let held = gpus.take(1, None, || ()).await.unwrap();
        let waiter = {
            let gpus = gpus.clone();
            tokio::spawn(async move {
                let mut waited = false;
                let lease = gpus.take(1, Some(Duration::from_secs(600)), || waited = true).await;
                (lease, waited)
            })
        };
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!waiter.is_finished(), "the only GPU is held");
        drop(held);
        let (lease, waited) = waiter.await.unwrap();
        let lease = lease.expect("the GPU given back");
        assert!(waited);
        assert_eq!(lease.cuda_visible_devices(true), "GPU-1111");
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_runs_out_says_so_and_takes_nothing() {
        let (_root, gpus) = fake(&[("0000:18:00.0", 0, ""), ("0000:28:00.0", 1, "")]);
        let one = gpus.take(1, None, || ()).await.unwrap();
        // Two GPUs wanted, one free: the free one is not kept while waiting for the other.
        let error = gpus.take(2, Some(Duration::from_secs(30)), || ()).await.unwrap_err();
        assert_eq!(error, GpuWaitError::TimedOut { needed: 2, total: 2, waited: Duration::from_secs(30) });
        assert!(gpus.try_take(1).is_some(), "the free GPU stayed free");
        drop(one);
    }

    #[tokio::test]
    async fn more_gpus_than_the_host_has_are_refused_at_once() {
        let (_root, gpus) = fake(&[("0000:18:00.0", 0, "")]);
        let error = gpus.take(2, None, || panic!("no wait can help")).await.unwrap_err();
        assert_eq!(error, GpuWaitError::TooMany { needed: 2, total: 1 });
        let (_root, none) = fake(&[]);
        assert_eq!(none.take(1, None, || ()).await.unwrap_err(), GpuWaitError::TooMany { needed: 1, total: 0 });
    }

    #[tokio::test]
    async fn a_worker_with_several_gpus_holds_them_all() {
        let (_root, gpus) =
            fake(&[("0000:18:00.0", 0, "GPU-a"), ("0000:28:00.0", 1, "GPU-b"), ("0000:38:00.0", 2, "")]);
        let pair = gpus.take(2, None, || ()).await.unwrap();
        assert_eq!(pair.cuda_visible_devices(true), "GPU-a,GPU-b");
        let last = gpus.try_take(1).expect("the third GPU");
        // Its UUID is not known yet: unjailed it is named by its index among the host's GPUs.
        assert_eq!(last.cuda_visible_devices(false), "2");
        assert!(gpus.try_take(1).is_none());
        drop(pair);
        assert_eq!(gpus.try_take(2).expect("both given back").indices, [0, 1]);
    }
}
