//! The `fal-serverless` command. Its arguments are declared here (and in `apps.rs`, `envs.rs`); the work is done by
//! `fal-server` (the server), `fal-client` (everything that talks to one) and, for `function serve`, which must run
//! the user's Python file, the Python package (`python -m fal_serverless._deploy`). Shipped both as a binary and, through the Python package, as the
//! `fal-serverless` console script.

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use fal_client::{Client, LocalServer, Target};
use fal_proto::controller::{create_user_key_request, CreateUserKeyRequest};
use fal_server::{ServerConfig, Started, Store};

mod apps;
mod envs;
mod files;
mod schedules;
mod secrets;

pub use apps::PYTHON_VARIABLE;

#[derive(Debug, Parser)]
#[command(
    name = "fal-serverless",
    version,
    about = "Run Python functions in isolated environments on machines you own"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server in the foreground (the `cloud` host of the Python SDK).
    Server(ServerArgs),
    /// Create, list and revoke keys (on the server of FAL_HOST, or the local one).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// List your live workers (all workers, with an admin key).
    Workers,
    /// List and remove environments on this machine's disk (a server's data dir, or the local host's cache).
    ///
    /// Works on the directory itself, with or without a server running, and never removes an environment in use:
    /// the server, the local host and this command agree through lock files every user of an environment holds.
    /// Run it as the user the server runs as (root for a server that jails its workers).
    Envs(envs::EnvsArgs),
    /// Deploy functions as web endpoints (`function serve FILE FUNCTION`) or run them on a schedule (`function
    /// schedule CRON FILE FUNCTION`).
    #[command(subcommand, visible_alias = "fn")]
    Function(apps::FunctionCommand),
    /// List and delete your web endpoints' aliases.
    #[command(subcommand)]
    Apps(apps::AppsCommand),
    /// Print a web endpoint's logs (its replicas' output), and with --follow new lines as they come.
    Logs(apps::LogsArgs),
    /// List and cancel your schedules, and see their activations and logs.
    #[command(subcommand, visible_alias = "crons")]
    Cron(schedules::CronCommand),
    /// The run history: your calls, web requests and schedule activations, and their logs.
    #[command(subcommand)]
    Runs(schedules::RunsCommand),
    /// Your persistent storage on the server (`/data` in your workers): ls, put, get, rm, du. Paths are relative to
    /// /data (or written /data/...).
    #[command(subcommand)]
    Files(files::FilesCommand),
    /// Set, list and delete your secrets: environment variables of all your workers, stored encrypted.
    #[command(subcommand, visible_alias = "secret")]
    Secrets(secrets::SecretsCommand),
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
struct ServerArgs {
    #[command(subcommand)]
    init: Option<ServerCommand>,
    /// Address to listen on [default: 127.0.0.1:6005; with --local, a free loopback port].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Where keys and environments live [default: $FAL_SERVERLESS_DATA_DIR, else ~/.local/share/fal-serverless].
    #[arg(long, env = "FAL_SERVERLESS_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// A TOML config file (capacity, extra machine types) [default: <data-dir>/config.toml if present].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Zero-config mode, as the SDK starts it: write the address and a local admin key to the local credentials
    /// file (mode 0600) instead of printing the key, and stop after --idle-shutdown seconds unused.
    #[arg(long)]
    local: bool,
    /// Stop after this many seconds without calls or warm workers [default: never; with --local, 900].
    #[arg(long)]
    idle_shutdown: Option<u64>,
    /// Serve TLS only, with this certificate chain (PEM) [default: [tls] in the config, else the pair `server init
    /// --tls-self-signed` made in the data dir, else plaintext].
    #[arg(long, requires = "tls_key", conflicts_with = "local")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert", conflicts_with = "local")]
    tls_key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum ServerCommand {
    /// Create the data dir and the first admin key, print the key, and exit.
    Init {
        #[arg(long, env = "FAL_SERVERLESS_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Also make a CA and a server certificate for these DNS names and IP addresses (the ones clients will
        /// connect to) in <data-dir>/tls/; a server started with this data dir then serves TLS with them.
        #[arg(long, num_args = 1.., value_name = "NAME")]
        tls_self_signed: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a key; prints FAL_KEY_ID and FAL_KEY_SECRET (the secret is shown only now).
    Create {
        /// The user the key is for (admin keys only; created if new) [default: your own user].
        #[arg(long)]
        user: Option<String>,
        /// Make an admin key (admin keys only).
        #[arg(long)]
        admin: bool,
        /// A note to recognize the key by.
        #[arg(long)]
        alias: Option<String>,
    },
    /// List keys: yours, or all of them with an admin key.
    List,
    /// Revoke a key: yours, or any with an admin key.
    Revoke { key_id: String },
}

/// Runs the command line `args` (program name first) and returns the process's exit code.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FAL_SERVERLESS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Server(ServerArgs { init: Some(ServerCommand::Init { data_dir, tls_self_signed }), .. }) => {
            let data_dir = data_dir.unwrap_or_else(default_data_dir);
            let (_, admin_key) = fal_server::init(&data_dir)?;
            match admin_key {
                Some((key, secret)) => print_first_key(&key.key_id, &secret),
                None => {
                    println!("{} already has keys; make more with `fal-serverless keys create`", data_dir.display())
                }
            }
            if !tls_self_signed.is_empty() {
                print_self_signed(&fal_server::self_signed(&data_dir, &tls_self_signed)?);
            }
            Ok(())
        }
        Command::Server(args) => serve(args).await,
        Command::Keys(command) => keys(command).await,
        // Walking and deleting trees: on a blocking thread.
        Command::Envs(args) => tokio::task::spawn_blocking(move || envs::run(args)).await?,
        Command::Function(apps::FunctionCommand::Serve(args)) => apps::serve(args),
        Command::Function(apps::FunctionCommand::Schedule(args)) => schedules::schedule(args),
        Command::Cron(command) => schedules::cron(&connect().await?, command).await,
        Command::Runs(command) => schedules::runs(&connect().await?, command).await,
        Command::Apps(command) => apps::apps(&connect().await?, command).await,
        Command::Logs(args) => apps::logs(&connect().await?, args).await,
        Command::Files(command) => {
            let target = Target::resolve(None)?;
            let client = Client::connect(&target).await?;
            files::run(&fal_client::rest::Rest::new(client.uri(), &target), command).await
        }
        Command::Secrets(command) => secrets::secrets(&connect().await?, command).await,
        Command::Workers => {
            let client = connect().await?;
            println!(
                "{:<10} {:<12} {:<8} {:<26} {:<6} {:>6}  {:<16} {:<15}",
                "PID", "USER", "MACHINE", "ENVIRONMENT", "BUSY", "CALLS", "HOSTNAME", "ADDRESS"
            );
            let or_dash = |s: String| if s.is_empty() { "-".to_string() } else { s };
            for w in client.workers().await? {
                println!(
                    "{:<10} {:<12} {:<8} {:<26} {:<6} {:>6}  {:<16} {:<15}",
                    w.worker_id,
                    w.user_id,
                    w.machine_type,
                    w.env_key,
                    w.busy,
                    w.calls,
                    or_dash(w.hostname),
                    or_dash(w.address)
                );
            }
            Ok(())
        }
    }
}

fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local").join("share")))
        .unwrap_or_else(std::env::temp_dir)
        .join("fal-serverless")
}

fn print_self_signed(made: &fal_server::SelfSigned) {
    let name = &made.names[0];
    println!();
    println!("Made a CA and a TLS certificate for {} (valid for 10 years):", made.names.join(", "));
    println!("  CA certificate (give it to clients): {}", made.ca.display());
    println!("  server certificate:                  {}", made.files.cert.display());
    println!("  server key (mode 0600):              {}", made.files.key.display());
    println!("A server started with this data dir serves TLS with them (or pass --tls-cert and --tls-key).");
    println!("Clients connect to one of those names, trusting the CA (copy ca.pem to them):");
    println!("  this SDK and CLI:    FAL_HOST=https://{name}:6005 FAL_SERVERLESS_CA_FILE=/path/to/ca.pem");
    println!("  fal-serverless 0.6.41 (grpcio), without ISOLATE_TEST_MODE (its FAL_HOST must start with \"api\"):");
    println!("                       FAL_HOST={name}:6005 GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=/path/to/ca.pem");
}

fn print_first_key(key_id: &str, secret: &str) {
    println!("Created the first admin key. The secret is shown only now; keep it safe:");
    println!("FAL_KEY_ID={key_id}");
    println!("FAL_KEY_SECRET={secret}");
}

