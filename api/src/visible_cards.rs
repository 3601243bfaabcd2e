//! Which physical cards a container holds, in the order its per-card
//! settings are numbered: `CUDA_DEVICE_MEMORY_LIMIT_<i>` (and the other
//! `_<i>` variables) speak of the `i`-th card of this list.
//!
//! The node agent writes the list twice: in `NVIDIA_VISIBLE_DEVICES`, which
//! the NVIDIA container runtime consumes (and which some setups replace with
//! `all`, `void` or a mount path), and in [`VISIBLE_UUIDS`], which only
//! Tessera reads. The interceptor maps a CUDA ordinal to its index in this
//! list through the card's UUID (`cuDeviceGetUuid`), so the cap follows the
//! physical card whatever order CUDA enumerates the cards in and however
//! the application narrows them with `CUDA_VISIBLE_DEVICES`.

/// The container's cards as a comma-separated UUID list (`GPU-…` or `MIG-…`),
/// in the order of the per-card `_<i>` variables.
pub const VISIBLE_UUIDS: &str = "TESSERA_VISIBLE_UUIDS";

/// Formats the list for [`VISIBLE_UUIDS`].
pub fn format_visible_uuids<'a>(uuids: impl IntoIterator<Item = &'a str>) -> String {
    uuids.into_iter().collect::<Vec<_>>().join(",")
}

/// Parses a UUID list: `Some(uuids)` when every comma-separated entry is a
/// card UUID (`GPU-…` / `MIG-…`, compared case-insensitively later), `None`
/// when the value is empty or anything else (`all`, `none`, `void`, indices,
/// a path), which names no card order.
pub fn parse_visible_uuids(value: &str) -> Option<Vec<String>> {
    let uuids: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let is_uuid = |s: &String| {
        let lower = s.to_ascii_lowercase();
        lower.starts_with("gpu-") || lower.starts_with("mig-")
    };
    (!uuids.is_empty() && uuids.iter().all(is_uuid)).then_some(uuids)
}

/// Position of `uuid` in `list`, if listed. Case and the `GPU-` / `MIG-`
/// prefix are ignored: CUDA's UUID bytes carry no prefix, and a MIG
/// instance's UUID is written `MIG-…` by NVML.
pub fn position_of(list: &[String], uuid: &str) -> Option<usize> {
    let key = |s: &str| {
        let lower = s.trim().to_ascii_lowercase();
        lower
            .strip_prefix("gpu-")
            .or_else(|| lower.strip_prefix("mig-"))
            .map(str::to_owned)
            .unwrap_or(lower)
    };
    let wanted = key(uuid);
    list.iter().position(|u| key(u) == wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_lists_round_trip() {
        let text = format_visible_uuids(["GPU-a", "GPU-b"]);
        assert_eq!(text, "GPU-a,GPU-b");
        assert_eq!(
            parse_visible_uuids(&text),
            Some(vec!["GPU-a".to_owned(), "GPU-b".to_owned()])
        );
        assert_eq!(
            parse_visible_uuids(" gpu-A , MIG-x "),
            Some(vec!["gpu-A".to_owned(), "MIG-x".to_owned()])
        );
    }

    #[test]
    fn other_values_name_no_order() {
        for value in ["", "all", "void", "none", "0,1", "GPU-a,1", "/var/run/x"] {
            assert_eq!(parse_visible_uuids(value), None, "{value}");
        }
    }

    #[test]
    fn positions_ignore_case() {
        let list = parse_visible_uuids("GPU-aa,GPU-bb").unwrap();
        assert_eq!(position_of(&list, "gpu-BB"), Some(1));
        assert_eq!(position_of(&list, "GPU-cc"), None);
        let mig = parse_visible_uuids("MIG-0123").unwrap();
        assert_eq!(position_of(&mig, "GPU-0123"), Some(0));
    }
}
