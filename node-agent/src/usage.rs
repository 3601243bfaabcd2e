//! Per-container GPU usage, read from the accounting region the interceptor
//! keeps in each container's host directory (layout owned by
//! `tessera_api::shared_region`). The file is container-writable, so it is
//! read through [`crate::region_file`]: no links followed, regular files of
//! the exact size only, only the ranges needed, into a private aligned
//! buffer the container cannot change while it is read. The agent never
//! writes to it. Blocking: call from a blocking thread.

use std::path::Path;
use std::sync::atomic::Ordering;

use tessera_api::shared_region::MAX_DEVICES;

use crate::region_file::{read_region_file, RegionBuffer, RegionFileError};

/// Usage of one visible card of a container.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceUsage {
    /// Bytes charged by the container's live processes.
    pub used_bytes: u64,
    /// The cap in bytes (0 when the interceptor has not set one yet).
    pub limit_bytes: u64,
    /// The container's share of the card's compute (0.0–1.0) as its SM
    /// updater last measured it from NVML; 0 when nothing measured it.
    pub utilization_ratio: f64,
    /// `CLOCK_MONOTONIC` nanoseconds of its last kernel launch on the card
    /// as its SM updater published it; 0 = none yet.
    pub last_launch_ns: u64,
}

/// Why a region could not be read.
pub type UsageError = RegionFileError;

/// Reads the usage of the first `cards` cards from a region file, using
/// `buffer` (reused between calls). A file no process has initialised yet
/// reads as no usage.
pub fn read_region(
    path: &Path,
    cards: usize,
    buffer: &mut RegionBuffer,
) -> Result<Vec<DeviceUsage>, UsageError> {
    let cards = cards.min(MAX_DEVICES);
    let Some(region) = read_region_file(path, buffer)? else {
        return Ok(vec![
            DeviceUsage {
                used_bytes: 0,
                limit_bytes: 0,
                utilization_ratio: 0.0,
                last_launch_ns: 0,
            };
            cards
        ]);
    };
    Ok((0..cards)
        .map(|i| DeviceUsage {
            used_bytes: region.device_used(i),
            limit_bytes: region.devices[i].limit_bytes.load(Ordering::Relaxed),
            utilization_ratio: f64::from(
                region.cores[i].utilization_permille.load(Ordering::Relaxed),
            ) / 1000.0,
            last_launch_ns: region.publish[i].figures().last_launch_ns,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_api::shared_region::{SharedRegion, REGION_SIZE};

    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    struct Line([u8; 64]);

    #[repr(C, align(64))]
    struct Lines([Line; REGION_SIZE.div_ceil(64)]);

    #[test]
    fn reads_what_the_layout_says_and_refuses_foreign_files() {
        let temp = tempfile::tempdir().expect("tempdir");
        let path = temp.path().join("region.cache");
        std::fs::write(&path, b"").expect("write");
        assert_eq!(
            read_region(&path, 2, &mut RegionBuffer::new())
                .expect("empty")
                .len(),
            2
        );

        let mut lines = Box::new(Lines([Line([0; 64]); REGION_SIZE.div_ceil(64)]));
        // SAFETY: the buffer is aligned, large enough and only used here.
        let region =
            unsafe { SharedRegion::from_raw(lines.0.as_mut_ptr().cast::<u8>(), REGION_SIZE) }
                .expect("region");
        region.initialise();
        region.devices[1]
            .limit_bytes
            .store(4 << 30, Ordering::Relaxed);
        region.charge(0, 1, 1 << 30, 4 << 30).expect("fits");
        region.cores[1]
            .utilization_permille
            .store(300, Ordering::Relaxed);
        let bytes: Vec<u8> = lines.0.iter().flat_map(|l| l.0).take(REGION_SIZE).collect();
        std::fs::write(&path, &bytes).expect("write");
        let usage = read_region(&path, 2, &mut RegionBuffer::new()).expect("reads");
        assert_eq!(
            usage[1],
            DeviceUsage {
                used_bytes: 1 << 30,
                limit_bytes: 4 << 30,
                utilization_ratio: 0.3,
                last_launch_ns: 0,
            }
        );
        assert_eq!(usage[0].used_bytes, 0);

        std::fs::write(&path, vec![0xAB; REGION_SIZE]).expect("write");
        assert!(matches!(
            read_region(&path, 1, &mut RegionBuffer::new()),
            Err(RegionFileError::Layout { .. })
        ));
        std::fs::write(&path, b"garbage").expect("write");
        assert!(read_region(&path, 1, &mut RegionBuffer::new()).is_err());
    }
}
