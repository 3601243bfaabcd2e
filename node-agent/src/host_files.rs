//! Files the agent keeps on the host under one directory (`--host-dir`,
//! mounted at the same path into the agent): the interceptor library and
//! the `ld.so.preload` naming it (installed atomically: written beside the
//! target, synced, then renamed over it, so a container starting meanwhile
//! sees the old file or the new one, never half of one), and one directory
//! per GPU container holding its shared accounting region. Directories are
//! owned by the agent and not world-writable; the region file inside is
//! made writable for the container's user (so everything in it is read
//! defensively, see [`crate::region_file`]). Directories of pods that no
//! longer exist are removed. The host-pid socket lives in its own directory
//! (`pid/`), served by [`crate::pid_socket`]. The per-card tenant tables
//! live in `cards/`, owned by the agent (0755, files 0644, written only by
//! [`crate::tenant_tables`]) and mounted read-only into containers.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tessera_api::shared_region::REGION_SIZE;
use thiserror::Error;

/// File name of the interceptor library.
pub const INTERCEPTOR_FILE: &str = "libtessera-cuda.so";
/// Where the interceptor appears inside containers.
pub const CONTAINER_LIB_DIR: &str = "/usr/local/tessera";
/// Where the container's own accounting directory appears inside it.
pub const CONTAINER_SHARED_DIR: &str = "/usr/local/tessera/shared";
/// Name of the accounting region file in that directory.
pub const REGION_FILE: &str = "region.cache";
/// Where the node-wide per-card tenant tables appear inside containers (read-only).
pub const CONTAINER_CARDS_DIR: &str = "/usr/local/tessera/cards";
/// The preload file every GPU container gets.
pub const CONTAINER_PRELOAD: &str = "/etc/ld.so.preload";
/// Where the directory of the host-pid socket appears inside containers
/// (read-only: connecting to a socket needs no write access to the mount).
pub const CONTAINER_PID_DIR: &str = "/usr/local/tessera/pid";
/// File name of the host-pid socket in that directory.
pub const PID_SOCKET_FILE: &str = "pid.sock";

/// Errors writing host files.
#[derive(Debug, Error)]
pub enum HostFileError {
    /// A file system operation failed.
    #[error(
        "could not {action} `{path}`: {source}; check that --host-dir is a writable hostPath mount"
    )]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
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

/// The agent's directory on the host and the paths under it.
#[derive(Debug, Clone)]
pub struct HostLayout {
    root: PathBuf,
}

impl HostLayout {
    /// A layout rooted at `root` (the host path, which the agent sees at the same path).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Host path of the installed interceptor.
    pub fn interceptor(&self) -> PathBuf {
        self.root.join("lib").join(INTERCEPTOR_FILE)
    }

    /// Host path of the preload file mounted as `/etc/ld.so.preload`.
    pub fn preload(&self) -> PathBuf {
        self.root.join("lib").join("ld.so.preload")
    }

    /// Directory of the host-pid socket ([`crate::pid_socket`]); mounted
    /// as a directory, so a socket re-made by a restarted agent is seen.
    pub fn pid_dir(&self) -> PathBuf {
        self.root.join("pid")
    }

