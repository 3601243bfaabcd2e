//! The enforcement decision, a pure function: the processes on one card
//! (each with the memory the driver says it holds and whom it was
//! attributed to) and the margin in, findings out. Every subject's
//! processes on the card are summed; a subject holding more than its cap
//! plus the margin is a finding. An allocated container's cap on a card it
//! was not given, and any process in a pod outside an allocated container,
//! have a cap of 0.
//!
//! Whom to kill: the subject's processes on that card, largest first,
//! until what remains is at most the cap itself (the margin only decides
//! whether to act; once acting, the container is brought back under its
//! real cap). Largest first kills the fewest processes and hits the one
//! that escaped its accounting (it holds the most); a container that has
//! nothing on the card is not touched. Host processes are never killed,
//! only reported: the agent cannot tell a host's own GPU user (a
//! monitoring daemon, an administrator's job) from an intruder, and
//! killing outside Kubernetes is not its business.

/// Who the processes belong to, for Events, labels and logs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subject {
    /// Pod UID (empty for host processes and pods the agent does not know).
    pub pod_uid: String,
    /// Pod namespace (empty when unknown).
    pub namespace: String,
    /// Pod name (empty when unknown).
    pub pod: String,
    /// Container name (empty when unknown).
    pub container: String,
}

impl Subject {
    /// The subject of host processes.
    pub fn host() -> Self {
        Self {
            pod_uid: String::new(),
            namespace: String::new(),
            pod: String::new(),
            container: String::new(),
        }
    }
}

/// Whom a process on a card was attributed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attribution {
    /// A container of a pod with a verified allocation. `cap_bytes` is its
    /// cap on this card, `None` when its allocation does not include the card.
    Allocated {
        /// The container.
        subject: Subject,
        /// Its cap on this card.
        cap_bytes: Option<u64>,
    },
    /// A process in a pod's cgroup that belongs to no allocated container:
    /// a pod without a (verified) allocation, a container the allocation
    /// does not name, or a pod the agent does not know. Its cap is 0.
    Unallocated {
        /// Whatever is known of it.
        subject: Subject,
    },
    /// A process outside every pod.
    Host,
    /// Not to be judged now (a container too new to be in its pod's
    /// status yet, or an exempt namespace).
    Skip,
}

/// One process on a card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardProcess {
    /// Host pid.
    pub pid: u32,
    /// Device memory it holds on the card, bytes (0 when the driver does not say).
    pub used_bytes: u64,
    /// Whom it belongs to.
    pub attribution: Attribution,
}

/// What kind of breach a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Breach {
    /// An allocated container holds more than its cap on the card.
    OverCap {
        /// Its cap on the card, bytes.
        cap_bytes: u64,
    },
    /// A pod process with no allocation on the card holds memory on it.
    Unallocated,
    /// A host process holds memory on the card (reported, never killed).
    HostProcess,
}

impl Breach {
    /// The Event reason for this breach.
    pub fn reason(self) -> &'static str {
        match self {
            Self::OverCap { .. } => "GPUMemoryOverCap",
            Self::Unallocated => "GPUUseWithoutAllocation",
            Self::HostProcess => "GPUHostProcess",
        }
    }

    /// The cap the subject is held to, bytes.
    pub fn cap_bytes(self) -> u64 {
        match self {
            Self::OverCap { cap_bytes } => cap_bytes,
            Self::Unallocated | Self::HostProcess => 0,
        }
    }
}

/// One subject over its cap on one card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The card.
    pub card_uuid: String,
    /// Whose processes.
    pub subject: Subject,
    /// Which breach.
    pub breach: Breach,
    /// What the subject holds on the card, bytes.
    pub used_bytes: u64,
    /// Every process of the subject on the card with what it holds,
    /// largest first.
    pub processes: Vec<(u32, u64)>,
    /// The processes to kill (largest first) to bring it to its cap;
    /// empty for host processes.
    pub to_kill: Vec<u32>,
}

