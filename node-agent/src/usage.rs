//! Per-container GPU usage, read from the accounting region the interceptor
//! keeps in each container's host directory (layout owned by
//! `tessera_api::shared_region`). The file is copied into an aligned buffer
//! and read there, so a container can never change what is being read and
//! the agent never writes to it.

use std::path::Path;
use std::sync::atomic::Ordering;

use tessera_api::shared_region::{RegionError, SharedRegion, MAX_DEVICES, REGION_SIZE};
use thiserror::Error;

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
}

/// Why a region could not be read.
#[derive(Debug, Error)]
pub enum UsageError {
    /// The file could not be read.
    #[error("could not read the accounting region `{path}`: {source}")]
    Read {
        /// The path.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not (yet) a region of this layout.
    #[error("accounting region `{path}`: {source}")]
    Layout {
        /// The path.
        path: String,
        /// What is wrong.
        #[source]
        source: RegionError,
    },
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Reads the usage of the first `cards` cards from a region file. A file
/// no process has initialised yet reads as no usage.
pub fn read_region(path: &Path, cards: usize) -> Result<Vec<DeviceUsage>, UsageError> {
    let bytes = std::fs::read(path).map_err(|source| UsageError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let layout_error = |source| UsageError::Layout {
        path: path.display().to_string(),
        source,
    };
    if bytes.len() < REGION_SIZE {
        if bytes.iter().all(|b| *b == 0) {
            return Ok(vec![
                DeviceUsage {
                    used_bytes: 0,
                    limit_bytes: 0,
                    utilization_ratio: 0.0,
                };
                cards.min(MAX_DEVICES)
            ]);
        }
        return Err(layout_error(RegionError::TooSmall { len: bytes.len() }));
    }
    let mut lines = vec![Line([0; 64]); REGION_SIZE.div_ceil(64)];
    for (line, chunk) in lines.iter_mut().zip(bytes[..REGION_SIZE].chunks(64)) {
        line.0[..chunk.len()].copy_from_slice(chunk);
    }
    // SAFETY: `lines` is a private, 64-byte aligned buffer of at least
    // REGION_SIZE bytes that lives until the end of this function and is
    // only read through the returned reference.
    let region = unsafe { SharedRegion::from_raw(lines.as_ptr().cast::<u8>(), lines.len() * 64) }
        .map_err(layout_error)?;
    if !region.is_initialised() {
        return Ok(vec![
            DeviceUsage {
                used_bytes: 0,
                limit_bytes: 0,
                utilization_ratio: 0.0,
            };
            cards.min(MAX_DEVICES)
        ]);
    }
    region.validate().map_err(layout_error)?;
    Ok((0..cards.min(MAX_DEVICES))
        .map(|i| DeviceUsage {
            used_bytes: region.device_used(i),
            limit_bytes: region.devices[i].limit_bytes.load(Ordering::Relaxed),
            utilization_ratio: f64::from(
                region.cores[i].utilization_permille.load(Ordering::Relaxed),
            ) / 1000.0,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C, align(64))]
    struct Lines([Line; REGION_SIZE.div_ceil(64)]);

    #[test]
    fn reads_what_the_layout_says_and_refuses_foreign_files() {
        let temp = tempfile::tempdir().expect("tempdir");
        let path = temp.path().join("region.cache");
        std::fs::write(&path, b"").expect("write");
        assert_eq!(read_region(&path, 2).expect("empty").len(), 2);

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
        let usage = read_region(&path, 2).expect("reads");
        assert_eq!(
            usage[1],
            DeviceUsage {
                used_bytes: 1 << 30,
                limit_bytes: 4 << 30,
                utilization_ratio: 0.3,
            }
        );
        assert_eq!(usage[0].used_bytes, 0);

        std::fs::write(&path, vec![0xAB; REGION_SIZE]).expect("write");
        assert!(matches!(
            read_region(&path, 1),
            Err(UsageError::Layout { .. })
        ));
        std::fs::write(&path, b"garbage").expect("write");
        assert!(read_region(&path, 1).is_err());
    }
}
