//! A private virtual network of simulated hosts, for tests of real multi-host runs on one machine.
//!
//! `Net::new()` makes a "switch" network namespace holding a Linux bridge. `Net::host(name)` adds
//! a host: a network namespace wired to the bridge by a veth pair, with the address
//! `10.213.N.i/24` (N picked per `Net`, i per host), and a "holder" process that owns the host's
//! own UTS namespace (its hostname), mount namespace (a fresh tmpfs on `/dev/shm`) and PID
//! namespace. Processes started with `Host::spawn` enter those namespaces (so ferroclip's
//! shared-memory transport sees different machines), stay direct children of the test, and all die
//! with the host's PID namespace when `Host::kill_all` SIGKILLs the holder, as at a power loss.
//!
//! Nothing is added to the root namespace: the veth ends are created inside the switch and host
//! namespaces, and the test talks to the cluster only through sockets made inside a host's
//! namespace (`Host::connect`). Names carry the test process's pid and a counter, so tests run in
//! parallel; `Drop` kills every process and deletes every namespace (links go with them), also
//! when a test panics; namespaces left by a killed test process are swept by the next `Net::new`.
//!
//! Needs root, `ip` (iproute2) and `unshare` (util-linux). Without them `Net::new` returns `None`
//! (the test skips), or panics when `CI=true`.
#![allow(dead_code)] // each test binary uses its own subset

use std::ffi::CString;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::raw::{c_char, c_int, c_ulong};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

mod host;
pub use host::Host;

const CLONE_NEWNS: c_int = 0x0002_0000;
const CLONE_NEWUTS: c_int = 0x0400_0000;
const CLONE_NEWPID: c_int = 0x2000_0000;
const CLONE_NEWNET: c_int = 0x4000_0000;
const PR_SET_PDEATHSIG: c_int = 1;
const SIGKILL: c_int = 9;

extern "C" {
    fn setns(fd: c_int, nstype: c_int) -> c_int;
    fn prctl(option: c_int, ...) -> c_int;
    fn geteuid() -> u32;
    fn kill(pid: c_int, sig: c_int) -> c_int;
    fn chdir(path: *const c_char) -> c_int;
}

/// Every namespace of this harness is named `fcmh-<pid>-<counter>-<what>`.
const NS_PREFIX: &str = "fcmh-";
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The calling thread (or, in `pre_exec`, the child) enters the namespace open at `fd`.
fn enter(fd: c_int, kind: c_int) -> io::Result<()> {
    // SAFETY: setns only reads its two integer arguments.
    if unsafe { setns(fd, kind) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `ip ARGS`, an error naming the command and its stderr when it fails.
fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Why this machine cannot run the harness, if it cannot.
fn unusable() -> Option<String> {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { geteuid() } != 0 {
        return Some("not root (network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN)".into());
    }
    for (tool, arg) in [("ip", "-V"), ("unshare", "--version")] {
        let ok = Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return Some(format!("`{tool}` is missing"));
        }
    }
    None
}

fn skip_or_fail(why: &str) -> Option<Net> {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("multi-host tests cannot run here (CI=true): {why}");
    }
    eprintln!("SKIPPED: multi-host tests need root, `ip` and `unshare`: {why}");
    None
}

/// Deletes namespaces of this harness whose creating process is gone (a test killed before its
/// `Drop` ran), SIGKILLing whatever still runs in them. Live tests' namespaces are left alone.
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(NS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(pids) = Command::new("ip").args(["netns", "pids", name]).output() {
            for p in String::from_utf8_lossy(&pids.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse::<c_int>().ok())
            {
                // SAFETY: kill only reads its arguments.
                unsafe { kill(p, SIGKILL) };
            }
        }
        let _ = ip(&["netns", "del", name]);
    }
}

/// A namespace named `name`, replacing a stale one of that name (same pid as an earlier,
/// crashed test process: no live process but this one can own the name).
fn add_netns(name: &str) -> io::Result<()> {
    if Path::new("/run/netns").join(name).exists() {
        let _ = ip(&["netns", "del", name]);
    }
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])
}

