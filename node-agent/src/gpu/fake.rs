//! The fake GPU backend: cards described on the command line
//! (`--fake-gpus "4x NVIDIA A10G 23028"`), with stable UUIDs derived from
//! the node name, and a [`FakeGpuControl`] handle through which tests
//! inject health events, make a card (un)responsive, set its usage and
//! the processes it reports (pids of real or imagined processes, with the
//! memory each holds), or make its process list fail. Fake cards are linked
//! over PCIe (within a socket on one NUMA node, across sockets otherwise);
//! [`FakeGpus::with_nvlinks`] adds NVLinks between chosen pairs.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::mpsc;

use tessera_api::pair_scores::PcieLink;

use super::{GpuBackend, GpuError, GpuInfo, GpuLink, GpuProcess, HealthEvent, HostGpuUsage};

/// Cards that exist only in memory.
#[derive(Debug, Clone)]
pub struct FakeGpus {
    cards: Vec<GpuInfo>,
    /// NVLinks per card pair `(lower index, higher index)`.
    nvlinks: HashMap<(u32, u32), u32>,
    control: FakeGpuControl,
}

/// Test handle to the fake cards' behaviour.
#[derive(Debug, Clone, Default)]
pub struct FakeGpuControl {
    state: Arc<Mutex<FakeState>>,
}

#[derive(Debug, Default)]
struct FakeState {
    watchers: Vec<mpsc::UnboundedSender<HealthEvent>>,
    unresponsive: HashSet<String>,
    usage: HashMap<String, (u64, f64)>,
    processes: HashMap<String, Vec<GpuProcess>>,
    unreadable_processes: HashSet<String>,
}

impl FakeGpus {
    /// Parses a description such as `4x NVIDIA A10G 23028` or
    /// `2x NVIDIA H100 80GB HBM3 81559; 1x Tesla T4 15360`: per group a
    /// count with `x`, the product name, and the memory in MiB last. UUIDs
    /// are derived from `node_name` so every node gets its own. A group
    /// `nvlink 0-2:4 1-3:4` links cards (by index) with NVLinks: cards 0
    /// and 2 with 4 links, 1 and 3 with 4.
    pub fn parse(spec: &str, node_name: &str) -> Result<Self, GpuError> {
        let bad = |reason| GpuError::FakeSpec {
            spec: spec.to_owned(),
            reason,
        };
        let mut cards = Vec::new();
        let mut nvlinks = HashMap::new();
        for group in spec.split(';').map(str::trim).filter(|g| !g.is_empty()) {
            if let Some(pairs) = group.strip_prefix("nvlink") {
                for pair in pairs.split_whitespace() {
                    let (a, b, count) = parse_nvlink_pair(pair).ok_or_else(|| {
                        bad("an nvlink group lists pairs `a-b:links` of card indices, as in `nvlink 0-2:4 1-3:4`")
                    })?;
                    nvlinks.insert((a.min(b), a.max(b)), count);
                }
                continue;
            }
            let (count, rest) = group
                .split_once(|c: char| c.is_whitespace())
                .ok_or_else(|| bad("each group needs a count, a name and the memory in MiB"))?;
            let count: u32 = count
                .strip_suffix(['x', 'X'])
                .ok_or_else(|| bad("the count must end with `x`, as in `4x`"))?
                .parse()
                .map_err(|_| bad("the count must be a whole number, as in `4x`"))?;
            if count == 0 {
                return Err(bad("the count must be at least 1"));
            }
            let (name, memory) = rest
                .trim()
                .rsplit_once(|c: char| c.is_whitespace())
                .ok_or_else(|| bad("each group needs a name and the memory in MiB"))?;
            let memory_mib: u64 = memory
                .parse()
                .map_err(|_| bad("the memory (last word) must be a whole number of MiB"))?;
            if memory_mib == 0 || name.trim().is_empty() {
                return Err(bad("each card needs a name and more than 0 MiB"));
            }
            for _ in 0..count {
                let index = u32::try_from(cards.len()).map_err(|_| bad("too many cards"))?;
                cards.push(GpuInfo {
                    uuid: fake_uuid(node_name, index),
                    index,
                    name: name.trim().to_owned(),
                    memory_mib,
                    numa: i32::try_from(index % 2).unwrap_or(0),
                    healthy: true,
                });
            }
        }
        if cards.is_empty() {
            return Err(bad("it describes no card"));
        }
        let known = |index: u32| (index as usize) < cards.len();
        if nvlinks
            .keys()
            .any(|&(a, b)| a == b || !known(a) || !known(b))
        {
            return Err(bad(
                "an nvlink pair names two different cards of the description",
            ));
        }
        Ok(Self {
            cards,
            nvlinks,
            control: FakeGpuControl::default(),
        })
    }

    /// Adds NVLinks: `(a, b, count)` links cards `a` and `b` (NVML indices)
    /// with `count` NVLinks.
    pub fn with_nvlinks(mut self, links: &[(u32, u32, u32)]) -> Self {
        for &(a, b, count) in links {
            self.nvlinks.insert((a.min(b), a.max(b)), count);
        }
        self
    }

