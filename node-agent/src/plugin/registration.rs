//! The plugin's life with kubelet: serve on a socket in kubelet's plugin
//! directory, register with kubelet's `Registration` service, then watch
//! both sockets. Kubelet deletes every plugin socket and recreates its own
//! when it restarts; when either socket disappears or is replaced, the
//! agent serves on a fresh socket and registers again.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::watch;

use super::service::DevicePluginService;
use super::socket;
use crate::probes::Readiness;
use crate::proto::registration_client::RegistrationClient;
use crate::proto::{DevicePluginOptions, RegisterRequest, API_VERSION};

/// Where and as what the plugin registers.
#[derive(Debug, Clone)]
pub struct PluginSettings {
    /// Kubelet's registration socket (`/var/lib/kubelet/device-plugins/kubelet.sock`).
    pub kubelet_socket: PathBuf,
    /// File name of the plugin's socket, created next to kubelet's.
    pub endpoint: String,
    /// The resource advertised (`nvidia.com/gpu`).
    pub resource_name: String,
    /// How often the sockets are checked.
    pub poll_interval: Duration,
}

impl PluginSettings {
    /// Full path of the plugin's socket.
    pub fn plugin_socket(&self) -> PathBuf {
        self.kubelet_socket
            .parent()
            .unwrap_or(Path::new("."))
            .join(&self.endpoint)
    }
}

/// Errors talking to kubelet.
#[derive(Debug, Error)]
pub enum PluginError {
    /// Kubelet's socket could not be reached.
    #[error("could not connect to kubelet at `{path}`: {source}; check that kubelet runs and the device-plugins directory is mounted into the agent")]
    Connect {
        /// Kubelet's socket.
        path: PathBuf,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// Kubelet refused the registration.
    #[error("kubelet refused to register resource `{resource}`: {status}; another plugin may already own it")]
    Refused {
        /// The resource name.
        resource: String,
        /// Kubelet's answer.
        status: tonic::Status,
    },
    /// The plugin socket could not be created.
    #[error("could not serve on `{path}`: {source}; check that the device-plugins directory is writable")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Registers once with kubelet.
pub async fn register(settings: &PluginSettings) -> Result<(), PluginError> {
    let channel = socket::connect(settings.kubelet_socket.clone(), "http://localhost")
        .await
        .map_err(|source| PluginError::Connect {
            path: settings.kubelet_socket.clone(),
            source,
        })?;
    RegistrationClient::new(channel)
        .register(RegisterRequest {
            version: API_VERSION.to_owned(),
            endpoint: settings.endpoint.clone(),
            resource_name: settings.resource_name.clone(),
            options: Some(DevicePluginOptions {
                pre_start_required: false,
                get_preferred_allocation_available: true,
            }),
        })
        .await
        .map_err(|status| PluginError::Refused {
            resource: settings.resource_name.clone(),
            status,
        })?;
    Ok(())
}

/// Identity of a file (device, inode), to notice a socket being replaced.
fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Serves and stays registered until `shutdown` turns true; `readiness`
/// says whether kubelet currently has the registration.
pub async fn run(
    settings: PluginSettings,
    make_service: impl Fn(watch::Receiver<bool>) -> DevicePluginService,
    mut shutdown: watch::Receiver<bool>,
    readiness: Readiness,
) -> Result<(), PluginError> {
    let plugin_socket = settings.plugin_socket();
    loop {
        let listener = socket::bind(&plugin_socket).map_err(|source| PluginError::Bind {
            path: plugin_socket.clone(),
            source,
        })?;
        let served_identity = identity(&plugin_socket);
        let (stop, stopping) = watch::channel(false);
        let service = make_service(stopping.clone());
        let mut server_stopping = stopping;
        let server = tokio::spawn(socket::serve(listener, service, async move {
            let _ = server_stopping.wait_for(|stop| *stop).await;
        }));
        tracing::info!(socket = %plugin_socket.display(), "device plugin serving");

        // Register as soon as kubelet's socket is there and answers.
        let kubelet_identity = loop {
            if let Some(kubelet) = identity(&settings.kubelet_socket) {
                match register(&settings).await {
                    Ok(()) => {
                        tracing::info!(resource = %settings.resource_name, "registered with kubelet");
                        readiness.set_registered(true);
                        break Some(kubelet);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "registration with kubelet failed; retrying")
                    }
                }
            }
            if wait_or_shutdown(&mut shutdown, settings.poll_interval).await {
                break None;
            }
        };
        // Watch both sockets until one is replaced or we are told to stop.
        if let Some(kubelet_identity) = kubelet_identity {
            loop {
                if wait_or_shutdown(&mut shutdown, settings.poll_interval).await {
                    break;
                }
                if identity(&plugin_socket) != served_identity {
                    tracing::info!("plugin socket was removed (kubelet restarted); serving again and re-registering");
                    break;
                }
                if identity(&settings.kubelet_socket) != Some(kubelet_identity) {
                    tracing::info!(
                        "kubelet socket was recreated (kubelet restarted); re-registering"
                    );
                    break;
                }
            }
        }
        readiness.set_registered(false);
        let _ = stop.send(true);
        match server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "device plugin server ended with an error"),
            Err(e) => tracing::warn!(error = %e, "device plugin server task failed"),
        }
        if *shutdown.borrow() {
            if identity(&plugin_socket) == served_identity {
                let _ = std::fs::remove_file(&plugin_socket);
            }
            return Ok(());
        }
    }
}

/// Sleeps `period`; true when shutdown was requested meanwhile.
async fn wait_or_shutdown(shutdown: &mut watch::Receiver<bool>, period: Duration) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    let stopped = tokio::select! {
        () = tokio::time::sleep(period) => false,
        _ = shutdown.wait_for(|stop| *stop) => true,
    };
    stopped || *shutdown.borrow()
}
