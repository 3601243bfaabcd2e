//! The per-pod allocation carried by `hami.io/vgpu-devices-allocated` and
//! `hami.io/vgpu-devices-to-allocate`: for each container (in pod order,
//! `;` after every container, empty containers included), the devices it
//! got as `UUID,NVIDIA,memMiB,cores:`.

use serde::{Deserialize, Serialize};

use crate::error::AllocationError;

/// Vendor tag written in the second field of each device.
pub const NVIDIA_VENDOR: &str = "NVIDIA";

/// A share of one card given to one container.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ContainerDevice {
    /// Card UUID.
    pub uuid: String,
    /// Vendor tag (`NVIDIA`).
    pub vendor: String,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Compute in percent of the card.
    pub cores: u32,
}

/// The devices of each container of a pod, in container order.
pub type PodDevices = Vec<Vec<ContainerDevice>>;

/// Encodes a pod's allocation into the annotation value.
pub fn encode_pod_devices(containers: &[Vec<ContainerDevice>]) -> String {
    let mut out = String::new();
    for devices in containers {
        for device in devices {
            out.push_str(&device.uuid);
            out.push(',');
            out.push_str(&device.vendor);
            out.push(',');
            out.push_str(&device.memory_mib.to_string());
            out.push(',');
            out.push_str(&device.cores.to_string());
            out.push(':');
        }
        out.push(';');
    }
    out
}

/// Decodes an annotation value. An empty value means no containers; a
/// missing final `;` is tolerated.
pub fn decode_pod_devices(value: &str) -> Result<PodDevices, AllocationError> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(Vec::new());
    }
    let body = value.strip_suffix(';').unwrap_or(value);
    body.split(';')
        .enumerate()
        .map(|(container, text)| decode_container(container, text))
        .collect()
}

fn decode_container(container: usize, text: &str) -> Result<Vec<ContainerDevice>, AllocationError> {
    text.split(':')
        .filter(|entry| !entry.trim().is_empty())
        .enumerate()
        .map(|(device, entry)| {
            let bad = |reason| AllocationError {
                container,
                device,
                value: entry.to_owned(),
                reason,
            };
            let fields: Vec<&str> = entry.split(',').map(str::trim).collect();
            let [uuid, vendor, memory, cores] = fields[..] else {
                return Err(bad("a device needs exactly 4 comma-separated fields"));
            };
            if uuid.is_empty() {
                return Err(bad("the card UUID is empty"));
            }
            Ok(ContainerDevice {
                uuid: uuid.to_owned(),
                vendor: vendor.to_owned(),
                memory_mib: memory
                    .parse()
                    .map_err(|_| bad("memory must be a whole number of MiB"))?,
                cores: cores
                    .parse()
                    .map_err(|_| bad("cores must be a whole percentage"))?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn device(uuid: &str, memory_mib: u64, cores: u32) -> ContainerDevice {
        ContainerDevice {
            uuid: uuid.into(),
            vendor: NVIDIA_VENDOR.into(),
            memory_mib,
            cores,
        }
    }

    #[test]
    fn encodes_hami_format() {
        let pod = vec![
            vec![],
            vec![device("GPU-a", 7500, 30), device("GPU-b", 7500, 30)],
            vec![],
        ];
        let text = encode_pod_devices(&pod);
        assert_eq!(text, ";GPU-a,NVIDIA,7500,30:GPU-b,NVIDIA,7500,30:;;");
        assert_eq!(decode_pod_devices(&text).expect("decodes"), pod);
    }

    #[test]
    fn decodes_hami_written_value() {
        let pod = decode_pod_devices("GPU-7f2003cf-a542-71cf-121f-0e489699bbcf,NVIDIA,7500,0:;")
            .expect("decodes");
        assert_eq!(
            pod,
            vec![vec![device(
                "GPU-7f2003cf-a542-71cf-121f-0e489699bbcf",
                7500,
                0
            )]]
        );
        assert_eq!(decode_pod_devices("").expect("empty"), PodDevices::new());
        assert_eq!(decode_pod_devices(";").expect("one empty"), vec![vec![]]);
    }

    #[test]
    fn corrupt_values_are_errors() {
        for bad in [
            "GPU-a,NVIDIA,lots,0:;",
            "GPU-a,NVIDIA,1:;",
            ",NVIDIA,1,1:;",
            ";GPU-a,NVIDIA,1,-5:;",
        ] {
            let err = decode_pod_devices(bad).expect_err(bad);
            assert!(err
                .to_string()
                .contains("expected `UUID,NVIDIA,memMiB,cores:`"));
        }
    }

    fn pod_strategy() -> impl Strategy<Value = PodDevices> {
        let device = ("GPU-[0-9a-f-]{1,36}", any::<u64>(), any::<u32>()).prop_map(
            |(uuid, memory_mib, cores)| ContainerDevice {
                uuid,
                vendor: NVIDIA_VENDOR.into(),
                memory_mib,
                cores,
            },
        );
        proptest::collection::vec(proptest::collection::vec(device, 0..4), 0..5)
    }

    proptest! {
        #[test]
        fn round_trip(pod in pod_strategy()) {
            prop_assert_eq!(decode_pod_devices(&encode_pod_devices(&pod)).expect("decodes"), pod);
        }

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC*") {
            let _ = decode_pod_devices(&text);
        }
    }
}
