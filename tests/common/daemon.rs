//! `ferroblk serve` for tests that run it as a child process: its configuration is
//! `ferroblk.toml` and its control socket `rpc.sock` in one directory, its output appended to
//! `daemon.log` there (a restarted daemon adds to the same log).

use std::net::TcpListener;
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A daemon child that is killed (and reaped) when dropped while still running, so a failing
/// test does not leave it behind.
pub struct Daemon(Child);

impl Deref for Daemon {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Daemon {
    /// SIGTERM, then waits up to 60 s; true when the daemon exited cleanly in time (one that
    /// ignores SIGTERM is killed and counts as a failure, not a hung test).
    pub fn stop(&mut self) -> bool {
        let pid = i32::try_from(self.0.id()).unwrap();
        // SAFETY: kill(2) on our own child's pid with a valid signal has no memory effects.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(60) {
            if let Some(st) = self.0.try_wait().unwrap() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        false
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The daemon binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_ferroblk");

/// Starts `ferroblk serve --config DIR/ferroblk.toml` in `dir` and waits for its control socket.
pub fn start_daemon(dir: &Path) -> Daemon {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("daemon.log"))
        .unwrap();
    let mut child = Daemon(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(dir.join("ferroblk.toml"))
            .current_dir(dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(dir.join("rpc.sock")).is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("daemon exited before its control socket appeared: {st}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "daemon did not start:\n{}",
            std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Calls `method` with JSON `params` through `ferroblk rpc`; panics on an error reply.
pub fn rpc(dir: &Path, method: &str, params: &str) -> String {
    let out = Command::new(BIN)
        .args(["rpc", "--socket"])
        .arg(dir.join("rpc.sock"))
        .arg(method)
        .arg(params)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rpc {method}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The one-line request (trimmed) a guest script's `say WORD` sent on a connection accepted
/// from the listener of a guest test's host side, with the connection to answer on.
pub fn read_request(
    stream: std::io::Result<std::net::TcpStream>,
) -> Option<(std::net::TcpStream, String)> {
    use std::io::BufRead;
    let s = stream.ok()?;
    let mut line = String::new();
    std::io::BufReader::new(&s).read_line(&mut line).ok()?;
    Some((s, line.trim().to_string()))
}

/// A free loopback TCP port, never one this process handed out before: the kernel may give
/// the port of a just-closed probe socket again, and two listeners of one daemon (or two tests
/// running at once) must not get the same one.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("ephemeral port")
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// The host side of a guest test: a loopback listener that takes one-line requests from the
/// guest script (`say WORD` in the lab scripts) and acts on the daemon:
/// - `resize`: grows bdev `disk` to 512 MiB over the RPC, answers `resized`;
/// - `kill`: kills the daemon with SIGKILL while the guest has writes in it, and starts it again
///   on the same directory. Without `expect_after_restart`, the kill comes once bdev `watch`
///   has taken `min_writes` more writes after the answer (the guest's fio is then in its write
///   phase). With it, the kill cannot miss: `watch` must be a `delay` bdev, whose write delay
///   is set to an hour before the answer, so every write the guest sends from then on stays in
///   flight in the daemon; the kill comes once at least `min_writes` are held and their number
///   stopped growing (see [`GuestRequests::held_at_kill`]), and the restarted daemon (with its
///   configured delay) must log `expect_after_restart` within 120 s, or the request is
///   recorded as `kill: ...` with what went wrong;
/// - `done`: answers `bye` and stops listening.
pub struct GuestRequests {
    /// The port the guest connects to (at 10.0.2.2, QEMU's user-mode address of the host).
    pub port: u16,
    events: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    held: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl GuestRequests {
    /// Starts listening; `daemon` is replaced by the restarted one after a `kill`.
    pub fn serve(
        dir: &Path,
        daemon: std::sync::Arc<std::sync::Mutex<Daemon>>,
        watch: &str,
        min_writes: u64,
        expect_after_restart: Option<&str>,
    ) -> GuestRequests {
        use std::io::Write;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let held = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (dir, watch, ev) = (dir.to_path_buf(), watch.to_string(), events.clone());
        let held2 = held.clone();
        let expect = expect_after_restart.map(str::to_string);
        let log_count = |dir: &Path, what: &str| -> usize {
            std::fs::read_to_string(dir.join("daemon.log"))
                .unwrap_or_default()
                .matches(what)
                .count()
        };
        // Writes `watch` has taken (counted when submitted to it).
        let writes = move |dir: &Path, watch: &str| -> u64 {
            let v: serde_json::Value =
                serde_json::from_str(&rpc(dir, "bdev_list", &format!(r#"{{"name": "{watch}"}}"#)))
                    .unwrap();
            v[0]["stats"]["ops"]["write"].as_u64().unwrap()
        };
        let restart = move |daemon: &std::sync::Mutex<Daemon>, dir: &Path| {
            let mut d = daemon.lock().unwrap();
            d.kill().unwrap();
            d.wait().unwrap();
            std::thread::sleep(Duration::from_millis(500));
            *d = start_daemon(dir);
        };
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Some((mut s, what)) = read_request(stream) else {
                    continue;
                };
                match what.as_str() {
                    "resize" => {
                        rpc(&dir, "bdev_resize", r#"{"name": "disk", "size": "512MiB"}"#);
                        let _ = writeln!(s, "resized");
                    }
                    "kill" => match expect.as_deref() {
                        None => {
                            let start = writes(&dir, &watch);
                            let _ = writeln!(s, "killing soon");
                            drop(s);
                            let t = Instant::now();
                            while writes(&dir, &watch) < start + min_writes
                                && t.elapsed() < Duration::from_secs(300)
                            {
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            restart(&daemon, &dir);
                        }
                        Some(e) => {
                            // Hold every write from now on, then let the guest start.
                            rpc(
                                &dir,
                                "bdev_delay_set",
                                &format!(r#"{{"name": "{watch}", "write_us": 3600000000}}"#),
                            );
                            let start = writes(&dir, &watch);
                            let _ = writeln!(s, "killing soon");
                            drop(s);
                            let seen = log_count(&dir, e);
                            let t = Instant::now();
                            let (mut last, mut stable) = (start, Instant::now());
                            loop {
                                let now = writes(&dir, &watch);
                                if now != last {
                                    (last, stable) = (now, Instant::now());
                                }
                                if last >= start + min_writes
                                    && stable.elapsed() >= Duration::from_secs(1)
                                {
                                    break;
                                }
                                if t.elapsed() > Duration::from_secs(600) {
                                    ev.lock().unwrap().push(format!(
                                        "kill: only {} writes held after 600 s",
                                        last - start
                                    ));
                                    break;
                                }
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            // Every write counted since `start` is still held: none of them
                            // can complete for an hour.
                            held2.store(last - start, std::sync::atomic::Ordering::Release);
                            restart(&daemon, &dir);
                            let t = Instant::now();
                            while log_count(&dir, e) == seen
                                && t.elapsed() < Duration::from_secs(120)
                            {
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            if log_count(&dir, e) == seen {
                                ev.lock().unwrap().push(format!(
                                    "kill: the restarted daemon did not log '{e}' within 120 s"
                                ));
                            }
                        }
                    },
                    "done" => {
                        let _ = writeln!(s, "bye");
                    }
                    _ => {
                        let _ = writeln!(s, "unknown");
                    }
                }
                ev.lock().unwrap().push(what.clone());
                if what == "done" {
                    return;
                }
            }
        });
        GuestRequests {
            port,
            events,
            held,
            thread,
        }
    }

    /// The guest script's side of these requests: a shell function `say WORD` that sends WORD
    /// to this listener (at 10.0.2.2, the host's loopback as the guest sees it) and prints the
    /// answer. Scripts put it where they write `__SAY__`.
    pub fn script(&self, script: &str) -> String {
        let say = format!(
            "say() {{\n  exec 3<>/dev/tcp/10.0.2.2/{}\n  echo \"$1\" >&3\n  read -r -t 300 reply <&3\n  \
             exec 3>&-\n  echo \"host answered: $reply\"\n}}",
            self.port
        );
        script.replace("__SAY__", &say)
    }

    /// How many writes were held in the daemon when a `kill` with `expect_after_restart` came
    /// (0 before).
    pub fn held_at_kill(&self) -> u64 {
        self.held.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits for `done` and returns the requests received, in order.
    pub fn join(self) -> Vec<String> {
        self.thread.join().unwrap();
        std::mem::take(&mut *self.events.lock().unwrap())
    }
}
