//! A network namespace per jailed process, and what it may reach.
//!
//! Mechanism: a veth pair per namespace (iproute2) and one nftables table per server (nftables), both from the
//! distribution; no daemon. Each namespace is a *slot*: a /30 of a subnet (default `10.250.0.0/16`), named after the
//! /30's first address in hex (`fal-0afa0004`, for the namespace itself and the host's end of its veth). The host's
//! end has the /30's first host address, the namespace's end (`eth0`) the second, with the host's end as its
//! default route. The namespace also has its own loopback, so its ports, its `127.0.0.1` and its abstract unix
//! sockets are its own.
//!
//! Slots are shared by every server of the host, whatever subnet each uses: a slot is taken by holding an exclusive
//! `flock` on `/run/fal-serverless/net/<name>.lock` for as long as its namespace lives. The kernel releases the
//! lock of a crashed server, so whoever finds the slot free next removes what that server left (its namespace and
//! veth), as a starting server does for every free slot it finds.
//!
//! The table `inet fal_<tag>` of a server (replaced whole when the server starts, so a crashed run's rules go too)
//! holds the names of its namespaces' veths in a set and says, for packets that come from them:
//! * to the host itself (any of its addresses, loopback included): refused (ICMP "administratively prohibited", so
//!   a connection fails at once instead of hanging), except DNS, below;
//! * forwarded to an address in `allow`: accepted; to a private, loopback, link-local, CGNAT or multicast range
//!   (`10/8`, `172.16/12`, `192.168/16`, `100.64/10`, `127/8`, `169.254/16`, `0/8`, `224/3`): refused; anywhere
//!   else (public addresses): accepted and masqueraded, when egress is `internet`;
//! * IPv6: no namespace has an IPv6 address or route, so `::1`, `fe80::/10` and `fc00::/7` are out of reach with
//!   everything else of IPv6;
//! * DNS: the namespace's `/etc/resolv.conf` names the subnet's last but one address, which is translated (DNAT) to
//!   the host's resolver (or `[network] resolver`), the only host service a namespace reaches;
//! * and for packets that go *to* a namespace: only replies, and new connections from processes of uid 0 on the host
//!   (the server), are let through; other namespaces and other host users cannot open connections to it.
//!
//! With egress `none` no veth is made at all: the process gets a namespace with loopback only.

use std::fs::{self, File};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::SandboxError;

/// Where slot locks live: shared by every server of the host, gone at reboot with the namespaces themselves.
const LOCK_ROOT: &str = "/run/fal-serverless/net";
/// Ranges a namespace never reaches unless `allow` lists them.
const DENIED: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/3",
];
/// Namespaces kept ready so that a cold start does not wait for iproute2.
const READY: usize = 2;

/// What jailed processes may reach (`[network]` in the server's config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPolicy {
    /// What workers reach.
    pub egress: Egress,
    /// What environment builds reach (they download from package indexes, so `internet` by default).
    pub build_egress: Egress,
    /// IPv4 networks reachable although in a denied range (`10.1.0.0/16`).
    pub allow: Vec<Ipv4Net>,
    /// The subnet slots are cut from.
    pub subnet: Ipv4Net,
    /// The resolver namespaces' DNS queries go to (the host's: the first `nameserver` of `/etc/resolv.conf`).
    pub resolver: Option<SocketAddrV4>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// Public addresses (and `allow`) are reachable.
    Internet,
    /// Loopback only.
    None,
}

/// An IPv4 network, `a.b.c.d/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    pub address: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for Ipv4Net {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (address, prefix) = text.split_once('/').unwrap_or((text, "32"));
        let address: Ipv4Addr = address.trim().parse().map_err(|e| format!("{text:?}: {e}"))?;
        let prefix: u8 =
            prefix.trim().parse().ok().filter(|p| *p <= 32).ok_or_else(|| {
                format!("{text:?}: the prefix length must be 0 to 32 (IPv6 networks are not supported)")
            })?;
        let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
        if u32::from(address) & !mask != 0 {
            return Err(format!("{text:?} has host bits set; write its network address"));
        }
        Ok(Self { address, prefix })
    }
}

impl std::fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

impl NetworkPolicy {
    /// The default policy: egress to the internet, nothing allowed beyond it, slots from `10.250.0.0/16`, the
    /// host's resolver.
    pub fn internet() -> Self {
        Self {
            egress: Egress::Internet,
            build_egress: Egress::Internet,
            allow: Vec::new(),
            subnet: Ipv4Net { address: Ipv4Addr::new(10, 250, 0, 0), prefix: 16 },
            resolver: host_resolver(),
        }
    }
}

