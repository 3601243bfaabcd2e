//! The node-wide per-card tenant tables (layout and aggregation in
//! `tessera_api::card_tenants`): the agent is their only writer.
//!
//! - [`TableFiles`] owns one file per card, `<host dir>/cards/<UUID>.tenants`,
//!   mode 0644 in a 0755 directory, both the agent's, mounted read-only into
//!   every GPU container. A file is updated in place through a shared
//!   mapping (entries are seqlocked, so readers never see half an entry),
//!   never truncated. At start a file is reused when it is exactly what the
//!   agent would make (a regular file of the table's size, owned by the
//!   agent, mode 0644, one link, a valid header), so containers that mapped
//!   it keep seeing updates across an agent restart; anything else (a file
//!   an older agent left writable, a link) is replaced by a fresh file
//!   through a temporary file and a rename, which readers notice (new
//!   inode) and re-open.
//! - [`TenantAggregator`] is the loop that fills them, on a thread of its
//!   own (never the async runtime's): every period (`--tenant-table-period-ms`,
//!   100 ms by default) it reads every allocated container's region
//!   defensively ([`crate::region_file`]), takes each container's priority
//!   from its pod (the index the pod sweep keeps), aggregates and publishes.
//!   A bad region is a warning for that container (once per change, and
//!   counted), never an error of the loop. When it finds a container
//!   directory the index does not know yet (a container allocated since the
//!   last sweep), it asks the sweep to run early.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tessera_api::card_tenants::{
    aggregate, priority_of_request, TenantRecord, TenantSource, TenantTable, TABLE_SIZE,
};
use tokio::sync::Notify;

use crate::host_files::{HostFileError, HostLayout};
use crate::metrics::ContainerIndex;
use crate::region_file::{read_region_file, RegionBuffer, RegionWarnings};

/// Mode of a table file: the agent writes, everyone reads.
pub const TABLE_MODE: u32 = 0o644;
/// Default period of the aggregation.
pub const DEFAULT_PERIOD: Duration = Duration::from_millis(100);

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of the tables, the same in
/// every container of the node.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// One table file, mapped shared and read-write (by the agent only).
struct MappedTable {
    ptr: *mut libc::c_void,
}

// SAFETY: the mapping is process-wide memory accessed only through atomics.
unsafe impl Send for MappedTable {}

impl MappedTable {
    fn table(&self) -> &TenantTable {
        // SAFETY: TABLE_SIZE bytes, page-aligned, mapped until drop; the
        // layout is all atomics.
        unsafe { &*(self.ptr as *const TenantTable) }
    }
}

impl Drop for MappedTable {
    fn drop(&mut self) {
        // SAFETY: our own mapping of TABLE_SIZE bytes.
        unsafe { libc::munmap(self.ptr, TABLE_SIZE) };
    }
}

fn io<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> HostFileError + 'a {
    move |source| HostFileError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

fn map_shared(file: &fs::File, path: &Path) -> Result<MappedTable, HostFileError> {
    // SAFETY: a fresh shared mapping of our descriptor, TABLE_SIZE bytes of
    // a file at least that long.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            TABLE_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io("map the card tenant table", path)(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(MappedTable { ptr })
}

/// The agent's table files, one per card.
pub struct TableFiles {
    dir: PathBuf,
    tables: BTreeMap<String, MappedTable>,
}

