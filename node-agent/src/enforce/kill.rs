//! Killing one process safely. Between reading NVML's list and the kill,
//! the process may have exited and its pid been reused by someone else. So
//! the pid is pinned first (`pidfd_open`), its cgroup owner read again and
//! compared with the owner the decision was made for, and only then is
//! SIGKILL sent through the pidfd, which cannot reach a different process.
//! Kernels older than 5.3 (no pidfd) get the same check followed by
//! `kill(2)`. Pid 1 and the agent's own pid are refused outright.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use thiserror::Error;

use super::cgroup::{read_owner, ProcessOwner};

/// Why a process was not killed.
#[derive(Debug, Error)]
pub enum KillError {
    /// The process exited before the kill: nothing to do.
    #[error("process {pid} is already gone")]
    Gone {
        /// The pid.
        pid: u32,
    },
    /// The pid now belongs to another cgroup than the one judged.
    #[error("process {pid} no longer belongs to the container it was judged for (pid reused); left alone")]
    Reused {
        /// The pid.
        pid: u32,
    },
    /// Refused: pid 1, the agent itself, or pid 0.
    #[error("refusing to kill process {pid} (init, the agent itself, or no process)")]
    Protected {
        /// The pid.
        pid: u32,
    },
    /// The kernel refused the signal.
    #[error("could not kill process {pid}: {source}; the agent needs the KILL capability (manifests/node-agent.yaml adds it) and hostPID")]
    Signal {
        /// The pid.
        pid: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Sends SIGKILL to `pid` if it still belongs to `expected` (read again
/// from `proc_root`).
pub fn kill_if_still_owned(
    proc_root: &Path,
    pid: u32,
    expected: &ProcessOwner,
) -> Result<(), KillError> {
    if pid <= 1 || pid == std::process::id() || *expected == ProcessOwner::Host {
        return Err(KillError::Protected { pid });
    }
    let raw_pid = libc::pid_t::try_from(pid).map_err(|_| KillError::Gone { pid })?;
    let pidfd = match pidfd_open(raw_pid) {
        Ok(fd) => Some(fd),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Err(KillError::Gone { pid }),
        // ENOSYS (kernel before 5.3) or a seccomp filter: check, then kill(2).
        Err(_) => None,
    };
    match read_owner(proc_root, pid) {
        None => return Err(KillError::Gone { pid }),
        Some(owner) if owner != *expected => return Err(KillError::Reused { pid }),
        Some(_) => {}
    }
    let sent = match &pidfd {
        Some(fd) => {
            // SAFETY: a valid pidfd, SIGKILL, no siginfo, no flags.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            }
        }
        // SAFETY: plain kill(2) of a positive pid.
        None => i64::from(unsafe { libc::kill(raw_pid, libc::SIGKILL) }),
    };
    if sent == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    if source.raw_os_error() == Some(libc::ESRCH) {
        return Err(KillError::Gone { pid });
    }
    Err(KillError::Signal { pid, source })
}

fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;

    fn fake_proc(pid: u32, cgroup: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(root.path().join(pid.to_string())).expect("pid dir");
        std::fs::write(root.path().join(format!("{pid}/cgroup")), cgroup).expect("cgroup");
        root
    }

    fn owner() -> ProcessOwner {
        ProcessOwner::Container {
            pod_uid: "0b7c2d52-7f3e-4a8b-9c1d-2e3f4a5b6c7d".into(),
            container_id: "aaaaaaaaaaaa1111".into(),
        }
    }

    const CGROUP: &str = "0::/kubepods/pod0b7c2d52-7f3e-4a8b-9c1d-2e3f4a5b6c7d/aaaaaaaaaaaa1111\n";

    #[test]
    fn kills_a_process_that_still_belongs_to_the_container() {
        let mut child = Command::new("sleep").arg("1000").spawn().expect("sleep");
        let root = fake_proc(child.id(), CGROUP);
        kill_if_still_owned(root.path(), child.id(), &owner()).expect("killed");
        let status = child.wait().expect("reaped");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn leaves_a_process_that_moved_to_another_cgroup() {
        let mut child = Command::new("sleep").arg("1000").spawn().expect("sleep");
        let root = fake_proc(child.id(), "0::/system.slice/other.service\n");
        let err = kill_if_still_owned(root.path(), child.id(), &owner()).expect_err("left");
        assert!(matches!(err, KillError::Reused { .. }), "{err}");
        assert!(child.try_wait().expect("status").is_none(), "still running");
        child.kill().expect("cleanup");
        let _ = child.wait();
    }

    #[test]
    fn refuses_init_itself_and_host_processes() {
        let root = tempfile::tempdir().expect("tempdir");
        for pid in [0, 1, std::process::id()] {
            assert!(matches!(
                kill_if_still_owned(root.path(), pid, &owner()),
                Err(KillError::Protected { .. })
            ));
        }
        assert!(matches!(
            kill_if_still_owned(root.path(), 12345, &ProcessOwner::Host),
            Err(KillError::Protected { .. })
        ));
    }

    #[test]
    fn a_gone_process_is_gone() {
        let mut child = Command::new("true").spawn().expect("true");
        let pid = child.id();
        child.wait().expect("reaped");
        let root = fake_proc(pid, CGROUP);
        let err = kill_if_still_owned(root.path(), pid, &owner()).expect_err("gone");
        assert!(matches!(err, KillError::Gone { .. }), "{err}");
    }
}
