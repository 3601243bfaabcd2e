//! Which of the container's cards a CUDA ordinal is. The per-card caps
//! (`CUDA_DEVICE_MEMORY_LIMIT_<i>`) and the shared region's per-card
//! counters are numbered by the container's card list (the node agent's
//! `TESSERA_VISIBLE_UUIDS`, else `NVIDIA_VISIBLE_DEVICES` when that is a
//! UUID list), not by CUDA ordinals: CUDA numbers cards fastest-first or by
//! PCI bus, and an application may narrow and renumber them with
//! `CUDA_VISIBLE_DEVICES`. So each ordinal is matched once, by the UUID the
//! driver reports for it (`cuDeviceGetUuid`), against the list; the cap
//! follows the physical card.
//!
//! - No list: ordinal `i` is card `i` (what a single-card container or a
//!   bare test machine needs).
//! - A card missing from the agent's list is not the container's
//!   ([`Card::Foreign`]): contexts and allocations on it are refused. A card
//!   missing from `NVIDIA_VISIBLE_DEVICES` alone (a runtime that rewrote the
//!   variable) falls back to its ordinal, with a warning.
//! - Ordinals at or past the region's capacity are not accounted.
//!
//! The answer is cached per ordinal: after the first call for a card,
//! mapping costs one relaxed atomic load.

use crate::ffi::{CuDevice, CUDA_SUCCESS};
use crate::log::{log, WARN};
use crate::state;
use std::sync::atomic::{AtomicU8, Ordering};
use tessera_api::shared_region::MAX_DEVICES;
use tessera_api::visible_cards::position_of;

/// What a CUDA ordinal is to the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Card {
    /// The container's card at this index of its list (cap and counters).
    Container(usize),
    /// Not accounted (no list entry can be checked, or past the region).
    Untracked,
    /// A card the node agent did not give the container.
    Foreign,
}

const UNRESOLVED: u8 = 0;
const UNTRACKED: u8 = 0xfe;
const FOREIGN: u8 = 0xff;

static RESOLVED: [AtomicU8; MAX_DEVICES] = [const { AtomicU8::new(UNRESOLVED) }; MAX_DEVICES];

fn encode(card: Card) -> u8 {
    match card {
        Card::Container(i) => i as u8 + 1,
        Card::Untracked => UNTRACKED,
        Card::Foreign => FOREIGN,
    }
}

fn decode(code: u8) -> Card {
    match code {
        UNTRACKED => Card::Untracked,
        FOREIGN => Card::Foreign,
        i => Card::Container(usize::from(i) - 1),
    }
}

/// The container card behind CUDA ordinal `ordinal`.
#[inline]
pub fn card_of(ordinal: CuDevice) -> Card {
    let Some(slot) = usize::try_from(ordinal).ok().and_then(|o| RESOLVED.get(o)) else {
        return Card::Untracked;
    };
    match slot.load(Ordering::Relaxed) {
        UNRESOLVED => resolve(ordinal, slot),
        code => decode(code),
    }
}

/// The container index of `ordinal`, if it is one of the container's cards.
#[inline]
pub fn container_index(ordinal: CuDevice) -> Option<usize> {
    match card_of(ordinal) {
        Card::Container(i) => Some(i),
        Card::Untracked | Card::Foreign => None,
    }
}

#[cold]
fn resolve(ordinal: CuDevice, slot: &AtomicU8) -> Card {
    let Ok(config) = state::config() else {
        return Card::Untracked;
    };
    let own_index = Card::Container(ordinal as usize);
    let Some(list) = &config.visible_uuids else {
        slot.store(encode(own_index), Ordering::Relaxed);
        return own_index;
    };
    // Not cached when the driver cannot answer yet (before cuInit).
    let Some(uuid) = cuda_uuid(ordinal) else {
        return Card::Untracked;
    };
    let card = match position_of(list, &uuid) {
        Some(i) if i < MAX_DEVICES => Card::Container(i),
        Some(_) => Card::Untracked,
        None if config.visible_uuids_from_agent => {
            log!(
                WARN,
                "CUDA device {ordinal} ({uuid}) is not one of the container's cards ({}); it is refused",
                list.join(",")
            );
            Card::Foreign
        }
        None => {
            log!(
                WARN,
                "CUDA device {ordinal} ({uuid}) is not in NVIDIA_VISIBLE_DEVICES; its cap is taken by ordinal"
            );
            own_index
        }
    };
    slot.store(encode(card), Ordering::Relaxed);
    card
}

/// The driver's UUID of `ordinal` in NVML's text form, if it can say.
pub fn cuda_uuid(ordinal: CuDevice) -> Option<String> {
    let device_uuid = state::cuda()?.device_get_uuid?;
    let mut bytes = [0u8; 16];
    // SAFETY: the driver's cuDeviceGetUuid with a 16-byte buffer.
    let rc = unsafe { device_uuid(bytes.as_mut_ptr(), ordinal) };
    (rc == CUDA_SUCCESS).then(|| uuid_text(&bytes))
}

/// NVML's text form of a CUDA UUID: `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
pub fn uuid_text(bytes: &[u8; 16]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_text_form() {
        let mut b = [0u8; 16];
        b[0] = 0xab;
        b[15] = 0x01;
        assert_eq!(uuid_text(&b), "GPU-ab000000-0000-0000-0000-000000000001");
    }

    #[test]
    fn codes_round_trip() {
        for card in [
            Card::Container(0),
            Card::Container(MAX_DEVICES - 1),
            Card::Untracked,
            Card::Foreign,
        ] {
            assert_eq!(decode(encode(card)), card);
        }
    }
}
