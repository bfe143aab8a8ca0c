//! Crier: a publish/subscribe message broker over WebSocket.
//!
//! Browsers and backends connect to `GET /ws`, subscribe to topics and receive every message
//! published to them, in JSON or MessagePack; backends can also publish over HTTP. The wire
//! protocol is specified in `proto/README.md`.
//!
//! The crate's public surface is small: a [`Config`] and a [`Server`] to run with it.
//!
//! ```no_run
//! # fn main() -> std::io::Result<()> {
//! actix_web::rt::System::new().block_on(async {
//!     let server = crier::Server::bind(crier::Config::default())?;
//!     println!("listening on {}", server.local_addr());
//!     server.run().await
//! })
//! # }
//! ```

// The crate's own tests run the integration tests' scenarios, which name it `crier`.
#[cfg(test)]
extern crate self as crier;

mod actor;
mod admission;
mod api;
mod auth;
mod backend;
mod broker;
mod config;
mod connection;
mod connections;
mod dashboard;
mod data;
mod frame;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod hub;
mod metrics;
mod model;
mod queue;
mod server;
mod stats;
mod table;
mod topic;
mod workers;
mod ws;

pub use config::{Config, SlowConsumerPolicy};
pub use server::{Server, ShutdownHandle};
