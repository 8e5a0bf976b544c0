//! Prometheus metrics at `GET /metrics` (OpenMetrics text): counted as things happen (runs ending, builds, cold
//! starts, webhook deliveries) and read at each scrape from what the server holds now (workers, replicas, the queue,
//! capacity).
//!
//! The scrape takes an admin key (`Authorization: Key <id>:<secret>`), or none with `[metrics] public = true`.
//!
//! Runs are counted from the run history's end events (`crate::runs`), one seam for every kind: calls (`call`,
//! `activation`) and requests to apps (`web`, `queue`).

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::capacity::Resources;
use crate::runs::Ended;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    kind: String,
    outcome: String,
    machine_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
    machine_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MachineLabels {
    machine_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    state: String,
    machine_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppLabels {
    user: String,
    app: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    resource: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Seconds, from a millisecond to about 9 hours: calls, requests, builds and cold starts all fit.
fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 25))
}

/// What one scrape reads of the server's state now.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Per worker: its machine type and whether it is busy.
    pub workers: Vec<(String, bool)>,
    /// Per app alias: its owner, its name, its ready and starting replicas and the most it may have.
    pub replicas: Vec<(String, String, u32, u32)>,
    /// Requests in the queue not yet handed to a replica.
    pub queue_depth: u64,
    pub reserved: Resources,
    pub total: Resources,
}

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    runs: Family<RunLabels, Counter>,
    run_seconds: Histograms<KindLabels>,
    queue_wait_seconds: Histogram,
    cold_starts: Family<MachineLabels, Counter>,
    cold_start_seconds: Histograms<MachineLabels>,
    builds: Family<OutcomeLabels, Counter>,
    build_seconds: Histogram,
    webhooks: Family<OutcomeLabels, Counter>,
    // Read at each scrape: one scrape at a time sets and encodes them.
    scrape: Mutex<()>,
    workers: Family<WorkerLabels, Gauge>,
    replicas: Family<AppLabels, Gauge>,
    queue_depth: Gauge,
    reserved: Family<ResourceLabels, Gauge<f64, AtomicU64>>,
    total: Family<ResourceLabels, Gauge<f64, AtomicU64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fal");
        let this = Self {
            runs: Family::default(),
            run_seconds: Family::new_with_constructor(seconds),
            queue_wait_seconds: seconds(),
            cold_starts: Family::default(),
            cold_start_seconds: Family::new_with_constructor(seconds),
            builds: Family::default(),
            build_seconds: seconds(),
            webhooks: Family::default(),
            scrape: Mutex::new(()),
            workers: Family::default(),
            replicas: Family::default(),
            queue_depth: Gauge::default(),
            reserved: Family::default(),
            total: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "runs",
            "Runs ended, by kind (call, activation: function calls; web, queue: requests to apps), outcome and \
             machine type",
            this.runs.clone(),
        );
        registry.register_with_unit(
            "run_duration",
            "Runs from arrival to end (waiting for room and a worker included)",
            Unit::Seconds,
            this.run_seconds.clone(),
        );
        registry.register_with_unit(
            "queue_wait",
            "Queued requests from arrival until a replica took them",
            Unit::Seconds,
            this.queue_wait_seconds.clone(),
        );
        registry.register("cold_starts", "Workers started for a call, by machine type", this.cold_starts.clone());
        registry.register_with_unit(
            "cold_start_duration",
            "Worker starts (its environment ready) until it could take the call",
            Unit::Seconds,
            this.cold_start_seconds.clone(),
        );
        registry.register("environment_builds", "Environment builds, by outcome (ok, failed)", this.builds.clone());
        registry.register_with_unit(
            "environment_build_duration",
            "Environment builds",
            Unit::Seconds,
            this.build_seconds.clone(),
        );
        registry.register(
            "webhook_deliveries",
            "Webhook delivery attempts, by outcome (delivered, retrying, failed: given up)",
            this.webhooks.clone(),
        );
        registry.register("workers", "Live workers, by state (idle, busy) and machine type", this.workers.clone());
        registry.register("app_replicas", "Replicas of each app (ready or starting)", this.replicas.clone());
        registry.register("queue_depth", "Queued requests not yet taken by a replica", this.queue_depth.clone());
        registry.register(
            "capacity_reserved",
            "What calls and workers hold of the server's capacity (cpus, memory_bytes, gpus)",
            this.reserved.clone(),
        );
        registry.register("capacity_total", "The server's capacity (cpus, memory_bytes, gpus)", this.total.clone());
        Self { registry, ..this }
    }
}

impl Metrics {
    /// A run ended (as the history records it).
    pub fn run_ended(&self, ended: &Ended) {
        let run = &ended.run;
        let outcome = ended.outcome.parts().0.to_string();
        let machine_type = run.machine_type.clone();
        self.runs
            .get_or_create(&RunLabels { kind: run.kind.into(), outcome, machine_type: machine_type.clone() })
            .inc();
        let took = (ended.finished_ms - run.queued_ms).max(0) as f64 / 1000.0;
        self.run_seconds.get_or_create(&KindLabels { kind: run.kind.into(), machine_type }).observe(took);
        if let (Some(started), "queue") = (ended.started_ms, run.kind) {
            self.queue_wait_seconds.observe((started - run.queued_ms).max(0) as f64 / 1000.0);
        }
    }

