//! Benchmark harness for host-side enforcement (prints figures, asserts
//! nothing). Run: `cargo bench -p tessera-node-agent --bench enforce`.
//!
//! 1. Cost of one round ([`Enforcer::tick`]) on the fake backend with 8
//!    cards × 50 processes (400 processes in 200 allocated containers,
//!    every one under its cap, so the round does all its reading and
//!    deciding and no acting): wall and CPU time per round, and the share
//!    of one core at the default 500 ms period.
//! 2. The same load in the running agent against the API stand-in: the
//!    process's CPU time over 10 s of rounds at 500 ms (this harness sleeps
//!    meanwhile), as a share of one core.
//! 3. Reaction time in that agent: a real `sleep` child goes over its cap,
//!    time until it is gone; 20 samples.

#[path = "../tests/integration/common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;
use tessera_api::config::{Config, Enforcement};
use tessera_node_agent::agent::AgentSetup;
use tessera_node_agent::enforce::{AnnotatedAllocations, EnforcementSettings, Enforcer};
use tessera_node_agent::gpu::fake::{FakeGpuControl, FakeGpus};
use tessera_node_agent::gpu::{GpuBackend, GpuInfo, GpuProcess};
use tessera_node_agent::testing::{fake_agent_setup, KUBELET_SOCKET};

const CARDS: &str = "8x NVIDIA H200 143771";
const PROCESSES_PER_CARD: u32 = 50;
const PROCESSES_PER_CONTAINER: u32 = 2;
const ROUNDS: u32 = 2000;
const REACTION_SAMPLES: usize = 20;
const MIB: u64 = 1 << 20;

/// CPU time of this process (all threads).
fn process_cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let micros = |t: libc::timeval| {
        u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_usec).unwrap_or(0)
    };
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

fn container_id(card: usize, slot: u32) -> String {
    format!("{card:02x}{slot:04x}").repeat(64 / 6 + 1)[..64].to_owned()
}

fn uid(card: usize, slot: u32) -> String {
    format!("{card:08x}-0000-4000-8000-{slot:012x}")
}

/// A running pod object (not inserted anywhere) with one container
/// allocated 4096 MiB of `card`.
fn pod_object(name: &str, uid: &str, card: &str, id: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "load", "uid": uid, "annotations": {
            "hami.io/vgpu-devices-allocated": format!("{card},NVIDIA,4096,10:;")
        }},
        "spec": {"nodeName": NODE, "containers": [{"name": "c0", "image": "x"}]},
        "status": {"phase": "Running", "containerStatuses": [{
            "name": "c0", "containerID": format!("containerd://{id}"),
            "image": "x", "imageID": "", "ready": true, "restartCount": 0
        }]}
    }))
    .expect("pod")
}

fn write_cgroup(proc_root: &Path, pid: u32, uid: &str, id: &str) {
    let dir = proc_root.join(pid.to_string());
    std::fs::create_dir_all(&dir).expect("pid dir");
    std::fs::write(
        dir.join("cgroup"),
        format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{id}.scope\n",
            uid.replace('-', "_")
        ),
    )
    .expect("cgroup");
}

/// Fills `control` with 50 processes per card (pids from 5_000_000 up,
/// above the kernel's largest `pid_max`, so none is real) in 25 containers per card, each under its 4096 MiB cap,
/// and writes their cgroup files under `proc_root`. Each pod goes through
/// `register`, which returns the UID it ended up with. Returns the pods
/// and card 0's processes.
fn load(
    cards: &[GpuInfo],
    control: &FakeGpuControl,
    proc_root: &Path,
    mut register: impl FnMut(Pod) -> (Pod, String),
) -> (Vec<Pod>, Vec<GpuProcess>) {
    let mut pods = Vec::new();
    let mut first_card = Vec::new();
    let mut pid = 5_000_000;
    for (c, card) in cards.iter().enumerate() {
        let mut processes = Vec::new();
        for slot in 0..PROCESSES_PER_CARD / PROCESSES_PER_CONTAINER {
            let id = container_id(c, slot);
            let (pod, uid) = register(pod_object(
                &format!("load-{c}-{slot}"),
                &uid(c, slot),
                &card.uuid,
                &id,
            ));
            pods.push(pod);
            for _ in 0..PROCESSES_PER_CONTAINER {
                write_cgroup(proc_root, pid, &uid, &id);
                processes.push(GpuProcess {
                    pid,
                    used_bytes: Some(1500 * MIB),
                });
                pid += 1;
            }
        }
        if c == 0 {
            first_card.clone_from(&processes);
        }
        control.set_processes(&card.uuid, processes);
    }
    (pods, first_card)
}

/// Keeps a pod as it is (its UID is the one written in it).
fn as_is(pod: Pod) -> (Pod, String) {
    let uid = pod.metadata.uid.clone().expect("uid");
    (pod, uid)
}

