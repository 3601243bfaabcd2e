//! Reading a container's accounting region (layout in
//! `tessera_api::shared_region`) defensively. The file lies in the
//! container's host directory, which is mounted read-write into the
//! container: whatever is there, the container may have put there. So:
//!
//! - the path is opened `O_PATH | O_NOFOLLOW` first and `fstat`ed: a
//!   symbolic link (to a FIFO, to another container's region, to anything)
//!   is refused without being followed, and anything but a regular file is
//!   refused without being opened for reading, so a FIFO or a device node
//!   is never opened and nothing can block; a regular file must be exactly
//!   [`REGION_SIZE`] bytes (or empty: no process has initialised it yet),
//!   else only its first 16 bytes are read, to name the layout version of a
//!   region from another interceptor build;
//! - the regular file is then opened for reading through that same
//!   descriptor (`/proc/self/fd/<n>`, so no second path lookup can be
//!   raced), `O_NONBLOCK`, and checked again (same inode, still regular,
//!   same size);
//! - only the byte ranges the agent uses are read
//!   ([`AGENT_READ_RANGES`], about 3 KiB), with positioned reads into one
//!   fixed, aligned buffer ([`RegionBuffer`]) the caller reuses: memory is
//!   bounded by [`REGION_SIZE`] whatever the file's size, and the container
//!   cannot change the bytes while they are being interpreted.
//!
//! The reads are plain blocking system calls on a local regular file:
//! callers run them on a dedicated thread or `spawn_blocking`, never on the
//! async runtime's workers. What to do about a bad file (warn once per
//! change, count it) is [`RegionWarnings`]'s.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tessera_api::shared_region::{
    RegionError, SharedRegion, AGENT_READ_RANGES, MAGIC, REGION_SIZE, VERSION,
};
use thiserror::Error;

/// Why a region file was not read.
#[derive(Debug, Error)]
pub enum RegionFileError {
    /// The path could not be opened (missing, permissions).
    #[error("cannot open `{path}`: {source}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Not a regular file: a symbolic link, FIFO, socket, device or directory.
    #[error("`{path}` is a {kind}, not the regular file the interceptor makes; it was not opened. Something in the container replaced it: restart the container so the agent recreates it")]
    NotRegular {
        /// The path.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// A regular file of the wrong size.
    #[error("`{path}` is {found} bytes, a region of this layout is exactly {expected}; it was not read. It was truncated or grown inside the container, or was made by another interceptor version: restart the container")]
    WrongSize {
        /// The path.
        path: PathBuf,
        /// Its size.
        found: u64,
        /// [`REGION_SIZE`].
        expected: usize,
    },
    /// The file changed between the check and the read.
    #[error("`{path}` was replaced while being read; it is read again on the next pass")]
    Replaced {
        /// The path.
        path: PathBuf,
    },
    /// Reading failed.
    #[error("cannot read `{path}`: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a region this build understands.
    #[error("`{path}`: {source}")]
    Layout {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: RegionError,
    },
}

impl RegionFileError {
    /// A short, stable word for the metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            RegionFileError::Open { .. } => "open",
            RegionFileError::NotRegular { .. } => "not_regular",
            RegionFileError::WrongSize { .. } => "wrong_size",
            RegionFileError::Replaced { .. } => "replaced",
            RegionFileError::Read { .. } => "read",
            RegionFileError::Layout { .. } => "layout",
        }
    }
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// One region's worth of aligned memory, reused from read to read. Only
/// the [`AGENT_READ_RANGES`] of it are ever filled; the rest stays zero.
pub struct RegionBuffer {
    lines: Vec<Line>,
}

impl std::fmt::Debug for RegionBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionBuffer").finish_non_exhaustive()
    }
}

