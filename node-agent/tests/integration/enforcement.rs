//! Host-side enforcement end to end, through the agent's own wiring: the
//! fake GPU backend reports REAL child processes (`sleep 1000`) holding
//! memory on a card, a fake proc root maps their pids to pods on the API
//! stand-in (by cgroup path, as `/proc/<pid>/cgroup` does on a node), and
//! the agent's enforcement loop must kill the one over its cap (and the
//! one in a pod without an allocation), leave the one under its cap and
//! the host process alone, post Warning Events and count
//! `tessera_enforcement_actions_total`; in report mode it kills nothing.
//! The kill test prints the reaction time (cap exceeded → process gone).

use crate::common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use serde_json::json;
use tessera_api::config::Config;
use tessera_node_agent::agent::AgentSetup;
use tessera_node_agent::gpu::fake::FakeGpus;
use tessera_node_agent::gpu::GpuProcess;
use tessera_node_agent::testing::{fake_agent_setup, KUBELET_SOCKET};

const MIB: u64 = 1 << 20;

/// A child process that ends when the test does.
struct Sleeper(Child);

impl Sleeper {
    fn start() -> Self {
        Self(
            Command::new("sleep")
                .arg("1000")
                .spawn()
                .expect("spawn sleep"),
        )
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// `Some(signal)` once it ended.
    fn ended_by(&mut self) -> Option<Option<i32>> {
        self.0
            .try_wait()
            .expect("child status")
            .map(|status| status.signal())
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes `<proc_root>/<pid>/cgroup`.
fn fake_cgroup(proc_root: &Path, pid: u32, path: &str) {
    let dir = proc_root.join(pid.to_string());
    std::fs::create_dir_all(&dir).expect("pid dir");
    std::fs::write(dir.join("cgroup"), format!("0::{path}\n")).expect("cgroup file");
}

/// The cgroup of container `id` of pod `uid` under the systemd driver with containerd.
fn container_cgroup(uid: &str, id: &str) -> String {
    let slice_uid = uid.replace('-', "_");
    format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{slice_uid}.slice/cri-containerd-{id}.scope")
}

/// A 64-hex container ID derived from `n`.
fn container_id(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

/// Inserts pod `name` with one container `c0` running as `container_id`,
/// allocated `memory_mib` of `card` (or nothing); returns its UID.
fn insert_running_pod(api: &ApiServer, name: &str, card: Option<(&str, u64)>, id: &str) -> String {
    let devices = card
        .map(|(uuid, mib)| vec![vec![device(uuid, mib, 30)]])
        .unwrap_or_default();
    let mut pod = bound_pod(name, &devices);
    if card.is_none() {
        pod.metadata.annotations = None;
    }
    let mut value = serde_json::to_value(&pod).expect("pod json");
    value["status"] = json!({
        "phase": "Running",
        "containerStatuses": [{
            "name": "c0", "containerID": format!("containerd://{id}"),
            "image": "cuda", "imageID": "", "ready": true, "restartCount": 0
        }]
    });
    let pod: Pod = serde_json::from_value(value).expect("pod");
    api.insert(&pod)
        .metadata
        .uid
        .expect("the stand-in assigns a UID")
}

struct Stand {
    api: ApiServer,
    _kubelet: KubeletStandIn,
    agent: Option<RunningAgent>,
    temp: tempfile::TempDir,
    metrics: std::net::SocketAddr,
}

impl Stand {
    async fn start(enforcement_yaml: &str) -> Self {
        let api = ApiServer::start().await.expect("API stand-in");
        api.insert(&node_object());
        let temp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(temp.path().join("proc")).expect("proc root");
        let kubelet = KubeletStandIn::start(&temp.path().join("kubelet"));
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let gpus = FakeGpus::parse("2x NVIDIA A10G 23028", NODE).expect("fake cards");
        let setup = AgentSetup {
            config: Config::from_yaml(enforcement_yaml).expect("config"),
            metrics_addr: Some(metrics),
            proc_root: temp.path().join("proc"),
            ..fake_agent_setup(
                NODE,
                &gpus,
                api.client(),
                &temp.path().join("host"),
                temp.path().join("kubelet").join(KUBELET_SOCKET),
            )
        };
        let agent = RunningAgent::spawn(&gpus, setup);
        Self {
            api,
            _kubelet: kubelet,
            agent: Some(agent),
            temp,
            metrics,
        }
    }

    fn agent(&self) -> &RunningAgent {
        self.agent.as_ref().expect("running")
    }

    fn card(&self, i: usize) -> String {
        self.agent().cards[i].uuid.clone()
    }

    fn proc_root(&self) -> std::path::PathBuf {
        self.temp.path().join("proc")
    }

    /// A running `sleep` mapped to container `id` of pod `uid`.
    fn sleeper_in(&self, uid: &str, id: &str) -> Sleeper {
        let sleeper = Sleeper::start();
        fake_cgroup(&self.proc_root(), sleeper.pid(), &container_cgroup(uid, id));
        sleeper
    }

    /// Warning Events the agent posted on pod `name` with `reason`.
    fn events(&self, name: &str, reason: &str) -> Vec<Event> {
        self.api
            .list::<Event>()
            .into_iter()
            .filter(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
            })
            .collect()
    }

    async fn metrics_text(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut stream) = tokio::net::TcpStream::connect(self.metrics).await else {
            return String::new();
        };
        let request = "GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n";
        if stream.write_all(request.as_bytes()).await.is_err() {
            return String::new();
        }
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text).await;
        text
    }

    /// Waits until `/metrics` has `line`.
    async fn wait_metric(&self, line: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = self.metrics_text().await;
            if has_line(&text, line) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {WAIT:?} waiting for `{line}` in /metrics:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn stop(mut self) {
        if let Some(agent) = self.agent.take() {
            agent.stop().await;
        }
    }
}

/// Whether `text` has exactly `line` as one of its lines.
fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l.trim_end() == line)
}