    /// The handle tests use to drive these cards.
    pub fn control(&self) -> FakeGpuControl {
        self.control.clone()
    }
}

/// `a-b:links` with a, b card indices and at least one link.
fn parse_nvlink_pair(pair: &str) -> Option<(u32, u32, u32)> {
    let (cards, count) = pair.split_once(':')?;
    let (a, b) = cards.split_once('-')?;
    let count: u32 = count.parse().ok().filter(|&c| c > 0)?;
    Some((a.parse().ok()?, b.parse().ok()?, count))
}

/// A UUID-shaped identifier, stable for a node name and index.
fn fake_uuid(node_name: &str, index: u32) -> String {
    // FNV-1a over the node name: stable across runs and platforms.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in node_name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!(
        "GPU-{:08x}-{:04x}-4000-8000-{:012x}",
        hash >> 32,
        (hash >> 16) & 0xffff,
        u64::from(index)
    )
}

impl FakeGpuControl {
    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Delivers a health event to every watcher.
    pub fn inject(&self, event: HealthEvent) {
        self.lock()
            .watchers
            .retain(|watcher| watcher.send(event.clone()).is_ok());
    }

    /// Makes a card answer (or stop answering) responsiveness probes.
    pub fn set_responsive(&self, uuid: &str, responsive: bool) {
        let mut state = self.lock();
        if responsive {
            state.unresponsive.remove(uuid);
        } else {
            state.unresponsive.insert(uuid.to_owned());
        }
    }

    /// Sets the host usage a card reports.
    pub fn set_usage(&self, uuid: &str, memory_used_bytes: u64, utilization_ratio: f64) {
        self.lock()
            .usage
            .insert(uuid.to_owned(), (memory_used_bytes, utilization_ratio));
    }
}

impl FakeGpuControl {
    /// Sets the processes a card reports (replacing what it reported before).
    pub fn set_processes(&self, uuid: &str, processes: Vec<GpuProcess>) {
        self.lock().processes.insert(uuid.to_owned(), processes);
    }

    /// Makes a card's process list fail (or answer again), as a card that
    /// fell off the bus does.
    pub fn set_processes_readable(&self, uuid: &str, readable: bool) {
        let mut state = self.lock();
        if readable {
            state.unreadable_processes.remove(uuid);
        } else {
            state.unreadable_processes.insert(uuid.to_owned());
        }
    }
}

impl GpuBackend for FakeGpus {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn discover(&self) -> Result<Vec<GpuInfo>, GpuError> {
        Ok(self.cards.clone())
    }

    fn links(&self) -> Vec<GpuLink> {
        let mut links = Vec::new();
        for (position, a) in self.cards.iter().enumerate() {
            for b in &self.cards[position + 1..] {
                let pcie = if a.numa == b.numa {
                    PcieLink::SameCpu
                } else {
                    PcieLink::CrossCpu
                };
                let mut link = GpuLink::pcie(a.index, b.index, Some(pcie));
                link.nvlinks = self
                    .nvlinks
                    .get(&(a.index.min(b.index), a.index.max(b.index)))
                    .copied()
                    .unwrap_or(0);
                link.nvlink = link.nvlinks > 0;
                links.push(link);
            }
        }
        links
    }

    fn host_usage(&self) -> Vec<HostGpuUsage> {
        let state = self.control.lock();
        self.cards
            .iter()
            .map(|card| {
                let (memory_used_bytes, utilization_ratio) =
                    state.usage.get(&card.uuid).copied().unwrap_or((0, 0.0));
                HostGpuUsage {
                    uuid: card.uuid.clone(),
                    memory_used_bytes,
                    utilization_ratio,
                    // The fake models kernel time only.
                    memory_controller_utilization_ratio: 0.0,
                }
            })
            .collect()
    }

    fn processes(&self, card: &GpuInfo) -> Result<Vec<GpuProcess>, GpuError> {
        let state = self.control.lock();
        if state.unreadable_processes.contains(&card.uuid) {
            return Err(GpuError::Query {
                index: card.index,
                query: "running processes",
                reason: "the fake card was told to fail".to_owned(),
            });
        }
        Ok(state.processes.get(&card.uuid).cloned().unwrap_or_default())
    }

    fn watch_health(&self) -> Result<mpsc::UnboundedReceiver<HealthEvent>, GpuError> {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.control.lock().watchers.push(sender);
        Ok(receiver)
    }

