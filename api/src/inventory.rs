//! The node GPU inventory carried by the `hami.io/node-nvidia-register`
//! node annotation: the node agent encodes it (JSON), the scheduler and the
//! CLI decode it (JSON, or HAMi's older `UUID,count,devmem,devcore,type,
//! numa,health[,index,mode]:` string form).

use serde::{Deserialize, Serialize};

use crate::error::InventoryError;

/// Default sharing mode written by HAMi's NVIDIA node agent.
pub const DEFAULT_MODE: &str = "hami-core";

/// One physical GPU as published on its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GpuDevice {
    /// Card UUID (`GPU-…`).
    pub id: String,
    /// NVML index on the node.
    pub index: u32,
    /// Split count: how many containers may share the card.
    pub count: u32,
    /// Memory in MiB, after the configured memory scaling.
    pub devmem: u64,
    /// Compute in percent of the card (100 × core scaling).
    pub devcore: u32,
    /// Card type, prefixed `NVIDIA-` (e.g. `NVIDIA-Tesla T4`).
    #[serde(rename = "type")]
    pub device_type: String,
    /// NUMA node the card is attached to.
    pub numa: i32,
    /// Sharing mode (`hami-core`, `mig`, `mps`).
    pub mode: String,
    /// False when the card reported a fatal error.
    pub health: bool,
}

impl Default for GpuDevice {
    fn default() -> Self {
        Self {
            id: String::new(),
            index: 0,
            count: 0,
            devmem: 0,
            devcore: 0,
            device_type: String::new(),
            numa: 0,
            mode: DEFAULT_MODE.to_owned(),
            health: false,
        }
    }
}

/// Encodes an inventory as the JSON annotation value.
pub fn encode_inventory(devices: &[GpuDevice]) -> String {
    // Serialising plain strings and integers cannot fail.
    serde_json::to_string(devices).unwrap_or_else(|_| "[]".to_owned())
}

/// Encodes an inventory in HAMi's older string form (for tests and for
/// talking to old tooling).
pub fn encode_inventory_legacy(devices: &[GpuDevice]) -> String {
    devices
        .iter()
        .map(|d| {
            format!(
                "{},{},{},{},{},{},{},{},{}:",
                d.id,
                d.count,
                d.devmem,
                d.devcore,
                d.device_type,
                d.numa,
                d.health,
                d.index,
                d.mode
            )
        })
        .collect()
}

/// Decodes the annotation value, JSON or string form. An empty value is an
/// empty inventory.
pub fn decode_inventory(value: &str) -> Result<Vec<GpuDevice>, InventoryError> {
    let trimmed = value.trim();
    let devices = if trimmed.is_empty() {
        Vec::new()
    } else if trimmed.starts_with('[') {
        serde_json::from_str::<Vec<GpuDevice>>(trimmed)
            .map_err(|source| InventoryError::Json { source })?
    } else {
        decode_legacy(trimmed)?
    };
    validate(&devices)?;
    Ok(devices)
}

fn validate(devices: &[GpuDevice]) -> Result<(), InventoryError> {
    let mut seen = std::collections::HashSet::new();
    for (position, device) in devices.iter().enumerate() {
        let field = |field, value: String, reason| InventoryError::Field {
            position,
            field,
            value,
            reason,
        };
        if device.id.trim().is_empty() {
            return Err(field("id", device.id.clone(), "must be the card UUID"));
        }
        if device.count == 0 {
            return Err(field("count", "0".into(), "must be at least 1"));
        }
        if device.devmem == 0 {
            return Err(field(
                "devmem",
                "0".into(),
                "must be the card memory in MiB",
            ));
        }
        if !seen.insert(device.id.as_str()) {
            return Err(InventoryError::DuplicateId {
                id: device.id.clone(),
            });
        }
    }
    Ok(())
}

fn decode_legacy(value: &str) -> Result<Vec<GpuDevice>, InventoryError> {
    value
        .split(':')
        .filter(|entry| !entry.trim().is_empty())
        .enumerate()
        .map(|(position, entry)| decode_legacy_device(position, entry))
        .collect()
}

