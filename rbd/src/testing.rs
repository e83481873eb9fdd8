//! A real single-node Ceph cluster for tests and benchmarks, from Debian's packages
//! (`ceph-mon`, `ceph-osd`, `ceph-common`): one monitor and one memstore OSD on 127.0.0.1, no
//! authentication, pool `rbd` of size one, in a temporary directory; ready in about a second.
//!
//! What keeps it fast and small: memstore with a page set of 4 KiB pages (otherwise the OSD
//! grows and random writes crawl), short paxos intervals (otherwise every map change waits about
//! a second), `osd crush chooseleaf type = 0` and pools of size one. The daemons run in the
//! foreground as children of a thread that lives as long as the process, with
//! `PR_SET_PDEATHSIG`, so they die with the test process even if it is killed; [`TestCluster`]
//! stops them by PID, the OSD before the monitor. [`shared`] gives the tests of one binary one
//! cluster, stopped at exit.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The pool every test cluster has.
pub const POOL: &str = "rbd";

/// A running cluster.
pub struct TestCluster {
    dir: tempfile::TempDir,
    port: u16,
    osd_id: String,
    mon: Mutex<Option<Child>>,
    osd: Mutex<Option<Child>>,
}

/// Spawns `cmd` from a thread that never exits, so that `PR_SET_PDEATHSIG` (which fires when the
/// spawning *thread* ends) fires only when the process ends.
fn spawn_daemon(mut cmd: Command) -> Child {
    type Req = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Req>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Req>();
        std::thread::Builder::new()
            .name("ceph-spawner".into())
            .spawn(move || {
                for (mut cmd, back) in rx {
                    let _ = back.send(cmd.spawn());
                }
                // Every sender is gone only at exit: stay, so the children keep their parent.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawn the ceph spawner thread");
        Mutex::new(tx)
    });
    // SAFETY: `prctl` is async-signal-safe; the closure touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let (back, rx) = mpsc::channel();
    tx.lock().unwrap().send((cmd, back)).unwrap();
    rx.recv().unwrap().expect("start a ceph daemon")
}

/// A free TCP port on 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .unwrap()
        .trim()
        .to_string()
}

