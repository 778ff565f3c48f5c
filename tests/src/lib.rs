//! Harness for the whole-process tests: a real mosquitto per test on a free loopback port, the
//! real `edge` and `trainer` binaries as child processes, and an MQTT watcher that records what
//! the devices publish.
//!
//! The binaries are the ones `cargo test --workspace --release` builds next to this test
//! (target/release/); run the tests through that command (README).

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::messages::Message;

/// Path of a workspace binary built beside the running test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run the tests with `cargo test --workspace --release` (README)",
        path.display()
    );
    path
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

pub fn wait_port(port: u16, timeout: Duration) -> bool {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Runs a binary to completion; panics with its output when it fails.
pub fn run_ok(name: &str, args: &[&str]) -> String {
    let (ok, out) = run(name, args);
    assert!(ok, "{name} {args:?} failed:\n{out}");
    out
}

/// `trainer package`: signs `model` with `key` as `version`, one golden image.
pub fn package(model: &Path, key: &Path, version: u64, golden: &Path, out: &Path) {
    package_with(model, key, version, &[golden], &[], out);
}

/// `trainer package` with several golden images and extra flags.
pub fn package_with(
    model: &Path,
    key: &Path,
    version: u64,
    golden: &[&Path],
    extra: &[&str],
    out: &Path,
) {
    let s = |p: &Path| p.display().to_string();
    let version = version.to_string();
    let (model, key, out) = (s(model), s(key), s(out));
    let golden: Vec<String> = golden.iter().map(|g| s(g)).collect();
    let mut args = vec![
        "package",
        "--model",
        &model,
        "--key",
        &key,
        "--version",
        &version,
    ];
    for g in &golden {
        args.extend(["--golden", g.as_str()]);
    }
    args.extend(extra);
    args.extend(["--out", &out]);
    run_ok("trainer", &args);
}

/// A folder of fixtures made with the real `trainer`: key pairs, a synthetic NEU-style set,
/// untrained models, signed packages. The folder is kept (tests of one binary share it through
/// a `OnceLock`).
pub struct Fixtures {
    pub dir: PathBuf,
}

impl Fixtures {
    /// A new folder under the system's temp dir, named after `prefix`.
    pub fn new(prefix: &str) -> Fixtures {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("tempdir")
            .keep();
        Fixtures { dir }
    }

    /// Fixtures written into an existing folder.
    pub fn at(dir: &Path) -> Fixtures {
        Fixtures {
            dir: dir.to_path_buf(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn p(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// `trainer keygen`: keys/NAME.key and keys/NAME.pub; returns the public key (hex).
    pub fn keygen(&self, name: &str) -> String {
        run_ok(
            "trainer",
            &["keygen", "--out", &self.p("keys"), "--name", name],
        );
        std::fs::read_to_string(self.path(&format!("keys/{name}.pub")))
            .expect("public key")
            .trim()
            .to_string()
    }

    /// `trainer synth` into synth/: `per_class` images of each class (synth/images/CLASS_N.jpg).
    pub fn synth(&self, per_class: usize, seed: u64) {
        run_ok(
            "trainer",
            &[
                "synth",
                "--out",
                &self.p("synth"),
                "--per-class",
                &per_class.to_string(),
                "--seed",
                &seed.to_string(),
            ],
        );
    }

    /// `trainer init-model`: an untrained detector of `size` in NAME.safetensors.
    pub fn init_model(&self, name: &str, size: &str, seed: u64) -> PathBuf {
        let out = self.path(&format!("{name}.safetensors"));
        run_ok(
            "trainer",
            &[
                "init-model",
                "--size",
                size,
                "--seed",
                &seed.to_string(),
                "--out",
                &out.display().to_string(),
            ],
        );
        out
    }

    /// A synthetic image made by [`Fixtures::synth`], as a golden sample.
    pub fn golden(&self, image: &str) -> PathBuf {
        self.path(&format!("synth/images/{image}"))
    }
}

/// Runs a binary; returns (success, stdout + stderr).
pub fn run(name: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new(bin(name))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// A mosquitto broker on a loopback port, killed on drop.
pub struct Broker {
    pub port: u16,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Broker {
    /// Plain TCP, anonymous.
    pub fn start(dir: &Path) -> Broker {
        let port = free_port();
        Self::start_with(
            dir,
            port,
            &format!("listener {port} 127.0.0.1\nallow_anonymous true\n"),
        )
    }

    /// With the given listener configuration (TLS, passwords).
    pub fn start_with(dir: &Path, port: u16, listener: &str) -> Broker {
        Self::start_conf(dir, port, listener, "persistence false\n")
    }

    /// Plain TCP with persistence on (sessions and queued messages survive a restart), as a
    /// production broker runs.
    pub fn start_persistent(dir: &Path, port: u16) -> Broker {
        let store = dir.join(format!("mosquitto-{port}-db"));
        std::fs::create_dir_all(&store).expect("mosquitto persistence dir");
        Self::start_conf(
            dir,
            port,
            &format!("listener {port} 127.0.0.1\nallow_anonymous true\n"),
            // `user root`: mosquitto started as root otherwise drops to the `mosquitto` user,
            // which cannot write the test's private directory, and its persistence silently
            // fails (it has no effect for any other user).
            &format!(
                "persistence true\npersistence_location {}/\nautosave_interval 1\nuser root\n",
                store.display()
            ),
        )
    }

    fn start_conf(dir: &Path, port: u16, listener: &str, persistence: &str) -> Broker {
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        std::fs::write(
            &conf,
            // max_packet_size: the broker refuses what no client of the protocol accepts (as a
            // production broker should, docs/operations.md), so an oversized message cannot
            // sit in a device's queue.
            // A configuration that sets its own limit keeps it.
            if listener.contains("max_packet_size") {
                format!("{listener}{persistence}max_queued_messages 100000\n")
            } else {
                format!(
                    "{listener}{persistence}max_queued_messages 100000\nmax_packet_size {}\n",
                    protocol::mqtt::MAX_PACKET
                )
            },
        )
        .expect("writing mosquitto.conf");
        let mut broker = Broker {
            port,
            log: dir.join(format!("mosquitto-{port}.log")),
            conf,
            child: None,
        };
        broker.restart();
        broker
    }

    pub fn restart(&mut self) {
        self.kill();
        let log = std::fs::File::create(&self.log).expect("mosquitto log");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("mosquitto not found: install it (apt-get install mosquitto)");
        self.child = Some(child);
        assert!(
            wait_port(self.port, Duration::from_secs(10)),
            "mosquitto did not listen on {}: {}",
            self.port,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM: mosquitto saves its persistence file and exits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill(2) on our child's pid.
            unsafe { kill(c.id() as i32, 15) };
            let _ = c.wait();
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What mosquitto printed (connections, disconnections, errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An `edge run` process with its config and log.
pub struct Edge {
    pub id: String,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    starts: usize,
    /// Extra environment for the process (e.g. `EDGE_FAULTS`).
    pub env: Vec<(String, String)>,
}

impl Edge {
    pub fn start(dir: &Path, id: &str, config: &str) -> Edge {
        Self::start_with_env(dir, id, config, &[])
    }

    /// [`Edge::start`] with extra environment variables (kept for restarts).
    pub fn start_with_env(dir: &Path, id: &str, config: &str, env: &[(&str, &str)]) -> Edge {
        let root = dir.join(id);
        std::fs::create_dir_all(&root).expect("edge dir");
        let path = root.join("edge.toml");
        std::fs::write(&path, config).expect("edge.toml");
        let mut edge = Edge {
            id: id.to_string(),
            config: path,
            log: root.join("edge.log"),
            child: None,
            starts: 0,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        edge.restart();
        edge
    }

    /// Starts the daemon again (after `kill9` or `stop`); the log is appended to.
    pub fn restart(&mut self) {
        self.kill9();
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("edge log");
        let child = Command::new(bin("edge"))
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting edge");
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("edge running");
        // SAFETY: plain kill(2) on our child's pid.
        unsafe { kill(c.id() as i32, 15) };
        c.wait().expect("edge exit")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// (topic, payload) of every message seen.
type Log = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Records every message under `edgeinsp/#` on a broker.
pub struct Watcher {
    messages: Log,
    _thread: std::thread::JoinHandle<()>,
}

impl Watcher {
    pub fn start(port: u16) -> Watcher {
        Self::start_with(protocol::mqtt::BrokerConfig::plain("127.0.0.1", port))
    }

    pub fn start_with(broker: protocol::mqtt::BrokerConfig) -> Watcher {
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = messages.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let options = broker
                    .options(&format!("watcher-{}", free_port()))
                    .expect("options");
                let mut conn = protocol::mqtt::Connection::start(
                    options,
                    vec![("edgeinsp/#".to_string(), rumqttc::QoS::AtLeastOnce)],
                );
                let _ = conn.wait_connected(Duration::from_secs(10)).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = ready_tx.send(());
                while let Some(m) = conn.incoming.recv().await {
                    sink.lock()
                        .expect("lock")
                        .push((m.topic, m.payload.to_vec()));
                }
            });
        });
        let _ = ready_rx.recv_timeout(Duration::from_secs(10));
        Watcher {
            messages,
            _thread: thread,
        }
    }

    /// Waits for a message on a topic ending in `suffix` that `pred` accepts; returns it.
    pub fn wait<T: Message>(
        &self,
        suffix: &str,
        timeout: Duration,
        pred: impl Fn(&T) -> bool,
    ) -> Option<T> {
        let until = Instant::now() + timeout;
        loop {
            {
                let messages = self.messages.lock().expect("lock");
                for (topic, payload) in messages.iter().rev() {
                    if topic.ends_with(suffix)
                        && let Ok(msg) = T::decode(payload)
                        && pred(&msg)
                    {
                        return Some(msg);
                    }
                }
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every message of type `T` seen on topics ending in `suffix`, in arrival order.
    pub fn all<T: Message>(&self, suffix: &str) -> Vec<T> {
        let messages = self.messages.lock().expect("lock");
        messages
            .iter()
            .filter(|(topic, _)| topic.ends_with(suffix))
            .filter_map(|(_, payload)| T::decode(payload).ok())
            .collect()
    }

    /// The latest status a device published.
    pub fn status(&self, device: &str) -> Option<protocol::Status> {
        self.wait::<protocol::Status>(&format!("/{device}/status"), Duration::ZERO, |_| true)
    }

    /// Waits until a device's latest status satisfies `pred`; panics with the last one seen.
    pub fn wait_status(
        &self,
        device: &str,
        timeout: Duration,
        pred: impl Fn(&protocol::Status) -> bool,
    ) -> protocol::Status {
        let until = Instant::now() + timeout;
        loop {
            let last = self.status(device);
            if let Some(s) = &last
                && pred(s)
            {
                return s.clone();
            }
            if Instant::now() >= until {
                panic!("{device}: status never matched; last seen: {last:#?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The edge config used by the tests: a device on `broker_port` with a factory package.
pub fn edge_config(
    id: &str,
    groups: &[&str],
    broker_port: u16,
    trusted: &str,
    factory: &Path,
    extra_models: &str,
) -> String {
    format!(
        "{}\n[mqtt]\nhost = \"127.0.0.1\"\nport = {broker_port}\nkeep_alive_s = 2\n",
        offline_edge_config(id, groups, trusted, factory, extra_models)
    )
}

/// The same device without a broker (`[device]`, `[storage]`, `[models]`): add sections after it.
pub fn offline_edge_config(
    id: &str,
    groups: &[&str],
    trusted: &str,
    factory: &Path,
    extra_models: &str,
) -> String {
    format!(
        r#"[device]
id = "{id}"
site = "test"
line = "line1"
groups = [{groups}]

[storage]
dir = "state"

[models]
trusted_keys = ["{trusted}"]
factory = "{factory}"
{extra_models}
"#,
        groups = groups
            .iter()
            .map(|g| format!("\"{g}\""))
            .collect::<Vec<_>>()
            .join(", "),
        factory = factory.display(),
    )
}

/// A TCP proxy in front of a broker: `cut` drops every connection through it and refuses new
/// ones (the device's network is down; the broker and other clients are fine) until `restore`.
pub struct Proxy {
    pub port: u16,
    enabled: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn start(upstream: u16) -> Proxy {
        Self::start_with_delay(upstream, Duration::ZERO)
    }

    /// A proxy that holds every byte for `one_way` in each direction (a round trip of twice
    /// that), as a WAN link does.
    pub fn start_with_delay(upstream: u16, one_way: Duration) -> Proxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy port");
        let port = listener.local_addr().expect("addr").port();
        let enabled = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (on, list) = (enabled.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if !on.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused in effect
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let pipe = move |mut from: TcpStream, mut to: TcpStream| {
                    if one_way.is_zero() {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        });
                        return;
                    }
                    // A delay line: the reader stamps each chunk, the writer releases it
                    // `one_way` later, in order.
                    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                    });
                    std::thread::spawn(move || {
                        use std::io::Write;
                        for (at, data) in rx {
                            let due = at + one_way;
                            let now = Instant::now();
                            if due > now {
                                std::thread::sleep(due - now);
                            }
                            if to.write_all(&data).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                };
                let mut l = list.lock().expect("lock");
                for s in [&client, &server] {
                    if let Ok(c) = s.try_clone() {
                        l.push(c);
                    }
                }
                pipe(
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                pipe(server, client);
            }
        });
        Proxy {
            port,
            enabled,
            conns,
        }
    }

    pub fn cut(&self) {
        self.enabled
            .store(false, std::sync::atomic::Ordering::SeqCst);
        for s in self.conns.lock().expect("lock").drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.enabled
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// GET, with the status and body (any status); panics when nothing answers.
pub fn get(url: &str) -> (u16, String) {
    try_get(url).unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// GET; an error while the daemon is not listening yet.
pub fn try_get(url: &str) -> Result<(u16, String), ureq::Error> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent.get(url).call()?;
    let status = resp.status().as_u16();
    Ok((status, resp.body_mut().read_to_string()?))
}

/// A sample's value in a Prometheus text page; panics when it is absent.
pub fn metric(metrics: &str, name: &str) -> f64 {
    metric_or(metrics, name).unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
}

/// A sample's value in a Prometheus text page (`name` with its labels, as printed).
pub fn metric_or(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The Python that runs the test tools in tests/tools (`EDGE_TEST_PYTHON`, else `python3`),
/// checked to have `module`.
pub fn python_with(module: &str) -> String {
    let python = std::env::var("EDGE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{python} cannot import {module}: `pip install -r tests/tools/requirements.txt` \
         (or point EDGE_TEST_PYTHON at a Python that has it; .ci/run makes one)"
    );
    python
}

/// A PLC stand-in: tests/tools/modbus_plc.py, an independent Modbus/TCP server (pymodbus) that
/// logs every write it accepts as JSON lines.
pub struct PlcServer {
    pub port: u16,
    pub log: PathBuf,
    child: Option<Child>,
}

/// One write the PLC accepted.
#[derive(Clone, Debug)]
pub struct PlcWrite {
    /// Seconds since the epoch, when the server applied it.
    pub t: f64,
    /// Modbus function code (5 coil, 6 register, 16 registers).
    pub fc: u8,
    pub address: u16,
    pub values: Vec<u16>,
}

impl PlcServer {
    pub fn start(dir: &Path) -> PlcServer {
        let mut server = PlcServer {
            port: free_port(),
            log: dir.join("plc-writes.jsonl"),
            child: None,
        };
        server.restart();
        server
    }

    /// Starts the server (again) on the same port, appending to the same log.
    pub fn restart(&mut self) {
        self.kill();
        let python = python_with("pymodbus");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/modbus_plc.py");
        let err = std::fs::File::create(self.log.with_extension("stderr")).expect("plc log");
        let child = Command::new(python)
            .arg(script)
            .args(["--port", &self.port.to_string(), "--log"])
            .arg(&self.log)
            .stdout(err.try_clone().expect("log"))
            .stderr(err)
            .spawn()
            .expect("starting tests/tools/modbus_plc.py");
        self.child = Some(child);
        assert!(
            wait_port(self.port, Duration::from_secs(20)),
            "the Modbus server did not listen on {}: {}",
            self.port,
            std::fs::read_to_string(self.log.with_extension("stderr")).unwrap_or_default()
        );
    }

    /// SIGKILL: the PLC is gone without a word (power, cable).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Every write so far, in the order the server applied them.
    pub fn writes(&self) -> Vec<PlcWrite> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| PlcWrite {
                t: v["t"].as_f64().unwrap_or(0.0),
                fc: v["fc"].as_u64().unwrap_or(0) as u8,
                address: v["address"].as_u64().unwrap_or(0) as u16,
                values: v["values"]
                    .as_array()
                    .map(|a| a.iter().map(|x| x.as_u64().unwrap_or(0) as u16).collect())
                    .unwrap_or_default(),
            })
            .collect()
    }
}

impl Drop for PlcServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A synthetic set (`per_class` images per class) and v1.edgepkg: an untrained nano detector
/// signed with the fleet key; returns the fixtures and the fleet's public key.
pub fn signed_nano_v1(prefix: &str, per_class: usize, seed: u64) -> (Fixtures, String) {
    let files = Fixtures::new(prefix);
    let public = files.keygen("fleet");
    files.synth(per_class, seed);
    let model = files.init_model("m", "nano", 0);
    package(
        &model,
        &files.path("keys/fleet.key"),
        1,
        &files.golden("crazing_1.jpg"),
        &files.path("v1.edgepkg"),
    );
    (files, public)
}

/// The daemon's `/metrics` page on `port`; `None` while it does not answer 200.
pub fn metrics_page(port: u16) -> Option<String> {
    try_get(&format!("http://127.0.0.1:{port}/metrics"))
        .ok()
        .filter(|(s, _)| *s == 200)
        .map(|(_, m)| m)
}

/// Polls `/metrics` on `port` until `ok` holds and returns that page; after `timeout` panics
/// naming `what`, with `context()` (the edge's log).
pub fn wait_for_metrics(
    port: u16,
    what: &str,
    timeout: Duration,
    ok: &dyn Fn(&str) -> bool,
    context: &dyn Fn() -> String,
) -> String {
    let end = Instant::now() + timeout;
    loop {
        if let Some(m) = metrics_page(port)
            && ok(&m)
        {
            return m;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for {what}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Verdicts counted in `edge_verdicts_total` with the given results (pass, fail, undecided).
pub fn verdicts_counted(metrics: &str, results: &[&str]) -> f64 {
    results
        .iter()
        .map(|r| {
            metric_or(metrics, &format!("edge_verdicts_total{{result=\"{r}\"}}")).unwrap_or(0.0)
        })
        .sum()
}