fn decode_legacy_device(position: usize, entry: &str) -> Result<GpuDevice, InventoryError> {
    let fields: Vec<&str> = entry.split(',').map(str::trim).collect();
    let bad = |field, value: &str, reason| InventoryError::Field {
        position,
        field,
        value: value.to_owned(),
        reason,
    };
    if !(7..=9).contains(&fields.len()) {
        return Err(bad(
            "entry",
            entry,
            "must have 7 to 9 comma-separated fields",
        ));
    }
    fn number<T: std::str::FromStr>(text: &str) -> Option<T> {
        text.parse().ok()
    }
    let health = match fields[6].to_ascii_lowercase().as_str() {
        "true" => true,
        "false" => false,
        _ => return Err(bad("health", fields[6], "must be true or false")),
    };
    Ok(GpuDevice {
        id: fields[0].to_owned(),
        count: number(fields[1])
            .ok_or_else(|| bad("count", fields[1], "must be a whole number"))?,
        devmem: number(fields[2])
            .ok_or_else(|| bad("devmem", fields[2], "must be a whole number of MiB"))?,
        devcore: number(fields[3])
            .ok_or_else(|| bad("devcore", fields[3], "must be a whole number"))?,
        device_type: fields[4].to_owned(),
        numa: number(fields[5]).ok_or_else(|| bad("numa", fields[5], "must be an integer"))?,
        health,
        index: match fields.get(7) {
            Some(text) => {
                number(text).ok_or_else(|| bad("index", text, "must be a whole number"))?
            }
            None => u32::try_from(position).unwrap_or(u32::MAX),
        },
        mode: fields
            .get(8)
            .filter(|m| !m.is_empty())
            .map_or_else(|| DEFAULT_MODE.to_owned(), |m| (*m).to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T4_NODE: &str = "GPU-f8e75627-86ed-f202-cf2b-6363fb18d516,10,15360,100,NVIDIA-Tesla T4,0,true,0,hami-core:GPU-7f2003cf-a542-71cf-121f-0e489699bbcf,10,15360,100,NVIDIA-Tesla T4,0,true,1,hami-core:GPU-90e2e938-7ac3-3b5e-e9d2-94b0bd279cf2,10,15360,100,NVIDIA-Tesla T4,0,true,2,hami-core:GPU-2facdfa8-853c-e117-ed59-f0f55a4d536f,10,15360,100,NVIDIA-Tesla T4,0,true,3,hami-core:";

    #[test]
    fn real_t4_node_decodes() {
        let devices = decode_inventory(T4_NODE).expect("T4 annotation decodes");
        assert_eq!(devices.len(), 4);
        for (i, device) in devices.iter().enumerate() {
            assert!(device.health);
            assert_eq!(device.devmem, 15360);
            assert_eq!(device.devcore, 100);
            assert_eq!(device.count, 10);
            assert_eq!(device.device_type, "NVIDIA-Tesla T4");
            assert_eq!(device.index, u32::try_from(i).expect("small"));
            assert_eq!(device.mode, "hami-core");
        }
        assert_eq!(devices[0].id, "GPU-f8e75627-86ed-f202-cf2b-6363fb18d516");
        assert_eq!(devices[3].id, "GPU-2facdfa8-853c-e117-ed59-f0f55a4d536f");
    }

    #[test]
    fn hami_json_with_omitted_zero_fields_decodes() {
        // HAMi's Go encoder omits zero values (index 0, numa 0, health false)
        // and adds fields we do not use.
        let json = r#"[{"id":"GPU-a","count":10,"devmem":23028,"devcore":100,"type":"NVIDIA-NVIDIA A10G","mode":"hami-core","health":true,"devicevendor":"NVIDIA"},
                      {"id":"GPU-b","index":1,"count":10,"devmem":23028,"devcore":100,"type":"NVIDIA-NVIDIA A10G","numa":1}]"#;
        let devices = decode_inventory(json).expect("decodes");
        assert_eq!(devices[0].index, 0);
        assert!(devices[0].health);
        assert_eq!(devices[1].numa, 1);
        assert!(
            !devices[1].health,
            "omitted health means unhealthy, as in Go"
        );
    }

    #[test]
    fn legacy_without_index_uses_position() {
        let devices = decode_inventory(
            "GPU-a,10,1000,100,NVIDIA-X,0,true:GPU-b,10,1000,100,NVIDIA-X,1,false:",
        )
        .expect("decodes");
        assert_eq!(devices[1].index, 1);
        assert!(!devices[1].health);
        assert_eq!(devices[1].mode, DEFAULT_MODE);
    }

    #[test]
    fn corrupt_values_are_errors_naming_the_field() {
        let cases = [
            ("GPU-a,ten,1000,100,NVIDIA-X,0,true:", "count"),
            ("GPU-a,10,1000,100,NVIDIA-X,0,maybe:", "health"),
            ("GPU-a,10:", "entry"),
            ("GPU-a,0,1000,100,NVIDIA-X,0,true:", "count"),
            (r#"[{"id":"","count":1,"devmem":1}]"#, "id"),
            (
                "GPU-a,1,1000,100,X,0,true:GPU-a,1,1000,100,X,0,true:",
                "twice",
            ),
            ("[{", "JSON"),
        ];
        for (value, expected) in cases {
            let message = decode_inventory(value).expect_err(value).to_string();
            assert!(message.contains(expected), "{value}: {message}");
        }
    }

    fn device_strategy() -> impl Strategy<Value = GpuDevice> {
        (
            "GPU-[0-9a-f]{8}",
            any::<u32>(),
            1..64u32,
            1..200_000u64,
            0..1000u32,
            "NVIDIA-[A-Za-z0-9]{1,6}( [A-Za-z0-9]{1,6})?",
            -1..4i32,
            prop_oneof![Just("hami-core".to_owned()), Just("mig".to_owned())],
            any::<bool>(),
        )
            .prop_map(
                |(id, index, count, devmem, devcore, device_type, numa, mode, health)| GpuDevice {
                    id,
                    index,
                    count,
                    devmem,
                    devcore,
                    device_type,
                    numa,
                    mode,
                    health,
                },
            )
    }

    fn unique(devices: Vec<GpuDevice>) -> Vec<GpuDevice> {
        let mut seen = std::collections::HashSet::new();
        devices
            .into_iter()
            .filter(|d| seen.insert(d.id.clone()))
            .collect()
    }

    proptest! {
        #[test]
        fn json_round_trip(devices in proptest::collection::vec(device_strategy(), 0..8)) {
            let devices = unique(devices);
            prop_assert_eq!(decode_inventory(&encode_inventory(&devices)).expect("decodes"), devices);
        }

        #[test]
        fn legacy_round_trip(devices in proptest::collection::vec(device_strategy(), 0..8)) {
            let devices = unique(devices);
            prop_assert_eq!(decode_inventory(&encode_inventory_legacy(&devices)).expect("decodes"), devices);
        }

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC*") {
            let _ = decode_inventory(&text);
        }

        #[test]
        fn arbitrary_legacy_like_text_never_panics(text in "[GPU0-9a-f,:\\-. truefals]{0,80}") {
            let _ = decode_inventory(&text);
        }
    }
}
