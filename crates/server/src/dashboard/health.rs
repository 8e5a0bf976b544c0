//! `GET /healthz` and `GET /readyz`, for a load balancer or a kubelet's probes.

use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::Json;
use http::StatusCode;

use super::Console;

/// Where `/readyz` writes its probe files, in the data dir.
const PROBES: &str = ".readyz";

/// The process is up and its port answers.
pub async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

/// It can serve calls: SQLite takes a write, the data dir takes a file, and (where it jails workers) the jail's
/// programs are still there. 503 with what failed otherwise.
pub async fn readyz(State(console): State<Arc<Console>>) -> impl IntoResponse {
    let (keys, data_dir, jailed) = (console.keys.clone(), console.data_dir.clone(), console.jailed);
    let checks = tokio::task::spawn_blocking(move || {
        let mut checks = serde_json::Map::new();
        let sqlite = keys.check_writable().map_err(|e| format!("SQLite (state.sqlite3) takes no write: {e}"));
        checks.insert("sqlite".into(), verdict(sqlite));
        // A file of its own per probe, in a directory of probes: probes at once never race on one name.
        let probes = data_dir.join(PROBES);
        let probe = probes.join(format!("{}-{:016x}", std::process::id(), rand::random::<u64>()));
        let written = std::fs::create_dir_all(&probes).and_then(|()| std::fs::write(&probe, b"ok"));
        // Removed whether or not the write went through (a full disk may leave it created and empty).
        let removed = std::fs::remove_file(&probe);
        let written = written.and(removed);
        checks.insert("data_dir".into(), verdict(written.map_err(|e| format!("the data dir takes no file: {e}"))));
        if jailed {
            let jail = fal_sandbox::Jail::from_path()
                .map(|_| ())
                .ok_or_else(|| "bubblewrap (bwrap) or setpriv is gone: install the bubblewrap package".to_string());
            checks.insert("jail".into(), verdict(jail));
        }
        checks
    })
    .await
    .unwrap_or_default();
    let ready = !checks.is_empty() && checks.values().all(|v| v == "ok");
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(serde_json::json!({ "status": if ready { "ready" } else { "not ready" }, "checks": checks })))
}

fn verdict(result: Result<(), String>) -> serde_json::Value {
    match result {
        Ok(()) => "ok".into(),
        Err(error) => error.into(),
    }
}
