//! What kubelet hands one container: the environment the NVIDIA runtime
//! and the interceptor read (`NVIDIA_VISIBLE_DEVICES`, per-card memory caps,
//! the card list the caps are numbered by (`TESSERA_VISIBLE_UUIDS`), SM cap,
//! shared region path, priority, its id in the card tenant tables) and the
//! mounts (the container's accounting directory, the card tenant tables
//! read-only, and unless the container opts out with
//! `CUDA_DISABLE_CONTROL=true`, the interceptor, `/etc/ld.so.preload` and
//! the host-pid socket's directory, read-only, named by `TESSERA_PID_SOCKET`),
//! and the card list a second way, as the NVIDIA Container Toolkit's
//! volume-mount device list (`/dev/null` at
//! `/var/run/nvidia-container-devices/<uuid>`): with
//! `accept-nvidia-visible-devices-envvar-when-unprivileged = false` the
//! toolkit ignores `NVIDIA_VISIBLE_DEVICES` and reads only those mounts,
//! which a pod cannot forge through its env.

use k8s_openapi::api::core::v1::{Container, Pod};
use tessera_api::allocation::ContainerDevice;
use tessera_api::container_contract::{CardEnv, ContainerEnv};
use tessera_api::container_env::{TaskPriority, DISABLE_CONTROL};
use tessera_api::names::ResourceNames;
use tessera_api::request::container_request;

use crate::host_files::{
    HostFileError, HostLayout, CONTAINER_CARDS_DIR, CONTAINER_PID_DIR, CONTAINER_PRELOAD,
    CONTAINER_SHARED_DIR,
};
use crate::proto::{ContainerAllocateResponse, Mount};

/// Where the NVIDIA Container Toolkit reads a volume-mount device list
/// (`accept-nvidia-visible-devices-as-volume-mounts = true`): one mount per
/// card at `<root>/<uuid>`.
pub const DEVICE_LIST_MOUNT_ROOT: &str = "/var/run/nvidia-container-devices";
/// The host path of a device-list mount; the toolkit ignores any other.
pub const DEVICE_LIST_MOUNT_SOURCE: &str = "/dev/null";

/// Whether the container opted out of the interceptor.
pub fn control_disabled(container: &Container) -> bool {
    container.env.iter().flatten().any(|var| {
        var.name == DISABLE_CONTROL
            && var
                .value
                .as_deref()
                .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    })
}

/// The user and group the container runs as, when the pod says so.
fn container_owner(pod: &Pod, container: &Container) -> Option<(u32, Option<u32>)> {
    let pod_context = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let own = container.security_context.as_ref();
    let uid = own
        .and_then(|c| c.run_as_user)
        .or_else(|| pod_context.and_then(|c| c.run_as_user))?;
    let gid = own
        .and_then(|c| c.run_as_group)
        .or_else(|| pod_context.and_then(|c| c.run_as_group))
        .and_then(|g| u32::try_from(g).ok());
    Some((u32::try_from(uid).ok()?, gid))
}