    /// A webhook delivery attempt: `delivered`, `retrying` or `failed`.
    pub fn webhook_attempt(&self, outcome: &str) {
        self.webhooks.get_or_create(&OutcomeLabels { outcome: outcome.into() }).inc();
    }

    /// The metrics in the OpenMetrics text format, with `snapshot` as the state now.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let _one_scrape = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        self.workers.clear();
        for (machine_type, busy) in &snapshot.workers {
            let state = if *busy { "busy" } else { "idle" };
            self.workers.get_or_create(&WorkerLabels { state: state.into(), machine_type: machine_type.clone() }).inc();
        }
        self.replicas.clear();
        for (user, app, ready, starting) in &snapshot.replicas {
            let labels = AppLabels { user: user.clone(), app: app.clone() };
            self.replicas.get_or_create(&labels).set(i64::from(ready + starting));
        }
        self.queue_depth.set(snapshot.queue_depth as i64);
        for (family, resources) in [(&self.reserved, &snapshot.reserved), (&self.total, &snapshot.total)] {
            for (resource, value) in [
                ("cpus", resources.cpus),
                ("memory_bytes", resources.memory_bytes as f64),
                ("gpus", f64::from(resources.gpus)),
            ] {
                family.get_or_create(&ResourceLabels { resource: resource.into() }).set(value);
            }
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

impl fal_engine::Observer for Metrics {
    fn environment_built(&self, ok: bool, took: Duration) {
        self.builds.get_or_create(&OutcomeLabels { outcome: if ok { "ok" } else { "failed" }.into() }).inc();
        self.build_seconds.observe(took.as_secs_f64());
    }

    fn worker_started(&self, machine_type: &str, took: Duration) {
        let labels = MachineLabels { machine_type: machine_type.into() };
        self.cold_starts.get_or_create(&labels).inc();
        self.cold_start_seconds.get_or_create(&labels).observe(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use fal_engine::Observer;

    use super::*;
    use crate::runs::{NewRun, Outcome};

    fn ended(kind: &'static str, outcome: Outcome, queued_ms: i64, started_ms: i64, finished_ms: i64) -> Ended {
        Ended {
            run: NewRun {
                id: "r".into(),
                user_id: "u".into(),
                kind,
                machine_type: "XS".into(),
                queued_ms,
                ..Default::default()
            },
            started_ms: Some(started_ms),
            finished_ms,
            worker: String::new(),
            outcome,
            logs: "[]".into(),
            logs_truncated: false,
        }
    }

    #[test]
    fn runs_builds_starts_and_the_state_now_are_rendered() {
        let metrics = Metrics::default();
        metrics.run_ended(&ended("call", Outcome::Success, 0, 10, 1500));
        metrics.run_ended(&ended("call", Outcome::Success, 0, 10, 20));
        metrics.run_ended(&ended("queue", Outcome::error("raised", "no"), 0, 4000, 5000));
        metrics.environment_built(true, Duration::from_millis(900));
        metrics.worker_started("XS", Duration::from_millis(120));
        metrics.webhook_attempt("delivered");
        let snapshot = Snapshot {
            workers: vec![("XS".into(), true), ("XS".into(), false), ("XS".into(), false)],
            replicas: vec![("u".into(), "app".into(), 2, 1)],
            queue_depth: 7,
            reserved: Resources { cpus: 0.5, memory_bytes: 1 << 30, gpus: 0 },
            total: Resources { cpus: 2.0, memory_bytes: 4 << 30, gpus: 1 },
        };
        let text = metrics.render(&snapshot);
        for line in [
            "fal_runs_total{kind=\"call\",outcome=\"success\",machine_type=\"XS\"} 2",
            "fal_runs_total{kind=\"queue\",outcome=\"error\",machine_type=\"XS\"} 1",
            "fal_run_duration_seconds_count{kind=\"call\",machine_type=\"XS\"} 2",
            "fal_queue_wait_seconds_sum 4.0",
            "fal_cold_starts_total{machine_type=\"XS\"} 1",
            "fal_environment_builds_total{outcome=\"ok\"} 1",
            "fal_webhook_deliveries_total{outcome=\"delivered\"} 1",
            "fal_workers{state=\"idle\",machine_type=\"XS\"} 2",
            "fal_workers{state=\"busy\",machine_type=\"XS\"} 1",
            "fal_app_replicas{user=\"u\",app=\"app\"} 3",
            "fal_queue_depth 7",
            "fal_capacity_total{resource=\"cpus\"} 2.0",
            "fal_capacity_reserved{resource=\"memory_bytes\"} 1073741824.0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
        // Gauges are the state now: a worker gone is gone from the next scrape.
        let text = metrics.render(&Snapshot::default());
        assert!(!text.contains("fal_workers{"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
