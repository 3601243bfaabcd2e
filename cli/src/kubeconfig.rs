//! Building a kube client for the commands that read a live cluster: the
//! usual kubeconfig lookup (`KUBECONFIG`, `~/.kube/config`, in-cluster),
//! optionally from an explicit file and context.

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};

/// Why no client could be built.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The kubeconfig could not be read or the context is not in it.
    #[error("could not load the kubeconfig{}: {source}; check the file and the context name (`kubectl config get-contexts`)", .path.as_deref().map(|p| format!(" {p}")).unwrap_or_default())]
    Kubeconfig {
        /// The explicit file, if one was given.
        path: Option<String>,
        /// The loader's error.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// No configuration was found at all.
    #[error("found no cluster configuration: {0}; set KUBECONFIG, pass --kubeconfig, or run inside a pod with a service account")]
    Infer(#[from] kube::config::InferConfigError),
    /// The client could not be built from the configuration.
    #[error("could not build a client from the kubeconfig: {0}")]
    Client(#[from] kube::Error),
}

/// A client for `kubeconfig` (default lookup when `None`) and `context`
/// (the current context when `None`).
pub async fn connect(
    kubeconfig: Option<&Path>,
    context: Option<&str>,
) -> Result<kube::Client, ConnectError> {
    let options = KubeConfigOptions {
        context: context.map(str::to_owned),
        ..KubeConfigOptions::default()
    };
    let config = match kubeconfig {
        Some(path) => {
            let wrap = |source| ConnectError::Kubeconfig {
                path: Some(path.display().to_string()),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(wrap)?;
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(wrap)?
        }
        None if context.is_some() => kube::Config::from_kubeconfig(&options)
            .await
            .map_err(|source| ConnectError::Kubeconfig { path: None, source })?,
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}
