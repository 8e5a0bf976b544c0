//! The gateway: the HTTP side of the server's port (gRPC shares it; `crate::http` tells them apart).
//!
//! * `ANY /apps/<user>/<alias or revision>[/path]`: the request goes to a replica of the app (`proxy.rs`), once
//!   the caller is allowed: `private` apps take their owner's key (or an admin's) in `Authorization: Key
//!   <key_id>:<key_secret>`, `shared` ones any valid key, `public` ones none.
//! * `/queue/<user>/<alias>[/path]` and its request routes: the queue (`crate::queue`).
//! * `GET /billing/user_details`: who the key is, as the original 0.6.41 CLI asks before it deploys.
//!
//! Every error is JSON, `{"detail": ..., "error": ...}`, saying what went wrong and what to do.

pub mod proxy;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::IntoResponse;
use axum::routing::{any, get};
use axum::Router;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use crate::apps::replicas::NoReplica;
use crate::apps::{AppError, Apps, AuthMode, Revision};
use crate::store::{Caller, Scope, Store};

/// The header fal-client sends a request's timeout in (seconds, waiting for a replica included).
pub const REQUEST_TIMEOUT: &str = "x-fal-request-timeout";
/// How many ways a `<user>-<alias>` host label is split at most.
const MAX_HOST_SPLITS: usize = 4;
/// What a 503 asks the client to wait before trying again.
const RETRY_AFTER_SECONDS: u64 = 5;

#[derive(Debug)]
pub struct Gateway {
    pub apps: Arc<Apps>,
    pub keys: Arc<Store>,
    pub client: proxy::Client,
    /// The run history each request is recorded in (as its app's owner's run).
    pub runs: Arc<crate::runs::Runs>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// A JSON error response.
pub fn json_error(status: StatusCode, error: &str, detail: impl Into<String>) -> Response<Body> {
    let body = serde_json::json!({ "detail": detail.into(), "error": error });
    let mut response = (status, axum::Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Key"));
    }
    response
}

/// The routes of the gateway (the queue's are merged in by the caller).
pub fn routes(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .fallback(by_host_or_not_found)
        .route("/billing/user_details", get(user_details).fallback(only_get))
        .route("/apps/{user}/{app}", any(app_root))
        .route("/apps/{user}/{app}/", any(app_root))
        .route("/apps/{user}/{app}/{*path}", any(app_path))
        .route_layer(axum::middleware::map_response(sandboxed))
        .with_state(gateway)
}

/// The policy apps' answers on the server's own origin (by path: `/apps/...`, `/queue/...`) carry: a
/// `Content-Security-Policy` sandbox without `allow-same-origin`, so an app's page runs its scripts in an origin
/// of its own and cannot read the dashboard (same origin otherwise) nor act as its signed-in user. Clients other
/// than browsers ignore it. An app whose web page needs an origin of its own (cookies, storage) is reached by host:
/// `https://<user>-<alias>.gateway.<host>/`.
const APP_SANDBOX: &str = "sandbox allow-scripts allow-forms allow-popups allow-downloads allow-modals";

/// Adds [`APP_SANDBOX`] to an answer (beside any policy of the app's own: browsers enforce both).
pub async fn sandboxed(mut response: Response<Body>) -> Response<Body> {
    response.headers_mut().append(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(APP_SANDBOX));
    response
}

/// The app a request's host names, as the original client prints its URLs
/// (`https://<user>-<alias>.gateway.<host>/[path]`, for a wildcard DNS name pointing here): its user and name.
pub async fn app_named_by_host(gateway: &Gateway, headers: &HeaderMap) -> Option<(String, String)> {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
    let mut labels = host.split('.');
    let (Some(label), Some("gateway")) = (labels.next(), labels.next()) else { return None };
    // User names may hold '-' too: each split is tried, the first that names an app wins.
    // At most MAX_HOST_SPLITS: a crafted name cannot make one request cost many lookups.
    let splits = label.match_indices('-').take(MAX_HOST_SPLITS).map(|(at, _)| (&label[..at], &label[at + 1..]));
    for (user, app) in splits {
        if !app.is_empty() && gateway.apps.resolve(user, app).await.is_ok() {
            return Some((user.to_string(), app.to_string()));
        }
    }
    None
}

/// What answers a path nothing else does: an app named by the host ([`app_named_by_host`]), else a 404.
pub async fn by_host_or_not_found(State(gateway): State<Arc<Gateway>>, request: Request) -> Response<Body> {
    if let Some((user, app)) = app_named_by_host(&gateway, request.headers()).await {
        let path = request.uri().path().trim_start_matches('/').to_string();
        return serve(gateway, user, app, path, request).await;
    }
    json_error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "nothing is served at {}: apps are at /apps/<user>/<alias>[/path], their queue at /queue/<user>/<alias>",
            request.uri().path()
        ),
    )
}

