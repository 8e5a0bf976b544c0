//! Nested calls: a function that calls other isolated functions reaches this server from inside its worker, as its
//! user, with a key valid only while that worker lives.
//!
//! Each new worker of a call gets, from the call's [`CallerLink`] (an engine [`WorkerLink`]):
//! * in a jailed worker's network namespace, a listener of this server on the namespace's own loopback, on the
//!   server's own port number (6005 if that is 8080, where apps serve), made by a short-lived thread that enters the namespace only to create the socket (a socket
//!   stays in the namespace it was made in). Its connections are served as the port's are (`lib.rs` merges them).
//!   The namespace's rules stay as they were (`fal-sandbox`'s `network.rs`): this listener is the one way to the
//!   server, and it is plaintext because the namespace's loopback carries nothing but that worker's own traffic;
//! * an `/etc/hosts` naming [`SERVER_NAME`] as that loopback, and the name the call's client reached the server by
//!   (its request's authority, when it is a host name), each with its `rest.` twin (the original client's REST host):
//!   the original client insists on a host that starts with `api`, and pickles the host it called with the function,
//!   so a nested call of its reaches `<that name>:<the server's port>`, which inside the worker is this listener;
//! * `FAL_HOST`, `FAL_KEY_ID` and `FAL_KEY_SECRET` (a worker key of its user, `keys.rs`), `IS_ISOLATE_AGENT=1` (with
//!   which the original client uses those keys instead of any pickled with the function) and `ISOLATE_TEST_MODE=1`
//!   (the original client's switch to plaintext gRPC and REST; this project's client honours it too);
//! * this project's SDK (the `fal_serverless` package the server runs from, when it knows it), read-only and after the
//!   environment's own modules, so that an isolated function pickled with the one that calls it can be called.
//!
//! Unjailed workers share the host's network: they get the server's own address instead. Workers of a jailed server
//! whose workers have no network at all (`[network] egress = "none"`) get nothing: there is no way to the server.
//!
//! Depth: a worker key carries one more than the depth of its worker's calls, workers of different depths are never
//! shared (the link's class), and a call deeper than `[limits] max_call_depth` is refused: no fork bomb through the
//! server.

pub(crate) mod keys;

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fal_engine::{LinkGrant, WorkerLink};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use self::keys::WorkerKeys;
use crate::apps::APP_PORT;

/// The name a jailed worker reaches its server by (`/etc/hosts` in its jail).
pub(crate) const SERVER_NAME: &str = "api.fal-serverless.internal";
/// The worker-side port when the server's own is [`APP_PORT`].
const FALLBACK_WORKER_PORT: u16 = 6005;
/// The SDK's package dir, as the `fal-serverless` console script names it for the server it starts.
pub(crate) const SDK_VARIABLE: &str = "FAL_SERVERLESS_SDK";

/// What every worker link of this server shares.
#[derive(Debug)]
pub(crate) struct Nested {
    keys: Arc<WorkerKeys>,
    /// Connections accepted in workers' namespaces, for the serving loop.
    connections: mpsc::UnboundedSender<TcpStream>,
    runtime: tokio::runtime::Handle,
    /// Where the `/etc/hosts` files shown to jailed workers are written (one per name a client used).
    hosts_dir: PathBuf,
    sdk: Option<Sdk>,
    /// Where unjailed workers reach the server, and whether it speaks plaintext there.
    address: SocketAddr,
    plaintext: bool,
    /// Whether workers are jailed (then only a namespace of their own reaches the server).
    jailed: bool,
    /// The links made so far, by user, depth and client name: a warm call reuses its link rather than building one.
    /// Bounded: client names are capped at [`MAX_CLIENT_NAMES`], depths at the server's limit.
    links: Mutex<HashMap<LinkKey, Arc<CallerLink>>>,
    /// The distinct host names clients reached the server by, each a hosts file and a class of warm workers.
    client_names: Mutex<HashSet<String>>,
}

/// What tells links apart: their user, their depth, the host name their client used.
type LinkKey = (String, u32, Option<String>);

/// How many distinct host names a client may reach the server by and have workers know it under that name too.
/// A client chooses its `Host`/`:authority`, so without a cap each new name would be a new hosts file and a new
/// class of warm workers; past it, workers know the server by [`SERVER_NAME`] only (nested calls still work,
/// with `FAL_HOST` set to that name).
const MAX_CLIENT_NAMES: usize = 16;

