//! Runs across simulated hosts (network namespaces, see `netns/mod.rs`): an S3 server
//! (`s3s-fs`) on one host, `ferroclip coordinator` on another, `ferroclip-worker join` processes on
//! three more, all over real TCP through a virtual switch. Whole hosts are SIGKILLed and links cut
//! mid-run; the workers' audit logs must show every sample of the epoch in exactly one applied
//! update and equal parameters on every rank at every step.
//!
//! Needs root, `ip` and `unshare` (skipped without them, failing when `CI=true`), and `s3s-fs`.
//! `MULTIHOST_KEEP=1` keeps each test's directory (logs, run dir, S3 files) and prints its path;
//! `MULTIHOST_DATA_FROM_FILES=1` has the run read the dataset from the S3 server's files instead
//! of over S3 (to tell a problem of the S3 path from the rest).

mod cluster;
mod netns;
mod run_common;

use cluster::*;
use netns::{Host, Net};
use run_common::step_of;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The `others=[..]` ranks of each "all-reduce over TCP" line of a worker log.
fn tcp_lines(log: &str) -> Vec<Vec<u64>> {
    log.lines()
        .filter(|l| l.contains(TCP_LINE))
        .map(|l| {
            l.split_once("others=[")
                .and_then(|(_, rest)| rest.split_once(']'))
                .map(|(list, _)| {
                    list.split(',')
                        .filter_map(|r| r.trim().parse().ok())
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect()
}

fn workers(s: &serde_json::Value) -> usize {
    s["workers"].as_array().map(|w| w.len()).unwrap_or(0)
}

fn recoveries(s: &serde_json::Value) -> u64 {
    s["counters"]["recoveries"].as_u64().unwrap_or(0)
}

/// The harness itself: hostnames, /dev/shm and PID namespaces per host, TCP over the switch, a
/// cut cable, and a host's power loss.
#[test]
fn hosts_are_separate_machines_on_one_network() {
    let Some(net) = Net::new() else { return };
    let a = net.host("alpha");
    let b = net.host("beta");
    let facts = |h: &Host| {
        let mut c = Command::new("sh");
        c.args(["-c", "echo $(hostname) $(stat -c %d /dev/shm)"]);
        let out = h.run(c, Duration::from_secs(10)).expect("probe");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let (fa, fb) = (facts(&a), facts(&b));
    let (fa, fb): (Vec<_>, Vec<_>) = (fa.split(' ').collect(), fb.split(' ').collect());
    assert_eq!((fa[0], fb[0]), ("alpha", "beta"));
    assert_ne!(fa[1], fb[1], "two hosts share one /dev/shm");
    let mut pwd = Command::new("pwd");
    pwd.current_dir("/tmp");
    let out = a.run(pwd, Duration::from_secs(10)).expect("pwd");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "/tmp");

    // Each process is in its host's PID namespace (NSpid: the test's pid, then the host's).
    let mut sleeper = Command::new("sleep");
    sleeper.arg("600");
    let pid = a.spawn(sleeper).expect("spawn sleep");
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let nspid = st.lines().find(|l| l.starts_with("NSpid:")).expect("NSpid");
    assert_eq!(nspid.split_whitespace().count(), 3, "{nspid}");
    // A grandchild: killing the host must take it too.
    let mut forker = Command::new("sh");
    forker
        .args(["-c", "sleep 600 & echo $!; wait"])
        .stdout(Stdio::piped());
    a.spawn(forker).expect("spawn forker");

    // TCP from beta to alpha over the switch; nothing gets through while alpha's cable is cut.
    let addr = SocketAddr::from((a.ip, 7000));
    let listener = a.listen(addr).expect("listen on alpha");
    let ping = || {
        let mut s = b.connect(addr, Duration::from_secs(1))?;
        s.write_all(b"x")?;
        let (mut peer, _) = listener.accept()?;
        peer.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; 1];
        peer.read_exact(&mut buf)?;
        std::io::Result::Ok(buf[0])
    };
    assert_eq!(ping().expect("beta reaches alpha"), b'x');
    a.cut_link().expect("cut");
    let err = b
        .connect(addr, Duration::from_secs(1))
        .expect_err("connected through a cut cable");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    a.restore_link().expect("restore");
    // A link brought back up takes a moment to carry traffic again (carrier, bridge port
    // state): retry for a while, as a real client would, instead of one 1 s connect.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let again = loop {
        match ping() {
            Ok(x) => break x,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("beta does not reach alpha yet: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("beta reaches alpha again: {e}"),
        }
    };
    assert_eq!(again, b'x');

    // Power loss: every process of the host is gone, the grandchild included.
    let in_ns = |ns: &str| -> Vec<String> {
        let out = Command::new("ip")
            .args(["netns", "pids", ns])
            .output()
            .expect("ip netns pids");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    assert!(in_ns(&a.ns).len() >= 3, "{:?}", in_ns(&a.ns));
    let t = Instant::now();
    a.kill_all();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !in_ns(&a.ns).is_empty() {
        assert!(Instant::now() < deadline, "left alive: {:?}", in_ns(&a.ns));
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("host powered off in {:?}", t.elapsed());
    assert!(
        a.spawn(Command::new("true")).is_err(),
        "spawned on a dead host"
    );
    assert!(facts(&b).starts_with("beta "), "the other host lives on");
    // And it boots again, with a fresh /dev/shm.
    a.boot().expect("reboot");
    assert_eq!(facts(&a).split(' ').next(), Some("alpha"));
}

/// Three hosts × two workers: the epoch finishes exactly once, and ranks on other hosts
/// all-reduce over TCP while the two on one host still see one host.
#[test]
fn a_run_across_three_hosts_finishes_exactly_once_over_tcp() {
    let t0 = Instant::now();
    let Some(c) = Cluster::start(3, 2, 2400) else {
        return;
    };
    let s = c.wait_until("the end of the epoch", Duration::from_secs(150), |s| {
        s["state"] == "finished"
    });
    eprintln!(
        "finished: {} steps in {:.1}s ({} generations, {} recoveries)",
        step_of(&s),
        t0.elapsed().as_secs_f64(),
        s["counters"]["generations"],
        recoveries(&s)
    );
    c.assert_contract();
    for h in &c.hosts {
        for w in 0..2 {
            let id = format!("{}-w{w}", h.name);
            let lines = tcp_lines(&c.worker_log(&id));
            assert!(!lines.is_empty(), "{id} never said \"{TCP_LINE}\"");
            // In the last generation (all six): four ranks elsewhere, the co-located one not.
            let last = lines.last().expect("a line");
            assert_eq!(last.len(), 4, "{id}: others = {last:?}");
        }
    }
}

/// Loses host `which` mid-run by `lose` (described as `how`); the other four workers go on, and
/// the run ends with the whole contract.
fn a_host_lost_mid_run(which: usize, how: &str, lose: impl FnOnce(&Host)) {
    let t0 = Instant::now();
    let Some(c) = Cluster::start(3, 2, 2400) else {
        return;
    };
    let s = c.wait_until("6 workers at step 3", Duration::from_secs(120), |s| {
        step_of(s) >= 3 && workers(s) == 6
    });
    let before = step_of(&s);
    lose(&c.hosts[which]);
    let killed = Instant::now();
    let s = c.wait_until(
        "a step committed after the host's loss",
        Duration::from_secs(60),
        |s| recoveries(s) >= 1 && step_of(s) > before,
    );
    eprintln!(
        "host {how} at step {before}: step {} committed {:.2}s later (coordinator: {:.2}s from detection)",
        step_of(&s),
        killed.elapsed().as_secs_f64(),
        s["counters"]["last_recovery_s"].as_f64().unwrap_or(f64::NAN)
    );
    assert_eq!(workers(&s), 4, "the survivors go on: {s}");
    let s = c.wait_until("the end of the epoch", Duration::from_secs(150), |s| {
        s["state"] == "finished"
    });
    eprintln!(
        "finished: {} steps in {:.1}s",
        step_of(&s),
        t0.elapsed().as_secs_f64()
    );
    c.assert_contract();
}

/// SIGKILL every process of one host mid-run (a power loss): the others go on without it.
#[test]
fn losing_a_whole_host_mid_run_recovers() {
    a_host_lost_mid_run(1, "lost", |h| h.kill_all());
}

/// A power loss as the network sees it: the host's cable is cut first, then its processes die,
/// so no FIN or RST ever reaches the others; they find out by timeouts alone.
#[test]
fn a_host_gone_silent_mid_run_recovers() {
    a_host_lost_mid_run(0, "silent", |h| {
        h.cut_link().expect("cut the link");
        h.kill_all();
    });
}

/// One host's cable is pulled mid-run for a few seconds, then plugged back in.
#[test]
fn a_cut_link_mid_step_recovers() {
    let t0 = Instant::now();
    let Some(c) = Cluster::start(3, 2, 2400) else {
        return;
    };
    let s = c.wait_until("6 workers at step 3", Duration::from_secs(120), |s| {
        step_of(s) >= 3 && workers(s) == 6
    });
    let before = step_of(&s);
    c.hosts[2].cut_link().expect("cut the link");
    let cut = Instant::now();
    std::thread::sleep(Duration::from_secs(6));
    c.hosts[2].restore_link().expect("restore the link");
    let s = c.wait_until(
        "a step committed after the cut",
        Duration::from_secs(60),
        |s| recoveries(s) >= 1 && step_of(s) > before,
    );
    eprintln!(
        "link cut at step {before} for 6s: step {} committed {:.2}s after the cut, {} workers",
        step_of(&s),
        cut.elapsed().as_secs_f64(),
        workers(&s)
    );
    let s = c.wait_until("the end of the epoch", Duration::from_secs(150), |s| {
        s["state"] == "finished"
    });
    eprintln!(
        "finished: {} steps in {:.1}s, {} workers, {} deaths, {} recoveries",
        step_of(&s),
        t0.elapsed().as_secs_f64(),
        workers(&s),
        s["counters"]["worker_deaths"],
        recoveries(&s)
    );
    c.assert_contract();
}
