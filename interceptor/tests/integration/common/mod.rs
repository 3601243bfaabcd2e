//! Setup shared by the interceptor's end-to-end tests: finding the `.so`
//! files cargo built for this profile, a temporary directory holding the
//! fake driver and NVML installed as `libcuda.so.1` / `libnvidia-ml.so.1`
//! next to the C clients compiled from `tests/programs/` with `cc`, starting
//! a client with the interceptor preloaded, reading its `key=value` output,
//! and reading the shared region file back.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tessera_api::shared_region::{SharedRegion, REGION_SIZE};

/// The fakes, the compiled clients and the interceptor to preload.
#[derive(Debug)]
pub struct Artifacts {
    /// Holds libcuda.so.1, libnvidia-ml.so.1 and the compiled clients.
    pub dir: PathBuf,
    pub interceptor: PathBuf,
}

impl Artifacts {
    /// A new directory (named from `prefix`, kept for the whole test run)
    /// with the fakes installed under the real libraries' names; `build`
    /// compiles the clients into it.
    pub fn prepare(prefix: &str, build: impl FnOnce(&Path)) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("temp dir")
            .keep();
        // Links, not copies: the directory outlives the run, and the fakes
        // are megabytes each.
        std::os::unix::fs::symlink(built_library("libfake_cuda.so"), dir.join("libcuda.so.1"))
            .unwrap();
        std::os::unix::fs::symlink(
            built_library("libfake_nvml.so"),
            dir.join("libnvidia-ml.so.1"),
        )
        .unwrap();
        build(&dir);
        Artifacts {
            dir,
            interceptor: built_library("libtessera_cuda.so"),
        }
    }

    /// `program` from the artifacts directory with the interceptor
    /// preloaded, the fakes on the library path and nothing else of the
    /// test's environment but `env`.
    pub fn command(&self, program: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(self.dir.join(program));
        cmd.args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LD_LIBRARY_PATH", &self.dir)
            .env("LD_PRELOAD", &self.interceptor)
            .envs(env.iter().copied());
        cmd
    }
}

/// `target/<profile>/` of this test binary.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_owned()
}

/// A cdylib built by cargo for this profile: uplifted into `target/<profile>/`
/// when built as a workspace member, else left in `deps/`.
pub fn built_library(file: &str) -> PathBuf {
    let profile = profile_dir();
    [profile.join(file), profile.join("deps").join(file)]
        .into_iter()
        .filter(|p| p.exists())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| {
            panic!(
                "{file} not found under {}; run `cargo test -p tessera-interceptor`",
                profile.display()
            )
        })
}

/// Compiles `tests/programs/<source>` into `dir/<output>` with `defines`,
/// linking `link` (from `dir`) and libdl.
pub fn compile(dir: &Path, source: &str, defines: &[&str], output: &str, link: &[&str]) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/programs")
        .join(source);
    let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(defines)
        .arg("-O1")
        .arg("-o")
        .arg(dir.join(output))
        .arg(&src)
        .arg(format!("-L{}", dir.display()))
        .args(link)
        .arg("-ldl")
        .status()
        .expect("a C compiler (cc) is needed for these tests");
    assert!(status.success(), "compiling {source} {defines:?} failed");
}

/// The `key=value` pairs in `text` (later ones win).
pub fn key_values(text: &str) -> HashMap<String, String> {
    text.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// `key=value` pairs of every line of stdout (later lines win).
pub fn values(output: &Output) -> HashMap<String, String> {
    key_values(&String::from_utf8_lossy(&output.stdout))
}

/// The number printed as `key=` on stdout.
pub fn value(output: &Output, key: &str) -> u64 {
    values(output)
        .get(key)
        .unwrap_or_else(|| {
            panic!(
                "no {key} in output:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
        })
        .parse()
        .unwrap()
}

/// Copies the shared region file into an aligned buffer and passes it on.
pub fn with_region<R>(path: impl AsRef<Path>, f: impl FnOnce(&SharedRegion) -> R) -> R {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(bytes.len(), REGION_SIZE);
    let layout = std::alloc::Layout::from_size_align(REGION_SIZE, 64).unwrap();
    // SAFETY: aligned buffer of REGION_SIZE bytes, filled from the file and
    // freed after use; the region is plain atomics.
    unsafe {
        let buf = std::alloc::alloc(layout);
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf, REGION_SIZE);
        let result = f(SharedRegion::from_raw(buf, REGION_SIZE).unwrap());
        std::alloc::dealloc(buf, layout);
        result
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds (the clock of the tables).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One container as the node agent knows it from its allocation.
#[derive(Debug, Clone)]
pub struct Tenant {
    /// What the agent passes as `TESSERA_TENANT_ID`.
    pub id: String,
    /// The allocation's priority (`tessera_api::card_tenants::PRIORITY_*`).
    pub priority: u32,
    /// Its region file.
    pub region: PathBuf,
    /// Its cards' UUIDs in container order.
    pub cards: Vec<String>,
}

/// The node agent's side of the tenant tables, as the tests need it: the
/// table files created read-only for everyone but the writer (0644), and a
/// thread that every 20 ms reads each tenant's region and runs the agent's
/// pure aggregation (`tessera_api::card_tenants::aggregate`) into them.
/// Stops when dropped.
#[derive(Debug)]
pub struct TableAggregator {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TableAggregator {
    /// Creates the tables of `cards` under `dir` and starts aggregating `tenants`.
    pub fn start(dir: &Path, cards: &[&str], tenants: Vec<Tenant>) -> TableAggregator {
        use std::os::unix::fs::OpenOptionsExt;
        use tessera_api::card_tenants::{TenantTable, TABLE_SIZE};
        let tables: Vec<(String, usize)> = cards
            .iter()
            .map(|uuid| {
                let path = dir.join(format!("{uuid}.tenants"));
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .open(&path)
                    .unwrap();
                file.set_len(TABLE_SIZE as u64).unwrap();
                // SAFETY: a fresh shared mapping of the file, never unmapped
                // (the test process ends soon), accessed through atomics.
                let ptr = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        TABLE_SIZE,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED,
                        std::os::fd::AsRawFd::as_raw_fd(&file),
                        0,
                    )
                };
                assert_ne!(ptr, libc::MAP_FAILED);
                // SAFETY: as above.
                unsafe { &*(ptr as *const TenantTable) }.initialise();
                ((*uuid).to_owned(), ptr as usize)
            })
            .collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let sources: Vec<_> = tenants
                        .iter()
                        .filter(|t| {
                            std::fs::metadata(&t.region)
                                .is_ok_and(|m| m.len() == REGION_SIZE as u64)
                        })
                        .filter_map(|t| {
                            with_region(&t.region, |r| {
                                r.validate().is_ok().then(|| {
                                    tessera_api::card_tenants::TenantSource::from_region(
                                        &t.id, t.priority, &t.cards, r,
                                    )
                                })
                            })
                        })
                        .collect();
                    let built = tessera_api::card_tenants::aggregate(&sources, monotonic_ns());
                    for (uuid, ptr) in &tables {
                        // SAFETY: the mapping made above.
                        let table = unsafe { &*(*ptr as *const TenantTable) };
                        table.publish(built.get(uuid).map_or(&[], Vec::as_slice));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            })
        };
        TableAggregator {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for TableAggregator {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