/// This project's SDK as workers see it: `layer` holds only a link named `fal_serverless` to `package`.
#[derive(Debug)]
struct Sdk {
    layer: PathBuf,
    package: PathBuf,
}

/// How [`Nested`] is set up.
pub(crate) struct NestedParts<'a> {
    pub keys: Arc<WorkerKeys>,
    pub run_dir: &'a Path,
    pub layers_dir: &'a Path,
    /// The SDK's package dir (`fal_serverless/`), if the server knows it.
    pub sdk_package: Option<PathBuf>,
    pub address: SocketAddr,
    pub plaintext: bool,
    pub jailed: bool,
}

impl Nested {
    /// Writes the jail's `/etc/hosts` and the SDK's layer; returns the links' source and the connections their
    /// listeners accept. A part that cannot be written is logged and left out (nested calls then fail clearly in the
    /// function), never a reason not to start.
    pub(crate) fn new(parts: NestedParts<'_>) -> (Arc<Self>, mpsc::UnboundedReceiver<TcpStream>) {
        let (connections, accepted) = mpsc::unbounded_channel();
        let sdk = parts.sdk_package.and_then(|package| match sdk_layer(parts.layers_dir, &package) {
            Ok(layer) => Some(Sdk { layer, package }),
            Err(e) => {
                tracing::warn!(
                    "cannot offer the SDK at {} to workers: {e}; a function calling another needs fal_serverless \
                     in its own requirements",
                    package.display()
                );
                None
            }
        });
        if sdk.is_none() {
            tracing::info!(
                "the SDK's package is unknown ({SDK_VARIABLE} is not set: the server was not started by the \
                 fal-serverless console script), so workers are not offered it"
            );
        }
        let nested = Self {
            keys: parts.keys,
            connections,
            runtime: tokio::runtime::Handle::current(),
            hosts_dir: parts.run_dir.join("hosts"),
            sdk,
            address: loopback_form(parts.address),
            plaintext: parts.plaintext,
            jailed: parts.jailed,
            links: Mutex::default(),
            client_names: Mutex::default(),
        };
        (Arc::new(nested), accepted)
    }

    /// The link for the workers of a call of `user_id` at `depth` (0: called from outside any function), whose
    /// client reached the server as `authority` (`host:port`), if known.
    pub(crate) fn link(self: &Arc<Self>, user_id: &str, depth: u32, authority: Option<&str>) -> Arc<dyn WorkerLink> {
        let client_name = authority
            .and_then(host_name)
            .map(str::to_ascii_lowercase)
            .filter(|name| name != SERVER_NAME)
            .filter(|name| self.admit_client_name(name));
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let link = links.entry((user_id.to_string(), depth, client_name.clone())).or_insert_with(|| {
            let class = format!("depth {depth} via {}", client_name.as_deref().unwrap_or("-"));
            Arc::new(CallerLink { nested: self.clone(), user_id: user_id.to_string(), depth, client_name, class })
        });
        link.clone()
    }

    /// Whether workers may know the server by `name` too: a name seen before, or a new one under the cap.
    fn admit_client_name(&self, name: &str) -> bool {
        let mut names = self.client_names.lock().unwrap_or_else(|e| e.into_inner());
        if names.contains(name) {
            return true;
        }
        if names.len() >= MAX_CLIENT_NAMES {
            tracing::debug!(
                name,
                "clients have reached this server by {MAX_CLIENT_NAMES} names already; workers of this call know it \
                 as {SERVER_NAME} only"
            );
            return false;
        }
        names.insert(name.to_string());
        true
    }

    /// The `/etc/hosts` of workers whose client used `client_name`: written once per name.
    fn hosts_file(&self, client_name: Option<&str>) -> std::io::Result<PathBuf> {
        let mut names = vec![SERVER_NAME.to_string(), SERVER_NAME.replacen("api", "rest", 1)];
        if let Some(name) = client_name {
            names.push(name.to_string());
            if let Some(rest) = name.strip_prefix("api") {
                names.push(format!("rest{rest}"));
            }
        }
        let path = self.hosts_dir.join(client_name.unwrap_or("default"));
        if !path.exists() {
            std::fs::create_dir_all(&self.hosts_dir)?;
            let text = format!("127.0.0.1\tlocalhost {}\n::1\tlocalhost\n", names.join(" "));
            // Written whole, then renamed: a worker starting at the same time never sees half of it.
            let partial = path.with_extension(format!("partial-{:08x}", rand::random::<u32>()));
            std::fs::write(&partial, text)?;
            std::fs::rename(&partial, &path)?;
        }
        Ok(path)
    }

