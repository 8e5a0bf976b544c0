//! `fal-serverless envs`: environments on this machine's disk, listed and removed.
//!
//! It works on the directory itself, not through a server: a server's data dir (running or not), or the local
//! host's cache. It agrees with a running server (and with local-host engines in users' processes) through the lock
//! files every user of an environment holds (see `fal-engine`'s `EnvironmentStore`), so it never removes one in use.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use fal_engine::{EngineConfig, EnvironmentInfo, EnvironmentPolicy, EnvironmentStore};
use fal_server::ServerConfig;

#[derive(Debug, Args)]
pub struct EnvsArgs {
    #[command(subcommand)]
    command: EnvsCommand,
    /// The data dir of the server whose environments to work on [default: $FAL_SERVERLESS_DATA_DIR, else
    /// ~/.local/share/fal-serverless: the server's default, which the zero-config server uses too]. The local host's
    /// cache dir works here too.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Work on the local host's environments instead (the SDK's `local` host, in your own processes):
    /// $FAL_SERVERLESS_CACHE_DIR, else ~/.cache/fal-serverless.
    #[arg(long, global = true)]
    local_host: bool,
}

#[derive(Debug, Subcommand)]
enum EnvsCommand {
    /// List environments: user, key, size, last use, in use or not.
    ///
    /// In use: a live worker runs in it, or a build or a call is starting on it. User `.shared` holds the environments users share: a user's environment built from wheels
    /// alone is a hard-linked copy of the shared one of its key, so they take that disk once; sizes split it evenly.
    List {
        /// Only this user's environments.
        #[arg(long)]
        user: Option<String>,
        /// One JSON object per environment, in a list (`bytes`, `last_used` as Unix seconds).
        #[arg(long)]
        json: bool,
    },
    /// Remove environments by key; one in use is refused.
    ///
    /// A key may be a unique start of one. One in use is refused: it can go once its workers have stopped. The next call that needs a removed environment builds it again. The shared environment of the
    /// key goes too when no user's environment links it any more.
    Rm {
        /// Keys, as `envs list` shows them; a start of one will do when it names only one.
        #[arg(required = true)]
        keys: Vec<String>,
        /// Whose environment (needed when users have environments of the same key).
        #[arg(long)]
        user: Option<String>,
    },
    /// Apply the eviction policy now (--dry-run: only show what it would remove).
    ///
    /// As the server does every prune_interval_seconds and after each build: remove environments unused
    /// for longer than max_unused_days, then each user's least recently used while over max_per_user or
    /// disk_per_user_gb, then the least recently used of all while over disk_budget_gb; never one in use. The policy
    /// is the data dir's config.toml `[environments]` (or the defaults: 30 days, 50 per user, half the file system in
    /// all, a quarter of that per user). Also deletes what interrupted removals and builds left.
    Prune {
        /// Remove environments unused for longer than this instead of max_unused_days: a number and a unit, as
        /// 90s, 15m, 12h, 7d; 0 removes every environment not in use. The disk budget and per-user caps still apply.
        #[arg(long, value_parser = parse_duration)]
        older_than: Option<Duration>,
        /// Only say what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// Only remove this user's environments (and shared ones none links).
        #[arg(long)]
        user: Option<String>,
    },
}