impl Default for RegionBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl RegionBuffer {
    /// A zeroed buffer of [`REGION_SIZE`] bytes.
    pub fn new() -> Self {
        Self {
            lines: vec![Line([0; 64]); REGION_SIZE.div_ceil(64)],
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `Line` is plain bytes; the vector holds at least
        // REGION_SIZE of them, contiguously.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<u8>(), REGION_SIZE) }
    }

    fn region(&self) -> Result<&SharedRegion, RegionError> {
        // SAFETY: a private, 64-byte aligned buffer of at least REGION_SIZE
        // bytes, borrowed for as long as the returned reference; only read.
        unsafe { SharedRegion::from_raw(self.lines.as_ptr().cast::<u8>(), REGION_SIZE) }
    }
}

fn kind_of(mode: libc::mode_t) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFLNK => "symbolic link",
        libc::S_IFIFO => "FIFO",
        libc::S_IFSOCK => "socket",
        libc::S_IFCHR => "character device",
        libc::S_IFBLK => "block device",
        libc::S_IFDIR => "directory",
        libc::S_IFREG => "regular file",
        _ => "special file",
    }
}

fn fstat(fd: &OwnedFd) -> std::io::Result<libc::stat> {
    // SAFETY: fstat on a live descriptor into a zeroed buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

fn open_raw(path: &[u8], flags: libc::c_int) -> std::io::Result<OwnedFd> {
    let c_path = std::ffi::CString::new(path).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: NUL-terminated path; the descriptor is owned below.
    let fd = unsafe { libc::open(c_path.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads the region at `path` into `buffer`. `Ok(None)` when no process
/// has initialised it yet (an empty file, or a zero header); `Ok(Some)`
/// is a validated region of which only [`AGENT_READ_RANGES`] are read (the
/// process slots read as empty).
pub fn read_region_file<'b>(
    path: &Path,
    buffer: &'b mut RegionBuffer,
) -> Result<Option<&'b SharedRegion>, RegionFileError> {
    let err_path = || path.to_owned();
    let handle = open_raw(path.as_os_str().as_bytes(), libc::O_PATH | libc::O_NOFOLLOW).map_err(
        |source| RegionFileError::Open {
            path: err_path(),
            source,
        },
    )?;
    let checked = fstat(&handle).map_err(|source| RegionFileError::Open {
        path: err_path(),
        source,
    })?;
    let regular = checked.st_mode & libc::S_IFMT == libc::S_IFREG;
    if let Err(wrong) = check_regular_and_size(path, &checked) {
        if !regular {
            return Err(wrong);
        }
        // A regular file of the wrong size: only its header is looked at.
    }
    if checked.st_size == 0 {
        return Ok(None);
    }
    // Open the very inode checked above for reading, without a new lookup
    // of `path`; where /proc is missing, by path again (no links followed,
    // non-blocking) and compared with the checked inode.
    let read_flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY;
    let proc_path = format!("/proc/self/fd/{}", handle.as_raw_fd());
    let fd = open_raw(proc_path.as_bytes(), read_flags)
        .or_else(|_| open_raw(path.as_os_str().as_bytes(), read_flags | libc::O_NOFOLLOW))
        .map_err(|source| RegionFileError::Open {
            path: err_path(),
            source,
        })?;
    let opened = fstat(&fd).map_err(|source| RegionFileError::Read {
        path: err_path(),
        source,
    })?;
    if (opened.st_dev, opened.st_ino) != (checked.st_dev, checked.st_ino) {
        return Err(RegionFileError::Replaced { path: err_path() });
    }
    let file = File::from(fd);
    if let Err(wrong) = check_regular_and_size(path, &opened) {
        // A region of another layout version says so in its header: name
        // the version rather than only the size.
        return Err(version_of_other_layout(&file, path).unwrap_or(wrong));
    }
    let bytes = buffer.bytes_mut();
    for range in AGENT_READ_RANGES {
        let offset = range.start as u64;
        file.read_exact_at(&mut bytes[range], offset)
            .map_err(|source| match source.kind() {
                // Shrunk since the check.
                std::io::ErrorKind::UnexpectedEof => RegionFileError::Replaced { path: err_path() },
                _ => RegionFileError::Read {
                    path: err_path(),
                    source,
                },
            })?;
    }
    let layout = |source| RegionFileError::Layout {
        path: err_path(),
        source,
    };
    let region = buffer.region().map_err(layout)?;
    if !region.is_initialised() {
        return Ok(None);
    }
    region.validate().map_err(layout)?;
    Ok(Some(region))
}

/// For a regular file of the wrong size: [`RegionError::BadVersion`] when
/// its first bytes are a Tessera region header of another layout version.
fn version_of_other_layout(file: &File, path: &Path) -> Option<RegionFileError> {
    let mut header = [0u8; 16];
    file.read_exact_at(&mut header, 0).ok()?;
    let magic = u64::from_le_bytes(header[..8].try_into().ok()?);
    let version = u32::from_le_bytes(header[8..12].try_into().ok()?);
    (magic == MAGIC && version != VERSION).then(|| RegionFileError::Layout {
        path: path.to_owned(),
        source: RegionError::BadVersion { found: version },
    })
}

fn check_regular_and_size(path: &Path, st: &libc::stat) -> Result<(), RegionFileError> {
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(RegionFileError::NotRegular {
            path: path.to_owned(),
            kind: kind_of(st.st_mode),
        });
    }
    let size = u64::try_from(st.st_size).unwrap_or(u64::MAX);
    if size != 0 && size != REGION_SIZE as u64 {
        return Err(RegionFileError::WrongSize {
            path: path.to_owned(),
            found: size,
            expected: REGION_SIZE,
        });
    }
    Ok(())
}

/// Labels of [`RegionWarnings`]' counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegionLabels {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Container name.
    pub container: String,
    /// [`RegionFileError::reason`].
    pub reason: String,
}