fn held(pid: u32, mib: u64) -> GpuProcess {
    GpuProcess {
        pid,
        used_bytes: Some(mib * MIB),
    }
}

fn action_line(namespace: &str, pod: &str, container: &str, card: &str, action: &str) -> String {
    format!("tessera_enforcement_actions_total{{namespace=\"{namespace}\",pod=\"{pod}\",container=\"{container}\",device_uuid=\"{card}\",action=\"{action}\"}} 1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_mode_kills_the_container_over_its_cap_and_the_unallocated_pod_only() {
    // The default period (500 ms), so the reaction time printed is the real one.
    let stand = Stand::start("enforcement:\n  mode: kill\n  marginMiB: 64\n").await;
    let card = stand.card(0);
    let id_modest = container_id(1);
    let id_greedy = container_id(2);
    let id_intruder = container_id(3);
    // Inserted in this order, so the pod watch has the first two whenever
    // it has the last.
    let modest_uid = insert_running_pod(&stand.api, "modest", Some((&card, 1024)), &id_modest);
    let intruder_uid = insert_running_pod(&stand.api, "intruder", None, &id_intruder);
    let greedy_uid = insert_running_pod(&stand.api, "greedy", Some((&card, 1024)), &id_greedy);
    let mut modest = stand.sleeper_in(&modest_uid, &id_modest);
    let mut intruder = stand.sleeper_in(&intruder_uid, &id_intruder);
    let mut greedy_small = stand.sleeper_in(&greedy_uid, &id_greedy);
    let mut greedy_big = stand.sleeper_in(&greedy_uid, &id_greedy);
    let mut host = Sleeper::start();
    fake_cgroup(
        &stand.proc_root(),
        host.pid(),
        "/system.slice/host-gpu-job.service",
    );

    // Under its cap with its margin (1000 MiB of 1024 + 64): left alone.
    // Over: 1500 + 600 MiB of 1024 — killing the 1500 MiB process is enough.
    let exceeded_at = Instant::now();
    stand.agent().control.set_processes(
        &card,
        vec![
            held(modest.pid(), 1000),
            held(greedy_small.pid(), 600),
            held(greedy_big.pid(), 1500),
            held(intruder.pid(), 700),
            held(host.pid(), 900),
        ],
    );
    let signal = eventually("the process over its cap to be killed", || {
        greedy_big.ended_by()
    })
    .await;
    let reaction = exceeded_at.elapsed();
    assert_eq!(signal, Some(libc::SIGKILL));
    eprintln!(
        "enforcement reaction time (cap exceeded -> process gone, period 500 ms): {reaction:?}"
    );

    let signal = eventually("the unallocated pod's process to be killed", || {
        intruder.ended_by()
    })
    .await;
    assert_eq!(signal, Some(libc::SIGKILL));

    let events = eventually("a GPUMemoryOverCap Event on greedy", || {
        Some(stand.events("greedy", "GPUMemoryOverCap")).filter(|e| !e.is_empty())
    })
    .await;
    let note = events[0].note.clone().unwrap_or_default();
    assert_eq!(events[0].type_.as_deref(), Some("Warning"));
    assert!(
        note.contains("container `c0`")
            && note.contains("2100 MiB")
            && note.contains("cap of 1024 MiB")
            && note.contains(&format!("killed pid {} (1500 MiB)", greedy_big.pid())),
        "{note}"
    );
    eventually("a GPUUseWithoutAllocation Event on intruder", || {
        Some(stand.events("intruder", "GPUUseWithoutAllocation")).filter(|e| !e.is_empty())
    })
    .await;
    stand
        .wait_metric(&action_line("default", "greedy", "c0", &card, "kill"))
        .await;
    stand
        .wait_metric(&action_line("default", "intruder", "c0", &card, "kill"))
        .await;
    // The host process is reported (metric, log), never killed.
    stand
        .wait_metric(&action_line("", "", "", &card, "report"))
        .await;

    // Decided in the same rounds as the kills: the rest is alive, and the
    // container under its cap got no Event.
    assert_eq!(modest.ended_by(), None, "under its cap: not killed");
    assert_eq!(
        greedy_small.ended_by(),
        None,
        "killing the largest was enough"
    );
    assert_eq!(host.ended_by(), None, "host processes are never killed");
    assert!(stand.events("modest", "GPUMemoryOverCap").is_empty());
    let text = stand.metrics_text().await;
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("tessera_enforcement_actions_total")
                && l.contains("pod=\"modest\"")),
        "{text}"
    );
    stand.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_mode_reports_once_and_kills_nothing() {
    let stand = Stand::start("enforcement:\n  mode: report\n  periodMs: 100\n").await;
    let card = stand.card(1);
    let id = container_id(9);
    let uid = insert_running_pod(&stand.api, "greedy", Some((&card, 1024)), &id);
    let mut greedy = stand.sleeper_in(&uid, &id);
    stand
        .agent()
        .control
        .set_processes(&card, vec![held(greedy.pid(), 4096)]);
    let events = eventually("a GPUMemoryOverCap Event on greedy", || {
        Some(stand.events("greedy", "GPUMemoryOverCap")).filter(|e| !e.is_empty())
    })
    .await;
    let note = events[0].note.clone().unwrap_or_default();
    assert!(note.contains("reported only"), "{note}");
    stand
        .wait_metric(&action_line("default", "greedy", "c0", &card, "report"))
        .await;
    // The Event is posted after the round that judged it: in kill mode the
    // process would be dead by now.
    assert_eq!(greedy.ended_by(), None, "report mode kills nothing");
    // Later rounds (five at 100 ms) see the same incident: it is not
    // reported again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rounds_later = stand.metrics_text().await;
    assert_eq!(greedy.ended_by(), None);
    let once = action_line("default", "greedy", "c0", &card, "report");
    assert!(has_line(&rounds_later, &once), "{rounds_later}");
    let text = stand.metrics_text().await;
    assert!(
        has_line(&text, &once),
        "reported once per incident:\n{text}"
    );
    stand.stop().await;
}