pub fn run(args: EnvsArgs) -> anyhow::Result<()> {
    let data_dir = match (args.data_dir, args.local_host) {
        (Some(_), true) => bail!("give --data-dir or --local-host, not both"),
        (Some(dir), false) => dir,
        (None, true) => EngineConfig::from_env().cache_dir,
        (None, false) => {
            std::env::var_os("FAL_SERVERLESS_DATA_DIR").map(PathBuf::from).unwrap_or_else(super::default_data_dir)
        }
    };
    if !data_dir.is_dir() {
        bail!(
            "there is no data dir at {}; point --data-dir at the server's data dir (or --local-host for the local \
             host's environments)",
            data_dir.display()
        );
    }
    let (environments_dir, mut policy) = settings(&data_dir)?;
    let store = EnvironmentStore::new(environments_dir.join("envs"));
    match args.command {
        EnvsCommand::List { user, json } => {
            // The budget is shown for reference.
            list(&store, user.as_deref(), json, policy.disk_budget(store.dir()))
        }
        EnvsCommand::Rm { keys, user } => remove(&store, &keys, user.as_deref()),
        EnvsCommand::Prune { older_than, dry_run, user } => {
            if let Some(older_than) = older_than {
                policy.max_unused = older_than;
            }
            prune(&store, &policy, user.as_deref(), dry_run)
        }
    }
}

/// Where a server of `data_dir` builds its environments (the data dir, or the config's cluster `shared_dir`) and
/// its `[environments]` policy: from the data dir's config.toml, read once, or the defaults where it has none (the
/// local host's cache).
fn settings(data_dir: &Path) -> anyhow::Result<(PathBuf, EnvironmentPolicy)> {
    let file = data_dir.join("config.toml");
    if !file.is_file() {
        return Ok((data_dir.to_path_buf(), EnvironmentPolicy::default()));
    }
    let config = ServerConfig::load(data_dir, None, None)
        .with_context(|| format!("reading {} to find where its environments are", file.display()))?;
    Ok((config.environments_dir, config.environments))
}

fn listed(store: &EnvironmentStore) -> anyhow::Result<Vec<EnvironmentInfo>> {
    store.list().with_context(|| {
        format!(
            "cannot read the environments in {}; run this as the user the server runs as (root, for a server that \
             jails its workers), or point --data-dir at the right data dir",
            store.dir().display()
        )
    })
}