    fn is_responsive(&self, uuid: &str) -> bool {
        !self.control.lock().unresponsive.contains(uuid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_groups_with_multi_word_names() {
        let gpus = FakeGpus::parse(
            "2x NVIDIA H100 80GB HBM3 81559; 1x Tesla T4 15360",
            "node-a",
        )
        .expect("parses");
        let cards = gpus.discover().expect("lists");
        assert_eq!(cards.len(), 3);
        assert_eq!(cards[0].name, "NVIDIA H100 80GB HBM3");
        assert_eq!(cards[0].memory_mib, 81559);
        assert_eq!(cards[2].name, "Tesla T4");
        assert_eq!(cards[2].index, 2);
        let ids: HashSet<_> = cards.iter().map(|c| c.uuid.clone()).collect();
        assert_eq!(ids.len(), 3, "UUIDs are distinct");
        assert!(cards[0].uuid.starts_with("GPU-") && cards[0].uuid.len() == 40);
    }

    #[test]
    fn links_follow_numa_and_the_nvlinks_given() {
        let gpus = FakeGpus::parse("4x NVIDIA A100 40960", "n")
            .expect("parses")
            .with_nvlinks(&[(2, 0, 4)]);
        let links = gpus.links();
        assert_eq!(links.len(), 6);
        let between = |a, b| {
            links
                .iter()
                .find(|l| l.from == a && l.to == b)
                .expect("listed")
        };
        // Fake cards alternate NUMA nodes: 0 and 2 share one.
        assert_eq!(between(0, 2).pcie, Some(PcieLink::SameCpu));
        assert_eq!(between(0, 2).nvlinks, 4);
        assert!(between(0, 2).nvlink);
        assert_eq!(between(0, 1).pcie, Some(PcieLink::CrossCpu));
        assert_eq!(between(0, 1).nvlinks, 0);
        assert_eq!(between(0, 1).topology, "system");
    }

    #[test]
    fn nvlinks_can_be_described_on_the_command_line() {
        let gpus =
            FakeGpus::parse("4x NVIDIA A100 40960; nvlink 0-2:4 3-1:2", "n").expect("parses");
        assert_eq!(gpus.cards.len(), 4);
        let links = gpus.links();
        let count = |a, b| {
            links
                .iter()
                .find(|l| l.from == a && l.to == b)
                .expect("listed")
                .nvlinks
        };
        assert_eq!((count(0, 2), count(1, 3), count(0, 1)), (4, 2, 0));
        for spec in [
            "2x A 100; nvlink 0-1",
            "2x A 100; nvlink 0-1:0",
            "2x A 100; nvlink 0-5:2",
            "2x A 100; nvlink 1-1:2",
            "2x A 100; nvlink x-1:2",
        ] {
            let error = FakeGpus::parse(spec, "n").expect_err(spec).to_string();
            assert!(error.contains("nvlink"), "{spec}: {error}");
        }
    }

    #[test]
    fn uuids_depend_on_the_node() {
        let a = FakeGpus::parse("1x X 10", "a").expect("parses").cards;
        let b = FakeGpus::parse("1x X 10", "b").expect("parses").cards;
        assert_ne!(a[0].uuid, b[0].uuid);
        let again = FakeGpus::parse("1x X 10", "a").expect("parses").cards;
        assert_eq!(a[0].uuid, again[0].uuid);
    }

    #[test]
    fn bad_descriptions_say_what_to_write() {
        for spec in [
            "",
            "4 NVIDIA 100",
            "fourx NVIDIA 100",
            "0x A 100",
            "2x A lots",
            "2x 100",
        ] {
            let err = FakeGpus::parse(spec, "n").expect_err(spec).to_string();
            assert!(err.contains("4x NVIDIA A10G 23028"), "{spec}: {err}");
        }
    }

    #[tokio::test]
    async fn control_drives_health_and_usage() {
        let gpus = FakeGpus::parse("1x A 100", "n").expect("parses");
        let uuid = gpus.cards[0].uuid.clone();
        let mut events = gpus.watch_health().expect("watch");
        let control = gpus.control();
        control.inject(HealthEvent {
            uuid: uuid.clone(),
            kind: super::super::HealthEventKind::Xid(79),
        });
        assert_eq!(events.recv().await.expect("event").uuid, uuid);
        control.set_responsive(&uuid, false);
        assert!(!gpus.is_responsive(&uuid));
        control.set_usage(&uuid, 1024, 0.5);
        assert_eq!(gpus.host_usage()[0].memory_used_bytes, 1024);
    }

    #[test]
    fn control_sets_and_fails_process_lists() {
        let gpus = FakeGpus::parse("2x A 100", "n").expect("parses");
        let cards = gpus.discover().expect("cards");
        let control = gpus.control();
        assert!(gpus.processes(&cards[0]).expect("empty").is_empty());
        let held = GpuProcess {
            pid: 42,
            used_bytes: Some(1 << 30),
        };
        control.set_processes(&cards[1].uuid, vec![held]);
        assert_eq!(gpus.processes(&cards[1]).expect("listed"), vec![held]);
        assert!(gpus.processes(&cards[0]).expect("other card").is_empty());
        control.set_processes_readable(&cards[1].uuid, false);
        let err = gpus.processes(&cards[1]).expect_err("fails").to_string();
        assert!(err.contains("GPU 1"), "{err}");
        control.set_processes_readable(&cards[1].uuid, true);
        assert_eq!(gpus.processes(&cards[1]).expect("again"), vec![held]);
    }
}
