//! Redis for the integration tests: the machine's shared Redis (each test in its own key prefix),
//! Redis servers and a Redis Cluster of a test's own (for outages: the shared one is never
//! touched), Crier nodes over them, and the scenarios that run against any of them.
//!
//! Included by `tests/redis.rs` and `tests/redis_cluster.rs` with
//! `#[path = "redis/mod.rs"] mod redis_support;` next to `mod common;`.
//!
//! The `redis-server` processes a test starts die with the thread that started them
//! (`PR_SET_PDEATHSIG`), so that a test killed by its runner leaves none behind: start and
//! restart them from the test's own body (not from `spawn_blocking`).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use crier::Config;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::common::*;

// ---------------------------------------------------------------------------------------------
// Redis processes and inspection
// ---------------------------------------------------------------------------------------------

/// The port of the machine's shared Redis.
pub const SHARED_PORT: u16 = 6379;

/// The machine's shared Redis (db 0: tests keep apart by key prefix); fails the test if it does
/// not answer.
pub fn shared_redis_url() -> String {
    assert!(
        ping(SHARED_PORT),
        "the shared Redis on 127.0.0.1:{SHARED_PORT} does not answer PING; the Redis tests need it"
    );
    format!("redis://127.0.0.1:{SHARED_PORT}")
}

/// A key prefix no other test uses.
pub fn unique_prefix() -> String {
    format!("test-{:016x}", fastrand::u64(..))
}

/// Whether a Redis answers `PING` on this port of 127.0.0.1.
pub fn ping(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(1000)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut answer = [0u8; 64];
    matches!(stream.read(&mut answer), Ok(n) if answer[..n].starts_with(b"+PONG"))
}

/// Runs `redis-cli -p PORT ARGS...` (raw output: one line per reply element); fails the test if
/// it fails.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success() && !stdout.starts_with("ERR") && !stdout.starts_with("(error)"),
        "redis-cli -p {port} {args:?}: {}\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The channels with subscribers on this Redis matching a glob (`PUBSUB CHANNELS`).
pub fn pubsub_channels(port: u16, pattern: &str) -> BTreeSet<String> {
    redis_cli(port, &["pubsub", "channels", pattern])
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `redis-cli` answering one integer.
pub fn redis_int(port: u16, args: &[&str]) -> i64 {
    let out = redis_cli(port, args);
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("redis-cli -p {port} {args:?}: not an integer: {out:?}"))
}