    /// Serves `listener`'s connections until the returned guard is dropped.
    fn accept(&self, listener: StdListener) -> std::io::Result<Accepting> {
        let _entered = self.runtime.enter();
        let listener = TcpListener::from_std(listener)?;
        let connections = self.connections.clone();
        let task = self.runtime.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        if connections.send(stream).is_err() {
                            return; // the server is stopping
                        }
                    }
                    Err(e) => {
                        // Out of descriptors, say: the worker's next try may succeed; never spin.
                        tracing::debug!("a worker's connection could not be accepted: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(Accepting(task))
    }
}

/// A worker's listener, served until dropped.
#[derive(Debug)]
struct Accepting(tokio::task::JoinHandle<()>);

impl Drop for Accepting {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The link of one call's workers.
#[derive(Debug)]
pub(crate) struct CallerLink {
    nested: Arc<Nested>,
    user_id: String,
    depth: u32,
    /// The host name the call's client reached the server by.
    client_name: Option<String>,
    /// Its class of warm workers (see [`WorkerLink::class`]).
    class: String,
}

impl WorkerLink for CallerLink {
    fn attach(&self, netns: Option<&Path>) -> Result<LinkGrant, String> {
        let nested = &self.nested;
        let mut grant = LinkGrant::default();
        let accepting = match (netns, nested.jailed) {
            (Some(netns), _) => {
                let port = worker_port(nested.address.port());
                let listener = listen_in(netns, port).map_err(|e| {
                    format!(
                        "cannot open the server's listener in the worker's network namespace {}: {e}",
                        netns.display()
                    )
                })?;
                let accepting =
                    nested.accept(listener).map_err(|e| format!("cannot serve the worker's listener: {e}"))?;
                let hosts = nested.hosts_file(self.client_name.as_deref()).map_err(|e| {
                    format!("cannot write the /etc/hosts of workers in {}: {e}", nested.hosts_dir.display())
                })?;
                grant.env.push(("FAL_HOST".into(), format!("{SERVER_NAME}:{port}")));
                grant.env.push(("ISOLATE_TEST_MODE".into(), "1".into()));
                grant.hosts_file = Some(hosts);
                Some(accepting)
            }
            // A jailed worker with loopback only: nothing reaches the server.
            (None, true) => return Ok(grant),
            (None, false) => {
                grant.env.push(("FAL_HOST".into(), nested.address.to_string()));
                if nested.plaintext {
                    grant.env.push(("ISOLATE_TEST_MODE".into(), "1".into()));
                }
                None
            }
        };
        let key = nested.keys.mint(&self.user_id, self.depth + 1);
        grant.env.push(("FAL_KEY_ID".into(), key.key_id.clone()));
        grant.env.push(("FAL_KEY_SECRET".into(), key.secret.clone()));
        grant.env.push(("IS_ISOLATE_AGENT".into(), "1".into()));
        if let Some(sdk) = &nested.sdk {
            grant.read_only = vec![sdk.layer.clone(), sdk.package.clone()];
            grant.python_path = Some(sdk.layer.clone());
        }
        let keep: Box<dyn Any + Send + Sync> = Box::new((key, accepting));
        grant.keep = Some(keep);
        Ok(grant)
    }

    fn class(&self) -> String {
        self.class.clone()
    }
}

/// A listener on `127.0.0.1:port` of the network namespace at `netns`. The namespace is entered by a thread of its
/// own, which ends right after: no other work of the server ever runs in a worker's namespace.
fn listen_in(netns: &Path, port: u16) -> std::io::Result<StdListener> {
    let namespace = File::open(netns)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on a descriptor we own; it changes only this (scoped, short-lived) thread's namespace.
                if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let listener = StdListener::bind((Ipv4Addr::LOCALHOST, port))?;
                listener.set_nonblocking(true)?;
                Ok(listener)
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the thread entering the namespace panicked")))
    })
}

/// `layers/sdk/` holding only a link `fal_serverless` to `package`, so that adding the layer to a worker's `sys.path`
/// offers that package and nothing else of where it is installed.
fn sdk_layer(layers_dir: &Path, package: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let package = package.canonicalize()?;
    if !package.join("__init__.py").is_file() {
        return Err(std::io::Error::other(format!("{} is not a Python package", package.display())));
    }
    let layer = layers_dir.join("sdk");
    std::fs::create_dir_all(&layer)?;
    // The data dir is the server's alone; the jail shows this dir alone, which its workers' users must read.
    std::fs::set_permissions(&layer, std::fs::Permissions::from_mode(0o755))?;
    let link = layer.join("fal_serverless");
    if std::fs::read_link(&link).ok().as_deref() != Some(package.as_path()) {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&package, &link)?;
    }
    Ok(layer)
}

