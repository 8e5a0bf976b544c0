//! The web-endpoint commands: `function serve` (deploy, done by the Python package: it must run the user's file),
//! `apps list|delete` and `logs`, which speak to the server themselves.

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use clap::{Args, Subcommand, ValueEnum};
use fal_client::{app_url, auth_mode_name, Client, LogsQuery};
use fal_proto::controller::GetLogsResult;

/// The Python that runs the deploy: the console script's own interpreter (its `_cli.py` sets this), else the
/// `python3` on PATH (the plain binary's case).
pub const PYTHON_VARIABLE: &str = "FAL_SERVERLESS_PYTHON";

#[derive(Debug, Subcommand)]
pub enum FunctionCommand {
    /// Deploy a function of a Python file as a web endpoint; prints its revision and URL.
    ///
    /// The function must be decorated with `@isolated(serve=True)` (a FastAPI app with `POST /` bound to it is
    /// made for you) or `@isolated(exposed_port=8080)` (the function starts its own server on port 8080). The file
    /// is run to find the function, as `python FILE` would run it but not as `__main__`, by the Python of the
    /// `fal-serverless` console script (FAL_SERVERLESS_PYTHON names another; the plain binary's default is
    /// `python3`). Deploying again under the same --alias makes a new revision and moves the alias to it, while the
    /// old revision stays reachable by its id.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The Python file that defines the function.
    pub file: PathBuf,
    /// The name of the decorated function in FILE.
    pub function: String,
    /// The name to reach the app by (`/apps/<user>/<alias>`) [default: none, reachable by its revision id only].
    #[arg(long)]
    pub alias: Option<String>,
    /// Who may call it: `private` (your keys, or an admin's), `public` (anyone, no key), `shared` (any valid key).
    #[arg(long, value_enum, default_value_t = Auth::Private)]
    pub auth: Auth,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Auth {
    Private,
    Public,
    Shared,
}

impl Auth {
    fn name(self) -> &'static str {
        match self {
            Auth::Private => "private",
            Auth::Public => "public",
            Auth::Shared => "shared",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum AppsCommand {
    /// List your aliases (every user's, with an admin key): the revision each points to, who may call it, its
    /// replicas and limits, and its URL.
    List,
    /// Delete an alias: its URL stops answering and its replicas stop.
    Delete {
        /// The alias to remove (see `fal-serverless apps list`).
        alias: String,
    },
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The app: an alias or a revision id of yours.
    pub alias: String,
    /// Keep printing new lines as the app's replicas write them, until Ctrl-C.
    #[arg(long, short)]
    pub follow: bool,
    /// Show the last N lines first [default: the server's].
    #[arg(long, short = 'n', value_name = "N", value_parser = clap::value_parser!(i32).range(0..))]
    pub lines: Option<i32>,
}

/// `function serve`: runs the deploy in Python (`python -m fal_serverless._deploy`), replacing this process, so its
/// output and exit code are the command's.
pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let python = std::env::var_os(PYTHON_VARIABLE).filter(|p| !p.is_empty()).unwrap_or_else(|| "python3".into());
    // Returns only when the exec failed.
    let error = deploy_command(&python, &args).exec();
    anyhow::bail!(
        "cannot run {} to load {}: {error}; set {PYTHON_VARIABLE} to a Python that has fal-serverless installed",
        PathBuf::from(python).display(),
        args.file.display()
    )
}

/// `python -m fal_serverless._deploy FILE FUNCTION --auth MODE [--alias NAME]`.
fn deploy_command(python: &OsStr, args: &ServeArgs) -> Command {
    let mut command = Command::new(python);
    command.args(["-m", "fal_serverless._deploy"]).arg(&args.file).arg(&args.function);
    command.args(["--auth", args.auth.name()]);
    if let Some(alias) = &args.alias {
        command.arg("--alias").arg(alias);
    }
    command
}

pub async fn apps(client: &Client, command: AppsCommand) -> anyhow::Result<()> {
    match command {
        AppsCommand::List => {
            let rows: Vec<[String; 8]> = client
                .list_aliases()
                .await?
                .into_iter()
                .map(|a| {
                    let url = app_url(client.uri(), &a.user_id, &a.alias);
                    [
                        a.alias,
                        a.revision,
                        auth_mode_name(a.auth_mode),
                        a.replicas.to_string(),
                        a.min_concurrency.to_string(),
                        a.max_concurrency.to_string(),
                        a.machine_type,
                        url,
                    ]
                })
                .collect();
            let header = ["ALIAS", "REVISION", "AUTH", "REPLICAS", "MIN", "MAX", "MACHINE", "URL"].map(String::from);
            print!("{}", table(&header, &rows));
        }
        AppsCommand::Delete { alias } => {
            if alias.trim().is_empty() {
                anyhow::bail!(
                    "name the alias to delete: `fal-serverless apps delete ALIAS` (see `fal-serverless apps list`)"
                );
            }
            let revision = client.delete_alias(&alias).await?;
            println!("deleted alias {alias} (it pointed to revision {revision})");
        }
    }
    Ok(())
}

pub async fn logs(client: &Client, args: LogsArgs) -> anyhow::Result<()> {
    let query = LogsQuery { app: Some(args.alias), lines: args.lines, follow: args.follow };
    let stdout = std::io::stdout();
    let mut failure = None;
    let read = client.get_logs(query, |line| {
        // A closed pipe (`| head`) ends the command quietly at the next line.
        if failure.is_none() {
            let mut out = stdout.lock();
            if let Err(error) = writeln!(out, "{}", log_line(&line)).and_then(|()| out.flush()) {
                failure = Some(error);
            }
        }
    });
    // Ctrl-C ends `--follow`: watched here, since in the console script Python's own SIGINT handler would only set
    // a flag nobody reads while this runs.
    tokio::select! {
        result = read => result?,
        _ = tokio::signal::ctrl_c() => {}
    }
    match failure {
        Some(error) if error.kind() != std::io::ErrorKind::BrokenPipe => Err(error.into()),
        _ => Ok(()),
    }
}

/// `2026-12-02 04:05:06.789 [app request] line`: the request part only for lines printed during one.
fn log_line(line: &GetLogsResult) -> String {
    let entry = line.log_entry.clone().unwrap_or_default();
    let when = entry.timestamp.map(|t| utc(t.seconds, t.nanos)).unwrap_or_else(|| "-".into());
    let request = if line.request_id.is_empty() { String::new() } else { format!(" {}", line.request_id) };
    format!("{when} [{}{request}] {}", line.app, entry.message)
}

/// A UTC time as `YYYY-MM-DD HH:MM:SS.mmm`.
pub(crate) fn utc(seconds: i64, nanos: i32) -> String {
    let nanos = i128::from(seconds) * 1_000_000_000 + i128::from(nanos);
    match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        ),
        Err(_) => format!("@{seconds}"),
    }
}

