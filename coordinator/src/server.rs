//! Assembles and serves the coordinator: the two dancegrpo services, gRPC health and
//! reflection, and the task that declares silent workers lost.

use std::sync::Arc;

use dancegrpo_proto::{AuthToken, ServerAuth, pb};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};

use crate::config::CoordinatorSettings;
use crate::error::{Error, Result};
use crate::service::CoordinatorService;
use crate::state::CoordinatorState;

/// Binds the listen address with a clear error when the port is taken.
pub async fn bind(settings: &CoordinatorSettings) -> Result<TcpListener> {
    TcpListener::bind(settings.listen).await.map_err(|source| Error::Io {
        context: format!("cannot listen on {}", settings.listen),
        source,
    })
}

/// Refuses to serve a non-loopback address to anyone who can reach it: without a token, only
/// loopback (or `insecure`, said out loud) is allowed.
pub fn check_exposure(
    listen: std::net::SocketAddr,
    token: Option<&AuthToken>,
    insecure: bool,
) -> Result<()> {
    match (token, listen.ip().is_loopback(), insecure) {
        (Some(_), _, _) | (None, true, _) => Ok(()),
        (None, false, true) => {
            tracing::warn!(%listen, "no auth token (--insecure): anyone who can reach this port \
                can act as any worker and change the job");
            Ok(())
        }
        (None, false, false) => Err(Error::InvalidRequest(format!(
            "refusing to listen on {listen} without an auth token: anyone who can reach it \
             could act as a worker. Give the job a token with --auth-token-file FILE or \
             DANCEGRPO_AUTH_TOKEN (the workers and the CLI need the same), or pass --insecure"
        ))),
    }
}

/// Serves the job on `listener` until `shutdown` is cancelled. With a `token`, every call but
/// gRPC health must carry it (reflection included: it describes the job's API).
pub async fn run(
    listener: TcpListener,
    state: Arc<CoordinatorState>,
    token: Option<AuthToken>,
    tls: Option<ServerTlsConfig>,
    shutdown: CancellationToken,
) -> Result<()> {
    let auth = ServerAuth::new(token.clone());
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let svc = CoordinatorService::new(state.clone(), token.is_some());
    health_reporter
        .set_serving::<pb::coordinator_server::CoordinatorServer<CoordinatorService>>()
        .await;
    health_reporter
        .set_serving::<pb::job_service_server::JobServiceServer<CoordinatorService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::InvalidRequest(format!("reflection: {e}")))?;

    let ticker = {
        let state = state.clone();
        let shutdown = shutdown.clone();
        let period = state.settings().heartbeat_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {
                        if let Err(e) = state.expire(tokio::time::Instant::now()) {
                            tracing::error!(cause = %e, "cannot update lost workers");
                        }
                    }
                }
            }
        })
    };

    let addr = listener
        .local_addr()
        .map_err(|source| Error::Io { context: "listener has no address".into(), source })?;
    tracing::info!(%addr, job_id = %state.job_id(), world_size = state.settings().topology.world_size,
        auth = if token.is_some() { "token" } else { "none" },
        tls = if tls.is_some() { "on" } else { "off" }, "coordinator listening");
    let mut server = Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    let result = server
        .add_service(health)
        .add_service(InterceptedService::new(reflection, auth.clone()))
        .add_service(pb::coordinator_server::CoordinatorServer::with_interceptor(
            svc.clone(),
            auth.clone(),
        ))
        .add_service(pb::job_service_server::JobServiceServer::with_interceptor(svc, auth))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown.cancelled())
        .await;
    shutdown.cancel();
    let _ = ticker.await;
    Ok(result?)
}