/// The port of the server's listener in a worker's namespace: the server's own, so that `<name>:<port>` a client
/// used means the server inside the worker too, unless that is the port apps serve on there.
fn worker_port(server_port: u16) -> u16 {
    if server_port == APP_PORT {
        FALLBACK_WORKER_PORT
    } else {
        server_port
    }
}

/// The host of `authority` (`host:port`) if it is a plain DNS name (no IP address, nothing a hosts file or a file
/// name could be confused by).
fn host_name(authority: &str) -> Option<&str> {
    let host = authority.rsplit_once(':').map_or(authority, |(host, _)| host);
    let plain = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
        })
        && host.parse::<Ipv4Addr>().is_err()
        && host != "localhost";
    plain.then_some(host)
}

/// Where a process of this host reaches a server listening on `address`: loopback for an unspecified address.
fn loopback_form(address: SocketAddr) -> SocketAddr {
    if address.ip().is_unspecified() {
        SocketAddr::from((Ipv4Addr::LOCALHOST, address.port()))
    } else {
        address
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sdk_layer_offers_the_package_alone_and_is_kept_across_starts() {
        let dir = tempfile::tempdir().unwrap();
        let package = dir.path().join("site/fal_serverless");
        std::fs::create_dir_all(&package).unwrap();
        std::fs::write(package.join("__init__.py"), "").unwrap();
        std::fs::write(dir.path().join("site/other.py"), "").unwrap();
        let layer = sdk_layer(&dir.path().join("layers"), &package).unwrap();
        let entries: Vec<_> = std::fs::read_dir(&layer).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(entries, ["fal_serverless"]);
        assert_eq!(sdk_layer(&dir.path().join("layers"), &package).unwrap(), layer);
        assert!(layer.join("fal_serverless/__init__.py").is_file());
        assert!(sdk_layer(&dir.path().join("layers"), dir.path()).is_err(), "not a package");
    }

    #[test]
    fn only_plain_host_names_go_into_a_hosts_file() {
        assert_eq!(host_name("api.fal-serverless.test:6005"), Some("api.fal-serverless.test"));
        assert_eq!(host_name("server"), Some("server"));
        for refused in ["127.0.0.1:6005", "[::1]:6005", "localhost:1", "a b:1", "../x:1", "-x:1", "a..b", ":1", ""] {
            assert_eq!(host_name(refused), None, "{refused}");
        }
    }

    #[tokio::test]
    async fn client_names_are_capped_and_links_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (nested, _accepted) = Nested::new(NestedParts {
            keys: Arc::new(WorkerKeys::default()),
            run_dir: dir.path(),
            layers_dir: &dir.path().join("layers"),
            sdk_package: None,
            address: "127.0.0.1:7000".parse().unwrap(),
            plaintext: true,
            jailed: true,
        });
        let classes: Vec<String> = (0..MAX_CLIENT_NAMES + 4)
            .map(|i| nested.link("u", 0, Some(&format!("api{i}.example:1"))).class())
            .collect();
        assert_eq!(classes[0], "depth 0 via api0.example");
        assert_eq!(classes[MAX_CLIENT_NAMES - 1], format!("depth 0 via api{}.example", MAX_CLIENT_NAMES - 1));
        assert!(classes[MAX_CLIENT_NAMES..].iter().all(|c| c == "depth 0 via -"), "{classes:?}");
        // A name seen before is still known, in any case; the same call's link is the same one.
        assert_eq!(nested.link("u", 1, Some("API0.example:1")).class(), "depth 1 via api0.example");
        let (a, b) = (nested.link("u", 0, Some("api0.example:1")), nested.link("u", 0, Some("api0.example:2")));
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn the_workers_listener_keeps_clear_of_the_port_apps_serve_on() {
        assert_eq!(worker_port(7000), 7000);
        assert_eq!(worker_port(APP_PORT), FALLBACK_WORKER_PORT);
    }

    #[test]
    fn unjailed_workers_reach_an_unspecified_address_on_loopback() {
        assert_eq!(loopback_form("0.0.0.0:7000".parse().unwrap()), "127.0.0.1:7000".parse().unwrap());
        assert_eq!(loopback_form("10.0.0.2:7000".parse().unwrap()), "10.0.0.2:7000".parse().unwrap());
    }
}
