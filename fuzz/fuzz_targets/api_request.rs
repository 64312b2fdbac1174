//! What a remote API client sends after the TLS handshake: HTTP/1.1 requests (methods, paths
//! with percent escapes, queries, headers, chunked or sized bodies) through the same router,
//! role check and body limits as sysd's, to concerns that parse what they are given with
//! sysd's own parsers (an apply body as the user's config, a pull's reference).
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use keelson_api::remote::{Peer, Role};
use keelson_api::{Concerns, Config, Failure, Images};
use keelson_common::api::config::ConfigView;
use keelson_common::api::images::{ImageInfo, ImagesRemoved, PullProgress};
use keelson_common::api::ApplyPlan;
use keelson_spec::Sources;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

struct Parsers;

#[async_trait]
impl Config for Parsers {
    async fn apply(&self, config: String, dry_run: bool) -> Result<ApplyPlan, Failure> {
        let sources = Sources {
            system_dir: "/nonexistent/services.d".into(),
            userdata_file: "/nonexistent/user-data.toml".into(),
            user_file: "/nonexistent/services.toml".into(),
        };
        sources
            .combine(Vec::new(), None, Some(&config))
            .map_err(|e| Failure::bad_request(e.to_string()))?;
        Ok(ApplyPlan {
            dry_run,
            ..ApplyPlan::default()
        })
    }

    fn view(&self) -> Option<ConfigView> {
        None
    }
}

#[async_trait]
impl Images for Parsers {
    fn list(&self) -> Result<Vec<ImageInfo>, Failure> {
        Ok(Vec::new())
    }

    fn pull(&self, reference: &str) -> Result<mpsc::UnboundedReceiver<PullProgress>, Failure> {
        keelson_spec::reference::parse(reference)
            .map_err(|e| Failure::bad_request(e.to_string()))?;
        Ok(mpsc::unbounded_channel().1)
    }

    async fn remove(&self, reference: &str) -> Result<ImagesRemoved, Failure> {
        keelson_spec::reference::parse(reference)
            .map_err(|e| Failure::bad_request(e.to_string()))?;
        Ok(ImagesRemoved::default())
    }

    async fn prune(&self) -> Result<ImagesRemoved, Failure> {
        Ok(ImagesRemoved::default())
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&who, request)) = data.split_first() else {
        return;
    };
    let role = match who % 3 {
        0 => Ok(Role::Admin),
        1 => Ok(Role::Reader),
        _ => Err("no role this server knows".to_string()),
    };
    let peer = Peer {
        name: "fuzz".into(),
        role,
    };
    let concerns = Arc::new(Concerns {
        config: Some(Arc::new(Parsers)),
        images: Some(Arc::new(Parsers)),
        ..Concerns::default()
    });
    runtime().block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let (_stop_tx, stop) = watch::channel(false);
        let served = tokio::spawn(keelson_api::remote::serve_authenticated(
            server, peer, concerns, stop,
        ));
        // The whole request, then the end of what the client sends; read every answer.
        let _ = client.write_all(request).await;
        let _ = client.shutdown().await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut answer)).await;
        drop(client);
        let _ = tokio::time::timeout(Duration::from_secs(5), served).await;
    });
});
