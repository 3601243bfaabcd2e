//! Which pid NVML lists this process under. In the initial (host) pid
//! namespace (the host, `hostPID` pods, bare machines) it is our own pid.
//! Inside a pid namespace (every other pod) some drivers report the host
//! pid, others (580.159.04, seen on an H100) translate it into the caller's
//! namespace, i.e. our own pid again; the host pid comes from the node
//! agent's socket (`TESSERA_PID_SOCKET`), which reads our credentials
//! (`SO_PEERCRED`, translated by the kernel into its host namespace) and
//! writes the pid as 4 bytes little-endian. With it, NVML's list is
//! searched for either pid, and the reading before a first context can be
//! skipped whichever way the driver reports.
//!
//! Asked on the NVML helper thread started at `cuInit` (off the critical
//! path), never at load time; a context made before the answer is in asks
//! itself. The answer is kept together with the pid it was asked for, so a
//! forked child (another pid) asks again. Any failure (no socket, timeout,
//! short answer) means "not known": contexts are then measured card-wide,
//! as before; logged once at debug.

use crate::log::{log, DEBUG};
use crate::state;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// `readlink /proc/self/ns/pid` in the initial pid namespace (its inode
/// number is fixed by the kernel, `PROC_PID_INIT_INO`).
const INITIAL_PID_NAMESPACE: &[u8] = b"pid:[4026531836]";

/// How long the agent's socket may take to connect and answer.
const ANSWER_TIMEOUT: Duration = Duration::from_millis(50);

/// The last answer: `(asking pid << 32) | host pid`, host pid 0 = the
/// question failed for that pid; 0 = never asked.
static ANSWER: AtomicU64 = AtomicU64::new(0);
/// The pid of the process one of whose threads is asking (or has asked):
/// another thread of it waits for that answer instead of asking again; a
/// forked child (another pid) asks itself.
static ASKING: AtomicU32 = AtomicU32::new(0);
/// A failure has been logged (once per process tree is enough).
static FAILURE_LOGGED: AtomicBool = AtomicBool::new(false);

/// Whether this process is in the initial pid namespace, where NVML lists
/// it by its own pid. False with `TESSERA_ASSUME_PID_NAMESPACE=1` (tests).
/// Read once: a process never changes its own pid namespace.
fn in_initial_pid_namespace() -> bool {
    static INITIAL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *INITIAL.get_or_init(|| {
        if state::config().is_ok_and(|c| c.assume_pid_namespace) {
            return false;
        }
        std::fs::read_link("/proc/self/ns/pid")
            .is_ok_and(|target| target.as_os_str().as_encoded_bytes() == INITIAL_PID_NAMESPACE)
    })
}

/// Whether the known-empty shortcut may be used at all (not with
/// `TESSERA_MEASURE_CONTEXT_CARD_WIDE=1`).
fn process_lists_trusted() -> bool {
    !state::config().is_ok_and(|c| c.measure_context_card_wide)
}

/// The pids NVML may list this process under: its own, and inside a pid
/// namespace the host pid the agent told us, if any. Drivers differ: some
/// report host pids, others (seen with 580.159.04) translate them into the
/// caller's pid namespace, so both are looked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NvmlPids {
    /// `getpid()`.
    pub own: u32,
    /// The host pid, when known and different from `own`.
    pub host: Option<u32>,
}

impl NvmlPids {
    /// Whether NVML lists a process of this pid as us.
    pub fn matches(self, pid: u32) -> bool {
        pid == self.own || self.host == Some(pid)
    }
}

/// The pids NVML may list this process under (asking the agent's socket,
/// inside a pid namespace, if this process has not asked yet).
pub fn nvml_pids() -> NvmlPids {
    let own = std::process::id();
    let host = if in_initial_pid_namespace() || !process_lists_trusted() {
        None
    } else {
        match kept_answer(own) {
            Some(answer) => answer,
            None => ask(own),
        }
    };
    NvmlPids {
        own,
        host: host.filter(|&h| h != own),
    }
}

/// Whether NVML surely lists this process under one of [`nvml_pids`]: in
/// the initial pid namespace, or inside another once the agent told us our
/// host pid. Only then may the reading before a first context be skipped.
pub fn listed_by_nvml() -> bool {
    process_lists_trusted()
        && (in_initial_pid_namespace() || {
            let own = std::process::id();
            let answer = match kept_answer(own) {
                Some(answer) => answer,
                None => ask(own),
            };
            answer.is_some()
        })
}