/// The first `nameserver` of `/etc/resolv.conf` that is IPv4, port 53.
pub fn host_resolver() -> Option<SocketAddrV4> {
    let text = fs::read_to_string("/etc/resolv.conf").ok()?;
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .find_map(|rest| rest.trim().parse::<Ipv4Addr>().ok())
        .map(|ip| SocketAddrV4::new(ip, 53))
}

/// The network namespaces of one server: its nftables table, its slots, a few namespaces kept ready.
#[derive(Debug)]
pub struct NetworkManager {
    policy: NetworkPolicy,
    table: String,
    slots: u32,
    /// The `resolv.conf` bound over `/etc/resolv.conf` in every namespace.
    resolv_conf: PathBuf,
    ready: Mutex<Vec<Namespace>>,
    /// Set while a thread refills `ready`, so that concurrent cold starts do not all make namespaces.
    refilling: AtomicBool,
    tally: Arc<Tally>,
}

/// A manager's namespaces that are not removed yet, and whether it has closed. The table is what restricts them, so
/// it goes only with the last of them: at close, or when the last namespace of a closed manager is removed.
#[derive(Debug, Default)]
struct Tally {
    table: String,
    live: AtomicUsize,
    closed: AtomicBool,
    table_removed: AtomicBool,
}

impl Tally {
    fn remove_table_if_unused(&self) {
        let unused = self.closed.load(Ordering::SeqCst) && self.live.load(Ordering::SeqCst) == 0;
        if unused && !self.table_removed.swap(true, Ordering::SeqCst) {
            if let Err(e) = nft(&format!("delete table inet {}\n", self.table)) {
                tracing::warn!("could not remove the nftables table {}: {e}", self.table);
            }
        }
    }
}

/// One network namespace with its veth and slot; removed, with them, when dropped.
#[derive(Debug)]
pub struct Namespace {
    name: String,
    /// `/run/netns/<name>`, for `setns`; `None` for a loopback-only namespace made by the jail itself.
    path: Option<PathBuf>,
    address: Option<Ipv4Addr>,
    _lock: Option<File>,
    /// Its manager's count (which it is one of) and table (which holds its veth's name).
    tally: Option<Arc<Tally>>,
}

impl Namespace {
    /// A namespace with loopback only: the jail makes it (bubblewrap's `--unshare-net`).
    pub fn loopback_only() -> Self {
        Self { name: String::new(), path: None, address: None, _lock: None, tally: None }
    }

    /// The namespace to enter before exec, if the jail should not make its own.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The namespace's address on its veth: where the server connects to a port of the process inside.
    pub fn address(&self) -> Option<Ipv4Addr> {
        self.address
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if let Some(tally) = &self.tally {
            remove_slot(&self.name, Some(&tally.table));
            tally.live.fetch_sub(1, Ordering::SeqCst);
            tally.remove_table_if_unused();
        }
    }
}

impl NetworkManager {
    /// Replaces the server's table `fal_<tag>` with one for `policy`, turns on IPv4 forwarding, and removes what
    /// crashed servers left in free slots. `run_dir` is where the namespaces' `resolv.conf` is written.
    pub fn setup(policy: NetworkPolicy, tag: &str, run_dir: &Path) -> Result<Self, SandboxError> {
        let size = 1u64 << (32 - policy.subnet.prefix as u64);
        // The last four addresses of the subnet are not a slot: one of them is the DNS address.
        let slots = u32::try_from(size / 4).unwrap_or(u32::MAX).saturating_sub(1);
        if slots == 0 {
            return Err(SandboxError::Unavailable(format!(
                "[network] subnet {} is too small: it needs at least 8 addresses (a /29)",
                policy.subnet
            )));
        }
        let table = format!("fal_{tag}");
        fs::create_dir_all(LOCK_ROOT).map_err(|e| io("create", Path::new(LOCK_ROOT), e))?;
        fs::create_dir_all(run_dir).map_err(|e| io("create", run_dir, e))?;
        let resolv_conf = run_dir.join("resolv.conf");
        fs::write(&resolv_conf, format!("nameserver {}\noptions ndots:0\n", dns_address(&policy.subnet)))
            .map_err(|e| io("write", &resolv_conf, e))?;
        let manager = Self {
            tally: Arc::new(Tally { table: table.clone(), ..Tally::default() }),
            table,
            slots,
            resolv_conf,
            policy,
            ready: Mutex::default(),
            refilling: Default::default(),
        };
        if manager.any_egress() {
            fs::write("/proc/sys/net/ipv4/ip_forward", "1")
                .map_err(|e| io("write", Path::new("/proc/sys/net/ipv4/ip_forward"), e))?;
            nft(&manager.ruleset())?;
            manager.sweep();
        }
        Ok(manager)
    }