async fn serve(args: ServerArgs) -> anyhow::Result<()> {
    let data_dir = args.data_dir.unwrap_or_else(default_data_dir);
    let listen = args.listen.or_else(|| args.local.then(|| SocketAddr::from(([127, 0, 0, 1], 0))));
    let mut config = ServerConfig::load(&data_dir, args.config.as_deref(), listen)?;
    if let Some(seconds) = args.idle_shutdown.or(args.local.then_some(900)) {
        config.idle_shutdown = Some(Duration::from_secs(seconds));
    }
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        config.tls = Some(fal_server::TlsFiles { cert, key });
    }
    // The zero-config server listens on loopback for this user's own SDK, which connects to it in plaintext.
    if args.local {
        config.tls = None;
    }
    let local = args.local;
    // The handlers are installed now, before the port serves: a SIGTERM that comes as soon as the server is ready
    // (a supervisor's, a test's) stops it as any other does, removing its namespaces and mounts, instead of
    // killing it with the signal's default action.
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let shutdown = async move {
        tokio::select! {
            _ = interrupt.recv() => {},
            _ = terminate.recv() => {},
        }
    };
    let mut failure = None;
    fal_server::serve(config, shutdown, |started: &Started| {
        let result = if local { write_local_credentials(&data_dir, started) } else { announce(started) };
        if let Err(error) = result {
            failure = Some(error);
        }
    })
    .await?;
    match failure {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

fn announce(started: &Started) -> anyhow::Result<()> {
    if let Some((key, secret)) = &started.admin_key {
        print_first_key(&key.key_id, secret);
    }
    match &started.tls {
        Some(tls) => {
            println!("serving TLS with {}", tls.cert.display());
            // The last word of this line is what clients set FAL_HOST to.
            println!("fal-serverless server listening on https://{}", started.address);
            println!(
                "point clients at it with FAL_HOST=https://NAME:{} (a name its certificate holds)",
                started.address.port()
            );
        }
        None => {
            println!("fal-serverless server listening on {}", started.address);
            println!("point clients at it with FAL_HOST={}", started.address);
        }
    }
    std::io::stdout().flush()?;
    Ok(())
}

/// Zero-config: the address and a key that works go to the credentials file, for the SDK and the CLI to find.
fn write_local_credentials(data_dir: &Path, started: &Started) -> anyhow::Result<()> {
    let store = Store::open(&data_dir.join("state.sqlite3"))?;
    // A previous file that cannot be trusted (someone else's, too open) is replaced, its key not reused.
    let previous = LocalServer::read().ok().flatten();
    let (key_id, key_secret) = match (&started.admin_key, previous) {
        (Some((key, secret)), _) => (key.key_id.clone(), secret.clone()),
        (None, Some(previous)) if store.verify(&previous.key_id, &previous.key_secret).is_ok() => {
            (previous.key_id, previous.key_secret)
        }
        (None, _) => {
            let (key, secret) = store.create_key("admin", fal_server::Scope::Admin, "local admin key")?;
            (key.key_id, secret)
        }
    };
    let info = LocalServer { host: started.address.to_string(), key_id, key_secret, pid: std::process::id() };
    let path = info.write()?;
    println!("fal-serverless local server listening on {} (credentials in {})", started.address, path.display());
    std::io::stdout().flush()?;
    Ok(())
}

async fn connect() -> anyhow::Result<Client> {
    let target = Target::resolve(None)?;
    Ok(Client::connect(&target).await?)
}

async fn keys(command: KeysCommand) -> anyhow::Result<()> {
    let client = connect().await?;
    match command {
        KeysCommand::Create { user, admin, alias } => {
            let scope = if admin { create_user_key_request::Scope::Admin } else { create_user_key_request::Scope::Api };
            let request = CreateUserKeyRequest { scope: scope as i32, alias, user_id: user };
            let (key_id, secret) = client.create_key(request).await?;
            println!("FAL_KEY_ID={key_id}");
            println!("FAL_KEY_SECRET={secret}");
        }
        KeysCommand::List => {
            println!("{:<18} {:<12} {:<6} {:<12} ALIAS", "KEY ID", "USER", "SCOPE", "CREATED");
            for key in client.list_keys().await? {
                let scope = if key.scope == create_user_key_request::Scope::Admin as i32 { "admin" } else { "api" };
                let created = key.created_at.map(|t| t.seconds).unwrap_or(0);
                println!("{:<18} {:<12} {:<6} {:<12} {}", key.key_id, key.user_id, scope, created, key.alias);
            }
        }
        KeysCommand::Revoke { key_id } => {
            if key_id.trim().is_empty() {
                bail!("name the key to revoke: `fal-serverless keys revoke KEY_ID` (see `fal-serverless keys list`)");
            }
            client.revoke_key(&key_id).await?;
            println!("revoked {key_id}");
        }
    }
    Ok(())
}