/// Who a region belongs to, for warnings.
#[derive(Debug, Clone, Copy)]
pub struct RegionOwner<'a> {
    /// Pod namespace.
    pub namespace: &'a str,
    /// Pod name.
    pub pod: &'a str,
    /// Container name.
    pub container: &'a str,
}

/// What the agent does about bad region files: a warning per container
/// when what is wrong changes (not on every read), an info line when the
/// file is readable again, and every failed read counted in
/// `tessera_region_read_failures_total` (labels: the pod, the container,
/// the reason). Shared by the metrics and the tenant-table aggregation.
#[derive(Clone, Debug, Default)]
pub struct RegionWarnings {
    last: Arc<Mutex<HashMap<PathBuf, String>>>,
    failures: Family<RegionLabels, Counter>,
}

impl RegionWarnings {
    /// No warnings yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The counter family, to register in a metrics registry.
    pub fn family(&self) -> Family<RegionLabels, Counter> {
        self.failures.clone()
    }

    /// Records the outcome of reading `owner`'s region at `path`.
    pub fn observe<T>(
        &self,
        owner: RegionOwner<'_>,
        path: &Path,
        outcome: &Result<T, RegionFileError>,
    ) {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        match outcome {
            Ok(_) => {
                if last.remove(path).is_some() {
                    tracing::info!(namespace = owner.namespace, pod = owner.pod, container = owner.container, path = %path.display(), "the container's accounting region is readable again");
                }
            }
            Err(error) => {
                self.failures
                    .get_or_create(&RegionLabels {
                        namespace: owner.namespace.to_owned(),
                        pod: owner.pod.to_owned(),
                        container: owner.container.to_owned(),
                        reason: error.reason().to_owned(),
                    })
                    .inc();
                let message = error.to_string();
                if last.get(path) != Some(&message) {
                    tracing::warn!(namespace = owner.namespace, pod = owner.pod, container = owner.container, error = %message, "ignoring the container's accounting region (its usage and launch figures are not used until it is fixed)");
                    last.insert(path.to_owned(), message);
                }
            }
        }
    }