    pub fn policy(&self) -> &NetworkPolicy {
        &self.policy
    }

    fn any_egress(&self) -> bool {
        self.policy.egress == Egress::Internet || self.policy.build_egress == Egress::Internet
    }

    /// The file to bind over `/etc/resolv.conf` in a namespace that has egress.
    pub fn resolv_conf(&self) -> &Path {
        &self.resolv_conf
    }

    /// A namespace for one process with `egress`: a ready one if there is one, else one made now. Blocks on
    /// iproute2 and nftables; call from a blocking context.
    pub fn take(&self, egress: Egress) -> Result<Namespace, SandboxError> {
        if egress == Egress::None {
            return Ok(Namespace::loopback_only());
        }
        if let Some(ready) = self.ready.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(ready);
        }
        self.create()
    }

    /// Makes namespaces until [`READY`] are kept ready. Blocking; meant for a background thread.
    pub fn refill(&self) {
        if !self.any_egress() || self.refilling.swap(true, Ordering::SeqCst) {
            return;
        }
        self.fill();
        self.refilling.store(false, Ordering::SeqCst);
    }

    fn fill(&self) {
        let closed = || self.tally.closed.load(Ordering::SeqCst);
        while !closed() && self.ready.lock().unwrap_or_else(|e| e.into_inner()).len() < READY {
            match self.create() {
                Ok(namespace) if closed() => drop(namespace),
                Ok(namespace) => self.ready.lock().unwrap_or_else(|e| e.into_inner()).push(namespace),
                Err(e) => {
                    tracing::warn!("could not prepare a network namespace: {e}");
                    return;
                }
            }
        }
    }

    fn create(&self) -> Result<Namespace, SandboxError> {
        for slot in 0..self.slots {
            let name = slot_name(self.host_end(slot, 0));
            let Some(lock) = lock_slot(&name)? else { continue };
            // Free: whatever is still there belongs to a server that died holding it.
            remove_stale(&name);
            let mut namespace = Namespace {
                name: name.clone(),
                path: None,
                address: Some(self.host_end(slot, 2)),
                _lock: Some(lock),
                tally: None,
            };
            self.make(slot, &name)?;
            namespace.path = Some(Path::new("/run/netns").join(&name));
            self.tally.live.fetch_add(1, Ordering::SeqCst);
            namespace.tally = Some(self.tally.clone());
            return Ok(namespace);
        }
        Err(SandboxError::Unavailable(format!(
            "all {} network namespaces of subnet {} are in use; give [network] subnet a larger range",
            self.slots, self.policy.subnet
        )))
    }

    fn make(&self, slot: u32, name: &str) -> Result<(), SandboxError> {
        let (host, inside) = (self.host_end(slot, 1), self.host_end(slot, 2));
        let made = ip(
            None,
            &format!(
                "netns add {name}\nlink add {name} type veth peer name eth0 netns {name}\naddr add {host}/30 dev \
                 {name}\nlink set {name} up\n"
            ),
        )
        .and_then(|()| {
            ip(
                Some(name),
                &format!(
                    "addr add {inside}/30 dev eth0\nlink set eth0 up\nlink set lo up\nroute add default via {host}\n"
                ),
            )
        })
        .and_then(|()| {
            if self.policy.resolver.is_some_and(|r| r.ip().is_loopback()) {
                // DNS translated to a loopback resolver must be routable from the veth.
                let knob = format!("/proc/sys/net/ipv4/conf/{name}/route_localnet");
                fs::write(&knob, "1").map_err(|e| io("write", Path::new(&knob), e))?;
            }
            nft(&format!("add element inet {} workers {{ \"{name}\" }}\n", self.table))
        });
        if made.is_err() {
            remove_slot(name, Some(&self.table));
        }
        made
    }

    /// Address `offset` (0: the /30 itself, 1: the host's end, 2: the namespace's) of `slot`'s /30.
    fn host_end(&self, slot: u32, offset: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.policy.subnet.address) + slot * 4 + offset)
    }

    /// Removes what crashed servers left in slots no live server holds.
    fn sweep(&self) {
        let Ok(entries) = fs::read_dir("/run/netns") else { return };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_slot_name(&name) {
                if let Ok(Some(_lock)) = lock_slot(&name) {
                    remove_stale(&name);
                }
            }
        }
    }

    /// The server's table: see the module doc.
    fn ruleset(&self) -> String {
        let table = &self.table;
        let allowed = self.policy.allow.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        let allowed_set = if allowed.is_empty() { String::new() } else { format!("elements = {{ {allowed} }}") };
        let denied = DENIED.join(", ");
        let dns = dns_address(&self.policy.subnet);
        let dnat = match self.policy.resolver {
            Some(resolver) => format!(
                "iifname @workers ip daddr {dns} udp dport 53 dnat ip to {resolver}\n\
                 iifname @workers ip daddr {dns} tcp dport 53 dnat ip to {resolver}"
            ),
            None => String::new(),
        };
        format!(
            "table inet {table}\ndelete table inet {table}\n\
             table inet {table} {{\n\
               set workers {{ type ifname; }}\n\
               set allowed {{ type ipv4_addr; flags interval; {allowed_set} }}\n\
               set denied {{ type ipv4_addr; flags interval; elements = {{ {denied} }} }}\n\
               chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;\n{dnat}\n}}\n\
               chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;\n\
                 iifname @workers oifname != @workers masquerade\n}}\n\
               chain forward {{ type filter hook forward priority filter; policy accept;\n\
                 oifname @workers ct state established,related accept\n\
                 oifname @workers drop\n\
                 iifname @workers ct status dnat accept\n\
                 iifname @workers ip daddr @allowed accept\n\
                 iifname @workers ip daddr @denied reject with icmpx type admin-prohibited\n\
                 iifname @workers meta nfproto ipv6 reject with icmpx type admin-prohibited\n\
               }}\n\
               chain input {{ type filter hook input priority filter; policy accept;\n\
                 iifname @workers ct state established,related accept\n\
                 iifname @workers ct status dnat accept\n\
                 iifname @workers reject with icmpx type admin-prohibited\n\
               }}\n\
               chain output {{ type filter hook output priority filter; policy accept;\n\
                 oifname @workers ct state established,related accept\n\
                 oifname @workers meta skuid != 0 reject with icmpx type admin-prohibited\n\
               }}\n\
             }}\n"
        )
    }
}