    /// Creates the host-pid socket's directory (mode 0755, owned by the
    /// agent) and returns it.
    pub fn prepare_pid_dir(&self) -> Result<PathBuf, HostFileError> {
        let dir = self.pid_dir();
        fs::create_dir_all(&dir).map_err(io("create the host-pid socket directory", &dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .map_err(io("set permissions of", &dir))?;
        Ok(dir)
    }

    /// Host path of the host-pid socket.
    pub fn pid_socket(&self) -> PathBuf {
        self.pid_dir().join(PID_SOCKET_FILE)
    }

    /// Path of the host-pid socket inside a container.
    pub fn container_pid_socket_path() -> String {
        format!("{CONTAINER_PID_DIR}/{PID_SOCKET_FILE}")
    }

    /// Directory holding one subdirectory per GPU container.
    pub fn containers_dir(&self) -> PathBuf {
        self.root.join("containers")
    }

    /// Directory of the per-card tenant tables.
    pub fn cards_dir(&self) -> PathBuf {
        self.root.join("cards")
    }

    /// Creates the directory of the per-card tenant tables (one file per
    /// card UUID, read by every GPU container of the node for SM limits
    /// and priorities, written only by the agent) and returns it: mode
    /// 0755, owned by the agent (a directory left world-writable by an
    /// older agent is closed).
    pub fn prepare_cards_dir(&self) -> Result<PathBuf, HostFileError> {
        let dir = self.cards_dir();
        fs::create_dir_all(&dir).map_err(io("create the card tenants directory", &dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .map_err(io("set permissions of", &dir))?;
        Ok(dir)
    }

    /// A container's id in the tenant tables and the name of its host
    /// directory: `<pod UID>_<container>`.
    pub fn tenant_id(pod_uid: &str, container: &str) -> String {
        format!("{pod_uid}_{container}")
    }

    /// Host directory of one container's accounting region.
    pub fn container_dir(&self, pod_uid: &str, container: &str) -> PathBuf {
        self.containers_dir()
            .join(Self::tenant_id(pod_uid, container))
    }

    /// Path of the interceptor inside a container.
    pub fn container_interceptor_path() -> String {
        format!("{CONTAINER_LIB_DIR}/{INTERCEPTOR_FILE}")
    }

    /// Path of the region file inside a container.
    pub fn container_region_path() -> String {
        format!("{CONTAINER_SHARED_DIR}/{REGION_FILE}")
    }

    /// Installs the interceptor from `source` and writes the preload file,
    /// both atomically. Unchanged files are left alone.
    pub fn install_interceptor(&self, source: &Path) -> Result<(), HostFileError> {
        let bytes = fs::read(source).map_err(io("read the interceptor library", source))?;
        write_atomically(&self.interceptor(), &bytes, 0o755)?;
        let preload = format!("{}\n", Self::container_interceptor_path());
        write_atomically(&self.preload(), preload.as_bytes(), 0o644)
    }

    /// Creates one container's directory (mode 0755, owned by the agent)
    /// and its empty region file, owned by `owner` (uid, gid) when the pod
    /// says which user the container runs as, else writable by any user of
    /// the container. Returns the host directory.
    pub fn prepare_container_dir(
        &self,
        pod_uid: &str,
        container: &str,
        owner: Option<(u32, Option<u32>)>,
    ) -> Result<PathBuf, HostFileError> {
        let dir = self.container_dir(pod_uid, container);
        fs::create_dir_all(&dir).map_err(io("create the container directory", &dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .map_err(io("set permissions of", &dir))?;
        let region = dir.join(REGION_FILE);
        // The directory may exist from before (and is the container's to
        // write in): whatever is at the region's path that is not a regular
        // file (a link, a FIFO, a directory) is removed, never followed, and
        // the file is then changed only through its own descriptor.
        match fs::symlink_metadata(&region) {
            Ok(meta) if meta.is_dir() => fs::remove_dir_all(&region)
                .map_err(io("remove a directory in place of", &region))?,
            Ok(meta) if !meta.is_file() => fs::remove_file(&region)
                .map_err(io("remove a special file in place of", &region))?,
            _ => {}
        }
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&region)
            .map_err(io("create the region file", &region))?;
        if !file.metadata().is_ok_and(|m| m.is_file()) {
            return Err(io("create the region file", &region)(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "something other than a regular file took its place",
            )));
        }
        // Sized (sparse, zero-filled) for the layout, so the first process
        // of the container only has to initialise the header.
        if file.metadata().map(|m| m.len()).unwrap_or(0) == 0 {
            file.set_len(REGION_SIZE as u64)
                .map_err(io("size the region file", &region))?;
        }
        let mode = match owner.map(|(uid, gid)| std::os::unix::fs::fchown(&file, Some(uid), gid)) {
            Some(Ok(())) => 0o660,
            Some(Err(e)) => {
                tracing::warn!(path = %region.display(), error = %e, "could not give the region file to the container user; making it writable for every user of the container instead");
                0o666
            }
            None => 0o666,
        };
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io("set permissions of", &region))?;
        Ok(dir)
    }

    /// The container directories that exist, as (directory, pod UID, container name).
    pub fn container_dirs(&self) -> Vec<(PathBuf, String, String)> {
        let Ok(entries) = fs::read_dir(self.containers_dir()) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let (uid, container) = name.split_once('_')?;
                Some((entry.path(), uid.to_owned(), container.to_owned()))
            })
            .collect()
    }

    /// Removes directories of pods not in `live_pod_uids` that are older
    /// than `min_age` (so a directory made for a pod the listing does not
    /// show yet survives). Returns the removed directories.
    pub fn remove_stale_container_dirs(
        &self,
        live_pod_uids: &HashSet<String>,
        min_age: Duration,
        now: SystemTime,
    ) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        for (dir, uid, _) in self.container_dirs() {
            if live_pod_uids.contains(&uid) {
                continue;
            }
            let old_enough = fs::metadata(&dir)
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|modified| now.duration_since(modified).ok())
                .is_some_and(|age| age >= min_age);
            if !old_enough {
                continue;
            }
            match fs::remove_dir_all(&dir) {
                Ok(()) => removed.push(dir),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "could not remove a stale container directory")
                }
            }
        }
        removed
    }
}