fn check(what: &str, out: std::io::Result<Output>) -> String {
    let out = out.unwrap_or_else(|e| {
        panic!("{what}: {e} (are ceph-mon, ceph-osd and ceph-common installed?)")
    });
    assert!(
        out.status.success(),
        "{what}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Stops a daemon by PID: SIGTERM, then SIGKILL if it has not exited within `grace`.
fn stop(child: &mut Child, grace: Duration) {
    let pid = child.id() as i32;
    // SAFETY: signals our own child, which has not been reaped (so the PID is still ours).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let t = Instant::now();
    while t.elapsed() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl TestCluster {
    /// Starts a cluster with pool [`POOL`]; panics with the failing step's output.
    pub fn start() -> TestCluster {
        let dir = tempfile::Builder::new()
            .prefix("ferroblk-ceph")
            .tempdir()
            .unwrap();
        let port = free_port();
        let d = dir.path();
        for sub in ["mon", "osd", "run"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let fsid = uuid();
        let conf = format!(
            "[global]\n\
             fsid = {fsid}\n\
             mon host = v2:127.0.0.1:{port}\n\
             public addr = 127.0.0.1\n\
             ms bind ipv6 = false\n\
             auth cluster required = none\n\
             auth service required = none\n\
             auth client required = none\n\
             run dir = {run}\n\
             admin socket = {run}/$name.asok\n\
             pid file = {run}/$name.pid\n\
             log file = {dir}/$name.log\n\
             mon data = {dir}/mon\n\
             osd data = {dir}/osd\n\
             osd objectstore = memstore\n\
             memstore page set = true\n\
             memstore page size = 4096\n\
             memstore device bytes = 4294967296\n\
             paxos propose interval = 0.05\n\
             paxos min wait = 0.01\n\
             osd crush chooseleaf type = 0\n\
             osd pool default size = 1\n\
             osd pool default min size = 1\n\
             mon allow pool size one = true\n\
             mon warn on pool no redundancy = false\n\
             osd mon shutdown timeout = 1\n\
             osd fast shutdown = false\n",
            run = d.join("run").display(),
            dir = d.display(),
        );
        std::fs::write(d.join("ceph.conf"), conf).unwrap();
        let monmap = d.join("monmap");
        check(
            "monmaptool",
            Command::new("monmaptool")
                .args(["--create", "--fsid", &fsid, "--addv", "a"])
                .arg(format!("[v2:127.0.0.1:{port}]"))
                .arg(&monmap)
                .output(),
        );
        let mut c = TestCluster {
            port,
            osd_id: String::new(),
            mon: Mutex::new(None),
            osd: Mutex::new(None),
            dir,
        };
        check(
            "ceph-mon --mkfs",
            c.daemon("ceph-mon")
                .args(["--mkfs", "-i", "a", "--monmap"])
                .arg(&monmap)
                .output(),
        );
        c.start_mon();
        let osd_uuid = uuid();
        c.osd_id = check("ceph osd new", c.ceph(&["osd", "new", &osd_uuid]))
            .trim()
            .to_string();
        check(
            "ceph-osd --mkfs",
            c.daemon("ceph-osd")
                .args(["--mkfs", "-i", &c.osd_id, "--osd-uuid", &osd_uuid])
                .output(),
        );
        c.start_osd();
        check(
            "ceph osd pool create",
            c.ceph(&["osd", "pool", "create", POOL, "8"]),
        );
        check("rbd pool init", c.rbd(&["pool", "init", POOL]));
        c
    }

    /// A command for a daemon or CLI of this cluster (`-c ceph.conf`), quiet on stderr.
    fn daemon(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.arg("-c").arg(self.conf()).stdin(Stdio::null());
        cmd
    }

    /// Runs `ceph ARGS` against the cluster.
    pub fn ceph(&self, args: &[&str]) -> std::io::Result<Output> {
        self.daemon("ceph")
            .args(["--connect-timeout", "30"])
            .args(args)
            .output()
    }

    /// Runs `rbd ARGS` against the cluster.
    pub fn rbd(&self, args: &[&str]) -> std::io::Result<Output> {
        self.daemon("rbd").args(args).output()
    }

    /// Runs `rbd ARGS` and returns its stdout; panics with its output if it fails.
    pub fn rbd_ok(&self, args: &[&str]) -> String {
        check(&format!("rbd {}", args.join(" ")), self.rbd(args))
    }

    /// The cluster's ceph.conf.
    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("ceph.conf")
    }

    /// The temporary directory holding the cluster's state and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The monitor's address, as `mon_host` takes it.
    pub fn mon_host(&self) -> String {
        format!("v2:127.0.0.1:{}", self.port)
    }

    /// The declaration fields that reach this cluster (TOML), for a `kind = "rbd"` table.
    pub fn decl_fields(&self) -> String {
        format!(
            "mon_host = \"{}\"\nauth = \"none\"\npool = \"{POOL}\"\n",
            self.mon_host()
        )
    }

    /// Starts the monitor.
    fn start_mon(&self) {
        let mut mon = self.daemon("ceph-mon");
        mon.args(["-f", "-i", "a"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        *self.mon.lock().unwrap() = Some(spawn_daemon(mon));
    }

    /// Starts the OSD (again, after [`stop_osd`](Self::stop_osd)); memstore keeps what it held
    /// across a clean stop.
    pub fn start_osd(&self) {
        let mut osd = self.daemon("ceph-osd");
        osd.args(["-f", "-i", &self.osd_id])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        *self.osd.lock().unwrap() = Some(spawn_daemon(osd));
    }

    /// Stops the OSD cleanly (memstore saves its contents) and waits for it to exit.
    pub fn stop_osd(&self) {
        if let Some(mut c) = self.osd.lock().unwrap().take() {
            stop(&mut c, Duration::from_secs(30));
        }
    }

    /// Cuts the cluster off, as a lost network does, without losing what it holds: the monitor
    /// freezes (SIGSTOP), then the OSD stops cleanly (memstore saves its contents). Clients see
    /// their connections to the OSD close and hear nothing of it from the monitor.
    /// [`restore`](Self::restore) brings both back.
    pub fn cut(&self) {
        self.signal_mon(libc::SIGSTOP);
        self.stop_osd();
    }

    /// Brings back a cluster [`cut`](Self::cut) off: the OSD starts again and the monitor goes
    /// on (SIGCONT).
    pub fn restore(&self) {
        self.start_osd();
        self.signal_mon(libc::SIGCONT);
    }

    fn signal_mon(&self, signal: i32) {
        if let Some(c) = self.mon.lock().unwrap().as_ref() {
            // SAFETY: signals our own child, not yet reaped (so the PID is still ours).
            unsafe { libc::kill(c.id() as i32, signal) };
        }
    }

    /// Kills both daemons at once (SIGKILL), as a crash or a lost network would take them.
    pub fn kill(&self) {
        for d in [&self.osd, &self.mon] {
            if let Some(mut c) = d.lock().unwrap().take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Stops both daemons, the OSD first.
    pub fn stop(&self) {
        self.signal_mon(libc::SIGCONT);
        self.stop_osd();
        if let Some(mut c) = self.mon.lock().unwrap().take() {
            stop(&mut c, Duration::from_secs(10));
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One cluster for all the tests of a binary, started on first use and stopped when the process
/// exits.
pub fn shared() -> &'static TestCluster {
    static SHARED: OnceLock<TestCluster> = OnceLock::new();
    SHARED.get_or_init(|| {
        extern "C" fn stop_shared() {
            if let Some(c) = SHARED.get() {
                c.stop();
                // The static is never dropped: remove its directory here.
                let _ = std::fs::remove_dir_all(c.dir());
            }
        }
        let c = TestCluster::start();
        // SAFETY: registers a plain function that only stops children and removes a directory.
        unsafe { libc::atexit(stop_shared) };
        c
    })
}