/// A private virtual network: a switch (bridge) and hosts plugged into it.
pub struct Net {
    /// `<pid>-<counter>`, in every namespace name.
    id: String,
    /// `<pid hex>g<counter hex>`, in every interface name (at most 15 characters).
    ifx: String,
    /// N of the network's 10.213.N.0/24.
    subnet: u8,
    switch: String,
    bridge: String,
    hosts: Mutex<Vec<Arc<Host>>>,
}

impl Net {
    /// A new network with no hosts; `None` (after saying why) when this machine cannot make one
    /// and `CI` is not `true`.
    pub fn new() -> Option<Net> {
        if let Some(why) = unusable() {
            return skip_or_fail(&why);
        }
        sweep_stale();
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{pid}-{n}");
        let ifx = format!("{pid:x}g{:x}", n % 256);
        let net = Net {
            switch: format!("{NS_PREFIX}{id}-sw"),
            bridge: format!("f{ifx}br"),
            subnet: 1 + ((u64::from(pid) * 31 + u64::from(n)) % 250) as u8,
            id,
            ifx,
            hosts: Mutex::new(Vec::new()),
        };
        if let Err(e) = add_netns(&net.switch) {
            return skip_or_fail(&format!("cannot create a network namespace: {e}"));
        }
        net.make_switch().expect("make the switch's bridge");
        Some(net)
    }

    fn make_switch(&self) -> io::Result<()> {
        let (sw, br) = (self.switch.as_str(), self.bridge.as_str());
        ip(&["-n", sw, "link", "add", br, "type", "bridge"])?;
        ip(&["-n", sw, "link", "set", br, "up"])
    }

    /// The network's prefix, e.g. `10.213.7.0/24`.
    pub fn subnet(&self) -> String {
        format!("10.213.{}.0/24", self.subnet)
    }

    /// Plugs a new host into the switch and boots it (`name`: its hostname, `[a-z0-9-]`).
    /// Call from the thread that will drop the `Net` (the holder dies with that thread).
    pub fn host(&self, name: &str) -> Arc<Host> {
        assert!(
            !name.is_empty()
                && name.len() <= 20
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "host name {name:?}: 1 to 20 of [a-z0-9-]"
        );
        let mut hosts = lock(&self.hosts);
        let i = hosts.len();
        assert!(i < 200, "too many hosts");
        assert!(
            hosts.iter().all(|h| h.name != name),
            "two hosts named {name}"
        );
        let host = Arc::new(Host {
            name: name.to_string(),
            ns: format!("{NS_PREFIX}{}-{name}", self.id),
            ip: Ipv4Addr::new(10, 213, self.subnet, i as u8 + 1),
            switch: self.switch.clone(),
            port: format!("f{}s{i}", self.ifx),
            link: format!("f{}h{i}", self.ifx),
            holder: Mutex::new(None),
            procs: Mutex::new(Vec::new()),
        });
        hosts.push(host.clone());
        drop(hosts);
        self.wire(&host)
            .unwrap_or_else(|e| panic!("wire host {name}: {e}"));
        host.boot()
            .unwrap_or_else(|e| panic!("boot host {name}: {e}"));
        host
    }

    fn wire(&self, h: &Host) -> io::Result<()> {
        add_netns(&h.ns)?;
        let (sw, ns) = (self.switch.as_str(), h.ns.as_str());
        let cidr = format!("{}/24", h.ip);
        ip(&[
            "-n", sw, "link", "add", &h.port, "type", "veth", "peer", "name", &h.link, "netns", ns,
        ])?;
        ip(&["-n", sw, "link", "set", &h.port, "master", &self.bridge])?;
        ip(&["-n", sw, "link", "set", &h.port, "up"])?;
        ip(&["-n", ns, "addr", "add", &cidr, "dev", &h.link])?;
        ip(&["-n", ns, "link", "set", &h.link, "up"])
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let hosts = std::mem::take(&mut *lock(&self.hosts));
        for h in &hosts {
            h.kill_all();
        }
        for h in &hosts {
            let _ = ip(&["netns", "del", &h.ns]); // its veth pair goes with it
        }
        let _ = ip(&["netns", "del", &self.switch]); // and the bridge with this one
    }
}
