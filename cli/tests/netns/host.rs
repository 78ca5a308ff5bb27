//! One simulated host: its namespaces, the processes started in it, its link to the switch.

use super::*;

/// One simulated machine of a `Net`.
pub struct Host {
    pub name: String,
    /// Its network namespace.
    pub ns: String,
    pub ip: Ipv4Addr,
    pub(super) switch: String,
    /// The veth end on the switch.
    pub(super) port: String,
    /// The veth end inside the host.
    pub(super) link: String,
    /// `unshare`, parent of the host's PID 1 (which dies with it, and takes the namespace along).
    pub(super) holder: Mutex<Option<Child>>,
    pub(super) procs: Mutex<Vec<Child>>,
}

impl Host {
    /// Starts the holder: new UTS, mount and PID namespaces inside the network namespace, a
    /// fresh tmpfs on /dev/shm, the hostname. Also brings a killed host back (a reboot).
    pub fn boot(&self) -> io::Result<()> {
        let mut holder = lock(&self.holder);
        if holder.is_some() {
            return Ok(());
        }
        let script = "mount -t tmpfs -o size=512m,mode=1777 tmpfs /dev/shm && hostname \"$1\" \
                      && echo ready && exec sleep infinity";
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .args(["unshare", "--uts", "--mount", "--propagation", "private"])
            .args(["--pid", "--fork", "--kill-child", "sh", "-c", script, "sh"])
            .arg(&self.name)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe. The holder dies with the thread that spawned it
        // (a killed test), and its PID 1 with it (--kill-child), and every process of the host.
        unsafe {
            cmd.pre_exec(|| {
                if prctl(PR_SET_PDEATHSIG, SIGKILL as c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            if let Some(out) = stdout {
                let _ = BufReader::new(out).read_line(&mut line);
            }
            let _ = tx.send(line);
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) if line.trim() == "ready" => {
                *holder = Some(child);
                Ok(())
            }
            other => {
                let _ = child.kill();
                let _ = child.wait();
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                Err(io::Error::other(format!(
                    "host {} did not boot ({other:?}): {}",
                    self.name,
                    err.trim()
                )))
            }
        }
    }

    /// Whether the host is up (booted and not killed).
    pub fn is_up(&self) -> bool {
        lock(&self.holder).is_some()
    }

    /// Starts `cmd` on this host (its network, hostname, /dev/shm and PID namespace); set env,
    /// stdio, args on `cmd` first. Returns its pid (as the test sees it). The process is a child
    /// of the test, killed by `kill`, `kill_all` or the `Net`'s drop.
    pub fn spawn(&self, cmd: Command) -> io::Result<u32> {
        let child = self.start(cmd)?;
        let pid = child.id();
        lock(&self.procs).push(child);
        Ok(pid)
    }

    fn start(&self, mut cmd: Command) -> io::Result<Child> {
        let holder = lock(&self.holder)
            .as_ref()
            .map(|c| c.id())
            .ok_or_else(|| io::Error::other(format!("host {} is down", self.name)))?;
        let open = |what: &str| File::open(format!("/proc/{holder}/ns/{what}"));
        let (net, uts, mnt) = (open("net")?, open("uts")?, open("mnt")?);
        let pid_ns = open("pid_for_children")?;
        let fds = (net.as_raw_fd(), uts.as_raw_fd(), mnt.as_raw_fd());
        // Entering a mount namespace moves the cwd to its /: go back to the same path there.
        let cwd = match cmd.get_current_dir() {
            Some(d) => d.to_path_buf(),
            None => std::env::current_dir()?,
        };
        let cwd = CString::new(cwd.into_os_string().into_vec()).map_err(io::Error::other)?;
        // SAFETY: between fork and exec the child only makes setns and chdir calls
        // (async-signal-safe) on descriptors and a string the parent keeps until `spawn` returns.
        unsafe {
            cmd.pre_exec(move || {
                enter(fds.0, CLONE_NEWNET)?;
                enter(fds.1, CLONE_NEWUTS)?;
                enter(fds.2, CLONE_NEWNS)?;
                if chdir(cwd.as_ptr()) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // The PID namespace applies to children of the thread that enters it: fork from a
        // thread of our own so the test's threads stay as they are.
        let spawned = std::thread::scope(|s| {
            s.spawn(|| {
                enter(pid_ns.as_raw_fd(), CLONE_NEWPID)?;
                cmd.spawn()
            })
            .join()
        });
        spawned.map_err(|_| io::Error::other("the spawning thread panicked"))?
    }

    /// Runs `cmd` on this host to its end, its output captured; kills it after `timeout`.
    pub fn run(&self, mut cmd: Command, timeout: Duration) -> io::Result<Output> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self.start(cmd)?;
        let pipe = |r: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut buf);
                }
                buf
            })
        };
        let out = pipe(child.stdout.take().map(|r| Box::new(r) as _));
        let err = pipe(child.stderr.take().map(|r| Box::new(r) as _));
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                let err = err.join().unwrap_or_default();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "a command on {} ran past {timeout:?}: {}",
                        self.name,
                        String::from_utf8_lossy(&err)
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(Output {
            status,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        })
    }

    /// SIGKILLs one process started by `spawn` (and reaps it).
    pub fn kill(&self, pid: u32) {
        let mut procs = lock(&self.procs);
        if let Some(i) = procs.iter().position(|c| c.id() == pid) {
            let mut c = procs.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The exit status of a process started by `spawn`, once it has ended.
    pub fn exited(&self, pid: u32) -> Option<ExitStatus> {
        let mut procs = lock(&self.procs);
        let c = procs.iter_mut().find(|c| c.id() == pid)?;
        c.try_wait().ok().flatten()
    }

    /// Pids of processes started by `spawn` that still run.
    pub fn running(&self) -> Vec<u32> {
        lock(&self.procs)
            .iter_mut()
            .filter_map(|c| matches!(c.try_wait(), Ok(None)).then(|| c.id()))
            .collect()
    }

    /// Power loss: SIGKILL the host's PID 1, which kills every process in the host's PID
    /// namespace at once (the kernel's doing), then reap ours. `boot` brings the host back.
    pub fn kill_all(&self) {
        if let Some(mut holder) = lock(&self.holder).take() {
            let _ = holder.kill();
            let _ = holder.wait();
        }
        for mut c in lock(&self.procs).drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Cuts the host's cable: its port on the switch goes down. Packets in either direction are
    /// lost silently (no reset, no error) until `restore_link`.
    pub fn cut_link(&self) -> io::Result<()> {
        ip(&["-n", &self.switch, "link", "set", &self.port, "down"])
    }

    pub fn restore_link(&self) -> io::Result<()> {
        ip(&["-n", &self.switch, "link", "set", &self.port, "up"])
    }

    /// Runs `f` on a thread inside this host's network namespace: sockets it makes belong to
    /// the host's network and can be used from any thread afterwards. (The test process itself
    /// sits in the root namespace, which has no route to the cluster.)
    pub fn within<T: Send>(&self, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
        let net = File::open(Path::new("/run/netns").join(&self.ns))?;
        let done = std::thread::scope(|s| {
            s.spawn(|| {
                enter(net.as_raw_fd(), CLONE_NEWNET)?;
                f()
            })
            .join()
        });
        done.map_err(|_| io::Error::other("the thread inside the namespace panicked"))?
    }

    /// A TCP connection made from this host.
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.within(|| TcpStream::connect_timeout(&addr, timeout))
    }

    /// A TCP listener on this host (the test serves from the cluster's network).
    pub fn listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        self.within(|| TcpListener::bind(addr))
    }

    /// Waits until something listens at `addr` (as seen from this host).
    pub fn wait_listening(&self, addr: SocketAddr, timeout: Duration) -> io::Result<()> {
        let start = Instant::now();
        loop {
            match self.connect(addr, Duration::from_secs(1)) {
                Ok(_) => return Ok(()),
                Err(e) if start.elapsed() > timeout => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("nothing listens at {addr} after {timeout:?}: {e}"),
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill_all();
    }
}
