//! `enforce-gpu`: the node agent's enforcement loop against real NVML,
//! without Kubernetes, for GPU validation scripts. Containers are given on
//! the command line as rules, each a selector and a cap in MiB per card:
//!
//! - `pid:<pid>=<MiB>`: that process and all its descendants;
//! - `cgroup:<text>=<MiB>`: every process whose `/proc/<pid>/cgroup`
//!   contains `<text>`.
//!
//! Every round it lists each card's processes (NVML), writes a private
//! proc tree in which each matched pid sits in the cgroup of a synthetic
//! pod (one per rule, allocated its cap on every card) and every other pid
//! is a host process, and runs the agent's own [`Enforcer`] round over it:
//! the same attribution, decision and pidfd kill as in the cluster. Other
//! processes on the cards are only ever reported, never killed.
//!
//! ```text
//! enforce-gpu --rule pid:12345=10240 [--mode kill|report] [--margin-mib 64]
//!             [--period-ms 500] [--duration-s 60]
//! ```
//!
//! `--fake-gpus "1x NVIDIA H200 143771" --fake-process <pid>=<MiB>` tries
//! it without a GPU (the fake first card lists those processes).
//!
//! Prints one line per action (`ACTION kill rule=… card=… used_mib=…
//! cap_mib=… pids=… at=<unix seconds>`) and, at the end, the rounds run and their mean wall
//! and CPU time.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;
use tessera_api::config::{Enforcement, EnforcementMode};
use tessera_node_agent::enforce::enforcer::Taken;
use tessera_node_agent::enforce::{AnnotatedAllocations, EnforcementSettings, Enforcer};
use tessera_node_agent::gpu::fake::FakeGpus;
use tessera_node_agent::gpu::nvml::NvmlGpus;
use tessera_node_agent::gpu::{GpuBackend, GpuInfo, GpuProcess};

/// Runs the node agent's GPU memory enforcement on this machine's cards
/// against rules given on the command line.
#[derive(Debug, Parser)]
#[command(name = "enforce-gpu")]
struct Options {
    /// `pid:<pid>=<MiB>` or `cgroup:<text>=<MiB>`: a container and its cap per card.
    #[arg(long = "rule", required = true)]
    rules: Vec<String>,
    /// `kill` or `report`.
    #[arg(long, default_value = "kill")]
    mode: String,
    /// MiB tolerated above a cap.
    #[arg(long, default_value_t = 64)]
    margin_mib: u64,
    /// Milliseconds between rounds.
    #[arg(long, default_value_t = 500)]
    period_ms: u64,
    /// Stop after this many seconds (0 = run until killed).
    #[arg(long, default_value_t = 0)]
    duration_s: u64,
    /// Without a GPU: fake cards instead of NVML, e.g. "1x NVIDIA H200 143771".
    #[arg(long)]
    fake_gpus: Option<String>,
    /// With --fake-gpus: `<pid>=<MiB>`, a process the first fake card lists.
    #[arg(long = "fake-process")]
    fake_processes: Vec<String>,
}

/// Which processes a rule covers.
#[derive(Debug, Clone)]
enum Selector {
    /// A process and its descendants.
    Tree(u32),
    /// Processes whose cgroup file contains this text.
    Cgroup(String),
}

#[derive(Debug, Clone)]
struct Rule {
    text: String,
    selector: Selector,
    cap_mib: u64,
    uid: String,
    container_id: String,
}

