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
        std::fs::copy(built_library("libfake_cuda.so"), dir.join("libcuda.so.1")).unwrap();
        std::fs::copy(
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
