use std::process::ExitCode;

use clap::Parser;
use crier::{Config, Server};
use tracing_subscriber::EnvFilter;

/// jemalloc in the broker binary only (tests and embedders keep their own): a small publish makes
/// and frees about four allocations, and glibc's malloc and free were 17% of its instructions.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let config = Config::parse();
    let filter = match EnvFilter::try_new(&config.log) {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!("crier: bad --log filter {:?}: {e}", config.log);
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt().with_env_filter(filter).init();
    if let Err(e) = config.validate() {
        eprintln!("crier: {e}");
        return ExitCode::from(2);
    }
    let served = actix_web::rt::System::new().block_on(async { Server::bind(config)?.run().await });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "crier stopped with an error");
            ExitCode::FAILURE
        }
    }
}