fn parse_rule(index: usize, text: &str) -> anyhow::Result<Rule> {
    let (selector, cap) = text.rsplit_once('=').with_context(|| {
        format!("rule `{text}`: expected `pid:<pid>=<MiB>` or `cgroup:<text>=<MiB>`")
    })?;
    let cap_mib: u64 = cap
        .parse()
        .with_context(|| format!("rule `{text}`: the cap `{cap}` must be whole MiB"))?;
    let selector = if let Some(pid) = selector.strip_prefix("pid:") {
        Selector::Tree(
            pid.parse()
                .with_context(|| format!("rule `{text}`: `{pid}` is not a pid"))?,
        )
    } else if let Some(cgroup) = selector.strip_prefix("cgroup:") {
        if cgroup.is_empty() {
            bail!("rule `{text}`: the cgroup text is empty");
        }
        Selector::Cgroup(cgroup.to_owned())
    } else {
        bail!("rule `{text}`: the selector must start with `pid:` or `cgroup:`");
    };
    Ok(Rule {
        text: text.to_owned(),
        selector,
        cap_mib,
        uid: format!("00000000-0000-4000-8000-{index:012x}"),
        container_id: format!("{:064x}", index + 1),
    })
}

/// The synthetic pod of a rule: one container allocated the cap on every card.
fn rule_pod(rule: &Rule, cards: &[GpuInfo]) -> anyhow::Result<Pod> {
    let devices: String = cards
        .iter()
        .map(|card| format!("{},NVIDIA,{},0:", card.uuid, rule.cap_mib))
        .collect();
    Ok(serde_json::from_value(json!({
        "metadata": {"name": rule.text, "namespace": "enforce-gpu", "uid": rule.uid, "resourceVersion": "1",
            "annotations": {"hami.io/vgpu-devices-allocated": format!("{devices};")}},
        "spec": {"containers": [{"name": "c0", "image": "-"}]},
        "status": {"containerStatuses": [{"name": "c0", "containerID": format!("containerd://{}", rule.container_id),
            "image": "-", "imageID": "", "ready": true, "restartCount": 0}]}
    }))?)
}

/// The parent pid of `pid`, from `/proc/<pid>/stat`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: skip past it.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split(' ').nth(1)?.parse().ok()
}

/// Whether `pid` is `root` or one of its descendants.
fn descends_from(pid: u32, root: u32) -> bool {
    let mut current = pid;
    for _ in 0..64 {
        if current == root {
            return true;
        }
        match parent_of(current) {
            Some(parent) if parent > 1 => current = parent,
            _ => return false,
        }
    }
    false
}

/// The rule covering `pid`, if any.
fn rule_of(rules: &[Rule], pid: u32) -> Option<&Rule> {
    rules.iter().find(|rule| match &rule.selector {
        Selector::Tree(root) => descends_from(pid, *root),
        Selector::Cgroup(text) => std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .is_ok_and(|cgroup| cgroup.contains(text.as_str())),
    })
}

/// Writes `<proc_root>/<pid>/cgroup` for every listed pid that exists: a
/// rule's pod cgroup for covered pids, the root cgroup (a host process)
/// otherwise; removes the entries of pids no longer listed or gone.
fn write_proc_tree(proc_root: &Path, rules: &[Rule], pids: &HashSet<u32>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(proc_root)?.flatten() {
        let pid: Option<u32> = entry.file_name().to_str().and_then(|n| n.parse().ok());
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive || !pid.is_some_and(|p| pids.contains(&p)) {
            std::fs::remove_dir_all(entry.path())?;
        }
    }
    for &pid in pids {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let cgroup = match rule_of(rules, pid) {
            Some(rule) => format!("0::/kubepods/pod{}/{}\n", rule.uid, rule.container_id),
            None => "0::/\n".to_owned(),
        };
        let dir = proc_root.join(pid.to_string());
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("cgroup"), cgroup)?;
    }
    Ok(())
}