/// Every key of this Redis (node) matching a glob.
pub fn scan_keys(port: u16, pattern: &str) -> BTreeSet<String> {
    redis_cli(port, &["--scan", "--pattern", pattern])
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "crier-{tag}-{}-{:016x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts `redis-server` on `port` in `dir`, without persistence; `extra` are more arguments.
fn spawn_redis(dir: &Path, port: u16, extra: &[String]) -> Child {
    let mut command = Command::new("redis-server");
    command
        .arg("--port")
        .arg(port.to_string())
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--daemonize", "no", "--protected-mode", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join(format!("redis-{port}.log")))
        .args(extra)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: prctl is async-signal-safe, and the closure allocates nothing.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    command
        .spawn()
        .expect("redis-server (Redis 7) must be on PATH")
}

/// Waits until the server on `port` answers PING; an error if it exited or took too long.
fn wait_ping(child: &mut Child, port: u16, patience: Duration) -> Result<(), String> {
    let deadline = Instant::now() + patience;
    loop {
        if ping(port) {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("redis-server on port {port} exited: {status}"));
        }
        if Instant::now() > deadline {
            return Err(format!("redis-server on port {port} does not answer PING"));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn stop(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
    }
}

fn log_tail(dir: &Path, port: u16) -> String {
    let text = std::fs::read_to_string(dir.join(format!("redis-{port}.log"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A `redis-server` of the test's own, on a free port; killed when dropped.
pub struct OwnRedis {
    pub port: u16,
    dir: TempDir,
    child: Option<Child>,
}

impl OwnRedis {
    pub fn start() -> OwnRedis {
        let dir = TempDir::new("redis");
        for _ in 0..5 {
            let port = free_port();
            let mut child = spawn_redis(&dir.0, port, &[]);
            match wait_ping(&mut child, port, Duration::from_secs(10)) {
                Ok(()) => {
                    return OwnRedis {
                        port,
                        dir,
                        child: Some(child),
                    };
                }
                Err(_) => stop(&mut Some(child)),
            }
        }
        panic!("could not start a redis-server on a free port");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, and waits until the process is gone.
    pub fn kill(&mut self) {
        stop(&mut self.child);
        assert!(!ping(self.port), "the killed Redis still answers");
    }

    /// Starts it again on the same port, empty (no persistence), and waits until it answers.
    pub fn restart(&mut self) {
        stop(&mut self.child);
        let mut child = spawn_redis(&self.dir.0, self.port, &[]);
        if let Err(e) = wait_ping(&mut child, self.port, Duration::from_secs(10)) {
            panic!(
                "restarting Redis: {e}\n{}",
                log_tail(&self.dir.0, self.port)
            );
        }
        self.child = Some(child);
    }

    /// The running `redis-server`'s process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the Redis is running").id()
    }

    /// SIGSTOP: the server keeps its connections open but answers nothing (not even PING)
    /// until the returned guard resumes it (SIGCONT), when its `resume` is called or it is
    /// dropped (a failing test never leaves it stopped).
    pub fn pause(&self) -> Paused {
        let pid = self.pid();
        if let Err(e) = signal(pid, libc::SIGSTOP) {
            panic!("SIGSTOP to redis-server {pid}: {e}");
        }
        Paused {
            pid,
            port: self.port,
        }
    }
}

/// A `redis-server` stopped by [`OwnRedis::pause`]; resumed when dropped.
#[must_use = "the Redis resumes when this is dropped"]
pub struct Paused {
    pid: u32,
    port: u16,
}

impl Paused {
    /// SIGCONT, and waits until it answers PING again.
    pub fn resume(self) {
        let port = self.port;
        drop(self);
        assert!(
            ping(port),
            "the resumed Redis on port {port} does not answer PING"
        );
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        // Not checked: a Redis killed meanwhile has nothing to resume.
        let _ = signal(self.pid, libc::SIGCONT);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ping(self.port) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn signal(pid: u32, signal: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).expect("a pid");
    // SAFETY: kill(2) sends a signal to the test's own child process; no memory is involved.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// A Redis Cluster of three masters (no replicas) on free ports; killed when dropped.
pub struct OwnCluster {
    /// The masters' client ports; `ports[i]` is master `i`.
    pub ports: Vec<u16>,
    bus_ports: Vec<u16>,
    children: Vec<Option<Child>>,
    dir: TempDir,
}

impl OwnCluster {
    pub fn start() -> OwnCluster {
        let dir = TempDir::new("cluster");
        'attempt: for _ in 0..5 {
            let mut ports = BTreeSet::new();
            while ports.len() < 6 {
                ports.insert(free_port());
            }
            let ports: Vec<u16> = ports.into_iter().collect();
            let mut cluster = OwnCluster {
                ports: ports[..3].to_vec(),
                bus_ports: ports[3..].to_vec(),
                children: Vec::new(),
                dir: TempDir(dir.0.clone()),
            };
            for i in 0..3 {
                let mut child = cluster.spawn_node(i);
                let ready = wait_ping(&mut child, cluster.ports[i], Duration::from_secs(10));
                cluster.children.push(Some(child));
                if ready.is_err() {
                    cluster.kill_all();
                    continue 'attempt;
                }
            }
            let mut create = vec!["--cluster".to_owned(), "create".to_owned()];
            create.extend(cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")));
            create.extend(["--cluster-replicas", "0", "--cluster-yes"].map(str::to_owned));
            let output = Command::new("redis-cli")
                .args(&create)
                .stdin(Stdio::null())
                .output()
                .expect("redis-cli runs");
            assert!(
                output.status.success(),
                "redis-cli {create:?}: {}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            cluster.wait_ok(Duration::from_secs(30));
            std::mem::forget(dir); // `cluster.dir` removes it
            return cluster;
        }
        panic!("could not start three redis-server cluster nodes on free ports");
    }

    fn spawn_node(&self, i: usize) -> Child {
        let port = self.ports[i];
        let extra = [
            "--cluster-enabled".to_owned(),
            "yes".to_owned(),
            "--cluster-config-file".to_owned(),
            format!("nodes-{port}.conf"),
            "--cluster-port".to_owned(),
            self.bus_ports[i].to_string(),
            "--cluster-node-timeout".to_owned(),
            "2000".to_owned(),
        ];
        spawn_redis(&self.dir.0, port, &extra)
    }

    fn kill_all(&mut self) {
        for child in &mut self.children {
            stop(child);
        }
    }

    /// `redis://127.0.0.1:P` for each master.
    pub fn seed_urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// Waits until every running master says `cluster_state:ok`.
    pub fn wait_ok(&self, patience: Duration) {
        let deadline = Instant::now() + patience;
        loop {
            let states: Vec<String> = self
                .ports
                .iter()
                .map(|&p| {
                    let info = Command::new("redis-cli")
                        .args(["-p", &p.to_string(), "cluster", "info"])
                        .stdin(Stdio::null())
                        .output()
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_default();
                    info.lines()
                        .find(|l| l.starts_with("cluster_state:"))
                        .unwrap_or("unreachable")
                        .trim()
                        .to_owned()
                })
                .collect();
            if states.iter().all(|s| s == "cluster_state:ok") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster is not ok: {states:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILLs master `i`.
    pub fn kill_master(&mut self, i: usize) {
        stop(&mut self.children[i]);
        assert!(!ping(self.ports[i]), "the killed master still answers");
    }

    /// Starts master `i` again on its port with its `nodes-P.conf` (it rejoins with its slots,
    /// without its data) and waits until the cluster is ok.
    pub fn start_master(&mut self, i: usize) {
        stop(&mut self.children[i]);
        let mut child = self.spawn_node(i);
        if let Err(e) = wait_ping(&mut child, self.ports[i], Duration::from_secs(10)) {
            panic!(
                "restarting master {i}: {e}\n{}",
                log_tail(&self.dir.0, self.ports[i])
            );
        }
        self.children[i] = Some(child);
        self.wait_ok(Duration::from_secs(30));
    }

    /// Kills master `i` and starts it again.
    pub fn restart_master(&mut self, i: usize) {
        self.kill_master(i);
        self.start_master(i);
    }

    /// The hash slot of a key.
    pub fn keyslot(&self, key: &str) -> u16 {
        let port = *self
            .ports
            .iter()
            .find(|&&p| ping(p))
            .expect("a live master");
        redis_int(port, &["cluster", "keyslot", key]) as u16
    }

    /// The master (index into `ports`) that serves a slot, as `CLUSTER NODES` says.
    pub fn slot_owner(&self, slot: u16) -> usize {
        let port = *self
            .ports
            .iter()
            .find(|&&p| ping(p))
            .expect("a live master");
        for line in redis_cli(port, &["cluster", "nodes"]).lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                continue;
            }
            // ip:port@cport
            let node_port: u16 = fields[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            let serves = fields[8..].iter().any(|range| {
                if range.starts_with('[') {
                    return false; // a slot being migrated
                }
                let (from, to) = range.split_once('-').unwrap_or((range, range));
                let (from, to): (u16, u16) = (from.parse().unwrap(), to.parse().unwrap());
                (from..=to).contains(&slot)
            });
            if serves && let Some(i) = self.ports.iter().position(|&p| p == node_port) {
                return i;
            }
        }
        panic!("no master serves slot {slot}");
    }

    /// The master that holds a key.
    pub fn key_owner(&self, key: &str) -> usize {
        self.slot_owner(self.keyslot(key))
    }

    /// Keys on master `i` matching a glob.
    pub fn scan(&self, i: usize, pattern: &str) -> BTreeSet<String> {
        scan_keys(self.ports[i], pattern)
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}

// ---------------------------------------------------------------------------------------------
// Crier nodes over Redis
// ---------------------------------------------------------------------------------------------

/// A Redis (or Redis Cluster) and the key prefix a test uses on it.
#[derive(Debug, Clone)]
pub struct Target {
    pub urls: Vec<String>,
    pub cluster: bool,
    pub prefix: String,
    /// The ports of the Redis servers (cluster masters) to inspect.
    pub ports: Vec<u16>,
}

impl Target {
    /// The shared Redis, with a fresh prefix.
    pub fn shared() -> Target {
        Target {
            urls: vec![shared_redis_url()],
            cluster: false,
            prefix: unique_prefix(),
            ports: vec![SHARED_PORT],
        }
    }

    pub fn own(redis: &OwnRedis) -> Target {
        Target {
            urls: vec![redis.url()],
            cluster: false,
            prefix: unique_prefix(),
            ports: vec![redis.port],
        }
    }

    pub fn cluster(cluster: &OwnCluster) -> Target {
        Target {
            urls: cluster.seed_urls(),
            cluster: true,
            prefix: unique_prefix(),
            ports: cluster.ports.clone(),
        }
    }

    /// A Crier node over this Redis (`c.redis`, `c.redis_prefix`, `c.redis_cluster`), then
    /// `adjust`.
    pub fn node(&self, adjust: impl FnOnce(&mut Config)) -> TestServer {
        node(&self.urls, &self.prefix, self.cluster, adjust)
    }

    /// `n` nodes with a history that holds everything the scenarios publish.
    pub fn nodes(&self, n: usize) -> Vec<TestServer> {
        (0..n)
            .map(|_| self.node(|c| c.history_size = 10_000))
            .collect()
    }

    /// The topic's channel, `P:{T}:c`.
    pub fn channel(&self, topic: &str) -> String {
        format!("{}:{{{topic}}}:c", self.prefix)
    }

    /// The topic's metadata hash, `P:{T}:m`.
    pub fn meta_key(&self, topic: &str) -> String {
        format!("{}:{{{topic}}}:m", self.prefix)
    }

    /// The topic's history stream, `P:{T}:h`.
    pub fn history_key(&self, topic: &str) -> String {
        format!("{}:{{{topic}}}:h", self.prefix)
    }

    /// How many Redis connections listen on the topic's channel (`PUBSUB NUMSUB`, or
    /// `PUBSUB SHARDNUMSUB` over the masters of a cluster): one per node that has interest.
    pub fn redis_listeners(&self, topic: &str) -> u64 {
        let channel = self.channel(topic);
        let command = if self.cluster {
            "shardnumsub"
        } else {
            "numsub"
        };
        self.ports
            .iter()
            .map(|&port| {
                let out = redis_cli(port, &["pubsub", command, &channel]);
                let lines: Vec<&str> = out.lines().collect();
                assert_eq!(lines.len(), 2, "pubsub {command}: {out:?}");
                lines[1].trim().parse::<u64>().unwrap()
            })
            .sum()
    }

    /// `PUBSUB NUMPAT` summed over the servers.
    pub fn redis_patterns(&self) -> u64 {
        self.ports
            .iter()
            .map(|&port| redis_int(port, &["pubsub", "numpat"]) as u64)
            .sum()
    }

    /// Removes the prefix's keys from the shared Redis when dropped (declare it before the
    /// nodes, so that it runs after they stopped).
    pub fn cleanup(&self) -> Cleanup {
        Cleanup {
            prefix: self.prefix.clone(),
            port: (!self.cluster).then(|| self.ports[0]),
        }
    }
}

/// Builds a Crier node over Redis: `c.redis = urls; c.redis_prefix = prefix;
/// c.redis_cluster = cluster`, then `adjust`.
pub fn node(
    urls: &[String],
    prefix: &str,
    cluster: bool,
    adjust: impl FnOnce(&mut Config),
) -> TestServer {
    let (urls, prefix) = (urls.to_vec(), prefix.to_owned());
    TestServer::with(move |c| {
        c.redis = urls;
        c.redis_prefix = prefix;
        c.redis_cluster = cluster;
        adjust(c);
    })
}

/// See [`Target::cleanup`].
pub struct Cleanup {
    prefix: String,
    port: Option<u16>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Some(port) = self.port else { return };
        if !ping(port) {
            return;
        }
        let keys = scan_keys(port, &format!("{}:*", self.prefix));
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        for chunk in keys.chunks(200) {
            let mut args = vec!["unlink"];
            args.extend_from_slice(chunk);
            let _ = Command::new("redis-cli")
                .arg("-p")
                .arg(port.to_string())
                .args(&args)
                .stdin(Stdio::null())
                .output();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients, publishers and what they see
// ---------------------------------------------------------------------------------------------

/// Connects in an encoding; returns the client and its `welcome`.
pub async fn connect_welcomed(server: &TestServer, enc: Enc) -> (Client, Value) {
    let mut request = server.ws_url("").into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(enc.subprotocol()),
    );
    let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    Client::welcomed_with(ws, enc).await
}

/// The next data frame within `wait`, checked to be in the client's encoding (text for JSON,
/// binary for MessagePack); `None` if none came.
pub async fn next_frame(client: &mut Client, wait: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let next = tokio::time::timeout_at(deadline, client.ws.next())
            .await
            .ok()?;
        let message = match next {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(message)) => message,
            other => panic!("connection ended: {other:?}"),
        };
        match (client.enc, &message) {
            (Enc::Json, Message::Text(_)) | (Enc::Msgpack, Message::Binary(_)) => {}
            _ => panic!("a {:?} connection got {message:?}", client.enc),
        }
        return Some(decode(&message).unwrap());
    }
}

/// The next data frame; fails the test if none comes within [`PATIENCE`].
pub async fn recv_frame(client: &mut Client) -> Value {
    next_frame(client, PATIENCE)
        .await
        .expect("timed out waiting for a frame")
}

/// Sends a `ping` and returns the frames that arrive before its `pong`: the connection is alive
/// and everything queued for it before the ping has been read.
pub async fn drain(client: &mut Client) -> Vec<Value> {
    let id = format!("drain-{:x}", fastrand::u64(..));
    client.send(json!({"op": "ping", "id": id})).await;
    let mut frames = Vec::new();
    loop {
        let frame = recv_frame(client).await;
        if frame == json!({"op": "pong", "id": id}) {
            return frames;
        }
        frames.push(frame);
    }
}

/// Every frame a client gets until a message of `topic` with `seq` (or until nothing more comes
/// for [`PATIENCE`]), then whatever else was queued for it: all it received, to compare whole.
pub async fn frames_through(client: &mut Client, topic: &str, seq: u64) -> Vec<Value> {
    let mut frames = Vec::new();
    while let Some(frame) = next_frame(client, PATIENCE).await {
        let last = frame["op"] == "message" && frame["topic"] == topic && frame["seq"] == seq;
        frames.push(frame);
        if last {
            break;
        }
    }
    frames.extend(drain(client).await);
    frames
}

/// Polls `observe` until it sees `expected`; fails the test after [`PATIENCE`], saying what it
/// saw last.
pub async fn eventually_equals<T, F, Fut>(what: &str, expected: T, mut observe: F)
where
    T: PartialEq + std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        let seen = observe().await;
        if seen == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {seen:?} after {PATIENCE:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether the node's `/readyz` answers 200.
pub async fn is_ready(node: &TestServer) -> bool {
    match node.http.get(node.url("/readyz")).send().await {
        Ok(response) => response.status() == 200,
        Err(_) => false,
    }
}

/// A published message as subscribers of each encoding must receive its `data`.
#[derive(Debug, Clone, PartialEq)]
pub struct Views {
    pub json: Value,
    pub msgpack: Value,
}

impl Views {
    pub fn of(&self, enc: Enc) -> &Value {
        match enc {
            Enc::Json => &self.json,
            Enc::Msgpack => &self.msgpack,
        }
    }
}

/// The number `k` as JSON data, which every subscriber receives as itself.
pub fn number(k: u64) -> (Data, Views) {
    (
        Data::Json(json!(k)),
        Views {
            json: json!(k),
            msgpack: json!(k),
        },
    )
}

/// The data a publisher sends, in the encoding it sends it in.
#[derive(Debug, Clone)]
pub enum Data {
    Json(Value),
    Msgpack(rmpv::Value),
}

/// Data for message `k` of publisher `from` in encoding `enc`, and how subscribers must see it.
/// MessagePack data carries `bin` (base64 for JSON subscribers), a float and a negative number.
pub fn payload(enc: Enc, from: &str, k: u64) -> (Data, Views) {
    match enc {
        Enc::Json => {
            let data = json!({
                "from": from, "k": k, "text": format!("héllo ✓ \"{k}\" \\ end"),
                "f": k as f64 + 0.25, "neg": -(k as i64) - 1, "big": (1u64 << 40) | k,
                "list": [true, null, "x", []], "empty": {},
            });
            (
                Data::Json(data.clone()),
                Views {
                    json: data.clone(),
                    msgpack: data,
                },
            )
        }
        Enc::Msgpack => {
            let bytes = vec![0u8, 1, 0x0a, 0xff, (k % 256) as u8];
            let s = |v: &str| rmpv::Value::from(v);
            let data = rmpv::Value::Map(vec![
                (s("from"), s(from)),
                (s("k"), rmpv::Value::from(k)),
                (s("bin"), rmpv::Value::Binary(bytes.clone())),
                (s("f"), rmpv::Value::F64(k as f64 + 0.5)),
                (s("neg"), rmpv::Value::from(-(k as i64) - 1)),
                (s("text"), s("ünïcödé ✓")),
                (
                    s("list"),
                    rmpv::Value::Array(vec![rmpv::Value::Boolean(false), rmpv::Value::Nil]),
                ),
            ]);
            let view = |bin: Value| {
                json!({
                    "from": from, "k": k, "bin": bin, "f": k as f64 + 0.5, "neg": -(k as i64) - 1,
                    "text": "ünïcödé ✓", "list": [false, null],
                })
            };
            let base64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
            (
                Data::Msgpack(data),
                Views {
                    json: view(json!(base64)),
                    msgpack: view(json!(bytes)),
                },
            )
        }
    }
}

fn msgpack_bytes(value: &rmpv::Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, value).unwrap();
    out
}

/// A message a publisher published, as its ack or HTTP response described it.
#[derive(Debug, Clone)]
pub struct Published {
    pub topic: String,
    pub seq: u64,
    /// From an HTTP response: the connections of the publishing node it was queued for.
    pub receivers: Option<u64>,
    pub views: Views,
}

/// A publish that was refused: the error `code` (WebSocket) or status and body (HTTP).
#[derive(Debug, Clone)]
pub struct Refused {
    pub status: Option<u16>,
    pub error: Value,
}

/// Publishes over WebSocket (answers awaited) or over HTTP, in one encoding.
pub enum Publisher {
    Ws(Box<Client>),
    Http {
        http: reqwest::Client,
        base: String,
        enc: Enc,
    },
}

impl Publisher {
    pub async fn ws(server: &TestServer, enc: Enc) -> Publisher {
        Publisher::Ws(Box::new(Client::connect(server, enc).await))
    }

    pub fn http(server: &TestServer, enc: Enc) -> Publisher {
        Publisher::Http {
            http: reqwest::Client::new(),
            base: server.url("/api/topics/"),
            enc,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Publisher::Ws(c) => format!("ws/{:?}", c.enc),
            Publisher::Http { enc, .. } => format!("http/{enc:?}"),
        }
    }

    /// Publishes; the error if the broker refused.
    pub async fn try_publish(
        &mut self,
        topic: &str,
        data: Data,
        views: Views,
    ) -> Result<Published, Refused> {
        match self {
            Publisher::Ws(client) => {
                let id = fastrand::u64(1..1 << 50);
                match data {
                    Data::Json(data) => {
                        client
                            .send(json!({"op": "publish", "topic": topic, "data": data, "id": id}))
                            .await
                    }
                    Data::Msgpack(data) => {
                        let s = |v: &str| rmpv::Value::from(v);
                        let frame = rmpv::Value::Map(vec![
                            (s("op"), s("publish")),
                            (s("topic"), s(topic)),
                            (s("data"), data),
                            (s("id"), rmpv::Value::from(id)),
                        ]);
                        client
                            .send_raw(Message::binary(msgpack_bytes(&frame)))
                            .await
                    }
                }
                let answer = recv_frame(client).await;
                assert_eq!(answer["id"], id, "the answer to a publish: {answer}");
                match answer["op"].as_str() {
                    Some("ack") => {
                        let seq = answer["seq"].as_u64().expect("a publish ack has a seq");
                        assert_eq!(
                            answer,
                            json!({"op": "ack", "id": id, "seq": seq}),
                            "a publish ack"
                        );
                        Ok(Published {
                            topic: topic.to_owned(),
                            seq,
                            receivers: None,
                            views,
                        })
                    }
                    Some("error") => Err(Refused {
                        status: None,
                        error: answer,
                    }),
                    _ => panic!("a publish answered {answer}"),
                }
            }
            Publisher::Http { http, base, .. } => {
                let request = http.post(format!("{base}{topic}")).timeout(PATIENCE);
                let request = match data {
                    Data::Json(data) => request.json(&data),
                    Data::Msgpack(data) => request
                        .header("Content-Type", "application/msgpack")
                        .body(msgpack_bytes(&data)),
                };
                let response = request
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("POST /api/topics/{topic}: {e}"));
                let status = response.status().as_u16();
                let text = response.text().await.unwrap();
                let body: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|_| panic!("a publish answered {status} with {text:?}"));
                if status != 200 {
                    return Err(Refused {
                        status: Some(status),
                        error: body,
                    });
                }
                let seq = body["seq"].as_u64().unwrap_or_else(|| panic!("{body}"));
                let receivers = body["receivers"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{body}"));
                assert_eq!(
                    body,
                    json!({"topic": topic, "seq": seq, "receivers": receivers})
                );
                Ok(Published {
                    topic: topic.to_owned(),
                    seq,
                    receivers: Some(receivers),
                    views,
                })
            }
        }
    }

    pub fn enc(&self) -> Enc {
        match self {
            Publisher::Ws(c) => c.enc,
            Publisher::Http { enc, .. } => *enc,
        }
    }

    /// Publishes message `k` of publisher `from` (see [`payload`]).
    pub async fn try_publish_k(
        &mut self,
        topic: &str,
        from: &str,
        k: u64,
    ) -> Result<Published, Refused> {
        let (data, views) = payload(self.enc(), from, k);
        self.try_publish(topic, data, views).await
    }

    /// Publishes message `k` of publisher `from` (see [`payload`]); fails the test if refused.
    pub async fn publish(&mut self, topic: &str, from: &str, k: u64) -> Published {
        match self.try_publish_k(topic, from, k).await {
            Ok(published) => published,
            Err(refused) => panic!("{from}: publish {k} to {topic} refused: {refused:?}"),
        }
    }
}

/// Asserts that a refusal is `unavailable`: HTTP 503 `{"error":{"code":"unavailable",
/// "message":...}}`, or an `error` frame with that code.
pub fn assert_unavailable(refused: &Refused, what: &str) {
    match refused.status {
        Some(status) => {
            assert_eq!(status, 503, "{what}: {refused:?}");
            assert_eq!(
                refused.error["error"]["code"], "unavailable",
                "{what}: {refused:?}"
            );
            assert!(
                refused.error["error"]["message"].is_string(),
                "{what}: {refused:?}"
            );
        }
        None => {
            assert_eq!(refused.error["op"], "error", "{what}: {refused:?}");
            assert_eq!(refused.error["code"], "unavailable", "{what}: {refused:?}");
            assert!(refused.error["message"].is_string(), "{what}: {refused:?}");
        }
    }
}

/// Whether a subscription subject (topic or NATS-style pattern) matches a topic.
pub fn matches(subject: &str, topic: &str) -> bool {
    let subject: Vec<&str> = subject.split('.').collect();
    let topic: Vec<&str> = topic.split('.').collect();
    for (i, segment) in subject.iter().enumerate() {
        if *segment == ">" {
            return topic.len() > i;
        }
        if i >= topic.len() || (*segment != "*" && *segment != topic[i]) {
            return false;
        }
    }
    subject.len() == topic.len()
}

/// Reads a subscriber's message frames until it holds `expected[topic]` of each topic (and
/// fails on a message of any other topic, or when nothing comes for [`PATIENCE`]).
fn read_expected(
    label: String,
    mut client: Client,
    expected: BTreeMap<String, u64>,
) -> tokio::task::JoinHandle<(Client, Vec<Value>)> {
    tokio::spawn(async move {
        let total: u64 = expected.values().sum();
        let mut frames: Vec<Value> = Vec::new();
        while (frames.len() as u64) < total {
            let Some(frame) = next_frame(&mut client, PATIENCE).await else {
                panic!(
                    "{label}: nothing more after {} of {total} messages; got {}",
                    frames.len(),
                    summary(&frames)
                );
            };
            assert_eq!(frame["op"], "message", "{label}: {frame}");
            let topic = frame["topic"].as_str().unwrap();
            assert!(
                expected.contains_key(topic),
                "{label}: a message on {topic}, which it does not subscribe to: {frame}"
            );
            frames.push(frame);
        }
        (client, frames)
    })
}

/// Per topic: how many messages, and their first and last seqs.
pub fn summary(frames: &[Value]) -> String {
    let mut by_topic: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for f in frames {
        by_topic
            .entry(f["topic"].as_str().unwrap_or("?"))
            .or_default()
            .push(f["seq"].as_u64().unwrap_or(0));
    }
    by_topic
        .iter()
        .map(|(t, s)| {
            format!(
                "{t}: {} messages, seqs {:?}..{:?}",
                s.len(),
                s.first(),
                s.last()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Asserts that, per topic, `seqs` are exactly `expected` in order; names the first difference.
pub fn assert_seqs(label: &str, topic: &str, seqs: &[u64], expected: &[u64]) {
    if seqs == expected {
        return;
    }
    let at = seqs
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(seqs.len().min(expected.len()));
    let from = at.saturating_sub(3);
    panic!(
        "{label} on {topic}: {} seqs where {} were expected; first difference at index {at}: \
         got {:?}, expected {:?}",
        seqs.len(),
        expected.len(),
        &seqs[from..(at + 4).min(seqs.len())],
        &expected[from..(at + 4).min(expected.len())],
    );
}

/// Asserts that a subscriber received, per topic, seqs 1..=expected[topic] in order, each frame
/// exactly `{"op":"message","topic","seq","data"}` with the data as published.
fn check_stream(
    label: &str,
    enc: Enc,
    frames: &[Value],
    expected: &BTreeMap<String, u64>,
    published: &HashMap<(String, u64), Views>,
) {
    let mut by_topic: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for frame in frames {
        let topic = frame["topic"].as_str().unwrap().to_owned();
        let seq = frame["seq"].as_u64().unwrap();
        by_topic.entry(topic.clone()).or_default().push(seq);
        if let Some(views) = published.get(&(topic.clone(), seq)) {
            assert_eq!(
                *frame,
                json!({"op": "message", "topic": topic, "seq": seq, "data": views.of(enc)}),
                "{label}: the message {topic}#{seq}"
            );
        }
    }
    for (topic, &count) in expected {
        let seqs = by_topic.get(topic).cloned().unwrap_or_default();
        assert_seqs(label, topic, &seqs, &(1..=count).collect::<Vec<_>>());
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

/// Three nodes; on each, subscribers (`subjects`: topic or pattern, encoding) and four
/// publishers (WebSocket and HTTP, each in JSON and MessagePack), publishing `n` messages each
/// (awaiting every answer), concurrently, round-robin over `topics`. Every subscriber gets every
/// message of the topics it matches exactly once, in `seq` order, with its data in its encoding;
/// the publishers' seqs are, per topic, exactly 1..=total; a publish over HTTP counts the
/// publishing node's matching subscribers as its receivers.
pub async fn fanout(target: &Target, subjects: &[(&str, Enc)], topics: &[&str], n: u64) {
    let nodes = target.nodes(3);

    // Subscribers, all before anything is published: every message must reach each.
    let mut epochs: BTreeMap<String, String> = BTreeMap::new();
    let mut subscribers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for (j, &(subject, enc)) in subjects.iter().enumerate() {
            let mut client = Client::connect(node, enc).await;
            let ack = client.subscribe(subject).await;
            if subject.contains(['*', '>']) {
                assert_eq!(ack, json!({"op": "ack", "id": "s"}), "pattern {subject}");
            } else {
                assert_eq!(ack["seq"], 0, "a fresh topic: {ack}");
                let epoch = ack["epoch"].as_str().expect("an epoch").to_owned();
                let first = epochs.entry(subject.to_owned()).or_insert(epoch.clone());
                assert_eq!(
                    *first, epoch,
                    "every node gives {subject} the same epoch (node {i})"
                );
            }
            let expected: BTreeMap<String, u64> = topics
                .iter()
                .filter(|t| matches(subject, t))
                .map(|t| (t.to_string(), 0))
                .collect();
            subscribers.push((
                format!("node {i} sub {j} ({subject}, {enc:?})"),
                enc,
                client,
                expected,
            ));
        }
    }
    // Per topic, how many messages the publishers publish in all.
    let mut per_topic: BTreeMap<String, u64> = topics.iter().map(|t| (t.to_string(), 0)).collect();
    for k in 0..n {
        *per_topic
            .get_mut(topics[k as usize % topics.len()])
            .unwrap() += 4 * 3;
    }
    // What a publish on node i to topic t must count as receivers.
    let local_receivers =
        |topic: &str| -> u64 { subjects.iter().filter(|(s, _)| matches(s, topic)).count() as u64 };

    let mut readers = Vec::new();
    for (label, enc, client, mut expected) in subscribers {
        for (topic, count) in expected.iter_mut() {
            *count = per_topic[topic];
        }
        readers.push((
            label.clone(),
            enc,
            expected.clone(),
            read_expected(label, client, expected),
        ));
    }

    let mut publishers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for publisher in [
            Publisher::ws(node, Enc::Json).await,
            Publisher::ws(node, Enc::Msgpack).await,
            Publisher::http(node, Enc::Json),
            Publisher::http(node, Enc::Msgpack),
        ] {
            let label = format!("n{i}-{}", publisher.describe());
            let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
            let mut publisher = publisher;
            publishers.push(tokio::spawn(async move {
                let mut published = Vec::new();
                for k in 0..n {
                    let topic = &topics[k as usize % topics.len()];
                    published.push(publisher.publish(topic, &label, k).await);
                }
                published
            }));
        }
    }

    let mut all: HashMap<(String, u64), Views> = HashMap::new();
    let mut seqs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for publisher in publishers {
        for p in publisher.await.unwrap() {
            if let Some(receivers) = p.receivers {
                assert_eq!(
                    receivers,
                    local_receivers(&p.topic),
                    "receivers of a publish to {} (this node's subscribers only)",
                    p.topic
                );
            }
            seqs.entry(p.topic.clone()).or_default().push(p.seq);
            let previous = all.insert((p.topic.clone(), p.seq), p.views);
            assert!(
                previous.is_none(),
                "two publishes got {}#{}",
                p.topic,
                p.seq
            );
        }
    }
    for (topic, mut seqs) in seqs {
        seqs.sort_unstable();
        assert_seqs(
            "the publishers' acks",
            &topic,
            &seqs,
            &(1..=per_topic[&topic]).collect::<Vec<_>>(),
        );
    }

    for (label, enc, expected, reader) in readers {
        let (mut client, frames) = reader.await.unwrap();
        check_stream(&label, enc, &frames, &expected, &all);
        let late = drain(&mut client).await;
        assert!(late.is_empty(), "{label}: more than expected: {late:?}");
        client.expect_silence(Duration::from_millis(200)).await;
    }
}

/// [`fanout`] on one topic, with a JSON and a MessagePack subscriber on each node.
pub async fn fanout_exact(target: &Target) {
    fanout(
        target,
        &[("orders", Enc::Json), ("orders", Enc::Msgpack)],
        &["orders"],
        200,
    )
    .await;
}

/// [`fanout`] with pattern subscribers (`news.*`, `news.>`, in both encodings) and an exact one
/// on each node, over topics each pattern matches or not.
pub async fn fanout_patterns(target: &Target) {
    fanout(
        target,
        &[
            ("news.*", Enc::Json),
            ("news.>", Enc::Msgpack),
            ("news.*", Enc::Msgpack),
            ("news.>", Enc::Json),
            ("news.b", Enc::Json),
        ],
        &["news.a", "news.b", "news.c.deep", "sports.a"],
        200,
    )
    .await;
}

/// A subscriber hops from node to node while a publisher on another node keeps publishing: each
/// time it reconnects with `since`, on a node that may never have seen the topic, and it ends
/// with every seq exactly once, in order.
pub async fn subscriber_moves(target: &Target) {
    const TOTAL: u64 = 600;
    let nodes = target.nodes(3);
    let topic = "moving.t";
    let mut node_ids = Vec::new();
    for node in &nodes {
        let (_, welcome) = connect_welcomed(node, Enc::Json).await;
        node_ids.push(welcome["node"].as_str().unwrap().to_owned());
    }

    let (mut client, _) = connect_welcomed(&nodes[0], Enc::Json).await;
    let ack = client.subscribe(topic).await;
    assert_eq!(ack["seq"], 0, "{ack}");
    let epoch = ack["epoch"].as_str().unwrap().to_owned();

    // The publisher, on node C (2), paced by its answers and short pauses.
    let published = Arc::new(AtomicU64::new(0));
    let publisher = {
        let mut publisher = Publisher::http(&nodes[2], Enc::Json);
        let published = published.clone();
        tokio::spawn(async move {
            for k in 1..=TOTAL {
                let (data, views) = number(k);
                let p = publisher
                    .try_publish(topic, data, views)
                    .await
                    .unwrap_or_else(|e| panic!("publish {k}: {e:?}"));
                assert_eq!(p.seq, k, "a single publisher's seqs");
                published.store(k, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(fastrand::u64(1..4))).await;
            }
        })
    };

    // Hops: A → B → C → A → B, each after another 100 messages.
    let hops = [1usize, 2, 0, 1, 1];
    let mut received: Vec<u64> = Vec::new();
    let mut replayed_somewhere = false;
    for (hop, &next) in hops.iter().enumerate() {
        let until = (hop as u64 + 1) * 100;
        while received.len() < until as usize {
            let frame = recv_frame(&mut client).await;
            assert_eq!(frame["op"], "message", "{frame}");
            let seq = frame["seq"].as_u64().unwrap();
            assert_eq!(frame["data"], seq, "{frame}");
            assert_seqs(
                &format!("the moving subscriber (hop {hop})"),
                topic,
                &[seq],
                &[received.len() as u64 + 1],
            );
            received.push(seq);
        }
        let _ = client.ws.close(None).await;
        drop(client);
        // Away long enough to miss some messages (while the publisher goes on).
        let last = *received.last().unwrap();
        let away = Instant::now();
        while published.load(Ordering::SeqCst) < (last + 30).min(TOTAL) && away.elapsed() < PATIENCE
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let enc = if hop % 2 == 0 {
            Enc::Msgpack
        } else {
            Enc::Json
        };
        let (c, welcome) = connect_welcomed(&nodes[next], enc).await;
        client = c;
        assert_eq!(welcome["node"], node_ids[next].as_str(), "{welcome}");
        let ack = client
            .subscribe_with(topic, json!({"since": {"epoch": epoch, "seq": last}}))
            .await;
        assert_eq!(ack["recovered"], true, "hop {hop} to node {next}: {ack}");
        assert_eq!(
            ack["epoch"],
            epoch.as_str(),
            "hop {hop} to node {next}: {ack}"
        );
        let head = ack["seq"].as_u64().unwrap();
        assert!(head >= last, "hop {hop}: the ack's seq {head} < {last}");
        replayed_somewhere |= head > last;
    }
    while received.len() < TOTAL as usize {
        let frame = recv_frame(&mut client).await;
        let seq = frame["seq"].as_u64().unwrap();
        assert_eq!(frame["data"], seq, "{frame}");
        assert_seqs(
            "the moving subscriber (last node)",
            topic,
            &[seq],
            &[received.len() as u64 + 1],
        );
        received.push(seq);
    }
    publisher.await.unwrap();
    assert!(received == (1..=TOTAL).collect::<Vec<_>>());
    assert!(
        replayed_somewhere,
        "the subscriber should have missed messages while away, and recovered them"
    );
    let late = drain(&mut client).await;
    assert!(late.is_empty(), "more than {TOTAL} messages: {late:?}");
}

/// The sum of a metric's series (0 if it has none).
pub fn metric_sum(scrape: &Scrape, name: &str) -> f64 {
    scrape
        .series
        .iter()
        .filter(|(series, _)| series.as_str() == name || series.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}

/// `GET /api/topics` on any node lists the topic with the cluster's seq and epoch, the backend,
/// the node's own id and its own subscriber count; history over HTTP on another node; metrics.
pub async fn topics_and_metrics(target: &Target) {
    let nodes = target.nodes(3);
    let topic = "stats.t";
    let mut ids = Vec::new();
    for node in &nodes {
        let (_, welcome) = connect_welcomed(node, Enc::Msgpack).await;
        ids.push(welcome["node"].as_str().unwrap().to_owned());
    }
    let distinct: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 3, "one node id per process: {ids:?}");

    let (mut sub, welcome) = connect_welcomed(&nodes[0], Enc::Json).await;
    assert_eq!(welcome["node"], ids[0].as_str());
    let ack = sub.subscribe(topic).await;
    let epoch = ack["epoch"].as_str().unwrap().to_owned();
    for k in 1..=5u64 {
        let body = nodes[1].publish(topic, &json!(k)).await;
        assert_eq!(body, json!({"topic": topic, "seq": k, "receivers": 0}));
    }
    for k in 1..=5u64 {
        assert_eq!(
            recv_frame(&mut sub).await,
            json!({"op": "message", "topic": topic, "seq": k, "data": k})
        );
    }

    for (i, node) in nodes.iter().enumerate() {
        let expected = json!({"backend": "redis", "node": ids[i], "topics": [
            {"name": topic, "subscribers": if i == 0 { 1 } else { 0 }, "seq": 5, "epoch": epoch, "history": 5},
        ]});
        let deadline = Instant::now() + PATIENCE;
        loop {
            let got = node.get("/api/topics").await;
            if got == expected {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {i}: /api/topics is {got}, expected {expected}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let history = nodes[2].get(&format!("/api/topics/{topic}/history")).await;
    assert_eq!(history["epoch"], epoch.as_str(), "{history}");
    assert_eq!(history["seq"], 5, "{history}");
    assert_eq!(
        history["messages"],
        json!([{"seq": 1, "data": 1}, {"seq": 2, "data": 2}, {"seq": 3, "data": 3},
               {"seq": 4, "data": 4}, {"seq": 5, "data": 5}]),
        "history of a topic published on another node: {history}"
    );

    let received = |s: &Scrape| s.get("crier_backend_received_total");
    let s0 = eventually(
        "node 0 to count 5 publications received from Redis",
        || async {
            let s = nodes[0].scrape().await;
            (received(&s) >= 5.0).then_some(s)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s0_later = nodes[0].scrape().await;
    assert_eq!(
        received(&s0_later),
        5.0,
        "node 0 subscribed to one topic that got 5 publications"
    );
    for (i, node) in nodes.iter().enumerate() {
        let s = if i == 0 {
            s0.clone()
        } else {
            node.scrape().await
        };
        assert_eq!(
            s.get(&format!(
                "crier_backend_info{{backend=\"redis\",node=\"{}\"}}",
                ids[i]
            )),
            1.0
        );
        if i > 0 {
            assert_eq!(
                received(&s),
                0.0,
                "node {i}'s clients subscribe to nothing: it receives nothing from Redis"
            );
        }
        assert_eq!(s.get("crier_backend_reconnects_total"), 0.0, "node {i}");
        assert_eq!(
            metric_sum(&s, "crier_backend_errors_total"),
            0.0,
            "node {i}: {}",
            s.text
                .lines()
                .filter(|l| l.starts_with("crier_backend_errors_total"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let s1 = nodes[1].scrape().await;
    assert!(
        metric_sum(&s1, "crier_backend_operations_total") >= 5.0,
        "node 1 published 5 times"
    );
    assert!(
        metric_sum(&s1, "crier_backend_latency_seconds_count") >= 5.0,
        "node 1's Redis round trips are timed"
    );
}

/// A node listens in Redis only for what its clients subscribe to, once however many clients,
/// and stops when the last one leaves; a node whose clients subscribe to nothing receives
/// nothing from Redis.
pub async fn interest(target: &Target) {
    let nodes = target.nodes(3);
    let topic = "interest.t";
    let received = |s: &Scrape| s.get("crier_backend_received_total");
    assert_eq!(target.redis_listeners(topic), 0);

    let mut a1 = Client::connect(&nodes[0], Enc::Json).await;
    let mut a2 = Client::connect(&nodes[0], Enc::Msgpack).await;
    let mut b = Client::connect(&nodes[1], Enc::Json).await;
    for c in [&mut a1, &mut a2, &mut b] {
        assert_eq!(c.subscribe(topic).await["seq"], 0);
    }
    // The node that publishes has clients, subscribed to nothing.
    let mut idle = Client::connect(&nodes[2], Enc::Json).await;
    idle.sync().await;
    assert_eq!(
        target.redis_listeners(topic),
        2,
        "one Redis subscription per node with interest, once subscribed"
    );

    let mut http = Publisher::http(&nodes[2], Enc::Json);
    let mut ws = Publisher::ws(&nodes[2], Enc::Msgpack).await;
    for k in 1..=20u64 {
        let p = if k % 2 == 0 {
            http.publish(topic, "c", k).await
        } else {
            ws.publish(topic, "c", k).await
        };
        assert_eq!(p.seq, k);
        if let Some(r) = p.receivers {
            assert_eq!(r, 0, "node 2 has no subscriber");
        }
    }
    for (name, c) in [("a1", &mut a1), ("a2", &mut a2), ("b", &mut b)] {
        let mut seqs = Vec::new();
        for _ in 0..20 {
            seqs.push(recv_frame(c).await["seq"].as_u64().unwrap());
        }
        assert_seqs(name, topic, &seqs, &(1..=20).collect::<Vec<_>>());
    }
    eventually("nodes 0 and 1 to count 20 received", || async {
        let (s0, s1) = (nodes[0].scrape().await, nodes[1].scrape().await);
        (received(&s0) == 20.0 && received(&s1) == 20.0).then_some(())
    })
    .await;
    assert_eq!(
        received(&nodes[2].scrape().await),
        0.0,
        "node 2 has no interest"
    );

    // One of node 0's two subscribers leaves: it still listens; both leave: it stops.
    a1.send(json!({"op": "unsubscribe", "topic": topic, "id": "u"}))
        .await;
    assert_eq!(recv_frame(&mut a1).await, json!({"op": "ack", "id": "u"}));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(target.redis_listeners(topic), 2);
    a2.send(json!({"op": "unsubscribe", "topic": topic, "id": "u"}))
        .await;
    assert_eq!(recv_frame(&mut a2).await, json!({"op": "ack", "id": "u"}));
    eventually("node 0 to stop listening", || async {
        (target.redis_listeners(topic) == 1).then_some(())
    })
    .await;
    let before = received(&nodes[0].scrape().await);
    assert_eq!(before, 20.0);
    for k in 21..=30u64 {
        assert_eq!(http.publish(topic, "c", k).await.seq, k);
    }
    let mut seqs = Vec::new();
    for _ in 21..=30 {
        seqs.push(recv_frame(&mut b).await["seq"].as_u64().unwrap());
    }
    assert_seqs("b", topic, &seqs, &(21..=30).collect::<Vec<_>>());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        received(&nodes[0].scrape().await),
        20.0,
        "node 0 no longer has interest"
    );
    assert!(drain(&mut a1).await.is_empty());
    assert!(drain(&mut a2).await.is_empty());
    assert_eq!(received(&nodes[2].scrape().await), 0.0);

    // The last subscriber disconnects: node 1 stops listening too.
    drop(b);
    eventually("node 1 to stop listening after its client left", || async {
        (target.redis_listeners(topic) == 0).then_some(())
    })
    .await;
}

/// A background publisher's outcome: the seq, or the refusal.
type Outcome = Result<u64, Refused>;

/// A publisher running in the background: see [`background_publisher`].
pub struct Background {
    /// Every outcome in order, with its topic, once stopped.
    pub handle: tokio::task::JoinHandle<Vec<(String, Outcome)>>,
    /// Refusals so far.
    pub refused: Arc<AtomicU64>,
}

/// Publishes `{"phase": phase, "k": k}` for k = 1, 2, ... to each topic in turn over HTTP, with
/// short pauses, until `stop` is set.
pub fn background_publisher(
    server: &TestServer,
    topics: Vec<String>,
    phase: u64,
    stop: Arc<AtomicBool>,
) -> Background {
    let mut publisher = Publisher::http(server, Enc::Json);
    let refused = Arc::new(AtomicU64::new(0));
    let counter = refused.clone();
    let handle = tokio::spawn(async move {
        let mut outcomes = Vec::new();
        let mut k = 0;
        while !stop.load(Ordering::SeqCst) {
            k += 1;
            for topic in &topics {
                let data = json!({"phase": phase, "k": k});
                let views = Views {
                    json: data.clone(),
                    msgpack: data.clone(),
                };
                let outcome = publisher
                    .try_publish(topic, Data::Json(data), views)
                    .await
                    .map(|p| p.seq);
                if outcome.is_err() {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                outcomes.push((topic.clone(), outcome));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        outcomes
    });
    Background { handle, refused }
}

/// Reads message frames until the subscriber has seq `upto` of `topic` (checking that seqs run
/// on from `next`); returns the next expected seq.
async fn read_through(
    label: &str,
    client: &mut Client,
    topic: &str,
    mut next: u64,
    upto: u64,
) -> u64 {
    while next <= upto {
        let frame = recv_frame(client).await;
        assert_eq!(frame["op"], "message", "{label}: {frame}");
        assert_eq!(frame["topic"], topic, "{label}: {frame}");
        assert_seqs(label, topic, &[frame["seq"].as_u64().unwrap()], &[next]);
        next += 1;
    }
    next
}

/// Redis killed and restarted (empty) while traffic flows: refusals say `unavailable`,
/// `/readyz` says so, subscribers stay connected, and afterwards delivery resumes with a new
/// epoch that `since` reports as `recovered: false`. Nothing crashes.
pub async fn outage(redis: &mut OwnRedis) {
    let target = Target::own(redis);
    let nodes = target.nodes(2);
    let topic = "alerts.fire";

    let mut sub0 = Client::connect(&nodes[0], Enc::Json).await;
    let mut sub1 = Client::connect(&nodes[1], Enc::Msgpack).await;
    let mut pat1 = Client::connect(&nodes[1], Enc::Json).await;
    let old_epoch = sub0.subscribe(topic).await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(sub1.subscribe(topic).await["epoch"], old_epoch.as_str());
    assert_eq!(
        pat1.subscribe("alerts.*").await,
        json!({"op": "ack", "id": "s"})
    );
    let mut ws_pub = Publisher::ws(&nodes[1], Enc::Json).await;
    let mut ws_sub = Client::connect(&nodes[0], Enc::Msgpack).await;
    ws_sub.sync().await;
    for node in &nodes {
        let ready = node.http.get(node.url("/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), 200);
        assert_eq!(
            ready.json::<Value>().await.unwrap(),
            json!({"status": "ready"})
        );
    }
    let subs: [(&str, &mut Client); 3] = [
        ("sub0", &mut sub0),
        ("sub1", &mut sub1),
        ("pat1", &mut pat1),
    ];
    let mut subs = subs;

    // Phase 1: 20 messages reach everyone.
    let mut http0 = Publisher::http(&nodes[0], Enc::Json);
    for k in 1..=20u64 {
        let p = http0.publish(topic, "phase1", k).await;
        assert_eq!((p.seq, p.receivers), (k, Some(1)));
    }
    for (label, c) in subs.iter_mut() {
        read_through(label, c, topic, 1, 20).await;
    }

    // Phase 2: traffic flows (node 0, over HTTP), Redis dies under it.
    let stop = Arc::new(AtomicBool::new(false));
    let background = background_publisher(&nodes[0], vec![topic.to_owned()], 2, stop.clone());
    for (label, c) in subs.iter_mut() {
        read_through(label, c, topic, 21, 30).await; // 10 of the background messages
    }
    redis.kill();

    // HTTP publishes answer 503, on both nodes, single and batch.
    let mut http1 = Publisher::http(&nodes[1], Enc::Msgpack);
    for (name, publisher) in [
        ("node 0 http", &mut http0),
        ("node 1 http", &mut http1),
        ("node 1 ws", &mut ws_pub),
    ] {
        for k in 0..3 {
            let started = Instant::now();
            match publisher.try_publish_k(topic, "outage", k).await {
                Ok(p) => panic!("{name}: a publish was accepted while Redis is down: {p:?}"),
                Err(refused) => assert_unavailable(&refused, name),
            }
            assert!(
                started.elapsed() < PATIENCE,
                "{name}: the refusal took {:?}",
                started.elapsed()
            );
        }
    }
    let batch = nodes[1]
        .http
        .post(nodes[1].url("/api/publish"))
        .json(&json!([{"topic": topic, "data": 1}, {"topic": "alerts.other", "data": 2}]))
        .timeout(PATIENCE)
        .send()
        .await
        .unwrap();
    let status = batch.status().as_u16();
    let body: Value = batch.json().await.unwrap();
    assert_unavailable(
        &Refused {
            status: Some(status),
            error: body,
        },
        "a batch publish",
    );

    // A subscribe that needs Redis is refused with `unavailable` (the connection stays).
    ws_sub
        .send(json!({"op": "subscribe", "topic": "alerts.other", "id": 9}))
        .await;
    let refused = recv_frame(&mut ws_sub).await;
    assert_eq!(refused["id"], 9, "{refused}");
    assert_unavailable(
        &Refused {
            status: None,
            error: refused,
        },
        "a subscribe during the outage",
    );

    for (i, node) in nodes.iter().enumerate() {
        eventually(
            &format!("node {i}'s /readyz to say unavailable"),
            || async {
                let r = node.http.get(node.url("/readyz")).send().await.unwrap();
                let status = r.status().as_u16();
                let body: Value = r.json().await.unwrap();
                (status == 503).then(|| assert_eq!(body["status"], "unavailable", "{body}"))
            },
        )
        .await;
        let health = node.http.get(node.url("/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200, "node {i} is alive");
    }

    // Let the background publisher meet a few refusals, then stop it before Redis returns.
    let refusals = background.refused.clone();
    eventually("the background publisher to be refused 5 times", || async {
        (refusals.load(Ordering::SeqCst) >= 5).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let outcomes = background.handle.await.unwrap();
    let accepted: Vec<u64> = outcomes
        .iter()
        .take_while(|(_, o)| o.is_ok())
        .map(|(_, o)| *o.as_ref().unwrap())
        .collect();
    let refused: Vec<&Refused> = outcomes[accepted.len()..]
        .iter()
        .map(|(_, o)| match o {
            Ok(seq) => panic!(
                "the background publisher: seq {seq} accepted after a refusal, with Redis down"
            ),
            Err(r) => r,
        })
        .collect();
    assert!(
        refused.len() >= 3,
        "the background publisher went on during the outage: {outcomes:?}"
    );
    for r in &refused {
        assert_unavailable(r, "the background publisher during the outage");
    }
    assert_eq!(
        accepted,
        (21..21 + accepted.len() as u64).collect::<Vec<_>>(),
        "the background publisher's seqs before the outage"
    );
    let last_accepted = 20 + accepted.len() as u64;
    assert!(last_accepted >= 30);

    // Subscribers stay connected: they answer a ping. What was accepted just before Redis
    // died may or may not have reached them (at most once), but nothing else did.
    for (label, c) in subs.iter_mut() {
        let frames = drain(c).await;
        let seqs: Vec<u64> = frames
            .iter()
            .map(|f| {
                assert_eq!(f["op"], "message", "{label}: {f}");
                f["seq"].as_u64().unwrap()
            })
            .collect();
        assert_seqs(
            label,
            topic,
            &seqs,
            &(31..31 + seqs.len() as u64).collect::<Vec<_>>(),
        );
        assert!(
            30 + seqs.len() as u64 <= last_accepted,
            "{label}: messages that were never accepted: {seqs:?}"
        );
    }
    assert!(drain(&mut ws_sub).await.is_empty());

    // Redis returns, empty.
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.restart();
    for (i, node) in nodes.iter().enumerate() {
        eventually_within(
            &format!("node {i}'s /readyz to say ready again"),
            Duration::from_secs(15),
            || async {
                let r = node.http.get(node.url("/readyz")).send().await.ok()?;
                let status = r.status().as_u16();
                let body: Value = r.json().await.ok()?;
                (status == 200).then(|| assert_eq!(body, json!({"status": "ready"})))
            },
        )
        .await;
    }
    eventually_within(
        "both nodes to listen again",
        Duration::from_secs(15),
        || async {
            (target.redis_listeners(topic) == 2 && target.redis_patterns() >= 1).then_some(())
        },
    )
    .await;

    // Phase 3: a new epoch from seq 1; everyone receives.
    for k in 1..=10u64 {
        let p = http1.publish(topic, "phase3", k).await;
        assert_eq!((p.seq, p.receivers), (k, Some(2)), "after the outage");
    }
    let p = ws_pub.publish(topic, "phase3", 11).await;
    assert_eq!(p.seq, 11);
    for (label, c) in subs.iter_mut() {
        read_through(label, c, topic, 1, 11).await;
        assert!(drain(c).await.is_empty(), "{label}");
    }
    ws_sub
        .send(json!({"op": "subscribe", "topic": "alerts.other", "id": 10}))
        .await;
    let ack = recv_frame(&mut ws_sub).await;
    assert_eq!(
        (ack["op"].clone(), ack["seq"].clone()),
        (json!("ack"), json!(0)),
        "{ack}"
    );

    let mut late = Client::connect(&nodes[0], Enc::Json).await;
    let ack = late
        .subscribe_with(
            topic,
            json!({"since": {"epoch": old_epoch, "seq": last_accepted}}),
        )
        .await;
    assert_eq!(ack["recovered"], false, "Redis lost its data: {ack}");
    assert_ne!(ack["epoch"], old_epoch.as_str(), "a new epoch: {ack}");
    assert_eq!(ack["seq"], 11, "{ack}");
    late.expect_silence(Duration::from_millis(300)).await;
    let mut fresh = Client::connect(&nodes[1], Enc::Json).await;
    assert_eq!(
        fresh.subscribe(topic).await["epoch"],
        ack["epoch"],
        "both nodes agree"
    );

    for (i, node) in nodes.iter().enumerate() {
        let health = node.http.get(node.url("/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200, "node {i}");
        let s = node.scrape().await;
        assert!(
            s.get("crier_backend_reconnects_total") >= 1.0,
            "node {i} reconnected"
        );
        assert!(
            metric_sum(&s, "crier_backend_errors_total") >= 1.0,
            "node {i}'s refusals are counted"
        );
    }
}

/// Topic names whose keys live, `per_shard` of them, on each master of the cluster.
pub fn topics_per_shard(
    cluster: &OwnCluster,
    target: &Target,
    stem: &str,
    per_shard: usize,
) -> Vec<Vec<String>> {
    let mut shards: Vec<Vec<String>> = vec![Vec::new(); cluster.ports.len()];
    for i in 0.. {
        if shards.iter().all(|s| s.len() == per_shard) {
            break;
        }
        assert!(
            i < 1000,
            "no spread of topic names over the shards: {shards:?}"
        );
        let topic = format!("{stem}.t{i}");
        let owner = cluster.key_owner(&target.meta_key(&topic));
        if shards[owner].len() < per_shard {
            shards[owner].push(topic);
        }
    }
    shards
}

/// A topic's seq, history and channel live on the shard of its hash tag: with four topics per
/// shard published on, each master holds exactly its topics' `P:{T}:m` and `P:{T}:h`, and every
/// node lists all twelve topics.
pub async fn topics_spread(cluster: &OwnCluster) {
    let target = Target::cluster(cluster);
    let shards = topics_per_shard(cluster, &target, "spread", 4);
    let topics: Vec<String> = shards.concat();
    let nodes = target.nodes(3);

    let mut exact = Client::connect(&nodes[1], Enc::Msgpack).await;
    let mut epochs = BTreeMap::new();
    for topic in &topics {
        let ack = exact.subscribe(topic).await;
        assert_eq!(ack["seq"], 0);
        epochs.insert(topic.clone(), ack["epoch"].as_str().unwrap().to_owned());
    }
    let mut pattern = Client::connect(&nodes[0], Enc::Json).await;
    pattern.subscribe("spread.*").await;

    for round in 1..=3u64 {
        for (i, topic) in topics.iter().enumerate() {
            let body = nodes[i % 3].publish(topic, &json!({"round": round})).await;
            assert_eq!(body["seq"], round, "{body}");
        }
    }
    let mut by_topic: [BTreeMap<String, Vec<u64>>; 2] = Default::default();
    for (which, client) in [&mut exact, &mut pattern].into_iter().enumerate() {
        for _ in 0..topics.len() * 3 {
            let frame = recv_frame(client).await;
            assert_eq!(frame["data"]["round"], frame["seq"], "{frame}");
            by_topic[which]
                .entry(frame["topic"].as_str().unwrap().to_owned())
                .or_default()
                .push(frame["seq"].as_u64().unwrap());
        }
        assert!(drain(client).await.is_empty());
    }
    for (which, label) in [(0, "the exact subscriber"), (1, "the pattern subscriber")] {
        for topic in &topics {
            let seqs = by_topic[which].get(topic).cloned().unwrap_or_default();
            assert_seqs(label, topic, &seqs, &[1, 2, 3]);
        }
    }

    for (shard, own) in shards.iter().enumerate() {
        let keys = cluster.scan(shard, &format!("{}:*", target.prefix));
        let metas: BTreeSet<String> = keys
            .iter()
            .filter(|k| k.ends_with("}:m"))
            .cloned()
            .collect();
        let expected: BTreeSet<String> = own.iter().map(|t| target.meta_key(t)).collect();
        assert_eq!(
            metas, expected,
            "the topics' metadata on master {shard}; all its keys: {keys:?}"
        );
        for topic in own {
            assert!(
                keys.contains(&target.history_key(topic)),
                "{topic}'s history on master {shard}: {keys:?}"
            );
            let port = cluster.ports[shard];
            let meta = target.meta_key(topic);
            assert_eq!(
                redis_cli(port, &["hget", &meta, "seq"]).trim(),
                "3",
                "{meta}"
            );
            assert_eq!(
                redis_cli(port, &["hget", &meta, "epoch"]).trim(),
                epochs[topic],
                "{meta}"
            );
            let history = target.history_key(topic);
            assert_eq!(redis_int(port, &["xlen", &history]), 3, "{history}");
            let first = redis_cli(port, &["xrange", &history, "-", "+", "count", "1"]);
            assert_eq!(
                first.lines().next(),
                Some("1-0"),
                "stream ids are <seq>-0: {first:?}"
            );
            let last = redis_cli(port, &["xrevrange", &history, "+", "-", "count", "1"]);
            assert_eq!(
                last.lines().next(),
                Some("3-0"),
                "stream ids are <seq>-0: {last:?}"
            );
        }
    }

    for (i, node) in nodes.iter().enumerate() {
        let listed = node.get("/api/topics").await;
        let mut names: Vec<(String, u64)> = listed["topics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["name"].as_str().unwrap().to_owned(),
                    t["seq"].as_u64().unwrap(),
                )
            })
            .collect();
        names.sort();
        let mut expected: Vec<(String, u64)> = topics.iter().map(|t| (t.clone(), 3)).collect();
        expected.sort();
        assert_eq!(
            names, expected,
            "node {i} lists the topics of all shards: {listed}"
        );
    }
}

/// A shard's master restarts (without its data) while traffic flows: publishes to its topic are
/// refused with `unavailable` meanwhile, nothing crashes, subscribers stay connected, and
/// afterwards delivery resumes on every topic (a new epoch on the restarted shard's topic, the
/// other shards' topics continuing).
pub async fn master_restart(cluster: &mut OwnCluster) {
    let target = Target::cluster(cluster);
    let topics: Vec<String> = topics_per_shard(cluster, &target, "shard", 1).concat();
    let victim = 1;
    let victim_topic = topics[victim].clone();
    let nodes = target.nodes(3);

    let mut subs = Vec::new();
    let mut epochs: Vec<String> = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let enc = if i % 2 == 0 { Enc::Json } else { Enc::Msgpack };
        let mut client = Client::connect(node, enc).await;
        for (t, topic) in topics.iter().enumerate() {
            let ack = client.subscribe(topic).await;
            assert_eq!(ack["seq"], 0);
            let epoch = ack["epoch"].as_str().unwrap().to_owned();
            if i == 0 {
                epochs.push(epoch);
            } else {
                assert_eq!(epoch, epochs[t], "{topic}'s epoch on node {i}");
            }
        }
        subs.push(client);
    }
    for topic in &topics {
        assert_eq!(
            target.redis_listeners(topic),
            3,
            "{topic}: one SSUBSCRIBE per node"
        );
    }
    // Per subscriber, per topic: the next seq it must get.
    let mut next: Vec<Vec<u64>> = vec![vec![1; topics.len()]; subs.len()];
    async fn take(
        label: &str,
        client: &mut Client,
        topics: &[String],
        next: &mut [u64],
        upto: &[u64],
    ) {
        while next.iter().zip(upto).any(|(n, u)| n <= u) {
            let frame = recv_frame(client).await;
            assert_eq!(frame["op"], "message", "{label}: {frame}");
            let t = topics
                .iter()
                .position(|t| frame["topic"] == t.as_str())
                .unwrap_or_else(|| panic!("{label}: {frame}"));
            assert_seqs(
                label,
                &topics[t],
                &[frame["seq"].as_u64().unwrap()],
                &[next[t]],
            );
            next[t] += 1;
        }
    }

    // Phase 1: 10 messages on each topic.
    for k in 1..=10u64 {
        for (t, topic) in topics.iter().enumerate() {
            let body = nodes[(k as usize + t) % 3].publish(topic, &json!(k)).await;
            assert_eq!(body["seq"], k);
        }
    }
    for (i, client) in subs.iter_mut().enumerate() {
        take(
            &format!("sub {i}"),
            client,
            &topics,
            &mut next[i],
            &[10, 10, 10],
        )
        .await;
    }

    // Phase 2: traffic flows on all three topics from node 0; the victim's master dies.
    let stop = Arc::new(AtomicBool::new(false));
    let background = background_publisher(&nodes[0], topics.clone(), 2, stop.clone());
    for (i, client) in subs.iter_mut().enumerate() {
        take(
            &format!("sub {i}"),
            client,
            &topics,
            &mut next[i],
            &[15, 15, 15],
        )
        .await;
    }
    cluster.kill_master(victim);
    let down = Instant::now();

    // Publishes to the dead shard's topic are refused, never accepted.
    let mut http = Publisher::http(&nodes[2], Enc::Json);
    let started = Instant::now();
    match http.try_publish_k(&victim_topic, "down", 0).await {
        Ok(p) => panic!("accepted while its shard's master is down: {p:?}"),
        Err(refused) => assert_unavailable(&refused, "a publish to the dead shard"),
    }
    assert!(
        started.elapsed() < PATIENCE,
        "the refusal took {:?}",
        started.elapsed()
    );
    for (i, node) in nodes.iter().enumerate() {
        let health = node.http.get(node.url("/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200, "node {i} is alive");
    }
    let refusals = background.refused.clone();
    eventually("the background publisher to be refused", || async {
        (refusals.load(Ordering::SeqCst) >= 3).then_some(())
    })
    .await;
    // Down for longer than the cluster's node timeout.
    tokio::time::sleep(Duration::from_millis(2500).saturating_sub(down.elapsed())).await;
    stop.store(true, Ordering::SeqCst);
    let outcomes = background.handle.await.unwrap();

    // Per topic: the seqs accepted in phase 2, in order. On the victim's topic none after the
    // first refusal (its master stayed down meanwhile).
    let mut accepted: Vec<Vec<u64>> = vec![Vec::new(); topics.len()];
    let mut victim_refused = false;
    for (topic, outcome) in &outcomes {
        let t = topics.iter().position(|x| x == topic).unwrap();
        match outcome {
            Ok(seq) => {
                assert!(
                    !(t == victim && victim_refused),
                    "{topic}: seq {seq} accepted after a refusal, its master down"
                );
                accepted[t].push(*seq);
            }
            Err(refused) => {
                assert_unavailable(refused, &format!("the background publisher on {topic}"));
                victim_refused |= t == victim;
            }
        }
    }
    assert!(
        victim_refused,
        "publishes to the dead shard's topic were refused: {outcomes:?}"
    );
    for (t, seqs) in accepted.iter().enumerate() {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]) && seqs.first().is_none_or(|&s| s == 11),
            "{}: accepted seqs in phase 2: {seqs:?}",
            topics[t]
        );
        assert!(seqs.len() >= 5, "{}: phase 2 accepted {seqs:?}", topics[t]);
    }

    // Subscribers stay connected. Seqs are assigned in Redis atomically with the append and
    // the publication, so each topic's stream has no hole: on the live shards a subscriber got
    // every seq up to the last accepted one (and perhaps one whose publish was refused when the
    // answer was lost); on the dead shard what was accepted just before it died may be lost
    // (delivery is at most once), but what arrives runs on without a gap.
    for (i, client) in subs.iter_mut().enumerate() {
        let label = format!("sub {i} during the outage");
        // The live shards' last messages may still be on their way to the node: read until
        // they are in (or PATIENCE passed), then check.
        let deadline = Instant::now() + PATIENCE;
        let mut frames = Vec::new();
        loop {
            frames.extend(drain(client).await);
            let caught_up = (0..topics.len()).filter(|&t| t != victim).all(|t| {
                let wanted = accepted[t].last().unwrap() + 1 - next[i][t];
                frames
                    .iter()
                    .filter(|f| f["topic"] == topics[t].as_str())
                    .count() as u64
                    >= wanted
            });
            if caught_up || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut got: Vec<Vec<u64>> = vec![Vec::new(); topics.len()];
        for f in &frames {
            assert_eq!(f["op"], "message", "{label}: {f}");
            let t = topics
                .iter()
                .position(|t| f["topic"] == t.as_str())
                .unwrap();
            got[t].push(f["seq"].as_u64().unwrap());
        }
        for (t, seqs) in got.iter().enumerate() {
            let from = next[i][t];
            let contiguous: Vec<u64> = (from..from + seqs.len() as u64).collect();
            assert_seqs(&label, &topics[t], seqs, &contiguous);
            let max_accepted = *accepted[t].last().unwrap();
            let reached = from + seqs.len() as u64 - 1;
            if t == victim {
                assert!(
                    reached <= max_accepted + 2,
                    "{label}: {} seqs up to {reached}, accepted only to {max_accepted}",
                    topics[t]
                );
            } else {
                assert!(
                    reached >= max_accepted,
                    "{label}: {} on a live shard: got up to {reached}, accepted up to {max_accepted}",
                    topics[t]
                );
            }
            next[i][t] = reached + 1;
        }
    }
    for t in 0..topics.len() {
        if t != victim {
            let heads: BTreeSet<u64> = next.iter().map(|n| n[t]).collect();
            assert_eq!(
                heads.len(),
                1,
                "{}: the subscribers disagree: {heads:?}",
                topics[t]
            );
        }
    }

    // The master returns, empty; the nodes become ready and listen again.
    cluster.start_master(victim);
    for (i, node) in nodes.iter().enumerate() {
        eventually_within(
            &format!("node {i}'s /readyz"),
            Duration::from_secs(15),
            || async {
                let r = node.http.get(node.url("/readyz")).send().await.ok()?;
                (r.status() == 200).then_some(())
            },
        )
        .await;
    }
    eventually_within(
        "every node to listen on every topic again",
        Duration::from_secs(15),
        || async {
            topics
                .iter()
                .all(|t| target.redis_listeners(t) == 3)
                .then_some(())
        },
    )
    .await;

    // Phase 3: 10 messages on each topic, every publish accepted. The victim's topic starts a
    // new epoch at 1; the others go on from their last seq.
    for (t, topic) in topics.iter().enumerate() {
        let first = if t == victim { 1 } else { next[0][t] };
        for k in 1..=10u64 {
            let p = http
                .try_publish_k(topic, "phase3", k)
                .await
                .unwrap_or_else(|e| panic!("{topic} after the restart, publish {k}: {e:?}"));
            assert_eq!(p.seq, first + k - 1, "{topic} after the restart");
        }
    }
    for (i, client) in subs.iter_mut().enumerate() {
        let label = format!("sub {i} after the restart");
        let mut got: Vec<Vec<(u64, u64)>> = vec![Vec::new(); topics.len()];
        for _ in 0..30 {
            let frame = recv_frame(client).await;
            assert_eq!(frame["op"], "message", "{label}: {frame}");
            assert_eq!(frame["data"]["from"], "phase3", "{label}: {frame}");
            let t = topics
                .iter()
                .position(|t| frame["topic"] == t.as_str())
                .unwrap();
            got[t].push((
                frame["seq"].as_u64().unwrap(),
                frame["data"]["k"].as_u64().unwrap(),
            ));
        }
        for (t, topic) in topics.iter().enumerate() {
            let first = if t == victim { 1 } else { next[i][t] };
            let expected: Vec<(u64, u64)> = (1..=10).map(|k| (first + k - 1, k)).collect();
            assert_eq!(got[t], expected, "{label} on {topic}: (seq, k)");
        }
        assert!(drain(client).await.is_empty(), "{label}");
    }

    // `since` after the restart: the victim's topic lost its data, the others did not.
    let mut late = Client::connect(&nodes[1], Enc::Json).await;
    let ack = late
        .subscribe_with(
            &victim_topic,
            json!({"since": {"epoch": epochs[victim], "seq": 10}}),
        )
        .await;
    assert_eq!(ack["recovered"], false, "{ack}");
    assert_ne!(ack["epoch"], epochs[victim].as_str(), "{ack}");
    assert_eq!(ack["seq"], 10, "{ack}");
    late.expect_silence(Duration::from_millis(200)).await;
    let other = (victim + 1) % topics.len();
    let ack = late
        .subscribe_with(
            &topics[other],
            json!({"since": {"epoch": epochs[other], "seq": 1}}),
        )
        .await;
    assert_eq!(ack["recovered"], true, "{ack}");
    assert_eq!(ack["epoch"], epochs[other].as_str(), "{ack}");
    let head = next[0][other] + 9;
    assert_eq!(ack["seq"], head, "{ack}");
    let mut replayed = Vec::new();
    for _ in 2..=head {
        replayed.push(recv_frame(&mut late).await["seq"].as_u64().unwrap());
    }
    assert_seqs(
        "the replay from the live shard",
        &topics[other],
        &replayed,
        &(2..=head).collect::<Vec<_>>(),
    );
    assert!(drain(&mut late).await.is_empty());

    for (i, node) in nodes.iter().enumerate() {
        let health = node.http.get(node.url("/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200, "node {i}");
    }
}

/// History is bounded in Redis by `--history-size`: another node's history over HTTP and a
/// `since` beyond it see the same ten messages.
pub async fn history_is_bounded(target: &Target) {
    let nodes: Vec<TestServer> = (0..2)
        .map(|_| target.node(|c| c.history_size = 10))
        .collect();
    let topic = "bounded.t";
    let mut http = Publisher::http(&nodes[0], Enc::Json);
    for k in 1..=25u64 {
        let (data, views) = number(k);
        let p = http.try_publish(topic, data, views).await.unwrap();
        assert_eq!(p.seq, k);
    }
    let history = nodes[1].get(&format!("/api/topics/{topic}/history")).await;
    assert_eq!(
        (history["oldest"].clone(), history["seq"].clone()),
        (json!(16), json!(25)),
        "{history}"
    );
    let held: Vec<Value> = (16..=25u64).map(|k| json!({"seq": k, "data": k})).collect();
    assert_eq!(history["messages"], json!(held), "{history}");
    let partial = nodes[1]
        .get(&format!("/api/topics/{topic}/history?since=3&limit=2"))
        .await;
    assert_eq!(partial["complete"], false, "{partial}");
    assert_eq!(
        partial["messages"],
        json!([{"seq": 16, "data": 16}, {"seq": 17, "data": 17}])
    );
    if !target.cluster {
        assert_eq!(
            redis_int(target.ports[0], &["xlen", &target.history_key(topic)]),
            10
        );
    }

    let mut c = Client::connect(&nodes[1], Enc::Msgpack).await;
    let epoch = history["epoch"].as_str().unwrap();
    let ack = c
        .subscribe_with(topic, json!({"since": {"epoch": epoch, "seq": 3}}))
        .await;
    assert_eq!(
        ack["recovered"], false,
        "history no longer reaches back to 4: {ack}"
    );
    assert_eq!(
        (ack["epoch"].as_str(), ack["seq"].as_u64()),
        (Some(epoch), Some(25))
    );
    let mut seqs = Vec::new();
    for _ in 16..=25 {
        let frame = recv_frame(&mut c).await;
        assert_eq!(frame["data"], frame["seq"], "{frame}");
        seqs.push(frame["seq"].as_u64().unwrap());
    }
    assert_seqs(
        "since beyond history",
        topic,
        &seqs,
        &(16..=25).collect::<Vec<_>>(),
    );
    assert!(drain(&mut c).await.is_empty());
}