impl NetworkManager {
    /// Removes the namespaces kept ready (a stopping server calls it; those of live processes go with them), and
    /// the server's table with the last namespace it restricts (a table left behind by a killed server is replaced
    /// at the next start). Blocking.
    pub fn close(&self) {
        if !self.any_egress() || self.tally.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let ready = std::mem::take(&mut *self.ready.lock().unwrap_or_else(|e| e.into_inner()));
        drop(ready);
        self.tally.remove_table_if_unused();
    }
}

impl Drop for NetworkManager {
    fn drop(&mut self) {
        self.close();
    }
}

/// The address namespaces send DNS queries to: the subnet's last but one.
fn dns_address(subnet: &Ipv4Net) -> Ipv4Addr {
    let size = 1u64 << (32 - subnet.prefix as u64);
    Ipv4Addr::from((u32::from(subnet.address) as u64 + size - 2) as u32)
}

/// The name of the slot at `/30`: its namespace's and its host-side veth's (15 characters at most, as interfaces').
fn slot_name(block: Ipv4Addr) -> String {
    format!("fal-{:08x}", u32::from(block))
}

fn is_slot_name(name: &str) -> bool {
    name.strip_prefix("fal-").is_some_and(|hex| hex.len() == 8 && hex.chars().all(|c| c.is_ascii_hexdigit()))
}

/// The slot's lock, if no one else holds it.
fn lock_slot(name: &str) -> Result<Option<File>, SandboxError> {
    let path = Path::new(LOCK_ROOT).join(format!("{name}.lock"));
    let lock = File::create(&path).map_err(|e| io("create", &path, e))?;
    Ok(lock.try_lock().is_ok().then_some(lock))
}