/// Writes `bytes` to `target` through a temporary file in the same
/// directory and a rename. Does nothing when the content is already there.
pub fn write_atomically(target: &Path, bytes: &[u8], mode: u32) -> Result<(), HostFileError> {
    if fs::read(target).is_ok_and(|current| current == bytes) {
        return Ok(());
    }
    let dir = target.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io("create directory", dir))?;
    let file_name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temp)
        .map_err(io("create", &temp))?;
    file.write_all(bytes).map_err(io("write", &temp))?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io("set permissions of", &temp))?;
    file.sync_all().map_err(io("sync", &temp))?;
    drop(file);
    fs::rename(&temp, target).map_err(io("rename into place", target))?;
    Ok(())
}

/// The owner of a path, for tests and diagnostics.
pub fn owner_of(path: &Path) -> Option<(u32, u32, u32)> {
    fs::metadata(path)
        .ok()
        .map(|m| (m.uid(), m.gid(), m.mode() & 0o7777))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_interceptor_and_preload_atomically() {
        let temp = tempfile::tempdir().expect("tempdir");
        let layout = HostLayout::new(temp.path().join("host"));
        let source = temp.path().join("lib.so");
        fs::write(&source, b"v1").expect("write");
        layout.install_interceptor(&source).expect("installs");
        assert_eq!(fs::read(layout.interceptor()).expect("read"), b"v1");
        assert_eq!(
            fs::read_to_string(layout.preload()).expect("read"),
            "/usr/local/tessera/libtessera-cuda.so\n"
        );
        // A reader holding the old file keeps its content after an update.
        let old = fs::File::open(layout.interceptor()).expect("open");
        fs::write(&source, b"v2").expect("write");
        layout.install_interceptor(&source).expect("installs");
        assert_eq!(fs::read(layout.interceptor()).expect("read"), b"v2");
        let mut old_content = Vec::new();
        std::io::Read::read_to_end(&mut &old, &mut old_content).expect("read old");
        assert_eq!(old_content, b"v1");
        let leftovers: Vec<_> = fs::read_dir(layout.interceptor().parent().expect("dir"))
            .expect("list")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "no temporary files remain");
    }

    #[test]
    fn container_dir_is_not_world_writable_and_stale_ones_go() {
        let temp = tempfile::tempdir().expect("tempdir");
        let layout = HostLayout::new(temp.path());
        let dir = layout
            .prepare_container_dir("uid-1", "main", None)
            .expect("dir");
        let (_, _, mode) = owner_of(&dir).expect("meta");
        assert_eq!(mode, 0o755);
        let (_, _, file_mode) = owner_of(&dir.join(REGION_FILE)).expect("meta");
        assert_eq!(file_mode, 0o666);
        layout
            .prepare_container_dir("uid-2", "main", None)
            .expect("dir");
        let live: HashSet<String> = ["uid-2".to_owned()].into();
        let now = SystemTime::now();
        assert!(
            layout
                .remove_stale_container_dirs(&live, Duration::from_secs(60), now)
                .is_empty(),
            "too young"
        );
        let removed = layout.remove_stale_container_dirs(
            &live,
            Duration::from_secs(60),
            now + Duration::from_secs(120),
        );
        assert_eq!(removed, vec![dir]);
        assert_eq!(layout.container_dirs().len(), 1);
    }

    #[test]
    fn preparing_again_never_follows_what_the_container_put_there() {
        let temp = tempfile::tempdir().expect("tempdir");
        let layout = HostLayout::new(temp.path().join("host"));
        let victim = temp.path().join("host-file");
        fs::write(&victim, b"precious").expect("write");
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).expect("chmod");
        let dir = layout
            .prepare_container_dir("uid-1", "main", None)
            .expect("dir");
        // The container swaps its region for a link to a host file.
        fs::remove_file(dir.join(REGION_FILE)).expect("rm");
        std::os::unix::fs::symlink(&victim, dir.join(REGION_FILE)).expect("link");
        layout
            .prepare_container_dir("uid-1", "main", Some((4242, Some(4242))))
            .expect("prepared again");
        assert_eq!(fs::read(&victim).expect("read"), b"precious");
        let (_, _, victim_mode) = owner_of(&victim).expect("meta");
        assert_eq!(victim_mode, 0o600, "the link's target was not chmodded");
        let region = fs::symlink_metadata(dir.join(REGION_FILE)).expect("meta");
        assert!(region.is_file());
        assert_eq!(region.len(), REGION_SIZE as u64);
    }
}