/// Processes (pid, bytes held) of one subject and breach kind on a card.
type Group = (Subject, Breach, Vec<(u32, u64)>);

/// The findings on one card: subjects holding more than their cap plus
/// `margin_bytes`, in a stable order (by subject).
pub fn decide_card(card_uuid: &str, processes: &[CardProcess], margin_bytes: u64) -> Vec<Finding> {
    let mut groups: Vec<Group> = Vec::new();
    for process in processes {
        let (subject, breach) = match &process.attribution {
            Attribution::Allocated {
                subject,
                cap_bytes: Some(cap_bytes),
            } => (
                subject.clone(),
                Breach::OverCap {
                    cap_bytes: *cap_bytes,
                },
            ),
            Attribution::Allocated {
                subject,
                cap_bytes: None,
            }
            | Attribution::Unallocated { subject } => (subject.clone(), Breach::Unallocated),
            Attribution::Host => (Subject::host(), Breach::HostProcess),
            Attribution::Skip => continue,
        };
        match groups
            .iter_mut()
            .find(|(s, b, _)| *s == subject && *b == breach)
        {
            Some((_, _, pids)) => pids.push((process.pid, process.used_bytes)),
            None => groups.push((subject, breach, vec![(process.pid, process.used_bytes)])),
        }
    }
    groups.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    groups
        .into_iter()
        .filter_map(|(subject, breach, mut pids)| {
            let used_bytes: u64 = pids.iter().map(|(_, used)| used).sum();
            let cap_bytes = breach.cap_bytes();
            if used_bytes <= cap_bytes.saturating_add(margin_bytes) {
                return None;
            }
            pids.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            let to_kill = if breach == Breach::HostProcess {
                Vec::new()
            } else {
                largest_first_until_under(&pids, used_bytes, cap_bytes)
            };
            Some(Finding {
                card_uuid: card_uuid.to_owned(),
                subject,
                breach,
                used_bytes,
                processes: pids,
                to_kill,
            })
        })
        .collect()
}

