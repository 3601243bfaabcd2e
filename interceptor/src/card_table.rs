//! Reading one card's node-wide tenant table (layout in
//! `tessera_api::card_tenants`): the file
//! `<TESSERA_CARD_TENANTS_DIR>/<card UUID>.tenants`, written by the node
//! agent and mounted read-only into the container. It is opened read-only
//! and mapped `PROT_READ`: nothing in it can be written from here. The
//! container's own entry (found by the key of `TESSERA_TENANT_ID`) is left
//! out of what the table says about the card's other tenants.
//!
//! The agent updates the file in place; should it ever replace it (a new
//! agent finding a file it did not make), the new inode is noticed within
//! [`RECHECK_NS`] and mapped instead. A table that is missing or not (yet)
//! valid is retried at the same pace. Only the SM updater thread uses this,
//! never a launch.

use crate::log::{log, INFO, WARN};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use tessera_api::card_tenants::{Neighbours, TenantTable, TABLE_SIZE};

/// How often the path is checked for a replaced (or newly created) file.
pub const RECHECK_NS: u64 = 1_000_000_000;

/// A read-only mapping of one table file.
#[derive(Debug)]
struct Mapped {
    table: &'static TenantTable,
    ptr: *mut libc::c_void,
    dev: u64,
    ino: u64,
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: our own mapping of TABLE_SIZE bytes; `table` goes with it.
        unsafe { libc::munmap(self.ptr, TABLE_SIZE) };
    }
}

/// One card's table as this container sees it.
#[derive(Debug)]
pub struct CardTable {
    path: PathBuf,
    own_key: u64,
    mapped: Option<Mapped>,
    checked_at_ns: Option<u64>,
    warned: bool,
}

