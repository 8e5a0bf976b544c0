//! `fal-serverless secrets set|list|delete`: a user's secrets, the environment variables of all their workers. The
//! value is taken from the command line, a file, or standard input (which keeps it out of the shell's history and
//! of `ps`), and never printed.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Subcommand;
use fal_client::Client;

#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// Set a secret: an environment variable of every worker of yours from now on (warm ones are replaced).
    ///
    /// The value comes from VALUE, or --from-file, or standard input when VALUE is omitted or `-` (one trailing
    /// newline is dropped there). On the command line it is seen by `ps` and kept in your shell's history: prefer
    /// the other two.
    Set {
        /// An environment variable name: letters, digits and '_' (API_TOKEN, say).
        name: String,
        value: Option<String>,
        /// Read the value from this file, byte for byte.
        #[arg(long, value_name = "PATH", conflicts_with = "value")]
        from_file: Option<PathBuf>,
        /// Whose secret (admin keys only) [default: yours].
        #[arg(long)]
        user: Option<String>,
    },
    /// List secrets by name and when they were set (never their values): yours, or every user's with an admin key.
    List {
        /// Only this user's (admin keys only, for another user).
        #[arg(long)]
        user: Option<String>,
    },
    /// Delete a secret: new workers no longer get it, and warm ones are replaced.
    #[command(visible_alias = "rm")]
    Delete {
        name: String,
        /// Whose secret (admin keys only) [default: yours].
        #[arg(long)]
        user: Option<String>,
    },
}

pub async fn secrets(client: &Client, command: SecretsCommand) -> anyhow::Result<()> {
    match command {
        SecretsCommand::Set { name, value, from_file, user } => {
            let value = match (value, from_file) {
                (_, Some(path)) => {
                    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
                    text(bytes, &format!("the file {}", path.display()))?
                }
                (Some(value), None) if value != "-" => value,
                _ => from_stdin()?,
            };
            client.set_secret(&name, Some(value), user.clone()).await?;
            match user {
                Some(user) => println!("secret {name} of {user} set"),
                None => println!("secret {name} set"),
            }
        }
        SecretsCommand::List { user } => {
            println!("{:<32} {:<16} SET AT (UTC)", "NAME", "USER");
            for secret in client.list_secrets(user).await? {
                let set_at =
                    secret.created_time.map(|t| crate::apps::utc(t.seconds, t.nanos)).unwrap_or_else(|| "-".into());
                println!("{:<32} {:<16} {set_at}", secret.name, secret.user_id);
            }
        }
        SecretsCommand::Delete { name, user } => {
            if name.trim().is_empty() {
                bail!("name the secret to delete: `fal-serverless secrets delete NAME` (see `fal-serverless secrets list`)");
            }
            client.set_secret(&name, None, user).await?;
            println!("secret {name} deleted");
        }
    }
    Ok(())
}

/// The value from standard input, less one trailing newline (what `echo` and a typed line end with).
fn from_stdin() -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("type the value, then Enter and Ctrl-D:");
    }
    let mut bytes = Vec::new();
    stdin.lock().read_to_end(&mut bytes).context("cannot read the value from standard input")?;
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    text(bytes, "standard input")
}

fn text(bytes: Vec<u8>, what: &str) -> anyhow::Result<String> {
    String::from_utf8(bytes).map_err(|_| {
        anyhow::anyhow!("the value in {what} is not UTF-8 text; encode it (base64, say) and decode it in your function")
    })
}