/// Builds the response for one container and prepares its host directory.
pub fn container_response(
    layout: &HostLayout,
    names: &ResourceNames,
    pod: &Pod,
    container: &Container,
    devices: &[ContainerDevice],
) -> Result<ContainerAllocateResponse, HostFileError> {
    let pod_uid = pod.metadata.uid.as_deref().unwrap_or("unknown-uid");
    let host_dir =
        layout.prepare_container_dir(pod_uid, &container.name, container_owner(pod, container))?;

    let controlled = !control_disabled(container);
    // One value for the whole environment: the interceptor reads back exactly
    // this (`ContainerEnv::from_vars`).
    let contract = ContainerEnv {
        cards: devices
            .iter()
            .map(|d| CardEnv {
                uuid: d.uuid.clone(),
                memory_mib: Some(d.memory_mib),
                sm_percent: u8::try_from(d.cores).ok().filter(|p| (1..100).contains(p)),
            })
            .collect(),
        shared_cache: Some(HostLayout::container_region_path()),
        card_tenants_dir: Some(CONTAINER_CARDS_DIR.to_owned()),
        // How the interceptor tells its own entry in those tables.
        tenant_id: Some(HostLayout::tenant_id(pod_uid, &container.name)),
        // The request was validated at admission; a value that no longer
        // parses simply sets no priority.
        priority: container_request(container, names)
            .ok()
            .and_then(|r| r.priority)
            .map(|p| {
                if p == 0 {
                    TaskPriority::High
                } else {
                    TaskPriority::Low
                }
            }),
        pid_socket: controlled.then(HostLayout::container_pid_socket_path),
    };
    let mut response = ContainerAllocateResponse {
        envs: contract.to_env().into_iter().collect(),
        ..ContainerAllocateResponse::default()
    };

    response.mounts.push(Mount {
        container_path: CONTAINER_SHARED_DIR.to_owned(),
        host_path: host_dir.to_string_lossy().into_owned(),
        read_only: false,
    });
    // Written by the agent alone: containers only read the tables.
    let cards_dir = layout.prepare_cards_dir()?;
    response.mounts.push(Mount {
        container_path: CONTAINER_CARDS_DIR.to_owned(),
        host_path: cards_dir.to_string_lossy().into_owned(),
        read_only: true,
    });
    if controlled {
        response.mounts.push(Mount {
            container_path: HostLayout::container_interceptor_path(),
            host_path: layout.interceptor().to_string_lossy().into_owned(),
            read_only: true,
        });
        response.mounts.push(Mount {
            container_path: CONTAINER_PRELOAD.to_owned(),
            host_path: layout.preload().to_string_lossy().into_owned(),
            read_only: true,
        });
        // Where the interceptor learns its host pid (NVML lists processes
        // by host pid); the directory exists even before the agent's socket.
        let pid_dir = layout.prepare_pid_dir()?;
        response.mounts.push(Mount {
            container_path: CONTAINER_PID_DIR.to_owned(),
            host_path: pid_dir.to_string_lossy().into_owned(),
            read_only: true,
        });
    }
    for device in devices {
        response.mounts.push(Mount {
            container_path: format!("{DEVICE_LIST_MOUNT_ROOT}/{}", device.uuid),
            host_path: DEVICE_LIST_MOUNT_SOURCE.to_owned(),
            read_only: true,
        });
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tessera_api::allocation::NVIDIA_VENDOR;
    use tessera_api::container_env::memory_limit_var;
    use tessera_api::request::annotated_container;

    fn pod(env: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "uid-7"},
            "spec": {
                "securityContext": {"runAsUser": 4242},
                "containers": [{
                    "name": "main", "image": "x", "env": env,
                    "resources": {"limits": {"nvidia.com/gpu": "2", "nvidia.com/priority": "1"}}
                }]
            }
        }))
        .expect("pod")
    }

    fn devices() -> Vec<ContainerDevice> {
        ["GPU-a", "GPU-b"]
            .iter()
            .map(|uuid| ContainerDevice {
                uuid: (*uuid).into(),
                vendor: NVIDIA_VENDOR.into(),
                memory_mib: 7500,
                cores: 30,
            })
            .collect()
    }

    #[test]
    fn env_and_mounts_for_a_controlled_container() {
        let temp = tempfile::tempdir().expect("tempdir");
        let layout = HostLayout::new(temp.path());
        let pod = pod(json!([]));
        let container = annotated_container(&pod, 1, 0).expect("container");
        let r = container_response(
            &layout,
            &ResourceNames::default(),
            &pod,
            container,
            &devices(),
        )
        .expect("response");
        assert_eq!(r.envs["NVIDIA_VISIBLE_DEVICES"], "GPU-a,GPU-b");
        assert_eq!(r.envs["TESSERA_VISIBLE_UUIDS"], "GPU-a,GPU-b");
        assert_eq!(r.envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "7500m");
        assert_eq!(r.envs["CUDA_DEVICE_MEMORY_LIMIT_1"], "7500m");
        assert_eq!(r.envs["CUDA_DEVICE_SM_LIMIT"], "30");
        assert_eq!(r.envs["CUDA_DEVICE_SM_LIMIT_1"], "30");
        assert_eq!(
            r.envs["TESSERA_CARD_TENANTS_DIR"],
            "/usr/local/tessera/cards"
        );
        assert_eq!(r.envs["CUDA_TASK_PRIORITY"], "1");
        // Its id in the tenant tables is its host directory's name.
        assert_eq!(r.envs["TESSERA_TENANT_ID"], "uid-7_main");
        assert_eq!(
            r.mounts[1].host_path,
            layout.cards_dir().to_string_lossy(),
            "the agent's tables, read-only"
        );
        let (_, _, cards_mode) = crate::host_files::owner_of(&layout.cards_dir()).expect("meta");
        assert_eq!(cards_mode, 0o755, "not writable by containers");
        assert_eq!(
            r.envs["CUDA_DEVICE_MEMORY_SHARED_CACHE"],
            "/usr/local/tessera/shared/region.cache"
        );
        let paths: Vec<_> = r
            .mounts
            .iter()
            .map(|m| (m.container_path.as_str(), m.read_only))
            .collect();
        assert_eq!(
            paths,
            vec![
                ("/usr/local/tessera/shared", false),
                ("/usr/local/tessera/cards", true),
                ("/usr/local/tessera/libtessera-cuda.so", true),
                ("/etc/ld.so.preload", true),
                ("/usr/local/tessera/pid", true),
                ("/var/run/nvidia-container-devices/GPU-a", true),
                ("/var/run/nvidia-container-devices/GPU-b", true)
            ]
        );
        assert!(r.mounts[5..].iter().all(|m| m.host_path == "/dev/null"));
        assert_eq!(
            r.envs["TESSERA_PID_SOCKET"],
            "/usr/local/tessera/pid/pid.sock"
        );
        // The socket the agent serves is in the mounted directory.
        assert_eq!(r.mounts[4].host_path, layout.pid_dir().to_string_lossy());
        assert!(layout.pid_dir().is_dir());
        assert_eq!(
            layout.pid_socket().parent(),
            Some(layout.pid_dir().as_path())
        );
        assert_eq!(
            r.mounts[0].host_path,
            layout.container_dir("uid-7", "main").to_string_lossy()
        );
        assert!(layout
            .container_dir("uid-7", "main")
            .join("region.cache")
            .exists());
    }

    #[test]
    fn caps_are_numbered_by_the_card_list_the_interceptor_reads() {
        let temp = tempfile::tempdir().expect("tempdir");
        let layout = HostLayout::new(temp.path());
        let pod = pod(json!([]));
        let container = annotated_container(&pod, 1, 0).expect("container");
        let mut cards = devices();
        cards[0].memory_mib = 20480;
        cards[1].memory_mib = 30720;
        cards.swap(0, 1);
        let r = container_response(&layout, &ResourceNames::default(), &pod, container, &cards)
            .expect("response");
        let list =
            tessera_api::visible_cards::parse_visible_uuids(&r.envs["TESSERA_VISIBLE_UUIDS"])
                .expect("a UUID list");
        for (uuid, mib) in [("GPU-a", "20480m"), ("GPU-b", "30720m")] {
            let i = tessera_api::visible_cards::position_of(&list, uuid).expect("listed");
            assert_eq!(r.envs[&memory_limit_var(i)], mib, "{uuid}");
        }
    }

    #[test]
    fn opted_out_container_gets_no_preload() {
        let temp = tempfile::tempdir().expect("tempdir");
        let layout = HostLayout::new(temp.path());
        let pod = pod(json!([{"name": "CUDA_DISABLE_CONTROL", "value": "true"}]));
        let container = annotated_container(&pod, 1, 0).expect("container");
        let r = container_response(
            &layout,
            &ResourceNames::default(),
            &pod,
            container,
            &devices(),
        )
        .expect("response");
        assert_eq!(
            r.mounts.len(),
            4,
            "region, cards and the two device-list mounts"
        );
        assert_eq!(
            r.mounts[2].container_path,
            "/var/run/nvidia-container-devices/GPU-a"
        );
        assert!(r
            .mounts
            .iter()
            .all(|m| m.container_path != "/etc/ld.so.preload"));
        assert!(!r.envs.contains_key("TESSERA_PID_SOCKET"));
        assert_eq!(r.envs["NVIDIA_VISIBLE_DEVICES"], "GPU-a,GPU-b");
    }
}