fn list(store: &EnvironmentStore, user: Option<&str>, json: bool, budget: u64) -> anyhow::Result<()> {
    let environments: Vec<EnvironmentInfo> =
        listed(store)?.into_iter().filter(|e| user.is_none_or(|u| e.tenant == u)).collect();
    if json {
        let objects: Vec<serde_json::Value> = environments
            .iter()
            .map(|e| {
                serde_json::json!({
                    "user": e.tenant,
                    "key": e.key,
                    "bytes": e.bytes,
                    "last_used": e.last_used.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
                    "in_use": e.in_use,
                    "shared": e.is_shared(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&objects)?);
        return Ok(());
    }
    if environments.is_empty() {
        println!("no environments in {}", store.dir().display());
        return Ok(());
    }
    println!("{:<16} {:<26} {:>10}  {:<16} IN USE", "USER", "KEY", "SIZE", "LAST USED");
    let now = SystemTime::now();
    for e in &environments {
        println!(
            "{:<16} {:<26} {:>10}  {:<16} {}",
            e.tenant,
            e.key,
            size(e.bytes),
            ago(now, e.last_used),
            if e.in_use { "yes" } else { "no" }
        );
    }
    let total: u64 = environments.iter().map(|e| e.bytes).sum();
    let budget = if budget < u64::MAX { format!(" (budget {})", size(budget)) } else { String::new() };
    println!("{} environments, {} in all{budget}, in {}", environments.len(), size(total), store.dir().display());
    Ok(())
}

fn remove(store: &EnvironmentStore, keys: &[String], user: Option<&str>) -> anyhow::Result<()> {
    let environments = listed(store)?;
    let mut failed = 0;
    for key in keys {
        let matching: Vec<&EnvironmentInfo> = environments
            .iter()
            .filter(|e| e.key.starts_with(key.as_str()) && !key.is_empty())
            .filter(|e| match user {
                Some(user) => e.tenant == user,
                None => !e.is_shared(),
            })
            .collect();
        let found = match matching.as_slice() {
            [] => {
                let whose = user.map(|u| format!(" of user {u}")).unwrap_or_default();
                eprintln!(
                    "error: no environment {key}{whose} in {} (see `fal-serverless envs list`)",
                    store.dir().display()
                );
                failed += 1;
                continue;
            }
            [one] => *one,
            several => {
                let names: Vec<String> = several.iter().map(|e| format!("{}/{}", e.tenant, e.key)).collect();
                eprintln!(
                    "error: {key} names {} environments ({}); say whose with --user, or give more of the key",
                    several.len(),
                    names.join(", ")
                );
                failed += 1;
                continue;
            }
        };
        match store.remove(&found.tenant, &found.key) {
            Ok(removal) => {
                println!("removed {}/{} ({})", found.tenant, found.key, size(removal.environment.bytes));
                if let Some(shared) = removal.shared_too {
                    println!(
                        "removed the shared environment {} ({}) too: no user's environment links it any more",
                        shared.key,
                        size(shared.bytes)
                    );
                }
            }
            Err(error) => {
                eprintln!("error: {error}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} environments not removed", keys.len());
    }
    Ok(())
}

fn prune(
    store: &EnvironmentStore,
    policy: &EnvironmentPolicy,
    user: Option<&str>,
    dry_run: bool,
) -> anyhow::Result<()> {
    let report = store
        .prune(policy, SystemTime::now(), user, dry_run)
        .with_context(|| format!("cannot prune the environments in {}", store.dir().display()))?;
    let verb = if dry_run { "would remove" } else { "removed" };
    for eviction in &report.evicted {
        let e = &eviction.environment;
        println!("{verb} {}/{} ({}): {}", e.tenant, e.key, size(e.bytes), eviction.reason);
    }
    for (eviction, why) in &report.failed {
        let e = &eviction.environment;
        eprintln!("could not remove {}/{}: {why}", e.tenant, e.key);
    }
    if report.swept > 0 {
        println!("deleted {} leftovers of interrupted removals and builds", report.swept);
    }
    match (report.evicted.len(), dry_run) {
        (0, _) => println!("nothing to remove in {}", store.dir().display()),
        (n, true) => {
            println!("{n} environments, {}, would be removed (dry run: nothing was)", size(report.removed_bytes()))
        }
        (n, false) => println!("{n} environments removed, {} in all", size(report.removed_bytes())),
    }
    if !report.failed.is_empty() {
        bail!("{} environments could not be removed", report.failed.len());
    }
    Ok(())
}

/// `90s`, `15m`, `12h`, `7d` (or `0`).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let expected = || format!("{text:?}: expected a number and a unit (s, m, h or d), as 90s, 15m, 12h, 7d");
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(expected)?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| expected())?;
    let seconds = match unit.trim() {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(expected()),
    };
    Duration::try_from_secs_f64(number * seconds).map_err(|_| expected())
}

fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn ago(now: SystemTime, then: SystemTime) -> String {
    let seconds = now.duration_since(then).unwrap_or_default().as_secs();
    let (count, unit) = match seconds {
        0..60 => (seconds, "second"),
        60..3600 => (seconds / 60, "minute"),
        3600..86400 => (seconds / 3600, "hour"),
        _ => (seconds / 86400, "day"),
    };
    if count == 1 {
        format!("1 {unit} ago")
    } else {
        format!("{count} {unit}s ago")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in ["7", "d", "5w", "-1d", "1e99d"] {
            assert!(parse_duration(bad).unwrap_err().contains("expected a number and a unit"), "{bad}");
        }
    }

    #[test]
    fn sizes_and_ages_read_as_people_write_them() {
        assert_eq!((size(512), size(1536), size(5 << 30)), ("512 B".into(), "1.5 KiB".into(), "5.0 GiB".into()));
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 30);
        assert_eq!(ago(now, now - Duration::from_secs(1)), "1 second ago");
        assert_eq!(ago(now, now - Duration::from_secs(7200)), "2 hours ago");
        assert_eq!(ago(now, now - Duration::from_secs(3 * 86400)), "3 days ago");
    }
}
