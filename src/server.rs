//! Wiring: the HTTP server and its routes, housekeeping, and graceful shutdown.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::{self, Next};
use actix_web::{App, HttpServer, web};
use tokio::sync::watch;

use crate::api;
use crate::backend::redis::RedisBackend;
use crate::broker::{Broker, new_node_id};
use crate::config::Config;
use crate::dashboard;
use crate::stats::StatsPublisher;
use crate::ws;

/// The HTTP layer's per-connection write buffer.
const WRITE_BUFFER_BYTES: usize = 8 * 1024;

/// A bound, not yet running Crier server.
pub struct Server {
    broker: Arc<Broker>,
    http: actix_web::dev::Server,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    signals: bool,
}

/// Asks a running [`Server`] to shut down gracefully, as SIGTERM does.
#[derive(Clone)]
pub struct ShutdownHandle(watch::Sender<bool>);

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

impl Server {
    /// Validates the configuration and binds the listening socket.
    pub fn bind(config: Config) -> io::Result<Server> {
        config
            .validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let broker = if config.redis.is_empty() {
            Broker::new(config)
        } else {
            Broker::with_shared_backend(config, Some(new_node_id()), |config, metrics, sink| {
                RedisBackend::connect(config, &metrics, sink)
            })
        }
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Server::bind_broker(broker)
    }

