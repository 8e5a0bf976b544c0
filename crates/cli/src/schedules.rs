//! Schedules and the run history: `function schedule` (done by the Python package, which must run the user's file),
//! `cron list|activations|logs|cancel` and `runs list|logs`, which speak to the server themselves. Times are UTC.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use clap::{Args, Subcommand};
use fal_client::Client;
use fal_proto::controller::{ListRunsRequest, RunInfo};
use fal_proto::Log;

use crate::apps::{table, utc, PYTHON_VARIABLE};

#[derive(Debug, Args)]
pub struct ScheduleArgs {
    /// When to run it, in UTC: five fields (minute hour day-of-month month day-of-week: "*/5 * * * *" is every
    /// five minutes, "0 3 * * MON" Mondays at 03:00), or six with seconds first ("*/10 * * * * *").
    pub cron: String,
    /// The Python file that defines the function.
    pub file: PathBuf,
    /// The name of the @isolated function in FILE (not serve=True: a schedule runs a function that returns).
    pub function: String,
}

#[derive(Debug, Subcommand)]
pub enum CronCommand {
    /// List your schedules (every user's, with an admin key): id, expression, next run (UTC), state.
    List,
    /// List a schedule's activations, newest first: when each was due, started and finished, and how it ended.
    Activations {
        /// The schedule's id (see `fal-serverless cron list`).
        cron_id: String,
        /// Show at most N.
        #[arg(long, short = 'n', default_value_t = 15)]
        limit: usize,
    },
    /// Print what one activation logged.
    Logs {
        /// The schedule's id.
        cron_id: String,
        /// The activation's id (see `fal-serverless cron activations CRON_ID`).
        activation_id: String,
    },
    /// Cancel a schedule: it runs no more (an activation running now is left to finish).
    Cancel {
        /// The schedule's id.
        cron_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// List your runs (calls, web requests, queued requests, schedule activations), newest first.
    List {
        /// Only those of this app (an alias or revision id) or function name.
        #[arg(long)]
        app: Option<String>,
        /// Only runs that did not succeed.
        #[arg(long)]
        failed: bool,
        /// Show at most N.
        #[arg(long, short = 'n', default_value_t = 20, value_parser = clap::value_parser!(i32).range(1..=1000))]
        limit: i32,
        /// Show the runs before this cursor (printed under a full page).
        #[arg(long)]
        before: Option<String>,
        /// Only this user's runs (admin keys only).
        #[arg(long)]
        user: Option<String>,
    },
    /// Print what one run logged (kept up to the server's limit per run).
    Logs {
        /// The run's id (see `fal-serverless runs list`).
        run_id: String,
    },
}

/// `function schedule`: registers and schedules in Python (`python -m fal_serverless._deploy --cron`), replacing
/// this process, so its output and exit code are the command's.
pub fn schedule(args: ScheduleArgs) -> anyhow::Result<()> {
    let python = std::env::var_os(PYTHON_VARIABLE).filter(|p| !p.is_empty()).unwrap_or_else(|| "python3".into());
    let error = schedule_command(&python, &args).exec();
    anyhow::bail!(
        "cannot run {} to load {}: {error}; set {PYTHON_VARIABLE} to a Python that has fal-serverless installed",
        PathBuf::from(python).display(),
        args.file.display()
    )
}

fn schedule_command(python: &std::ffi::OsStr, args: &ScheduleArgs) -> Command {
    let mut command = Command::new(python);
    command.args(["-m", "fal_serverless._deploy"]).arg(&args.file).arg(&args.function).arg("--cron").arg(&args.cron);
    command
}

fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.map(|t| utc(t.seconds, t.nanos)).unwrap_or_else(|| "-".into())
}

fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text.to_string()
    }
}

fn print_logs(logs: &[Log]) {
    for log in logs {
        println!("{} {}", time(log.timestamp.as_ref()), log.message);
    }
}