impl std::fmt::Debug for TableFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableFiles")
            .field("dir", &self.dir)
            .field("cards", &self.tables.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl TableFiles {
    /// Opens (reusing what is sound, replacing the rest) the tables of the
    /// cards `uuids` in `dir`, which must exist and be the agent's.
    pub fn open(dir: &Path, uuids: &[String]) -> Result<Self, HostFileError> {
        let mut tables = BTreeMap::new();
        for uuid in uuids {
            if uuid.is_empty() || uuid.starts_with('.') || uuid.contains('/') {
                tracing::warn!(%uuid, "not a card UUID that can name a file; this card gets no tenant table");
                continue;
            }
            let path = Self::path_in(dir, uuid);
            let table = match Self::reuse(&path) {
                Some(table) => table,
                None => Self::create(dir, uuid, &path)?,
            };
            tables.insert(uuid.clone(), table);
        }
        Ok(Self {
            dir: dir.to_owned(),
            tables,
        })
    }

    fn path_in(dir: &Path, uuid: &str) -> PathBuf {
        dir.join(format!("{uuid}.tenants"))
    }

    /// The file of card `uuid`.
    pub fn path_of(&self, uuid: &str) -> PathBuf {
        Self::path_in(&self.dir, uuid)
    }

    /// The existing file, if it is exactly what this agent makes.
    fn reuse(path: &Path) -> Option<MappedTable> {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .ok()?;
        let meta = file.metadata().ok()?;
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        let sound = meta.file_type().is_file()
            && meta.len() == TABLE_SIZE as u64
            && meta.uid() == me
            && meta.nlink() == 1
            && meta.mode() & 0o7777 == TABLE_MODE;
        if !sound {
            return None;
        }
        let mapped = map_shared(&file, path).ok()?;
        mapped.table().is_valid().then_some(mapped)
    }

    /// A fresh, initialised file put in place with a rename.
    fn create(dir: &Path, uuid: &str, path: &Path) -> Result<MappedTable, HostFileError> {
        let temp = dir.join(format!(".{uuid}.tenants.tmp-{}", std::process::id()));
        match fs::remove_file(&temp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove a stale temporary table", &temp)(e)),
        }
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(TABLE_MODE)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temp)
            .map_err(io("create the card tenant table", &temp))?;
        file.set_permissions(fs::Permissions::from_mode(TABLE_MODE))
            .map_err(io("set permissions of", &temp))?;
        file.set_len(TABLE_SIZE as u64)
            .map_err(io("size the card tenant table", &temp))?;
        let mapped = map_shared(&file, &temp)?;
        mapped.table().initialise();
        fs::rename(&temp, path).map_err(io("rename into place", path))?;
        Ok(mapped)
    }

    /// Makes every card's table hold exactly its entries in `tables` (a
    /// card absent from it is emptied).
    pub fn publish(&self, tables: &BTreeMap<String, Vec<TenantRecord>>) {
        for (uuid, mapped) in &self.tables {
            mapped
                .table()
                .publish(tables.get(uuid).map_or(&[], Vec::as_slice));
        }
    }

    /// The entries of card `uuid`'s table as they are now.
    pub fn records(&self, uuid: &str) -> Option<Vec<TenantRecord>> {
        self.tables.get(uuid).map(|m| m.table().records())
    }
}

/// The loop that fills the tables from the containers' regions.
#[derive(Debug)]
pub struct TenantAggregator {
    files: TableFiles,
    index: ContainerIndex,
    layout: HostLayout,
    warnings: RegionWarnings,
    buffer: RegionBuffer,
    /// Container directories the sweep was asked about already.
    asked: HashSet<String>,
    ask_sweep: Option<Arc<Notify>>,
}

impl TenantAggregator {
    /// An aggregator writing `files` from the containers in `index`
    /// (directories under `layout`), reporting bad regions to `warnings`
    /// and asking for an early sweep through `ask_sweep` when it finds a
    /// container the index does not know.
    pub fn new(
        files: TableFiles,
        index: ContainerIndex,
        layout: HostLayout,
        warnings: RegionWarnings,
        ask_sweep: Option<Arc<Notify>>,
    ) -> Self {
        Self {
            files,
            index,
            layout,
            warnings,
            buffer: RegionBuffer::new(),
            asked: HashSet::new(),
            ask_sweep,
        }
    }

    /// The table files.
    pub fn files(&self) -> &TableFiles {
        &self.files
    }