impl Gateway {
    /// The caller named by `Authorization: Key <key_id>:<key_secret>`; `Ok(None)` without that header.
    // The error is the response to send as it is, made once per refused request: boxing it gains nothing.
    #[allow(clippy::result_large_err)]
    pub fn caller(&self, headers: &HeaderMap) -> Result<Option<Caller>, Response<Body>> {
        let Some(value) = headers.get(header::AUTHORIZATION) else { return Ok(None) };
        let malformed = || {
            json_error(
                StatusCode::UNAUTHORIZED,
                "wrong_key",
                "the Authorization header must be `Key <key_id>:<key_secret>` (a key `fal-serverless keys create` made)",
            )
        };
        let text = value.to_str().map_err(|_| malformed())?;
        let (scheme, key) = text.trim().split_once(' ').ok_or_else(malformed)?;
        if !scheme.eq_ignore_ascii_case("key") {
            return Err(malformed());
        }
        let (id, secret) = key.trim().split_once(':').ok_or_else(malformed)?;
        self.keys
            .verify(id, secret)
            .map(Some)
            .map_err(|e| json_error(StatusCode::UNAUTHORIZED, "wrong_key", e.to_string()))
    }

    /// The revision `user`'s `app` stands for, if the caller (by `headers`) may call it.
    pub async fn admit(&self, headers: &HeaderMap, user: &str, app: &str) -> Result<Revision, Response<Body>> {
        let revision = match self.apps.resolve(user, app).await {
            Ok(revision) => revision,
            Err(error @ AppError::NotFound { .. }) => {
                return Err(json_error(StatusCode::NOT_FOUND, "unknown_app", error.to_string()))
            }
            Err(error) => return Err(json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", error.to_string())),
        };
        if !revision.serves {
            return Err(json_error(
                StatusCode::NOT_FOUND,
                "not_an_app",
                format!(
                    "{user}/{app} is a function registered for a schedule, not a web endpoint; deploy one with \
                     @isolated(serve=True) and `fal-serverless function serve`"
                ),
            ));
        }
        // A public app takes anyone: a key it is sent (even a wrong one) is not its business.
        if revision.auth == AuthMode::Public {
            return Ok(revision);
        }
        let caller = self.caller(headers)?;
        let allowed = match (revision.auth, &caller) {
            (AuthMode::Public, _) => true,
            (AuthMode::Shared, Some(_)) => true,
            (AuthMode::Private, Some(caller)) => caller.user_id == revision.user_id || caller.scope == Scope::Admin,
            (_, None) => false,
        };
        if allowed {
            return Ok(revision);
        }
        let (error, detail) = match (&caller, revision.auth) {
            (None, AuthMode::Shared) => (
                "missing_key",
                format!(
                    "app {user}/{app} is shared: send `Authorization: Key <key_id>:<key_secret>` with a key of this \
                     server"
                ),
            ),
            (None, _) => (
                "missing_key",
                format!(
                    "app {user}/{app} is private: send `Authorization: Key <key_id>:<key_secret>` with a key of its \
                     owner"
                ),
            ),
            (Some(caller), _) => (
                "wrong_key",
                format!(
                    "app {user}/{app} is private to its owner; key {} is user {:?}'s. Use a key of {user:?} (or have \
                     the app deployed with --auth shared)",
                    caller.key_id, caller.user_id
                ),
            ),
        };
        Err(json_error(StatusCode::UNAUTHORIZED, error, detail))
    }

    /// How long a request waits for a replica: its `X-Fal-Request-Timeout`, else the server's default.
    pub fn wait(&self, headers: &HeaderMap) -> Duration {
        headers
            .get(REQUEST_TIMEOUT)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|seconds| seconds.is_finite() && *seconds > 0.0)
            .map(|seconds| Duration::from_secs_f64(seconds.min(self.apps.config.request_timeout.as_secs_f64())))
            .unwrap_or(self.apps.config.request_timeout)
    }
}

