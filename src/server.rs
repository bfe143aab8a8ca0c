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
use crate::broker::Broker;
use crate::config::Config;
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
        Server::bind_broker(Broker::new(config))
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
        let http = http.bind(config.listen)?;
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
        tracing::info!(
            backend = broker.backend_name(),
            "crier {} listening: WebSocket ws://{addr}/ws, HTTP API http://{addr}/api, metrics http://{addr}/metrics",
            env!("CARGO_PKG_VERSION")
        );
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

/// Periodic upkeep: forgetting idle topics.
async fn housekeeping(broker: Arc<Broker>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        broker.sweep(Instant::now());
    }
}