/// Deletes slot `name`'s veth (which takes its peer with it) and namespace, and its name from `table`'s set.
fn remove_slot(name: &str, table: Option<&str>) {
    let _ = quiet(Command::new("ip").args(["link", "del", name]));
    let _ = quiet(Command::new("ip").args(["netns", "del", name]));
    if let Some(table) = table {
        let _ = nft(&format!("delete element inet {table} workers {{ \"{name}\" }}\n"));
    }
}

/// Removes a slot a dead server left: its veth, its namespace, and its name from every server's table (a table
/// of a server that never started again would otherwise apply its rules to the slot's next owner).
fn remove_stale(name: &str) {
    let exists = Path::new("/run/netns").join(name).exists() || Path::new("/sys/class/net").join(name).exists();
    if !exists {
        return;
    }
    remove_slot(name, None);
    let Ok(listed) = Command::new("nft").args(["list", "tables"]).stderr(Stdio::null()).output() else { return };
    for line in String::from_utf8_lossy(&listed.stdout).lines() {
        if let Some(table) = line.strip_prefix("table inet ").filter(|t| t.starts_with("fal_")) {
            let _ = nft(&format!("delete element inet {table} workers {{ \"{name}\" }}\n"));
        }
    }
}

fn quiet(command: &mut Command) -> std::io::Result<std::process::ExitStatus> {
    command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status()
}

/// Runs iproute2 commands, one a line, in one process (in namespace `netns`, if given).
fn ip(netns: Option<&str>, batch: &str) -> Result<(), SandboxError> {
    let mut command = Command::new("ip");
    if let Some(netns) = netns {
        command.args(["-n", netns]);
    }
    command.args(["-batch", "-"]);
    run_with_input(command, batch, "ip (iproute2)")
}

/// Applies an nftables script.
fn nft(script: &str) -> Result<(), SandboxError> {
    let mut command = Command::new("nft");
    command.args(["-f", "-"]);
    run_with_input(command, script, "nft (nftables)")
}

fn run_with_input(mut command: Command, input: &str, what: &str) -> Result<(), SandboxError> {
    let unavailable = |detail: String| SandboxError::Unavailable(format!("{what}: {detail}"));
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| unavailable(format!("{e}; install iproute2 and nftables")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).map_err(|e| unavailable(e.to_string()))?;
    }
    let output = child.wait_with_output().map_err(|e| unavailable(e.to_string()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(unavailable(String::from_utf8_lossy(&output.stderr).trim().to_string()))
    }
}

fn io(action: &'static str, path: &Path, source: std::io::Error) -> SandboxError {
    SandboxError::Io { action, path: path.to_path_buf(), source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_parse_and_refuse_host_bits_and_ipv6() {
        let net: Ipv4Net = "10.1.0.0/16".parse().unwrap();
        assert_eq!(net.to_string(), "10.1.0.0/16");
        assert_eq!("198.51.100.7".parse::<Ipv4Net>().unwrap().prefix, 32);
        assert!("10.1.0.1/16".parse::<Ipv4Net>().unwrap_err().contains("host bits"));
        assert!("fc00::/7".parse::<Ipv4Net>().is_err());
        assert!("10.0.0.0/33".parse::<Ipv4Net>().unwrap_err().contains("0 to 32"));
    }

    #[test]
    fn the_dns_address_is_outside_every_slot() {
        let subnet: Ipv4Net = "10.250.0.0/16".parse().unwrap();
        assert_eq!(dns_address(&subnet), Ipv4Addr::new(10, 250, 255, 254));
        let manager = NetworkManager {
            policy: NetworkPolicy { subnet, ..NetworkPolicy::internet() },
            table: "fal_test".into(),
            slots: 16383,
            resolv_conf: PathBuf::new(),
            ready: Mutex::default(),
            refilling: Default::default(),
            // Closed already: dropping it touches no table.
            tally: Arc::new(Tally { closed: AtomicBool::new(true), ..Tally::default() }),
        };
        // The last slot's namespace end is below the DNS address.
        assert_eq!(manager.host_end(16382, 2), Ipv4Addr::new(10, 250, 255, 250));
        assert_eq!(slot_name(manager.host_end(1, 0)), "fal-0afa0004");
        assert!(is_slot_name("fal-0afa0004") && !is_slot_name("fal-w1") && !is_slot_name("faltest-1"));
        let rules = manager.ruleset();
        assert!(rules.contains("iifname @workers ip daddr @denied reject"));
        assert!(rules.contains("oifname @workers meta skuid != 0 reject"));
        assert!(rules.contains("10.0.0.0/8") && rules.contains("169.254.0.0/16"));
    }
}