fn round_cost() {
    let gpus = FakeGpus::parse(CARDS, NODE).expect("fake cards");
    let cards: Arc<[GpuInfo]> = gpus.discover().expect("cards").into();
    let temp = tempfile::tempdir().expect("tempdir");
    let pods: Vec<Arc<Pod>> = load(&cards, &gpus.control(), temp.path(), as_is)
        .0
        .into_iter()
        .map(Arc::new)
        .collect();
    let mut enforcer = Enforcer::new(
        Arc::new(gpus),
        Arc::clone(&cards),
        EnforcementSettings::from_config(&Enforcement::default(), temp.path().to_owned()),
        Arc::new(AnnotatedAllocations),
    );
    let warm = enforcer.tick(&pods, Instant::now());
    assert!(warm.actions.is_empty(), "the load is under its caps");
    let (wall_start, cpu_start) = (Instant::now(), thread_cpu());
    let mut seen = 0;
    for _ in 0..ROUNDS {
        seen += enforcer.tick(&pods, Instant::now()).processes_seen;
    }
    let wall = wall_start.elapsed() / ROUNDS;
    let cpu = (thread_cpu() - cpu_start) / ROUNDS;
    println!(
        "round cost, {} cards x {PROCESSES_PER_CARD} processes, {} pods ({} processes per round): wall {wall:?}/round, CPU {cpu:?}/round = {:.3}% of one core at a 500 ms period",
        cards.len(),
        pods.len(),
        seen / ROUNDS as usize,
        cpu.as_secs_f64() / 0.5 * 100.0
    );
}

struct Agent {
    api: ApiServer,
    _kubelet: KubeletStandIn,
    agent: RunningAgent,
    temp: tempfile::TempDir,
}

async fn start_agent() -> Agent {
    let api = ApiServer::start().await.expect("API stand-in");
    api.insert(&node_object());
    let temp = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(temp.path().join("proc")).expect("proc");
    let kubelet = KubeletStandIn::start(&temp.path().join("kubelet"));
    let gpus = FakeGpus::parse(CARDS, NODE).expect("fake cards");
    let setup = AgentSetup {
        config: Config::default(),
        proc_root: temp.path().join("proc"),
        sweep_interval: Duration::from_secs(3600),
        publish_interval: Duration::from_secs(3600),
        ..fake_agent_setup(
            NODE,
            &gpus,
            api.client(),
            &temp.path().join("host"),
            temp.path().join("kubelet").join(KUBELET_SOCKET),
        )
    };
    let agent = RunningAgent::spawn(&gpus, setup);
    Agent {
        api,
        _kubelet: kubelet,
        agent,
        temp,
    }
}

async fn running_agent() {
    let agent = start_agent().await;
    let (_, base) = load(
        &agent.agent.cards,
        &agent.agent.control,
        &agent.temp.path().join("proc"),
        |pod| {
            let stored = agent.api.insert(&pod);
            let uid = stored.metadata.uid.clone().expect("assigned uid");
            (stored, uid)
        },
    );
    // Let the watch catch up and the first rounds run.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (wall_start, cpu_start) = (Instant::now(), process_cpu());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let cpu = process_cpu() - cpu_start;
    let wall = wall_start.elapsed();
    println!(
        "running agent with that load (rounds every 500 ms, plus its other tasks): {cpu:?} CPU over {wall:?} = {:.3}% of one core",
        cpu.as_secs_f64() / wall.as_secs_f64() * 100.0
    );

    // Reaction: one more pod per sample, its process goes over its cap.
    let card = agent.agent.cards[0].uuid.clone();
    let mut reactions = Vec::new();
    for sample in 0..REACTION_SAMPLES {
        let slot = 1000 + u32::try_from(sample).expect("small");
        let id = container_id(0, slot);
        let uid = agent
            .api
            .insert(&pod_object(
                &format!("greedy-{sample}"),
                &uid(0, slot),
                &card,
                &id,
            ))
            .metadata
            .uid
            .expect("assigned uid");
        let mut child = std::process::Command::new("sleep")
            .arg("1000")
            .spawn()
            .expect("sleep");
        write_cgroup(&agent.temp.path().join("proc"), child.id(), &uid, &id);
        // Let the pod watch deliver the pod, then go over the cap at a
        // random point of the period.
        tokio::time::sleep(Duration::from_millis(300 + 37 * sample as u64 % 500)).await;
        let mut processes = base.clone();
        processes.push(GpuProcess {
            pid: child.id(),
            used_bytes: Some(8192 * MIB),
        });
        let exceeded = Instant::now();
        agent.agent.control.set_processes(&card, processes);
        loop {
            if child.try_wait().expect("status").is_some() {
                reactions.push(exceeded.elapsed());
                break;
            }
            assert!(exceeded.elapsed() < Duration::from_secs(30), "never killed");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    reactions.sort();
    println!(
        "reaction time (cap exceeded -> process gone), {REACTION_SAMPLES} samples, period 500 ms: min {:?}, median {:?}, max {:?}",
        reactions[0],
        reactions[reactions.len() / 2],
        reactions[reactions.len() - 1]
    );
    agent.agent.stop().await;
}

fn main() {
    round_cost();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(running_agent());
}
