//! The server's own web pages and probes, on the gateway's port:
//!
//! * the dashboard (`/`, `/workers`, `/runs`, `/apps`, `/schedules`, `/environments`, `/keys`, `/secrets`): plain
//!   HTML rendered here from templates compiled into the binary (`templates/dashboard/`, HTML-escaped by askama),
//!   with a few lines of JavaScript of our own (`static/dashboard.js`: a run's live log, by server-sent events) and
//!   no library. Signed in with a key (`session.rs`): a user sees their own things, an admin everyone's;
//! * `GET /metrics`: Prometheus metrics (`crate::metrics`), for an admin key or, with `[metrics] public = true`, anyone;
//! * `GET /healthz` (the process answers) and `GET /readyz` (it can serve: SQLite writable, the data dir writable,
//!   the jail available where the server jails workers).
//!
//! A request to an app by host name (`<user>-<alias>.gateway.<host>`) never reaches these pages: it goes to the app.

mod health;
mod pages;
pub mod session;

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::capacity::Capacity;
use crate::gateway::{json_error, Gateway};
use crate::metrics::{Metrics, Snapshot};
use crate::store::{Caller, Scope, Store};

/// What the pages and probes read.
#[derive(Debug)]
pub struct Console {
    pub controller: crate::service::Controller,
    pub gateway: Arc<Gateway>,
    pub keys: Arc<Store>,
    pub capacity: Arc<Capacity>,
    pub metrics: Arc<Metrics>,
    pub queue: Arc<crate::queue::store::QueueStore>,
    pub sessions: session::Sessions,
    pub data_dir: PathBuf,
    /// Where environments are (the data dir, or Slurm's shared dir).
    pub environments_dir: PathBuf,
    /// The server jails workers: `/readyz` checks the jail is still there.
    pub jailed: bool,
    /// Workers have cgroups of their own on this host (jailed, local provider): the workers page reads their use.
    pub local_cgroups: bool,
    pub metrics_public: bool,
    /// The port serves TLS: the session cookie is `Secure`.
    pub tls: bool,
}

/// The dashboard's routes, `/metrics`, `/healthz` and `/readyz`.
pub fn routes(console: Arc<Console>) -> Router {
    let pages = Router::new()
        .route("/", get(pages::home))
        .route("/login", get(pages::login_form).post(pages::login))
        .route("/logout", post(pages::logout))
        .route("/workers", get(pages::workers))
        .route("/workers/{pid}/stop", post(pages::stop_worker))
        .route("/runs", get(pages::runs))
        .route("/runs/{id}", get(pages::run))
        .route("/runs/{id}/events", get(pages::run_events))
        .route("/apps", get(pages::apps))
        .route("/schedules", get(pages::schedules))
        .route("/environments", get(pages::environments))
        .route("/environments/{user}/{key}/remove", post(pages::remove_environment))
        .route("/keys", get(pages::keys).post(pages::create_key))
        .route("/keys/{id}/revoke", post(pages::revoke_key))
        .route("/secrets", get(pages::secrets))
        .route("/static/dashboard.css", get(pages::css))
        .route("/static/dashboard.js", get(pages::js))
        .route("/metrics", get(metrics))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz));
    pages.layer(axum::middleware::from_fn_with_state(console.clone(), apps_by_host_first)).with_state(console)
}

/// Apps named by the host keep every path: their requests go to the gateway, not to these pages.
async fn apps_by_host_first(State(console): State<Arc<Console>>, request: Request, next: Next) -> Response<Body> {
    if crate::gateway::app_named_by_host(&console.gateway, request.headers()).await.is_some() {
        return crate::gateway::by_host_or_not_found(State(console.gateway.clone()), request).await;
    }
    next.run(request).await
}

impl Console {
    /// Who a request's session (cookie) is signed in as, checked against the key store now.
    fn signed_in(&self, headers: &http::HeaderMap) -> Option<(String, session::Session, Caller)> {
        let (id, session) = self.sessions.of(headers, self.tls)?;
        match self.keys.verify(&session.key_id, &session.key_secret) {
            Ok(caller) if caller.depth == 0 => Some((id, session, caller)),
            // The database did not answer: the session stays for the next request.
            Err(crate::store::StoreError::Database(error)) => {
                tracing::warn!(%error, "dashboard: cannot check a session's key");
                None
            }
            _ => {
                // Its key was revoked (or is no longer one that may sign in): the session ends with it.
                self.sessions.remove(&id);
                None
            }
        }
    }

    /// What the server holds now, for a scrape.
    async fn snapshot(&self) -> Snapshot {
        let engine = &self.controller.engine;
        let workers = engine.workers().into_iter().map(|w| (w.machine_type, w.busy)).collect();
        let admin = Caller { user_id: String::new(), key_id: String::new(), scope: Scope::Admin, depth: 0 };
        let replicas = match self.controller.apps.aliases(&admin).await {
            Ok(aliases) => aliases
                .into_iter()
                .map(|a| {
                    (a.revision.user_id.clone(), a.revision.name().to_string(), a.replicas.ready, a.replicas.starting)
                })
                .collect(),
            Err(error) => {
                tracing::warn!(%error, "metrics: cannot list apps");
                Vec::new()
            }
        };
        let queue = self.queue.clone();
        let queue_depth = tokio::task::spawn_blocking(move || queue.depth(None)).await.ok().and_then(Result::ok);
        let (reserved, total) = self.capacity.usage();
        Snapshot { workers, replicas, queue_depth: queue_depth.unwrap_or(0), reserved, total }
    }
}

/// `GET /metrics`: the OpenMetrics text, for an admin key (or anyone, with `[metrics] public = true`).
async fn metrics(State(console): State<Arc<Console>>, headers: http::HeaderMap) -> Response<Body> {
    if !console.metrics_public {
        let caller =
            match console.gateway.caller(&headers) {
                Ok(Some(caller)) => caller,
                Ok(None) => return json_error(
                    StatusCode::UNAUTHORIZED,
                    "no_key",
                    "/metrics takes an admin key: `Authorization: Key <key_id>:<key_secret>`, or set [metrics] public \
                     = true in the server's config to scrape it without one",
                ),
                Err(response) => return response,
            };
        if caller.scope != Scope::Admin {
            return json_error(StatusCode::FORBIDDEN, "not_admin", "/metrics takes an admin key");
        }
    }
    let text = console.metrics.render(&console.snapshot().await);
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}
