//! The host-pid socket: a unix socket under the agent's host directory,
//! mounted read-only into GPU containers, that tells each connecting
//! process its pid in the host's pid namespace. The agent runs with
//! `hostPID: true`, so the kernel reports a peer's credentials
//! (`SO_PEERCRED`) translated into the host namespace; inside a pod NVML
//! lists processes by exactly those pids, and the interceptor needs its own
//! to read its usage from NVML's process list.
//!
//! Protocol: connect; the agent writes the peer's pid as 4 bytes
//! little-endian and closes. Nothing is read from the peer.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};

/// How long one answer may take before the connection is dropped.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// Errors setting up the socket.
#[derive(Debug, Error)]
pub enum PidSocketError {
    /// A file system or socket operation failed.
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

/// Binds the socket at `path` (a stale one left by an earlier agent is
/// replaced) and makes it connectable by every user (mode 0666): any
/// container user may ask for its own pid, and learns nothing else.
pub fn bind(path: &Path) -> Result<UnixListener, PidSocketError> {
    let io = |action: &'static str| {
        move |source| PidSocketError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io("create the directory of"))?;
    }
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("remove the stale socket")(e)),
    }
    let listener = UnixListener::bind(path).map_err(io("listen on"))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o666))
        .map_err(io("set permissions of"))?;
    Ok(listener)
}

/// Answers every connection with the peer's pid until the task is dropped.
pub async fn serve(listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(answer(stream));
            }
            Err(e) => {
                tracing::warn!(error = %e, "host-pid socket: accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Writes the peer's pid (as the kernel reports it in the agent's pid
/// namespace) and closes.
async fn answer(mut stream: UnixStream) {
    let pid = match stream.peer_cred().map(|cred| cred.pid()) {
        Ok(Some(pid)) if pid > 0 => pid as u32,
        Ok(_) => {
            tracing::debug!("host-pid socket: the peer's pid is not known here; closing");
            return;
        }
        Err(e) => {
            tracing::debug!(error = %e, "host-pid socket: could not read the peer's credentials");
            return;
        }
    };
    let write = async {
        stream.write_all(&pid.to_le_bytes()).await?;
        stream.shutdown().await
    };
    if let Err(e) = tokio::time::timeout(ANSWER_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    {
        tracing::debug!(error = %e, pid, "host-pid socket: could not answer");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;

    #[tokio::test]
    async fn answers_each_peer_with_its_own_pid() {
        let temp = tempfile::tempdir().expect("tempdir");
        let path = temp.path().join("pid").join("pid.sock");
        // A stale file where the socket goes is replaced.
        fs::create_dir_all(path.parent().expect("dir")).expect("dir");
        fs::write(&path, b"stale").expect("write");
        let listener = bind(&path).expect("binds");
        assert_eq!(fs::metadata(&path).expect("meta").mode() & 0o777, 0o666);
        let server = tokio::spawn(serve(listener));
        for _ in 0..2 {
            let path = path.clone();
            let answer = tokio::task::spawn_blocking(move || {
                let mut stream = std::os::unix::net::UnixStream::connect(&path).expect("connect");
                let mut bytes = Vec::new();
                stream.read_to_end(&mut bytes).expect("read");
                bytes
            })
            .await
            .expect("client");
            assert_eq!(answer, std::process::id().to_le_bytes());
        }
        server.abort();
    }
}