/// `(st_dev, st_ino)` of `path`, following nothing special.
fn identity(path: &Path) -> Option<(u64, u64)> {
    let c_path = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: `stat` is plain old data, for which all zeroes is a value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out-buffer.
    (unsafe { libc::stat(c_path.as_ptr(), &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

impl CardTable {
    /// The table of card `uuid` under `dir`, for the tenant keyed
    /// `own_key`. Opened on the first look.
    pub fn new(dir: &Path, uuid: &str, own_key: u64) -> CardTable {
        CardTable {
            path: dir.join(format!("{uuid}.tenants")),
            own_key,
            mapped: None,
            checked_at_ns: None,
            warned: false,
        }
    }

    /// What the card's other tenants do at `now_ns` (see
    /// `TenantTable::neighbours`); `None` while the table cannot be read.
    pub fn neighbours(&mut self, now_ns: u64, window_ns: u64) -> Option<Neighbours> {
        let due = self
            .checked_at_ns
            .is_none_or(|at| now_ns.saturating_sub(at) >= RECHECK_NS);
        if due {
            self.checked_at_ns = Some(now_ns);
            self.refresh();
        }
        let table = self.mapped.as_ref()?.table;
        Some(table.neighbours(self.own_key, now_ns, window_ns))
    }

    /// Maps the file if it is not mapped, or was replaced.
    fn refresh(&mut self) {
        let current = identity(&self.path);
        if let (Some(mapped), Some((dev, ino))) = (&self.mapped, current) {
            if (mapped.dev, mapped.ino) == (dev, ino) && mapped.table.is_valid() {
                return;
            }
        }
        match Self::map(&self.path) {
            Ok(mapped) => {
                if self.warned || self.mapped.is_some() {
                    log!(INFO, "card tenant table {} (re)opened", self.path.display());
                }
                self.mapped = Some(mapped);
                self.warned = false;
            }
            Err(reason) => {
                // Keep a valid old mapping rather than none at all.
                if self.mapped.as_ref().is_some_and(|m| !m.table.is_valid()) {
                    self.mapped = None;
                }
                if !self.warned {
                    self.warned = true;
                    log!(
                        WARN,
                        "cannot read the card tenant table {}: {reason}; other tenants of the card are seen through NVML only until the node agent provides it",
                        self.path.display()
                    );
                }
            }
        }
    }

    fn map(path: &Path) -> Result<Mapped, String> {
        let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
        // SAFETY: NUL-terminated path; read-only, no creation.
        let fd = unsafe { libc::open(c_path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        let mapped = (|| {
            // SAFETY: `stat` is plain old data, for which all zeroes is a value.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: fstat on our descriptor into a valid out-buffer.
            if unsafe { libc::fstat(fd, &mut st) } != 0 {
                return Err(std::io::Error::last_os_error().to_string());
            }
            if st.st_mode & libc::S_IFMT != libc::S_IFREG || (st.st_size as usize) < TABLE_SIZE {
                return Err(format!(
                    "not a regular file of {TABLE_SIZE} bytes (mode {:o}, {} bytes)",
                    st.st_mode, st.st_size
                ));
            }
            // SAFETY: a fresh read-only shared mapping of our descriptor.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    TABLE_SIZE,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd,
                    0,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error().to_string());
            }
            // SAFETY: page-aligned, TABLE_SIZE bytes, mapped until `Mapped`
            // drops; only loaded through atomics (the writer is the agent).
            let table: &'static TenantTable = unsafe { &*(ptr as *const TenantTable) };
            let mapped = Mapped {
                table,
                ptr,
                dev: st.st_dev,
                ino: st.st_ino,
            };
            if !table.is_valid() {
                return Err("its header is not a version this build reads".to_owned());
            }
            Ok(mapped)
        })();
        // SAFETY: our descriptor; the mapping outlives it.
        unsafe { libc::close(fd) };
        mapped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use tessera_api::card_tenants::{tenant_key, TenantRecord, PRIORITY_HIGH};

    /// Writes a valid table holding `records` at `path` (as the agent would).
    fn write_table(path: &Path, records: &[TenantRecord]) {
        let layout = std::alloc::Layout::new::<TenantTable>();
        // SAFETY: all-atomic layout (zero is valid), freed below.
        let bytes = unsafe {
            let ptr = std::alloc::alloc_zeroed(layout);
            let table = &*(ptr as *const TenantTable);
            table.initialise();
            table.publish(records);
            let bytes = std::slice::from_raw_parts(ptr, TABLE_SIZE).to_vec();
            std::alloc::dealloc(ptr, layout);
            bytes
        };
        let temp = path.with_extension("tmp");
        std::fs::write(&temp, bytes).unwrap();
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o444)).unwrap();
        std::fs::rename(&temp, path).unwrap();
    }

    #[test]
    fn reads_others_leaves_itself_out_and_follows_a_replaced_file() {
        let dir = tempfile::tempdir().unwrap();
        let now = 5_000_000_000;
        let me = tenant_key("me");
        let mut table = CardTable::new(dir.path(), "GPU-x", me);
        assert_eq!(table.neighbours(now, 500_000_000), None, "no file yet");
        let entry = |key, priority| TenantRecord {
            key,
            priority,
            last_launch_ns: now,
            beat_ns: now,
            launch_rate: 10,
        };
        write_table(
            &dir.path().join("GPU-x.tenants"),
            &[entry(me, PRIORITY_HIGH)],
        );
        // Not looked at again before RECHECK_NS.
        assert_eq!(table.neighbours(now + 1, 500_000_000), None);
        let later = now + RECHECK_NS;
        let alone = table.neighbours(later, RECHECK_NS).expect("mapped");
        assert!(!alone.other_active, "its own entry is not a neighbour");
        write_table(
            &dir.path().join("GPU-x.tenants"),
            &[entry(me, 1), entry(tenant_key("other"), PRIORITY_HIGH)],
        );
        let seen = table
            .neighbours(later + RECHECK_NS, 2 * RECHECK_NS)
            .expect("re-mapped");
        assert!(seen.other_active && seen.high_priority_active);
        assert_eq!(seen.others_launch_rate, 10);
    }
}
