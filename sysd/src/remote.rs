//! `[api.remote]` put in force: the supervisor publishes the effective `[api]` table after boot
//! and every apply; this reads the PEM it names (inline or files on the node), builds the TLS
//! settings and hands them to the remote server (`keelson_api::remote`). A table that cannot be
//! put in force (a file missing, a key that does not match its certificate) is an
//! `api-remote-error` event and the settings in force stay, so a bad rotation never locks the
//! operator out of a node that was reachable.

use std::sync::Arc;

use keelson_api::remote::RemoteTls;
use keelson_common::notice::Notice;
use keelson_spec::api::{ApiSpec, RemoteSpec};
use keelson_spec::ConfigError;
use tokio::sync::{mpsc, watch};

/// Follows `spec`, publishing what the remote server should serve.
pub fn follow(
    mut spec: watch::Receiver<Result<ApiSpec, ConfigError>>,
    notices: mpsc::UnboundedSender<Notice>,
) -> watch::Receiver<Option<Arc<RemoteTls>>> {
    let first = spec.borrow_and_update().clone();
    let initial = match settings(&first) {
        Ok(s) => s,
        Err(err) => {
            let _ = notices.send(Notice::new("api-remote-error", err));
            None
        }
    };
    let (tx, rx) = watch::channel(initial);
    tokio::spawn(async move {
        while spec.changed().await.is_ok() {
            let next = spec.borrow_and_update().clone();
            match settings(&next) {
                Ok(s) => {
                    tx.send_replace(s);
                }
                Err(err) => {
                    let _ = notices.send(Notice::new(
                        "api-remote-error",
                        format!("{err}; the remote API keeps its previous settings"),
                    ));
                }
            }
        }
    });
    rx
}

/// The remote server's settings for a table (None: no remote API).
fn settings(spec: &Result<ApiSpec, ConfigError>) -> Result<Option<Arc<RemoteTls>>, String> {
    let spec = spec
        .as_ref()
        .map_err(|e| format!("remote API: [api] not loaded: {e}"))?;
    let Some(remote) = &spec.remote else {
        return Ok(None);
    };
    build(remote)
        .map(|tls| Some(Arc::new(tls)))
        .map_err(|e| format!("remote API: {e}"))
}

fn build(remote: &RemoteSpec) -> Result<RemoteTls, String> {
    let listen = remote.address().map_err(|e| e.to_string())?;
    let read = |what: &str, pem: &keelson_spec::api::Pem| {
        pem.read()
            .map_err(|e| format!("api.remote.{what}: reading {}: {e}", pem.describe()))
    };
    let ca = read("ca", &remote.ca)?;
    let cert = read("cert", &remote.cert)?;
    let key = read("key", &remote.key)?;
    RemoteTls::new(listen, remote.max_connections as usize, &ca, &cert, &key)
        .map_err(|e| format!("api.remote.{e}"))
}