    /// Forgets containers whose region is not in `live` (they are gone).
    pub fn retain(&self, live: impl Fn(&Path) -> bool) {
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|path, _| live(path));
    }

    /// The current problem of the region at `path`, if any.
    pub fn current(&self, path: &Path) -> Option<String> {
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(path)
            .cloned()
    }

    /// Failed reads counted for one container and reason.
    pub fn failures(&self, owner: RegionOwner<'_>, reason: &str) -> u64 {
        self.failures
            .get_or_create(&RegionLabels {
                namespace: owner.namespace.to_owned(),
                pod: owner.pod.to_owned(),
                container: owner.container.to_owned(),
                reason: reason.to_owned(),
            })
            .get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    /// A valid region file at `path` with `used` bytes charged on card 0.
    fn write_region(path: &Path, used: u64) {
        let mut buffer = RegionBuffer::new();
        let bytes = buffer.bytes_mut().as_mut_ptr();
        // SAFETY: aligned, REGION_SIZE bytes, used only here.
        let region = unsafe { SharedRegion::from_raw(bytes, REGION_SIZE) }.expect("region");
        region.initialise();
        region.charge(0, 0, used, u64::MAX).expect("fits");
        region.publish[0].beat_ns.store(42, Ordering::Relaxed);
        std::fs::write(path, &*buffer.bytes_mut()).expect("write");
    }

    /// Peak resident memory of this process, bytes.
    fn peak_rss() -> u64 {
        // SAFETY: getrusage into a zeroed buffer.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
        u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024
    }

    /// Runs `read` on its own thread; fails the test if it has not returned
    /// after a minute (a guard against a hang, not a timing assertion).
    fn within_a_minute<T: Send + 'static>(read: impl FnOnce() -> T + Send + 'static) -> T {
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(read());
        });
        result
            .recv_timeout(Duration::from_secs(60))
            .expect("the read hung")
    }

    fn read(path: &Path) -> Result<Option<u64>, RegionFileError> {
        let mut buffer = RegionBuffer::new();
        read_region_file(path, &mut buffer).map(|r| r.map(|r| r.device_used(0)))
    }

    #[test]
    fn reads_a_good_region_and_an_empty_one() {
        let temp = tempfile::tempdir().expect("tempdir");
        let path = temp.path().join("region.cache");
        std::fs::write(&path, b"").expect("write");
        assert_eq!(read(&path).expect("empty is fine"), None);
        std::fs::write(&path, vec![0; REGION_SIZE]).expect("write");
        assert_eq!(read(&path).expect("zero header is fine"), None);
        write_region(&path, 1234);
        assert_eq!(read(&path).expect("reads"), Some(1234));
        // Only the agent's ranges are read: the process slots stay empty.
        let mut buffer = RegionBuffer::new();
        let region = read_region_file(&path, &mut buffer)
            .expect("reads")
            .expect("initialised");
        assert!(region.active_processes().is_empty());
        assert_eq!(region.publish[0].beat_ns.load(Ordering::Relaxed), 42);
    }

    #[test]
    fn a_huge_file_is_refused_without_reading_it() {
        let temp = tempfile::tempdir().expect("tempdir");
        let path = temp.path().join("region.cache");
        write_region(&path, 1);
        // `truncate -s 300M` inside the container.
        File::options()
            .write(true)
            .open(&path)
            .expect("open")
            .set_len(300 << 20)
            .expect("grow");
        let before = peak_rss();
        let outcome = {
            let path = path.clone();
            within_a_minute(move || read(&path))
        };
        assert!(
            matches!(outcome, Err(RegionFileError::WrongSize { found, .. }) if found == 300 << 20),
            "{outcome:?}"
        );
        let grown = peak_rss().saturating_sub(before);
        assert!(
            grown < 64 << 20,
            "reading a 300 MiB file raised peak memory by {grown} bytes"
        );
    }

    #[test]
    fn links_fifos_and_other_files_are_refused_without_hanging() {
        let temp = tempfile::tempdir().expect("tempdir");
        let other = temp.path().join("other-container-region.cache");
        write_region(&other, 99);
        let fifo = temp.path().join("fifo");
        let c_fifo = std::ffi::CString::new(fifo.as_os_str().as_bytes()).expect("path");
        // SAFETY: NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o666) }, 0);

        /// Puts something at the path the agent will read.
        type Make<'a> = Box<dyn Fn(&Path) + 'a>;
        let cases: Vec<(&str, Make<'_>, &str)> = vec![
            (
                "symlink to a FIFO",
                Box::new(|p: &Path| symlink(&fifo, p).expect("link")),
                "not_regular",
            ),
            (
                "a FIFO itself",
                Box::new(|p: &Path| {
                    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).expect("path");
                    // SAFETY: NUL-terminated path.
                    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
                }),
                "not_regular",
            ),
            (
                "symlink to another container's region",
                Box::new(|p: &Path| symlink(&other, p).expect("link")),
                "not_regular",
            ),
            (
                "a directory",
                Box::new(|p: &Path| std::fs::create_dir(p).expect("dir")),
                "not_regular",
            ),
            (
                "wrong size",
                Box::new(|p: &Path| std::fs::write(p, vec![0; REGION_SIZE - 64]).expect("write")),
                "wrong_size",
            ),
            (
                "garbage of the right size",
                Box::new(|p: &Path| std::fs::write(p, vec![0xAB; REGION_SIZE]).expect("write")),
                "layout",
            ),
            ("missing", Box::new(|_: &Path| {}), "open"),
        ];
        let warnings = RegionWarnings::new();
        for (i, (name, make, reason)) in cases.into_iter().enumerate() {
            let path = temp.path().join(format!("case-{i}"));
            make(&path);
            let outcome = {
                let path = path.clone();
                within_a_minute(move || read(&path))
            };
            let error = outcome.expect_err(name);
            assert_eq!(error.reason(), reason, "{name}: {error}");
            let owner = RegionOwner {
                namespace: "ns",
                pod: "p",
                container: name,
            };
            warnings.observe(owner, &path, &Err::<(), _>(error));
            warnings.observe(owner, &path, &read(&path));
            assert_eq!(warnings.failures(owner, reason), 2, "{name}: counted");
            assert!(warnings.current(&path).is_some(), "{name}");
        }
        // The other container's file was neither followed nor changed.
        assert_eq!(read(&other).expect("still fine"), Some(99));
    }

    #[test]
    fn a_region_of_another_layout_version_is_named_by_its_version() {
        let temp = tempfile::tempdir().expect("tempdir");
        let path = temp.path().join("region.cache");
        // A version-2 region (before the publish block): shorter.
        let mut bytes = vec![0u8; REGION_SIZE - 1024];
        bytes[..8].copy_from_slice(&MAGIC.to_le_bytes());
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        std::fs::write(&path, &bytes).expect("write");
        let error = read(&path).expect_err("refused");
        assert!(
            matches!(
                error,
                RegionFileError::Layout {
                    source: RegionError::BadVersion { found: 2 },
                    ..
                }
            ),
            "{error}"
        );
        assert!(error.to_string().contains("layout version 2"), "{error}");
        // Not a region at all: the size is what is wrong.
        std::fs::write(&path, vec![1u8; 100]).expect("write");
        assert_eq!(read(&path).expect_err("refused").reason(), "wrong_size");
    }

    #[test]
    fn warnings_clear_when_the_file_is_good_again() {
        let temp = tempfile::tempdir().expect("tempdir");
        let path = temp.path().join("region.cache");
        std::fs::write(&path, b"short").expect("write");
        let warnings = RegionWarnings::new();
        let owner = RegionOwner {
            namespace: "ns",
            pod: "p",
            container: "c",
        };
        warnings.observe(owner, &path, &read(&path));
        assert!(warnings.current(&path).expect("bad").contains("5 bytes"));
        std::fs::remove_file(&path).expect("remove");
        write_region(&path, 7);
        warnings.observe(owner, &path, &read(&path));
        assert_eq!(warnings.current(&path), None);
        warnings.observe(owner, &path, &read(&temp.path().join("nope")));
        warnings.retain(|p| p == path);
        assert_eq!(warnings.current(&temp.path().join("nope")), None);
    }
}