/// The answer for a request that got no replica.
pub fn no_replica(error: NoReplica) -> Response<Body> {
    match error {
        NoReplica::Timeout { .. } => {
            let mut response = json_error(StatusCode::SERVICE_UNAVAILABLE, "no_replica", error.to_string());
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
            response
        }
        NoReplica::StartFailed(_) => json_error(StatusCode::BAD_GATEWAY, "replica_failed", error.to_string()),
        NoReplica::Closed => json_error(StatusCode::NOT_FOUND, "unknown_app", error.to_string()),
    }
}

async fn app_root(
    State(gateway): State<Arc<Gateway>>,
    Path((user, app)): Path<(String, String)>,
    request: Request,
) -> Response<Body> {
    serve(gateway, user, app, String::new(), request).await
}

async fn app_path(
    State(gateway): State<Arc<Gateway>>,
    Path((user, app, path)): Path<(String, String, String)>,
    request: Request,
) -> Response<Body> {
    serve(gateway, user, app, path, request).await
}

/// One request to an app, through a replica.
async fn serve(gateway: Arc<Gateway>, user: String, app: String, path: String, request: Request) -> Response<Body> {
    let revision = match gateway.admit(request.headers(), &user, &app).await {
        Ok(revision) => revision,
        Err(response) => return response,
    };
    let request_id = uuid::Uuid::new_v4().to_string();
    let wait = gateway.wait(request.headers());
    let replicas = gateway.apps.replicas(&revision);
    let recording = gateway.runs.begin(crate::runs::NewRun {
        id: request_id.clone(),
        user_id: revision.user_id.clone(),
        kind: "web",
        function: revision.function_name.clone(),
        app: revision.name().to_string(),
        revision: revision.id.clone(),
        machine_type: revision.machine_type.clone(),
        queued_ms: crate::runs::now_ms(),
        ..Default::default()
    });
    let request_logs = crate::apps::logs::RequestLogs::new();
    let lease = match replicas.acquire(request_id, request_logs.clone(), wait).await {
        Ok(lease) => lease,
        Err(error) => {
            let kind = match &error {
                NoReplica::Timeout { .. } => "no_replica",
                NoReplica::StartFailed(_) => "replica_failed",
                NoReplica::Closed => "app_deleted",
            };
            recording.finish(crate::runs::Outcome::error(kind, error.to_string()));
            return no_replica(error);
        }
    };
    recording.started(format!("replica {}", lease.address));
    let query = request.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
    let response = proxy::forward(&gateway.client, lease, request, &format!("/{path}{query}")).await;
    crate::runs::web::recorded(response, recording, request_logs)
}

/// Another method than GET on a GET route: said in JSON, as every answer of the gateway's own.
async fn only_get(request: Request) -> Response<Body> {
    let mut response = json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} takes GET, not {}", request.uri().path(), request.method()),
    );
    response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET"));
    response
}

/// `GET /billing/user_details`: the key's user, shaped as the original's REST API answers (`provider|id`).
async fn user_details(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response<Body> {
    match gateway.caller(&headers) {
        Ok(Some(caller)) => {
            axum::Json(serde_json::json!({ "user_id": format!("fal-serverless|{}", caller.user_id) })).into_response()
        }
        Ok(None) => json_error(
            StatusCode::UNAUTHORIZED,
            "missing_key",
            "send `Authorization: Key <key_id>:<key_secret>` (FAL_KEY_ID and FAL_KEY_SECRET for the original client)",
        ),
        Err(response) => response,
    }
}
