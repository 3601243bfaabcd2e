//! Which pod and container a process belongs to, from its
//! `/proc/<pid>/cgroup` (the agent runs with `hostPID`, so NVML's pids are
//! pids of its own `/proc`). Kubelet names every pod's cgroup after the
//! pod's UID and the container runtime names the container's cgroup after
//! the container ID, in one of these shapes:
//!
//! - systemd driver: `…/kubepods-<qos>-pod<uid with _>.slice/<runtime>-<id>.scope`
//!   with `<runtime>` `cri-containerd`, `crio` or `docker` (CRI-O may add a
//!   `/container` leaf below the scope; kind and other nested setups prefix
//!   the slices, e.g. `kubelet-kubepods-…`);
//! - cgroupfs driver: `…/kubepods/<qos>/pod<uid>/<id>` (no QoS level for
//!   Guaranteed pods);
//! - cgroup v2 has one line `0::<path>`, cgroup v1 one line per hierarchy
//!   (`<n>:<controllers>:<path>`), which agree for pods; the first line
//!   naming a pod wins.
//!
//! A process inside the pod's cgroup but in no container's (CRI-O's
//! `crio-conmon-<id>.scope`, or the pod cgroup itself) belongs to the pod
//! only. Everything else is a host process.

use std::path::Path;

/// Whom a process belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ProcessOwner {
    /// A container of a pod.
    Container {
        /// The pod's UID as the API server writes it (`-` separated).
        pod_uid: String,
        /// The container ID, without the runtime's `containerd://` prefix.
        container_id: String,
    },
    /// A pod's cgroup, but no container of it (e.g. CRI-O's conmon).
    Pod {
        /// The pod's UID.
        pod_uid: String,
    },
    /// Not in any pod's cgroup: a host process.
    Host,
}

impl ProcessOwner {
    /// The pod UID, when the process is in a pod's cgroup.
    pub fn pod_uid(&self) -> Option<&str> {
        match self {
            Self::Container { pod_uid, .. } | Self::Pod { pod_uid } => Some(pod_uid),
            Self::Host => None,
        }
    }
}

/// Reads the owner of `pid` under `proc_root` (`/proc` on a node; a
/// directory of fake `<pid>/cgroup` files in tests). `None` when the
/// process is gone (or its cgroup file cannot be read): NVML's lists lag
/// behind exits, and a process that no longer exists holds nothing.
/// Blocking file I/O of a few hundred bytes.
pub fn read_owner(proc_root: &Path, pid: u32) -> Option<ProcessOwner> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
    Some(parse_cgroup_file(&text))
}

/// The owner described by the text of a `/proc/<pid>/cgroup` file.
pub fn parse_cgroup_file(text: &str) -> ProcessOwner {
    text.lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .map(owner_of_path)
        .find(|owner| *owner != ProcessOwner::Host)
        .unwrap_or(ProcessOwner::Host)
}

/// The owner of one cgroup path.
pub fn owner_of_path(path: &str) -> ProcessOwner {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let Some((at, pod_uid)) = components
        .iter()
        .enumerate()
        .find_map(|(i, component)| pod_uid_of(component).map(|uid| (i, uid)))
    else {
        return ProcessOwner::Host;
    };
    match components.get(at + 1).and_then(|c| container_id_of(c)) {
        Some(container_id) => ProcessOwner::Container {
            pod_uid,
            container_id,
        },
        None => ProcessOwner::Pod { pod_uid },
    }
}

/// The pod UID named by one path component: `pod<uid>` (cgroupfs) or
/// `…-pod<uid with _>.slice` (systemd).
fn pod_uid_of(component: &str) -> Option<String> {
    let candidate = match component.strip_suffix(".slice") {
        Some(slice) => {
            let (_, after) = slice.rsplit_once("-pod")?;
            after
        }
        None => component.strip_prefix("pod")?,
    };
    let uid = candidate.replace('_', "-");
    is_uid(&uid).then_some(uid)
}

/// A UUID as Kubernetes writes pod UIDs (8-4-4-4-12 hex digits), or the
/// 32-hex-digit hash kubelet uses as a static pod's UID.
fn is_uid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    match groups[..] {
        [a, b, c, d, e] => {
            [a.len(), b.len(), c.len(), d.len(), e.len()] == [8, 4, 4, 4, 12]
                && groups.iter().all(|g| hex(g))
        }
        [single] => single.len() == 32 && hex(single),
        _ => false,
    }
}

/// The container ID named by the component below a pod's cgroup:
/// `<id>` (cgroupfs), `cri-containerd-<id>.scope`, `crio-<id>.scope`,
/// `docker-<id>.scope` (systemd). CRI-O's `crio-conmon-<id>.scope` is the
/// container's monitor, not the container: `None`.
fn container_id_of(component: &str) -> Option<String> {
    let id = match component.strip_suffix(".scope") {
        Some(scope) => ["cri-containerd-", "crio-", "docker-", "containerd-"]
            .iter()
            .find_map(|prefix| scope.strip_prefix(prefix))?,
        None => component,
    };
    let is_id = id.len() >= 12 && id.bytes().all(|b| b.is_ascii_hexdigit());
    is_id.then(|| id.to_ascii_lowercase())
}

