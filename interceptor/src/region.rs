//! Opening, mapping and locking the shared accounting region (layout in
//! `tessera_api::shared_region`): the one module here that does file I/O.
//!
//! A process attaches once (first capped CUDA call), maps the file and later,
//! on its first charge, claims a slot by taking the OFD lock on the slot's
//! lock byte. The kernel drops that lock when the process dies, so a slot
//! whose lock can be taken while it still shows usage belongs to a dead
//! process: [`Region::reclaim_dead`] hands such usage back. That scan runs
//! only off the hot path (attach, before refusing an allocation, NVML queries).
//!
//! Without `CUDA_DEVICE_MEMORY_SHARED_CACHE` the region is a private
//! anonymous mapping: the process is accounted alone.

use crate::log::{log, INFO, WARN};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use tessera_api::shared_region::{
    slot_lock_offset, RegionError, SharedRegion, INIT_LOCK_OFFSET, MAX_PROCESSES, REGION_SIZE,
    SLOT_ACTIVE,
};
use thiserror::Error;

const NO_SLOT: usize = usize::MAX;

/// Why the region could not be used.
#[derive(Debug, Error)]
pub enum AttachError {
    /// A system call failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The region file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a region this build understands.
    #[error("{path}: {source}")]
    Layout {
        /// The region file.
        path: String,
        /// What is wrong with it.
        source: RegionError,
    },
    /// Every slot is held by a live process.
    #[error("all {MAX_PROCESSES} process slots of {path} are in use")]
    Full {
        /// The region file.
        path: String,
    },
}

/// A mapped region and this process's place in it.
#[derive(Debug)]
pub struct Region {
    map: &'static SharedRegion,
    /// `None` for a private region.
    path: Option<PathBuf>,
    /// Descriptor whose open file description holds our locks; -1 when none.
    fd: AtomicI32,
    slot: AtomicUsize,
    /// Serialises slot claims and reclaim scans between our own threads:
    /// our threads share one open file description, so the file lock alone
    /// does not keep them apart. Cold paths only.
    scan: AtomicBool,
}

fn io_error(what: &'static str, path: &Path) -> AttachError {
    AttachError::Io {
        what,
        path: path.display().to_string(),
        source: std::io::Error::last_os_error(),
    }
}

/// Maps `len` bytes of the open file `fd` shared and read-write; `None`
/// when the kernel refuses. The mapping is never unmapped.
pub(crate) fn map_read_write(fd: i32, len: usize) -> Option<*mut libc::c_void> {
    // SAFETY: a fresh shared mapping of our own descriptor; the kernel picks
    // the address, so nothing existing is replaced.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    (ptr != libc::MAP_FAILED).then_some(ptr)
}

/// Sets (`F_WRLCK`) or clears (`F_UNLCK`) an OFD lock on one byte.
pub(crate) fn lock_byte(fd: i32, offset: u64, kind: i32, wait: bool) -> bool {
    // SAFETY: a zeroed flock is valid; OFD locks require l_pid == 0.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as _;
    lock.l_whence = libc::SEEK_SET as _;
    lock.l_start = offset as _;
    lock.l_len = 1;
    let cmd = if wait {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    loop {
        // SAFETY: fcntl on our descriptor with a valid flock.
        let rc = unsafe { libc::fcntl(fd, cmd, &lock) };
        if rc == 0 {
            return true;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return false;
        }
    }
}

/// Holds [`Region::scan`]: a spin flag rather than a mutex, so a child after
/// fork can reset it (a mutex held by a parent thread would stay locked).
struct ScanGuard<'a>(&'a AtomicBool);

impl<'a> ScanGuard<'a> {
    fn take(flag: &'a AtomicBool) -> ScanGuard<'a> {
        while flag
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::thread::yield_now();
        }
        ScanGuard(flag)
    }
}

impl Drop for ScanGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