    /// One pass at the agent's time `now_ns`: read, aggregate, publish.
    /// Returns what was published.
    pub fn run_once(&mut self, now_ns: u64) -> BTreeMap<String, Vec<TenantRecord>> {
        let records = self
            .index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut sources = Vec::with_capacity(records.len());
        for record in &records {
            let outcome = read_region_file(&record.region, &mut self.buffer);
            if let Ok(Some(region)) = &outcome {
                sources.push(TenantSource::from_region(
                    &record.tenant_id(),
                    priority_of_request(record.priority),
                    &record.cards,
                    region,
                ));
            }
            self.warnings
                .observe(record.owner(), &record.region, &outcome);
        }
        self.warnings
            .retain(|path| records.iter().any(|r| r.region == path));
        let tables = aggregate(&sources, now_ns);
        self.files.publish(&tables);
        self.ask_about_unknown(&records);
        tables
    }

    /// Asks the sweep once for every container directory not in the index.
    fn ask_about_unknown(&mut self, records: &[crate::metrics::ContainerRecord]) {
        let Some(notify) = &self.ask_sweep else {
            return;
        };
        let known: HashSet<String> = records.iter().map(|r| r.tenant_id()).collect();
        let present: HashSet<String> = self
            .layout
            .container_dirs()
            .into_iter()
            .map(|(_, uid, container)| HostLayout::tenant_id(&uid, &container))
            .collect();
        self.asked.retain(|id| present.contains(id));
        let mut ask = false;
        for id in present {
            if !known.contains(&id) && self.asked.insert(id) {
                ask = true;
            }
        }
        if ask {
            notify.notify_one();
        }
    }

