//! gRPC over unix sockets with tonic: serving on a socket path (each
//! accepted connection wrapped in the `:authority` repair) and connecting
//! to one as a client.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint, Server};

use super::authority::AuthorityRepair;
use super::service::DevicePluginService;
use crate::proto::device_plugin_server::DevicePluginServer;

/// Binds `path`, replacing a stale socket file left by an earlier run.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    UnixListener::bind(path)
}

/// Serves the device plugin on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    service: DevicePluginService,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let incoming = UnixListenerStream::new(listener).map(|conn| conn.map(AuthorityRepair::new));
    Server::builder()
        .add_service(DevicePluginServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// A channel to the gRPC server on the unix socket `path`. The URI's host
/// becomes the `:authority` the client sends.
pub async fn connect(path: PathBuf, uri: &str) -> Result<Channel, tonic::transport::Error> {
    Endpoint::try_from(uri.to_owned())?
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
}