/// Fake cards whose first card lists `processes` (`<pid>=<MiB>` each).
fn fake_backend(spec: &str, processes: &[String]) -> anyhow::Result<FakeGpus> {
    let gpus = FakeGpus::parse(spec, "enforce-gpu")?;
    let listed = processes
        .iter()
        .map(|text| {
            let (pid, mib) = text
                .split_once('=')
                .with_context(|| format!("--fake-process `{text}`: expected `<pid>=<MiB>`"))?;
            Ok(GpuProcess {
                pid: pid
                    .parse()
                    .with_context(|| format!("--fake-process `{text}`: bad pid"))?,
                used_bytes: Some(
                    mib.parse::<u64>()
                        .with_context(|| format!("--fake-process `{text}`: bad MiB"))?
                        << 20,
                ),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let first = gpus.discover()?.remove(0);
    gpus.control().set_processes(&first.uuid, listed);
    Ok(gpus)
}

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

fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    let mode = match options.mode.as_str() {
        "kill" => EnforcementMode::Kill,
        "report" => EnforcementMode::Report,
        other => bail!("--mode `{other}`: expected kill or report"),
    };
    let rules = options
        .rules
        .iter()
        .enumerate()
        .map(|(i, text)| parse_rule(i, text))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let backend: Arc<dyn GpuBackend> = match &options.fake_gpus {
        Some(spec) => Arc::new(fake_backend(spec, &options.fake_processes)?),
        None => Arc::new(NvmlGpus::init()?),
    };
    let cards: Arc<[GpuInfo]> = backend.discover()?.into();
    let pods = rules
        .iter()
        .map(|rule| rule_pod(rule, &cards).map(Arc::new))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let by_uid: HashMap<&str, &Rule> = rules.iter().map(|r| (r.uid.as_str(), r)).collect();
    let proc_root = tempfile::tempdir()?;
    let settings = EnforcementSettings::from_config(
        &Enforcement {
            mode,
            margin_mib: options.margin_mib,
            period_ms: options.period_ms,
            exempt_namespaces: Vec::new(),
        },
        proc_root.path().to_owned(),
    );
    let mut enforcer = Enforcer::new(
        Arc::clone(&backend),
        Arc::clone(&cards),
        settings,
        Arc::new(AnnotatedAllocations),
    );
    println!(
        "enforce-gpu: {} card(s), mode {}, margin {} MiB, period {} ms, rules: {}",
        cards.len(),
        options.mode,
        options.margin_mib,
        options.period_ms,
        options.rules.join(" ")
    );
    let started = Instant::now();
    let (mut rounds, mut wall, mut cpu) = (0u32, Duration::ZERO, Duration::ZERO);
    loop {
        let round_start = (Instant::now(), thread_cpu());
        let mut pids = HashSet::new();
        for card in cards.iter() {
            match backend.processes(card) {
                Ok(listed) => pids.extend(listed.iter().map(|p| p.pid)),
                Err(e) => eprintln!("enforce-gpu: {e}"),
            }
        }
        write_proc_tree(proc_root.path(), &rules, &pids)?;
        let report = enforcer.tick(&pods, Instant::now());
        wall += round_start.0.elapsed();
        cpu += thread_cpu() - round_start.1;
        rounds += 1;
        for action in &report.actions {
            let f = &action.finding;
            let rule = by_uid
                .get(f.subject.pod_uid.as_str())
                .map_or("host", |r| r.text.as_str());
            let pids = match &action.taken {
                Taken::Killed { pids } => pids.clone(),
                Taken::Reported => f.processes.iter().map(|(p, _)| *p).collect(),
            };
            let at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            println!(
                "ACTION {} rule={rule} card={} used_mib={} cap_mib={} pids={:?} at={:.3}",
                action.taken.label(),
                f.card_uuid,
                f.used_bytes >> 20,
                f.breach.cap_bytes() >> 20,
                pids,
                at.as_secs_f64()
            );
        }
        if options.duration_s > 0 && started.elapsed() >= Duration::from_secs(options.duration_s) {
            break;
        }
        std::thread::sleep(Duration::from_millis(options.period_ms));
    }
    println!(
        "enforce-gpu: {rounds} rounds, mean wall {:?}, mean CPU {:?} per round (NVML queries, proc tree, decision)",
        wall / rounds.max(1),
        cpu / rounds.max(1)
    );
    Ok(())
}