pub async fn cron(client: &Client, command: CronCommand) -> anyhow::Result<()> {
    match command {
        CronCommand::List => {
            let rows: Vec<[String; 6]> = client
                .list_crons()
                .await?
                .into_iter()
                .map(|c| {
                    [
                        c.cron_id,
                        c.cron_string,
                        time(c.next_run.as_ref()),
                        if c.is_active { "active" } else { "cancelled" }.into(),
                        c.user_id,
                        c.function_name,
                    ]
                })
                .collect();
            let header = ["CRON ID", "CRON", "NEXT RUN (UTC)", "STATE", "USER", "FUNCTION"].map(String::from);
            print!("{}", table(&header, &rows));
        }
        CronCommand::Activations { cron_id, limit } => {
            let rows: Vec<[String; 6]> = client
                .list_activations(&cron_id)
                .await?
                .into_iter()
                .take(limit)
                .map(|a| {
                    let outcome = if a.error_kind.is_empty() || a.outcome == "timeout" {
                        a.outcome
                    } else {
                        format!("{} ({})", a.outcome, a.error_kind)
                    };
                    [
                        a.activation_id,
                        time(a.scheduled_at.as_ref()),
                        time(a.started_at.as_ref()),
                        time(a.finished_at.as_ref()),
                        outcome,
                        or_dash(&a.error),
                    ]
                })
                .collect();
            let header = ["ACTIVATION ID", "DUE", "STARTED", "FINISHED", "OUTCOME", "ERROR"].map(String::from);
            print!("{}", table(&header, &rows));
        }
        CronCommand::Logs { cron_id, activation_id } => {
            let logs = client.activation_logs(&cron_id, &activation_id).await?;
            if logs.is_empty() {
                println!("activation {activation_id} logged nothing");
            }
            print_logs(&logs);
        }
        CronCommand::Cancel { cron_id } => {
            client.cancel_cron(&cron_id).await?;
            println!("cancelled schedule {cron_id}: it runs no more");
        }
    }
    Ok(())
}

fn run_row(run: RunInfo) -> [String; 9] {
    let what = match (run.kind.as_str(), run.app.is_empty()) {
        ("call", _) | (_, true) => run.function,
        _ => run.app,
    };
    let outcome = if run.error_kind.is_empty() || run.outcome == "timeout" {
        run.outcome
    } else {
        format!("{} ({})", run.outcome, run.error_kind)
    };
    let seconds = match (&run.started_at, &run.finished_at) {
        (Some(s), Some(f)) => {
            let ms = (f.seconds - s.seconds) * 1000 + i64::from(f.nanos - s.nanos) / 1_000_000;
            format!("{:.3}", ms as f64 / 1000.0)
        }
        _ => "-".into(),
    };
    [
        run.run_id,
        run.kind,
        what,
        run.user_id,
        or_dash(&run.machine_type),
        time(run.queued_at.as_ref()),
        seconds,
        outcome,
        or_dash(&run.worker),
    ]
}

pub async fn runs(client: &Client, command: RunsCommand) -> anyhow::Result<()> {
    match command {
        RunsCommand::List { app, failed, limit, before, user } => {
            let request = ListRunsRequest { app, failed_only: failed, limit, before, user_id: user };
            let page = client.list_runs(request).await?;
            let rows: Vec<[String; 9]> = page.runs.into_iter().map(run_row).collect();
            let header =
                ["RUN ID", "KIND", "FUNCTION / APP", "USER", "MACHINE", "QUEUED (UTC)", "SECONDS", "OUTCOME", "WORKER"]
                    .map(String::from);
            print!("{}", table(&header, &rows));
            if let Some(cursor) = page.next_cursor {
                println!("more: --before {cursor}");
            }
        }
        RunsCommand::Logs { run_id } => {
            let result = client.run_logs(&run_id).await?;
            if let Some(run) = result.run {
                let error = if run.error.is_empty() { String::new() } else { format!(": {}", run.error) };
                eprintln!("run {} ({} {}) {}{error}", run.run_id, run.kind, run.function, run.outcome);
                if run.logs_truncated {
                    eprintln!("its logs were cut at the server's limit per run ([runs] log_limit_kb)");
                }
            }
            print_logs(&result.logs);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_hands_the_cron_to_python() {
        let args = ScheduleArgs { cron: "* * * * *".into(), file: "jobs.py".into(), function: "tick".into() };
        let command = schedule_command(std::ffi::OsStr::new("python3"), &args);
        let args: Vec<_> = command.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(args, ["-m", "fal_serverless._deploy", "jobs.py", "tick", "--cron", "* * * * *"]);
    }

    #[test]
    fn a_run_row_names_what_ran_and_how_long() {
        let ts = |seconds, nanos| Some(prost_types::Timestamp { seconds, nanos });
        let run = RunInfo {
            run_id: "r".into(),
            kind: "web".into(),
            function: "m.f".into(),
            app: "web-app".into(),
            outcome: "error".into(),
            error_kind: "http-500".into(),
            started_at: ts(10, 0),
            finished_at: ts(11, 500_000_000),
            ..Default::default()
        };
        let row = run_row(run);
        assert_eq!((row[2].as_str(), row[6].as_str(), row[7].as_str()), ("web-app", "1.500", "error (http-500)"));
    }
}
