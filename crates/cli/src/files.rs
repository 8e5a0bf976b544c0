//! `fal-serverless files ls|put|get|rm|du`: your persistent storage on the server (`/data` in your workers), over
//! its REST files routes. Paths are relative to `/data` (or written `/data/...`), sent as they are: the server
//! confines them (a `..` or a path outside `/data` is refused with its reason).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use fal_client::rest::{self, Rest};
use http::Method;
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;

#[derive(Debug, Subcommand)]
pub enum FilesCommand {
    /// List a directory of your storage (its root by default).
    Ls { dir: Option<String> },
    /// Upload a local file to PATH (its directories are made).
    Put { local: PathBuf, path: String },
    /// Download PATH to a local file (by default the file's own name, here).
    Get { path: String, local: Option<PathBuf> },
    /// Remove a file or a directory (with everything in it).
    Rm { path: String },
    /// How much of your quota you use.
    Du,
}

/// Transfers past this show their progress on stderr.
const PROGRESS_FROM: u64 = 4 << 20;

fn quote(path: &str) -> String {
    // Each byte outside the unreserved set and `/` is percent-encoded.
    path.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Shows `done` of `total` bytes on stderr, at most once per percent.
struct Progress {
    total: u64,
    shown: u64,
    what: String,
}

impl Progress {
    fn new(total: u64, what: String) -> Option<Self> {
        (total >= PROGRESS_FROM).then_some(Self { total, shown: u64::MAX, what })
    }

    fn update(&mut self, done: u64) {
        let percent = done * 100 / self.total.max(1);
        if percent != self.shown {
            self.shown = percent;
            eprint!("\r{}: {percent:>3}% of {:.1} MiB", self.what, self.total as f64 / (1 << 20) as f64);
            let _ = std::io::stderr().flush();
        }
    }

    fn finish(&self) {
        eprintln!();
    }
}

/// A path as workers see it: `/data/...`.
fn shown(path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/data/{path}")
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

pub async fn run(rest: &Rest, command: FilesCommand) -> anyhow::Result<()> {
    match command {
        FilesCommand::Ls { dir } => {
            let route = match dir.as_deref().filter(|d| !d.is_empty()) {
                Some(dir) => format!("/files/list/{}", quote(dir)),
                None => "/files/list".into(),
            };
            let listed = rest.json(Method::GET, &route, rest::full(""), None).await?;
            for entry in listed.as_array().into_iter().flatten() {
                let is_file = entry["is_file"].as_bool().unwrap_or(false);
                let path = entry["path"].as_str().unwrap_or("?");
                let updated = entry["updated_time"].as_str().unwrap_or("");
                let size = if is_file { entry["size"].as_u64().unwrap_or(0).to_string() } else { "-".into() };
                println!(
                    "{size:>12}  {}  {path}{}",
                    updated.get(..19).unwrap_or(updated),
                    if is_file { "" } else { "/" }
                );
            }
        }
        FilesCommand::Put { local, path } => {
            let file =
                tokio::fs::File::open(&local).await.with_context(|| format!("cannot read {}", local.display()))?;
            let total = file.metadata().await?.len();
            let mut progress = Progress::new(total, format!("uploading {}", local.display()));
            let mut sent = 0u64;
            let stream = tokio_util::io::ReaderStream::new(file).map(move |chunk| {
                if let (Ok(chunk), Some(progress)) = (&chunk, progress.as_mut()) {
                    sent += chunk.len() as u64;
                    progress.update(sent);
                }
                chunk.map(hyper::body::Frame::data)
            });
            let body = http_body_util::StreamBody::new(stream).boxed();
            let outcome = rest.json(Method::PUT, &format!("/files/file/{}", quote(&path)), body, Some(total)).await;
            if total >= PROGRESS_FROM {
                eprintln!();
            }
            outcome?;
            println!("uploaded {} to {} ({})", local.display(), shown(&path), mib(total));
        }
        FilesCommand::Get { path, local } => {
            let name = path.trim_end_matches('/').rsplit('/').next().unwrap_or("download").to_string();
            let local = local.unwrap_or_else(|| PathBuf::from(&name));
            let response =
                rest.send(Method::GET, &format!("/files/file/{}", quote(&path)), rest::full(""), None).await?;
            let status = response.status();
            if !status.is_success() {
                let body = response.into_body().collect().await?.to_bytes();
                return Err(rest::error_of(status, &body).into());
            }
            let total = response
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut progress = Progress::new(total, format!("downloading {path}"));
            let partial = local.with_extension("part");
            let mut file = tokio::fs::File::create(&partial)
                .await
                .with_context(|| format!("cannot write {}", partial.display()))?;
            let mut body = response.into_body();
            let mut received = 0u64;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    file.write_all(&data).await?;
                    received += data.len() as u64;
                    if let Some(progress) = progress.as_mut() {
                        progress.update(received);
                    }
                }
            }
            file.flush().await?;
            if let Some(progress) = &progress {
                progress.finish();
            }
            tokio::fs::rename(&partial, &local).await?;
            println!("downloaded {} to {} ({})", shown(&path), local.display(), mib(received));
        }
        FilesCommand::Rm { path } => {
            rest.json(Method::DELETE, &format!("/files/file/{}", quote(&path)), rest::full(""), None).await?;
            println!("removed {}", shown(&path));
        }
        FilesCommand::Du => {
            let du = rest.json(Method::GET, "/files/du", rest::full(""), None).await?;
            let used = du["used_bytes"].as_u64().unwrap_or(0);
            let quota = du["quota_bytes"].as_u64().unwrap_or(0);
            let how = match du["enforcement"].as_str() {
                Some("kernel") => "enforced by the kernel",
                _ => "soft: counted on uploads",
            };
            println!("{} of {} used ({}%); quota {how}", mib(used), mib(quota), used * 100 / quota.max(1));
        }
    }
    Ok(())
}
