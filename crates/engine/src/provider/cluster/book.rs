//! What the cluster says of the jobs someone waits on. One observer per provider (a poll of the cluster's queue, or
//! a watch) keeps it current for all of them; starts waiting for their job to run, and workers whose connection
//! closed waiting to learn why, read it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Notify};

/// A job's state, as its provider words it for a user.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum JobState {
    /// Submitted; the cluster has not been asked since.
    Submitted,
    /// Waiting for resources: `PENDING (Resources)`, `Pending: 0/1 nodes are available: Insufficient cpu`.
    Waiting { reason: String },
    /// Started on `node`.
    Running { node: Option<String> },
    /// Over.
    Ended(Ending),
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Ending {
    pub cause: EndCause,
    /// Where it ran, if the cluster says.
    pub node: Option<String>,
    /// The cluster's own words: `CANCELLED by 0`, `OOMKilled`.
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndCause {
    /// Killed for exceeding its memory limit.
    OutOfMemory,
    /// Its node failed or went away.
    NodeLost,
    /// Cancelled or deleted by someone else (an admin, an eviction).
    Cancelled,
    /// It could not start at all (an image that cannot be pulled): the detail says why.
    Unstartable,
    /// Ended otherwise (exited, or the cluster no longer knows it).
    Other,
}

/// The states of the jobs being waited on.
#[derive(Debug, Default)]
pub(crate) struct JobBook {
    /// Each followed job's state, and how many follow it.
    jobs: Mutex<HashMap<String, (watch::Sender<JobState>, usize)>>,
    /// Why the cluster could not be asked, while it cannot (slurmctld timing out, say); `None` once it answers.
    trouble: watch::Sender<Option<String>>,
    /// Wakes the observer when the first job is followed.
    followed: Notify,
    /// Jobs the cluster said are over or going (a pod being deleted), followed or not, where its observer sees every
    /// job (a watch): a warm worker of one is not handed a call.
    gone: Mutex<HashSet<String>>,
}

impl JobBook {
    /// Follows `id` until the returned guard is dropped.
    pub fn follow(self: &Arc<Self>, id: &str) -> Following {
        let state = {
            let mut jobs = self.jobs();
            let (sender, followers) =
                jobs.entry(id.to_string()).or_insert_with(|| (watch::channel(JobState::Submitted).0, 0));
            *followers += 1;
            sender.subscribe()
        };
        self.followed.notify_one();
        Following { book: self.clone(), id: id.to_string(), state, trouble: self.trouble.subscribe() }
    }

    /// The jobs someone follows now.
    pub fn followed(&self) -> Vec<String> {
        self.jobs().keys().cloned().collect()
    }

    /// Resolves once some job is followed (at once if one is).
    pub async fn until_followed(&self) {
        let notified = self.followed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.jobs().is_empty() {
            notified.await;
        }
    }

    /// Records what the cluster said of `id` (nothing if nobody follows it).
    pub fn record(&self, id: &str, state: JobState) {
        if let Some((sender, _)) = self.jobs().get(id) {
            sender.send_if_modified(|known| {
                let changed = *known != state && !matches!(known, JobState::Ended(_));
                if changed {
                    *known = state;
                }
                changed
            });
        }
    }

    /// Records that the cluster could not be asked (`Some`), or answered again (`None`).
    pub fn trouble(&self, why: Option<String>) {
        self.trouble.send_if_modified(|known| {
            let changed = *known != why;
            *known = why;
            changed
        });
    }

    /// Records that `id` is over or going.
    pub fn gone(&self, id: &str) {
        self.gone_jobs().insert(id.to_string());
    }

    /// Whether the cluster said `id` is over or going.
    pub fn is_gone(&self, id: &str) -> bool {
        self.gone_jobs().contains(id)
    }

    /// Forgets `id` (its worker is gone too).
    pub fn forget(&self, id: &str) {
        self.gone_jobs().remove(id);
    }

    fn gone_jobs(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.gone.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, (watch::Sender<JobState>, usize)>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One job followed: its state, and the cluster's trouble, as they change.
#[derive(Debug)]
pub(crate) struct Following {
    book: Arc<JobBook>,
    id: String,
    pub state: watch::Receiver<JobState>,
    pub trouble: watch::Receiver<Option<String>>,
}

/// Waits for what `receiver` holds to change from what it last saw, and returns it.
pub(crate) async fn next_change<T: Clone>(receiver: &mut watch::Receiver<T>) -> T {
    if receiver.changed().await.is_err() {
        // The book holds the sender while anyone follows; a closed channel would be a bug, not an end.
        std::future::pending::<()>().await;
    }
    receiver.borrow_and_update().clone()
}

impl Drop for Following {
    fn drop(&mut self) {
        let mut jobs = self.book.jobs();
        if let Some((_, followers)) = jobs.get_mut(&self.id) {
            *followers -= 1;
            if *followers == 0 {
                jobs.remove(&self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_see_changes_and_an_end_is_final() {
        let book = Arc::new(JobBook::default());
        let mut job = book.follow("7");
        assert_eq!(book.followed(), ["7"]);
        book.record("7", JobState::Waiting { reason: "PENDING (Resources)".into() });
        assert_eq!(next_change(&mut job.state).await, JobState::Waiting { reason: "PENDING (Resources)".into() });
        let end = Ending { cause: EndCause::Cancelled, node: None, detail: "CANCELLED by 0".into() };
        book.record("7", JobState::Ended(end.clone()));
        book.record("7", JobState::Running { node: None });
        assert_eq!(*job.state.borrow_and_update(), JobState::Ended(end), "nothing comes after an end");
        book.record("8", JobState::Running { node: None });
        assert_eq!(book.followed(), ["7"], "a job nobody follows is not recorded");
        let second = book.follow("7");
        assert!(matches!(*second.state.borrow(), JobState::Ended(_)), "a later follower sees the state as it is");
        drop(job);
        assert_eq!(book.followed(), ["7"], "followed while one still follows");
        drop(second);
        assert!(book.followed().is_empty());
    }

    #[tokio::test]
    async fn the_observer_wakes_when_a_job_is_followed() {
        let book = Arc::new(JobBook::default());
        let waiting = tokio::spawn({
            let book = book.clone();
            async move { book.until_followed().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        let _job = book.follow("1");
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.unwrap().unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), book.until_followed()).await.unwrap();
    }

    #[tokio::test]
    async fn trouble_is_told_once_and_its_end_too() {
        let book = Arc::new(JobBook::default());
        let mut job = book.follow("1");
        book.trouble(Some("squeue: Socket timed out".into()));
        book.trouble(Some("squeue: Socket timed out".into()));
        assert_eq!(next_change(&mut job.trouble).await.as_deref(), Some("squeue: Socket timed out"));
        book.trouble(None);
        assert_eq!(next_change(&mut job.trouble).await, None);
    }
}