/// Asks the agent's socket now if this process is inside a pid namespace
/// and has not asked yet; for the NVML helper thread.
pub fn learn_in_advance() {
    if process_lists_trusted() && !in_initial_pid_namespace() {
        let me = std::process::id();
        if kept_answer(me).is_none() {
            ask(me);
        }
    }
}

/// The answer kept for pid `me`: `Some(None)` = asked and failed.
fn kept_answer(me: u32) -> Option<Option<u32>> {
    let kept = ANSWER.load(Ordering::Acquire);
    ((kept >> 32) as u32 == me && kept != 0).then(|| Some(kept as u32).filter(|&p| p != 0))
}

/// Asks the socket and keeps the answer for `me`; waits for the answer
/// instead if another thread of this process is already asking.
fn ask(me: u32) -> Option<u32> {
    let path = state::config().ok()?.pid_socket.as_ref()?;
    if ASKING.swap(me, Ordering::AcqRel) == me {
        let deadline = Instant::now() + 2 * ANSWER_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(answer) = kept_answer(me) {
                return answer;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        return None;
    }
    let started = Instant::now();
    let answer = query(path);
    ANSWER.store(
        (u64::from(me) << 32) | u64::from(*answer.as_ref().unwrap_or(&0)),
        Ordering::Release,
    );
    match &answer {
        Ok(host) => log!(
            DEBUG,
            "host pid {host} (own pid {me}) from {} in {} us",
            path.display(),
            started.elapsed().as_micros()
        ),
        Err(e) if !FAILURE_LOGGED.swap(true, Ordering::Relaxed) => log!(
            DEBUG,
            "no host pid from {}: {e}; contexts are measured card-wide",
            path.display()
        ),
        Err(_) => {}
    }
    answer.ok()
}

/// Connects (non-blocking, bounded by [`ANSWER_TIMEOUT`]) and reads the
/// 4-byte answer.
fn query(path: &std::path::Path) -> std::io::Result<u32> {
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let stream = connect_within(path, ANSWER_TIMEOUT)?;
    let mut bytes = [0u8; 4];
    let mut filled = 0;
    while filled < bytes.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        match (&stream).read(&mut bytes[filled..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    match u32::from_le_bytes(bytes) {
        0 => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "pid 0",
        )),
        pid => Ok(pid),
    }
}

/// A unix-socket connection that gives up after `timeout` (a listener
/// whose backlog is full would otherwise block `connect`).
fn connect_within(path: &std::path::Path, timeout: Duration) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::FromRawFd;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is valid; the path is bounds-checked below.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= address.sun_path.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (slot, byte) in address.sun_path.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: plain socket(2); the descriptor is owned by the stream below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: connect(2) with a valid sockaddr_un of the stated length.
    let rc = unsafe {
        libc::connect(
            fd,
            std::ptr::addr_of!(address).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // A unix socket reports a full backlog as EAGAIN (it does not
        // complete later like TCP's EINPROGRESS).
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        let mut poll = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: poll(2) on one valid pollfd.
        let ready = unsafe { libc::poll(&mut poll, 1, timeout.as_millis() as libc::c_int) };
        if ready <= 0 {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
    }
    stream.set_nonblocking(false)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_kept_per_asking_pid() {
        ANSWER.store((42u64 << 32) | 1042, Ordering::Release);
        assert_eq!(kept_answer(42), Some(Some(1042)));
        // A forked child (another pid) has no answer yet.
        assert_eq!(kept_answer(43), None);
        ANSWER.store(42u64 << 32, Ordering::Release);
        assert_eq!(kept_answer(42), Some(None), "a failure is kept too");
        ANSWER.store(0, Ordering::Release);
    }

    #[test]
    fn either_pid_is_ours() {
        let pids = NvmlPids {
            own: 7,
            host: Some(4007),
        };
        assert!(pids.matches(7) && pids.matches(4007));
        assert!(!pids.matches(8));
        let own_only = NvmlPids { own: 7, host: None };
        assert!(own_only.matches(7) && !own_only.matches(4007));
    }

    #[test]
    fn a_missing_socket_is_a_quick_failure() {
        let started = Instant::now();
        assert!(query(std::path::Path::new("/nonexistent/tessera/pid.sock")).is_err());
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn reads_the_pid_a_listener_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pid.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            std::io::Write::write_all(&mut stream, &4_000_123u32.to_le_bytes()).expect("write");
        });
        assert_eq!(query(&path).expect("answer"), 4_000_123);
        server.join().expect("server");
    }
}