pub(crate) fn open_region_file(path: &Path) -> Result<i32, AttachError> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| AttachError::Io {
        what: "open",
        path: path.display().to_string(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: NUL-terminated path; the mode is an explicit argument, so the
    // process umask is neither read nor changed.
    let fd = unsafe {
        libc::open(
            c_path.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC,
            0o666 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io_error("open", path));
    }
    Ok(fd)
}

impl Region {
    /// Maps the region at `path` (creating and initialising it if new), or a
    /// private one when `path` is `None`.
    pub fn attach(path: Option<&Path>) -> Result<Region, AttachError> {
        let Some(path) = path else {
            return Self::private();
        };
        let fd = open_region_file(path)?;
        let result = Self::map_shared(fd, path);
        if result.is_err() {
            // SAFETY: our descriptor.
            unsafe { libc::close(fd) };
        }
        result
    }

    fn map_shared(fd: i32, path: &Path) -> Result<Region, AttachError> {
        // Serialise initialisation between processes starting together.
        if !lock_byte(fd, INIT_LOCK_OFFSET, libc::F_WRLCK, true) {
            return Err(io_error("lock", path));
        }
        let mapped = (|| {
            // SAFETY: `stat` is plain old data, for which all zeroes is a value.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: fstat on our descriptor into a valid out-buffer.
            if unsafe { libc::fstat(fd, &mut st) } != 0 {
                return Err(io_error("stat", path));
            }
            if st.st_size == 0 {
                // New file: size it and open it to the container's other
                // users (the open mode was already filtered by the umask).
                // SAFETY: plain syscalls on our descriptor.
                unsafe { libc::fchmod(fd, 0o666) };
                // SAFETY: as above.
                if unsafe { libc::ftruncate(fd, REGION_SIZE as libc::off_t) } != 0 {
                    return Err(io_error("size", path));
                }
            } else if (st.st_size as usize) < REGION_SIZE {
                return Err(AttachError::Layout {
                    path: path.display().to_string(),
                    source: RegionError::TooSmall {
                        len: st.st_size as usize,
                    },
                });
            }
            let ptr = map_read_write(fd, REGION_SIZE).ok_or_else(|| io_error("map", path))?;
            // SAFETY: the mapping lives for the rest of the process (never
            // unmapped) and the region is only accessed through atomics.
            let map = unsafe { SharedRegion::from_raw(ptr as *const u8, REGION_SIZE) }.map_err(
                |source| AttachError::Layout {
                    path: path.display().to_string(),
                    source,
                },
            )?;
            if !map.is_initialised() {
                map.initialise();
            }
            map.validate().map_err(|source| AttachError::Layout {
                path: path.display().to_string(),
                source,
            })?;
            Ok(map)
        })();
        lock_byte(fd, INIT_LOCK_OFFSET, libc::F_UNLCK, false);
        let region = Region {
            map: mapped?,
            path: Some(path.to_owned()),
            fd: AtomicI32::new(fd),
            slot: AtomicUsize::new(NO_SLOT),
            scan: AtomicBool::new(false),
        };
        let reclaimed = region.reclaim_dead();
        log!(
            INFO,
            "attached to shared region {} (reclaimed {reclaimed} bytes of exited processes)",
            path.display()
        );
        Ok(region)
    }

    fn private() -> Result<Region, AttachError> {
        // SAFETY: anonymous mapping, checked below. MAP_PRIVATE, so a forked
        // child gets its own copy (reset in `after_fork_in_child`).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                REGION_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io_error("map", Path::new("(private region)")));
        }
        // SAFETY: as in map_shared: live forever, atomics only, zero-filled.
        let map =
            unsafe { SharedRegion::from_raw(ptr as *const u8, REGION_SIZE) }.map_err(|source| {
                AttachError::Layout {
                    path: "(private region)".into(),
                    source,
                }
            })?;
        map.initialise();
        map.processes[0].state.store(SLOT_ACTIVE, Ordering::Relaxed);
        Ok(Region {
            map,
            path: None,
            fd: AtomicI32::new(-1),
            slot: AtomicUsize::new(0),
            scan: AtomicBool::new(false),
        })
    }

    /// The mapped layout.
    pub fn map(&self) -> &'static SharedRegion {
        self.map
    }

    /// The region file, `None` for a private region.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// This process's slot, claiming one on first use.
    #[inline]
    pub fn slot(&self) -> Result<usize, AttachError> {
        let slot = self.slot.load(Ordering::Acquire);
        if slot != NO_SLOT {
            return Ok(slot);
        }
        self.claim_slot()
    }

    /// This process's slot if it has claimed one.
    pub fn claimed_slot(&self) -> Option<usize> {
        Some(self.slot.load(Ordering::Acquire)).filter(|&s| s != NO_SLOT)
    }

    #[cold]
    fn claim_slot(&self) -> Result<usize, AttachError> {
        let _guard = ScanGuard::take(&self.scan);
        let slot = self.slot.load(Ordering::Acquire);
        if slot != NO_SLOT {
            return Ok(slot);
        }
        let path = self
            .path
            .as_deref()
            .unwrap_or(Path::new("(private region)"));
        let mut fd = self.fd.load(Ordering::Acquire);
        if fd < 0 {
            // A child after fork: its own open file description, so its locks
            // are not the parent's.
            fd = open_region_file(path)?;
            if let Err(other) =
                self.fd
                    .compare_exchange(-1, fd, Ordering::AcqRel, Ordering::Acquire)
            {
                // SAFETY: ours, lost the race.
                unsafe { libc::close(fd) };
                fd = other;
            }
        }
        for (index, slot) in self.map.processes.iter().enumerate() {
            if !lock_byte(fd, slot_lock_offset(index), libc::F_WRLCK, false) {
                continue;
            }
            if slot.state.load(Ordering::Acquire) == SLOT_ACTIVE || slot.total_used() != 0 {
                let bytes = slot.reclaim(&self.map.devices);
                log!(
                    INFO,
                    "slot {index}: reclaimed {bytes} bytes of an exited process"
                );
            }
            slot.pid.store(std::process::id(), Ordering::Relaxed);
            slot.state.store(SLOT_ACTIVE, Ordering::Release);
            self.slot.store(index, Ordering::Release);
            return Ok(index);
        }
        log!(WARN, "no free process slot in {}", path.display());
        Err(AttachError::Full {
            path: path.display().to_string(),
        })
    }

    /// Hands back the usage of processes that died without freeing. Returns
    /// the bytes given back.
    pub fn reclaim_dead(&self) -> u64 {
        let fd = self.fd.load(Ordering::Acquire);
        if fd < 0 || self.path.is_none() {
            return 0;
        }
        let _guard = ScanGuard::take(&self.scan);
        let own = self.slot.load(Ordering::Acquire);
        let mut total = 0;
        for (index, slot) in self.map.processes.iter().enumerate() {
            if index == own
                || (slot.state.load(Ordering::Acquire) != SLOT_ACTIVE && slot.total_used() == 0)
            {
                continue;
            }
            // Taking the lock proves the owner is gone (a live owner holds it).
            if lock_byte(fd, slot_lock_offset(index), libc::F_WRLCK, false) {
                total += slot.reclaim(&self.map.devices);
                lock_byte(fd, slot_lock_offset(index), libc::F_UNLCK, false);
            }
        }
        total
    }

    /// In a child after fork: the slot and its lock are the parent's. Drop
    /// our copy of the descriptor (the parent's lock stays, as it shares the
    /// open file description) and claim a slot of our own when needed. A
    /// private region's copy is cleared: the parent's usage is not ours.
    pub fn after_fork_in_child(&self) {
        if self.path.is_none() {
            self.map.processes[0].reclaim(&self.map.devices);
            self.map.processes[0]
                .state
                .store(SLOT_ACTIVE, Ordering::Relaxed);
            return;
        }
        // A thread of the parent may have held it at the fork; it is gone.
        self.scan.store(false, Ordering::Release);
        let fd = self.fd.swap(-1, Ordering::AcqRel);
        if fd >= 0 {
            // SAFETY: our inherited copy; the parent keeps its own.
            unsafe { libc::close(fd) };
        }
        self.slot.store(NO_SLOT, Ordering::Release);
    }
}