    /// Binds the listening socket for a broker already built (with whichever backend).
    pub(crate) fn bind_broker(broker: Arc<Broker>) -> io::Result<Server> {
        let config = broker.config();
        let data = web::Data::from(broker.clone());
        let mut http = HttpServer::new(move || {
            App::new()
                .wrap(middleware::from_fn(count_requests))
                .app_data(data.clone())
                .service(api::resource("/ws").route(web::get().to(ws::upgrade)))
                .configure(api::routes)
                .configure(dashboard::routes)
                .default_service(web::to(api::not_found))
        })
        .on_connect(ws::on_accept(config.socket_unsent_bytes))
        // What the HTTP layer copies out of a connection's queue before writing: kept small so
        // that frames wait in the queue, counted and conflatable, rather than here.
        .h1_write_buffer_size(WRITE_BUFFER_BYTES)
        .disable_signals()
        // Crier closes WebSockets itself within the grace period; this only bounds stragglers.
        .shutdown_timeout(config.shutdown_grace.as_secs().max(1));
        if let Some(workers) = config.workers {
            http = http.workers(workers);
        }
        // A client must finish its TLS handshake and send its request head in time: a
        // connection that trickles bytes (or none) is dropped rather than held.
        http = http
            .client_request_timeout(config.handshake_timeout)
            .tls_handshake_timeout(config.handshake_timeout);
        let http = match tls_config(config)? {
            Some(tls) => http.bind_rustls_0_23(config.listen, tls)?,
            None => http.bind(config.listen)?,
        };
        let addr = *http
            .addrs()
            .first()
            .ok_or_else(|| io::Error::other("the listener has no address"))?;
        let (shutdown, _) = watch::channel(false);
        Ok(Server {
            http: http.run(),
            broker,
            addr,
            shutdown,
            signals: true,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }

    /// Whether SIGINT and SIGTERM start a graceful shutdown (the default). Embedders and tests
    /// that drive shutdown through a [`ShutdownHandle`] can turn this off.
    pub fn handle_signals(mut self, on: bool) -> Self {
        self.signals = on;
        self
    }

    /// Serves until shut down: then stops accepting, closes every WebSocket with 1001 after
    /// flushing what is queued for it, and returns once all are closed or the grace period ends.
    /// Must run inside an actix system (`actix_web::rt::System`).
    pub async fn run(self) -> io::Result<()> {
        let Server {
            broker,
            http,
            addr,
            shutdown,
            signals,
        } = self;
        let (ws, http_scheme) = if broker.config().tls_cert.is_some() {
            ("wss", "https")
        } else {
            ("ws", "http")
        };
        tracing::info!(
            backend = broker.backend_name(),
            "crier {} listening: WebSocket {ws}://{addr}/ws, HTTP API {http_scheme}://{addr}/api, metrics {http_scheme}://{addr}/metrics",
            env!("CARGO_PKG_VERSION")
        );
        if !broker.auth().required() {
            tracing::warn!(
                "no --jwt-secret, --jwt-public-key or --api-key: Crier runs open, and anyone who can reach {addr} may subscribe and publish to every topic"
            );
        }
        let handle = http.handle();
        let mut serving = actix_web::rt::spawn(http);
        let housekeeping = actix_web::rt::spawn(housekeeping(broker.clone()));
        let mut requested = shutdown.subscribe();
        tokio::select! {
            result = &mut serving => {
                housekeeping.abort();
                return result.map_err(io::Error::other)?;
            }
            _ = shutdown_requested(&mut requested, signals) => {}
        }

        let grace = broker.config().shutdown_grace;
        tracing::info!(
            connections = broker.connection_count(),
            ?grace,
            "shutting down"
        );
        let deadline = Instant::now() + grace;
        handle.pause().await;
        broker.begin_shutdown();
        while broker.connection_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let stragglers = broker.connections();
        if !stragglers.is_empty() {
            tracing::warn!(
                connections = stragglers.len(),
                "grace period over; closing the rest"
            );
            for conn in stragglers {
                conn.force_close();
            }
        }
        housekeeping.abort();
        handle.stop(true).await;
        serving.await.map_err(io::Error::other)??;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The rustls configuration for `--tls-cert` and `--tls-key`, if they are set.
fn tls_config(config: &Config) -> io::Result<Option<rustls::ServerConfig>> {
    let (Some(cert_path), Some(key_path)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let invalid = |what: &str, path: &std::path::Path, e: &dyn std::fmt::Display| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} {}: {e}", path.display()),
        )
    };
    let certs = rustls_pemfile::certs(&mut io::BufReader::new(
        std::fs::File::open(cert_path).map_err(|e| invalid("--tls-cert", cert_path, &e))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .map_err(|e| invalid("--tls-cert", cert_path, &e))?;
    if certs.is_empty() {
        return Err(invalid(
            "--tls-cert",
            cert_path,
            &"no PEM certificate in it",
        ));
    }
    let key = rustls_pemfile::private_key(&mut io::BufReader::new(
        std::fs::File::open(key_path).map_err(|e| invalid("--tls-key", key_path, &e))?,
    ))
    .map_err(|e| invalid("--tls-key", key_path, &e))?
    .ok_or_else(|| invalid("--tls-key", key_path, &"no PEM private key in it"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid("--tls-key", key_path, &e))?;
    Ok(Some(tls))
}

async fn shutdown_requested(requested: &mut watch::Receiver<bool>, signals: bool) {
    let handle = async {
        // The sender lives in the Server being run, so this only ends on a request.
        let _ = requested.wait_for(|&stop| stop).await;
    };
    if !signals {
        return handle.await;
    }
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = handle => {}
        _ = terminate => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

/// Counts every HTTP request by route pattern (never the raw path, which clients choose) and status.
async fn count_requests(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let broker = req.app_data::<web::Data<Broker>>().cloned();
    let response = next.call(req).await?;
    if let Some(broker) = broker {
        let route = response
            .request()
            .match_pattern()
            .unwrap_or_else(|| "unmatched".to_owned());
        broker
            .metrics()
            .http_request(&route, response.status().as_u16());
    }
    Ok(response)
}

/// Periodic upkeep: forgetting idle topics, publishing `_crier.stats`.
async fn housekeeping(broker: Arc<Broker>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut stats = StatsPublisher::default();
    loop {
        tick.tick().await;
        let now = Instant::now();
        broker.sweep(now);
        stats.tick(&broker, now);
    }
}