/// A container ID as pod status writes it (`containerd://<id>`,
/// `cri-o://<id>`, `docker://<id>`), without the runtime prefix.
pub fn status_container_id(id: &str) -> &str {
    id.split_once("://").map_or(id, |(_, bare)| bare)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b7c2d52-7f3e-4a8b-9c1d-2e3f4a5b6c7d";
    const UID_SYSTEMD: &str = "0b7c2d52_7f3e_4a8b_9c1d_2e3f4a5b6c7d";
    const ID: &str = "4f1c9e0b2a7d48c3b5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c";

    fn container() -> ProcessOwner {
        ProcessOwner::Container {
            pod_uid: UID.into(),
            container_id: ID.into(),
        }
    }

    #[test]
    fn containerd_with_the_systemd_driver_on_cgroup_v2() {
        let text = format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope\n");
        assert_eq!(parse_cgroup_file(&text), container());
        // Guaranteed pods have no QoS slice.
        let text = format!(
            "0::/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(parse_cgroup_file(&text), container());
    }

    #[test]
    fn cgroupfs_driver_with_and_without_a_qos_level() {
        let text = format!("0::/kubepods/besteffort/pod{UID}/{ID}\n");
        assert_eq!(parse_cgroup_file(&text), container());
        let text = format!("0::/kubepods/pod{UID}/{ID}\n");
        assert_eq!(parse_cgroup_file(&text), container());
    }

    #[test]
    fn cri_o_scopes_with_a_container_leaf_and_its_conmon() {
        let text = format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice/crio-{ID}.scope/container\n");
        assert_eq!(parse_cgroup_file(&text), container());
        let text = format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice/crio-conmon-{ID}.scope\n");
        assert_eq!(
            parse_cgroup_file(&text),
            ProcessOwner::Pod {
                pod_uid: UID.into()
            }
        );
    }

    #[test]
    fn docker_scopes_and_nested_kind_slices() {
        let text = format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/docker-{ID}.scope\n");
        assert_eq!(parse_cgroup_file(&text), container());
        let text = format!("0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope\n");
        assert_eq!(parse_cgroup_file(&text), container());
    }

    #[test]
    fn cgroup_v1_lines_find_the_pod_whatever_the_hierarchy_order() {
        let text = format!(
            "12:pids:/kubepods/burstable/pod{UID}/{ID}\n\
             11:cpuset:/kubepods/burstable/pod{UID}/{ID}\n\
             5:memory:/kubepods/burstable/pod{UID}/{ID}\n\
             1:name=systemd:/kubepods/burstable/pod{UID}/{ID}\n\
             0::/\n"
        );
        assert_eq!(parse_cgroup_file(&text), container());
        let text = format!(
            "13:rdma:/\n\
             12:devices:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(parse_cgroup_file(&text), container());
    }

    #[test]
    fn static_pod_hash_uids_are_pod_uids() {
        let hash = "6bd2ea4e03c0b8d5e9e3a1f1d3e4c5b6";
        let text = format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice/cri-containerd-{ID}.scope\n");
        assert_eq!(
            parse_cgroup_file(&text),
            ProcessOwner::Container {
                pod_uid: hash.into(),
                container_id: ID.into()
            }
        );
    }

    #[test]
    fn the_pod_cgroup_itself_is_the_pod_without_a_container() {
        let text = format!("0::/kubepods/burstable/pod{UID}\n");
        assert_eq!(
            parse_cgroup_file(&text),
            ProcessOwner::Pod {
                pod_uid: UID.into()
            }
        );
    }

    #[test]
    fn host_processes_and_look_alikes_are_host() {
        for text in [
            "0::/system.slice/nvidia-persistenced.service\n",
            "0::/user.slice/user-1000.slice/session-3.scope\n",
            "0::/\n",
            "0::/kubepods.slice\n",
            "0::/kubepods/burstable\n",
            // Not a UID after `pod`.
            "0::/kubepods/burstable/podcast/abc\n",
            "0::/system.slice/my-pod1234.slice\n",
            "",
            "garbage without colons\n",
        ] {
            assert_eq!(parse_cgroup_file(text), ProcessOwner::Host, "{text:?}");
        }
    }

    #[test]
    fn status_ids_lose_their_runtime_prefix() {
        assert_eq!(status_container_id(&format!("containerd://{ID}")), ID);
        assert_eq!(status_container_id(&format!("cri-o://{ID}")), ID);
        assert_eq!(status_container_id(ID), ID);
    }

    #[test]
    fn read_owner_reads_a_proc_tree_and_misses_gone_processes() {
        let proc_root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(proc_root.path().join("4242")).expect("pid dir");
        std::fs::write(
            proc_root.path().join("4242/cgroup"),
            format!("0::/kubepods/pod{UID}/{ID}\n"),
        )
        .expect("cgroup file");
        assert_eq!(read_owner(proc_root.path(), 4242), Some(container()));
        assert_eq!(read_owner(proc_root.path(), 4243), None);
        let own = read_owner(Path::new("/proc"), std::process::id());
        assert!(own.is_some(), "this test's own process has a cgroup file");
    }
}