    /// Runs [`run_once`](Self::run_once) every `period` on a thread of its
    /// own until `stop` is set.
    pub fn spawn(
        mut self,
        period: Duration,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("tessera-tenants".into())
            .spawn(move || {
                tracing::info!(period_ms = period.as_millis(), cards = ?self.files, "card tenant tables: aggregating the containers' launch figures");
                while !stop.load(Ordering::Relaxed) {
                    self.run_once(monotonic_ns());
                    std::thread::sleep(period);
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ContainerRecord;
    use std::os::unix::fs::symlink;
    use std::sync::RwLock;
    use tessera_api::card_tenants::{tenant_key, PRIORITY_HIGH, PRIORITY_LOW};
    use tessera_api::shared_region::{LaunchFigures, SharedRegion, REGION_SIZE};

    const MS: u64 = 1_000_000;

    /// A region file in `layout`'s directory of (`uid`, `container`) whose
    /// publish block for card 0 says `figures` and whose every other
    /// spare word says "high priority" (0).
    fn write_region(layout: &HostLayout, uid: &str, container: &str, figures: LaunchFigures) {
        let dir = layout
            .prepare_container_dir(uid, container, None)
            .expect("dir");
        let mut bytes = vec![0u8; REGION_SIZE + 64];
        let offset = bytes.as_ptr().align_offset(64);
        let slice = &mut bytes[offset..offset + REGION_SIZE];
        // SAFETY: aligned slice of REGION_SIZE bytes, used only here.
        let region =
            unsafe { SharedRegion::from_raw(slice.as_mut_ptr(), REGION_SIZE) }.expect("region");
        region.initialise();
        region.publish[0].publish(figures);
        fs::write(dir.join(crate::host_files::REGION_FILE), &*slice).expect("write");
    }

    fn record(
        layout: &HostLayout,
        uid: &str,
        container: &str,
        priority: Option<u32>,
    ) -> ContainerRecord {
        ContainerRecord {
            namespace: "ns".into(),
            pod: uid.into(),
            container: container.into(),
            region: layout
                .container_dir(uid, container)
                .join(crate::host_files::REGION_FILE),
            cards: vec!["GPU-a".into()],
            card_memory_mib: vec![1024],
            priority,
        }
    }

    fn figures(at: u64, rate: u64) -> LaunchFigures {
        LaunchFigures {
            launch_rate: rate,
            last_launch_ns: at,
            beat_ns: at,
        }
    }

    #[test]
    fn tables_are_the_agents_readable_by_all_and_reused_only_when_sound() {
        let temp = tempfile::tempdir().expect("tempdir");
        let layout = HostLayout::new(temp.path());
        let dir = layout.prepare_cards_dir().expect("dir");
        // What an older agent left: a world-writable directory with a
        // world-writable table, and a link planted for another card.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777)).expect("chmod");
        fs::write(dir.join("GPU-a.tenants"), vec![0u8; TABLE_SIZE]).expect("write");
        fs::set_permissions(dir.join("GPU-a.tenants"), fs::Permissions::from_mode(0o666))
            .expect("chmod");
        let elsewhere = temp.path().join("elsewhere");
        fs::write(&elsewhere, b"keep").expect("write");
        symlink(&elsewhere, dir.join("GPU-b.tenants")).expect("link");

        let dir = layout.prepare_cards_dir().expect("dir");
        let files = TableFiles::open(&dir, &["GPU-a".into(), "GPU-b".into()]).expect("tables");
        let (_, _, dir_mode) = crate::host_files::owner_of(&dir).expect("meta");
        assert_eq!(dir_mode, 0o755);
        for uuid in ["GPU-a", "GPU-b"] {
            let path = files.path_of(uuid);
            let meta = fs::symlink_metadata(&path).expect("meta");
            assert!(
                meta.file_type().is_file(),
                "{uuid}: a regular file, not a link"
            );
            assert_eq!(
                meta.mode() & 0o7777,
                0o644,
                "{uuid}: read-only to containers"
            );
            assert_eq!(meta.len(), TABLE_SIZE as u64);
            // SAFETY: geteuid cannot fail.
            assert_eq!(meta.uid(), unsafe { libc::geteuid() });
        }
        assert_eq!(
            fs::read(&elsewhere).expect("read"),
            b"keep",
            "the link was not followed"
        );

        // A restarted agent keeps the sound file (readers keep their mapping).
        let record = TenantRecord {
            key: 7,
            priority: PRIORITY_LOW,
            last_launch_ns: 1,
            beat_ns: 1,
            launch_rate: 1,
        };
        files.publish(&[("GPU-a".to_owned(), vec![record])].into());
        let inode = fs::metadata(files.path_of("GPU-a")).expect("meta").ino();
        drop(files);
        let files = TableFiles::open(&dir, &["GPU-a".into()]).expect("tables");
        assert_eq!(
            fs::metadata(files.path_of("GPU-a")).expect("meta").ino(),
            inode
        );
        assert_eq!(files.records("GPU-a"), Some(vec![record]));
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .expect("list")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "no temporary files remain");
    }

    #[test]
    fn priority_comes_from_the_pod_and_bad_regions_are_skipped_with_a_warning() {
        let temp = tempfile::tempdir().expect("tempdir");
        let layout = HostLayout::new(temp.path());
        let dir = layout.prepare_cards_dir().expect("dir");
        let files = TableFiles::open(&dir, &["GPU-a".into()]).expect("tables");
        let now = 100_000 * MS;
        // "high": the pod asks for priority 0. "liar": the pod asks for
        // nothing, the container publishes like anyone (nothing it can write
        // carries a priority). "broken": its region was replaced by a link
        // to a FIFO. "huge": truncated to 300 MiB.
        write_region(&layout, "u-high", "main", figures(now - MS, 500));
        write_region(&layout, "u-liar", "main", figures(u64::MAX, 9));
        write_region(&layout, "u-broken", "main", figures(now, 1));
        write_region(&layout, "u-huge", "main", figures(now, 1));
        let fifo = temp.path().join("fifo");
        let c_fifo = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).expect("path");
        // SAFETY: NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o666) }, 0);
        let broken = layout
            .container_dir("u-broken", "main")
            .join("region.cache");
        fs::remove_file(&broken).expect("rm");
        symlink(&fifo, &broken).expect("link");
        let huge = layout.container_dir("u-huge", "main").join("region.cache");
        fs::OpenOptions::new()
            .write(true)
            .open(&huge)
            .expect("open")
            .set_len(300 << 20)
            .expect("grow");
        let index: ContainerIndex = Arc::new(RwLock::new(vec![
            record(&layout, "u-high", "main", Some(0)),
            record(&layout, "u-liar", "main", None),
            record(&layout, "u-broken", "main", Some(0)),
            record(&layout, "u-huge", "main", Some(0)),
        ]));
        let warnings = RegionWarnings::new();
        let mut aggregator = TenantAggregator::new(
            files,
            Arc::clone(&index),
            layout.clone(),
            warnings.clone(),
            None,
        );
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let published = aggregator.run_once(now);
            let _ = done.send((published, aggregator));
        });
        // A guard against a hang, not a timing assertion.
        let (published, aggregator) = result
            .recv_timeout(Duration::from_secs(60))
            .expect("the aggregation hung on a bad region");
        let mut entries = aggregator.files().records("GPU-a").expect("table");
        entries.sort_by_key(|r| r.priority);
        assert_eq!(published["GPU-a"].len(), 2);
        assert_eq!(
            entries,
            vec![
                TenantRecord {
                    key: tenant_key("u-high_main"),
                    priority: PRIORITY_HIGH,
                    last_launch_ns: now - MS,
                    beat_ns: now - MS,
                    launch_rate: 500,
                },
                TenantRecord {
                    key: tenant_key("u-liar_main"),
                    priority: PRIORITY_LOW,
                    last_launch_ns: now,
                    beat_ns: now,
                    launch_rate: 9,
                },
            ]
        );
        for (pod, reason) in [("u-broken", "not_regular"), ("u-huge", "wrong_size")] {
            let owner = crate::region_file::RegionOwner {
                namespace: "ns",
                pod,
                container: "main",
            };
            assert_eq!(warnings.failures(owner, reason), 1, "{pod}");
        }
        // The container's region comes back: it is aggregated again.
        fs::remove_file(&broken).expect("rm");
        let mut aggregator = aggregator;
        write_region(&layout, "u-broken", "main", figures(now, 3));
        assert_eq!(aggregator.run_once(now)["GPU-a"].len(), 3);
        // Its pod is gone: its entry goes too.
        index.write().expect("lock").retain(|r| r.pod != "u-broken");
        assert_eq!(aggregator.run_once(now)["GPU-a"].len(), 2);
        assert_eq!(aggregator.files().records("GPU-a").expect("table").len(), 2);
    }