/// Columns padded to their widest cell, two spaces apart; the last column unpadded.
fn table<const N: usize>(header: &[String; N], rows: &[[String; N]]) -> String {
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(header).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (cell, width))| if i + 1 == N { cell.clone() } else { format!("{cell:<width$}") })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use fal_proto::Log;

    #[test]
    fn tables_align_their_columns() {
        let header = ["A".to_string(), "LONG NAME".to_string(), "URL".to_string()];
        let rows = [["alpha".to_string(), "x".to_string(), "http://h/apps/u/alpha".to_string()]];
        assert_eq!(table(&header, &rows), "A      LONG NAME  URL\nalpha  x          http://h/apps/u/alpha\n");
        assert_eq!(table(&header, &[]), "A  LONG NAME  URL\n");
    }

    #[test]
    fn log_lines_show_time_app_and_request() {
        let entry = Log {
            message: "hello".into(),
            timestamp: Some(prost_types::Timestamp { seconds: 1_764_648_306, nanos: 789_000_000 }),
            ..Default::default()
        };
        let line = GetLogsResult { log_entry: Some(entry), app: "web".into(), request_id: "r1".into() };
        assert_eq!(log_line(&line), "2025-12-02 04:05:06.789 [web r1] hello");
        let between = GetLogsResult { request_id: String::new(), ..line };
        assert_eq!(log_line(&between), "2025-12-02 04:05:06.789 [web] hello");
    }

    #[test]
    fn serve_hands_the_file_and_function_to_python() {
        let args_of =
            |command: Command| command.get_args().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>();
        let mut args = ServeArgs { file: "app.py".into(), function: "f".into(), alias: None, auth: Auth::Shared };
        let command = deploy_command(OsStr::new("/usr/bin/python3"), &args);
        assert_eq!(command.get_program(), "/usr/bin/python3");
        assert_eq!(args_of(command), ["-m", "fal_serverless._deploy", "app.py", "f", "--auth", "shared"]);
        args.alias = Some("web".into());
        assert_eq!(args_of(deploy_command(OsStr::new("python3"), &args))[4..], ["--auth", "shared", "--alias", "web"]);
    }
}
