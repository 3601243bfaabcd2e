//! Opening one card's node-wide tenant table (layout in
//! `tessera_api::card_tenants`) and holding this container's entry in it:
//! the file `<TESSERA_CARD_TENANTS_DIR>/<card UUID>.tenants`, created and
//! initialised by whichever container comes first, mapped shared. Only the
//! SM updater thread uses it, never a launch.

use crate::region::{lock_byte, map_read_write};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use tessera_api::card_tenants::{
    entry_lock_offset, TenantTable, MAX_TENANTS, TABLE_INIT_LOCK_OFFSET, TABLE_SIZE,
};

/// This container's entry in one card's table.
#[derive(Debug)]
pub struct CardTable {
    table: &'static TenantTable,
    entry: usize,
    /// Holds the entry's lock for as long as the process lives (never read,
    /// never closed).
    _lock_fd: i32,
}

impl CardTable {
    /// Opens (creating if needed) the table of card `uuid` under `dir` and
    /// claims a free entry. `None` (after a log line) when the directory is
    /// not usable or the table is full.
    pub fn claim(dir: &Path, uuid: &str) -> Option<CardTable> {
        let path = dir.join(format!("{uuid}.tenants"));
        let c_path = CString::new(path.as_os_str().as_bytes()).ok()?;
        // SAFETY: NUL-terminated path, explicit mode.
        let fd = unsafe {
            libc::open(
                c_path.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC,
                0o666 as libc::c_uint,
            )
        };
        if fd < 0 {
            crate::log::log!(
                crate::log::WARN,
                "cannot open the card tenant table {}: {}; other tenants of the card are seen through NVML only",
                path.display(),
                std::io::Error::last_os_error()
            );
            return None;
        }
        let claimed = Self::map_and_claim(fd);
        if claimed.is_none() {
            // SAFETY: our descriptor.
            unsafe { libc::close(fd) };
            crate::log::log!(
                crate::log::WARN,
                "card tenant table {} is unusable or full",
                path.display()
            );
        }
        claimed
    }

    fn map_and_claim(fd: i32) -> Option<CardTable> {
        if !lock_byte(fd, TABLE_INIT_LOCK_OFFSET, libc::F_WRLCK, true) {
            return None;
        }
        let table = (|| {
            // SAFETY: fstat into a zeroed buffer; plain syscalls on our fd.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            if unsafe { libc::fstat(fd, &mut st) } != 0 {
                return None;
            }
            if (st.st_size as usize) < TABLE_SIZE {
                unsafe { libc::fchmod(fd, 0o666) };
                if unsafe { libc::ftruncate(fd, TABLE_SIZE as libc::off_t) } != 0 {
                    return None;
                }
            }
            let ptr = map_read_write(fd, TABLE_SIZE)?;
            // SAFETY: page-aligned, TABLE_SIZE bytes, never unmapped, atomics only.
            let table: &'static TenantTable = unsafe { &*(ptr as *const TenantTable) };
            if table.magic.load(Ordering::Acquire) == 0 {
                table.initialise();
            }
            table.is_valid().then_some(table)
        })();
        lock_byte(fd, TABLE_INIT_LOCK_OFFSET, libc::F_UNLCK, false);
        let table = table?;
        let entry = (0..MAX_TENANTS)
            .find(|&i| lock_byte(fd, entry_lock_offset(i), libc::F_WRLCK, false))?;
        let e = &table.entries[entry];
        e.last_launch_ns.store(0, Ordering::Relaxed);
        e.beat_ns.store(0, Ordering::Relaxed);
        e.launch_rate.store(0, Ordering::Relaxed);
        e.in_use.store(1, Ordering::Release);
        Some(CardTable {
            table,
            entry,
            _lock_fd: fd,
        })
    }

    /// The mapped table.
    pub fn table(&self) -> &'static TenantTable {
        self.table
    }

    /// Index of our entry.
    pub fn entry(&self) -> usize {
        self.entry
    }
}