    #[test]
    fn an_unknown_container_directory_asks_for_one_early_sweep() {
        let temp = tempfile::tempdir().expect("tempdir");
        let layout = HostLayout::new(temp.path());
        let dir = layout.prepare_cards_dir().expect("dir");
        let files = TableFiles::open(&dir, &["GPU-a".into()]).expect("tables");
        let notify = Arc::new(Notify::new());
        let index: ContainerIndex = Arc::new(RwLock::new(Vec::new()));
        let mut aggregator = TenantAggregator::new(
            files,
            Arc::clone(&index),
            layout.clone(),
            RegionWarnings::new(),
            Some(Arc::clone(&notify)),
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let asked = |aggregator: &mut TenantAggregator| {
            aggregator.run_once(1);
            runtime.block_on(async {
                tokio::time::timeout(Duration::from_millis(1), notify.notified())
                    .await
                    .is_ok()
            })
        };
        assert!(!asked(&mut aggregator), "nothing new");
        layout
            .prepare_container_dir("u-new", "main", None)
            .expect("dir");
        assert!(asked(&mut aggregator), "a directory the index lacks");
        assert!(!asked(&mut aggregator), "asked once, not every pass");
        index
            .write()
            .expect("lock")
            .push(record(&layout, "u-new", "main", None));
        assert!(!asked(&mut aggregator));
    }
}