/// Pids from `sorted` (largest first) to kill until what remains of
/// `used_bytes` is at most `cap_bytes`.
fn largest_first_until_under(sorted: &[(u32, u64)], used_bytes: u64, cap_bytes: u64) -> Vec<u32> {
    let mut remaining = used_bytes;
    let mut kill = Vec::new();
    for &(pid, used) in sorted {
        if remaining <= cap_bytes || used == 0 {
            break;
        }
        kill.push(pid);
        remaining -= used;
    }
    kill
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const MARGIN: u64 = 64 * MIB;
    const CARD: &str = "GPU-0";

    fn container(name: &str) -> Subject {
        Subject {
            pod_uid: "uid-1".into(),
            namespace: "ns".into(),
            pod: "p".into(),
            container: name.into(),
        }
    }

    fn allocated(pid: u32, mib: u64, name: &str, cap_mib: u64) -> CardProcess {
        CardProcess {
            pid,
            used_bytes: mib * MIB,
            attribution: Attribution::Allocated {
                subject: container(name),
                cap_bytes: Some(cap_mib * MIB),
            },
        }
    }

    #[test]
    fn over_cap_by_more_than_the_margin_kills_largest_first_until_under_the_cap() {
        // 3 processes of one container: 600 + 300 + 200 = 1100 MiB under a
        // 1000 MiB cap (+64 margin): killing the 600 MiB one is enough.
        let processes = [
            allocated(11, 300, "main", 1000),
            allocated(12, 600, "main", 1000),
            allocated(13, 200, "main", 1000),
        ];
        let findings = decide_card(CARD, &processes, MARGIN);
        assert_eq!(findings.len(), 1, "{findings:?}");
        let finding = &findings[0];
        assert_eq!(finding.subject, container("main"));
        assert_eq!(
            finding.breach,
            Breach::OverCap {
                cap_bytes: 1000 * MIB
            }
        );
        assert_eq!(finding.used_bytes, 1100 * MIB);
        assert_eq!(finding.to_kill, vec![12]);
        assert_eq!(
            finding.processes,
            vec![(12, 600 * MIB), (11, 300 * MIB), (13, 200 * MIB)]
        );
        assert_eq!(finding.breach.reason(), "GPUMemoryOverCap");
    }

    #[test]
    fn kills_several_when_one_is_not_enough() {
        // 3 × 500 MiB under a 600 MiB cap: two must go.
        let processes = [
            allocated(1, 500, "main", 600),
            allocated(2, 500, "main", 600),
            allocated(3, 500, "main", 600),
        ];
        let findings = decide_card(CARD, &processes, MARGIN);
        assert_eq!(findings[0].to_kill, vec![1, 2], "ties go by pid");
    }

    #[test]
    fn at_or_under_the_cap_plus_margin_nothing_happens() {
        assert!(decide_card(CARD, &[allocated(1, 900, "main", 1000)], MARGIN).is_empty());
        assert!(decide_card(CARD, &[allocated(1, 1064, "main", 1000)], MARGIN).is_empty());
        let just_over = decide_card(CARD, &[allocated(1, 1065, "main", 1000)], MARGIN);
        assert_eq!(just_over.len(), 1);
        assert!(decide_card(CARD, &[], MARGIN).is_empty());
    }

    #[test]
    fn containers_are_summed_separately() {
        // Each container is under its own cap; together they are over either.
        let processes = [
            allocated(1, 900, "a", 1000),
            allocated(2, 900, "b", 1000),
            allocated(3, 1200, "c", 1000),
        ];
        let findings = decide_card(CARD, &processes, MARGIN);
        assert_eq!(findings.len(), 1);
        assert_eq!(findings[0].subject.container, "c");
        assert_eq!(findings[0].to_kill, vec![3]);
    }

    #[test]
    fn a_card_outside_the_allocation_and_unknown_pod_processes_have_a_cap_of_zero() {
        let processes = [
            CardProcess {
                pid: 5,
                used_bytes: 500 * MIB,
                attribution: Attribution::Allocated {
                    subject: container("main"),
                    cap_bytes: None,
                },
            },
            CardProcess {
                pid: 6,
                used_bytes: 300 * MIB,
                attribution: Attribution::Unallocated {
                    subject: Subject {
                        container: String::new(),
                        ..container("")
                    },
                },
            },
            CardProcess {
                pid: 7,
                used_bytes: 0,
                attribution: Attribution::Unallocated {
                    subject: container("main"),
                },
            },
        ];
        let findings = decide_card(CARD, &processes, MARGIN);
        assert_eq!(findings.len(), 2, "{findings:?}");
        assert!(findings.iter().all(|f| f.breach == Breach::Unallocated));
        let main = findings
            .iter()
            .find(|f| f.subject.container == "main")
            .expect("main");
        assert_eq!(main.to_kill, vec![5], "a process holding nothing is left");
        assert_eq!(main.breach.reason(), "GPUUseWithoutAllocation");
    }

    #[test]
    fn unknown_host_processes_are_reported_never_killed() {
        let processes = [
            CardProcess {
                pid: 100,
                used_bytes: 2000 * MIB,
                attribution: Attribution::Host,
            },
            CardProcess {
                pid: 101,
                used_bytes: 100 * MIB,
                attribution: Attribution::Host,
            },
        ];
        let findings = decide_card(CARD, &processes, MARGIN);
        assert_eq!(findings.len(), 1);
        assert_eq!(findings[0].breach, Breach::HostProcess);
        assert_eq!(findings[0].subject, Subject::host());
        assert_eq!(findings[0].used_bytes, 2100 * MIB);
        assert!(findings[0].to_kill.is_empty());
    }

    #[test]
    fn skipped_processes_count_for_nothing() {
        let processes = [CardProcess {
            pid: 9,
            used_bytes: 9000 * MIB,
            attribution: Attribution::Skip,
        }];
        assert!(decide_card(CARD, &processes, MARGIN).is_empty());
    }
}
