//! crier-bench: load scenarios for Crier, runnable unchanged against NATS over WebSocket.
//!
//! Every scenario prints a one-line JSON summary, then a table. `report` turns the JSON lines of
//! `bench/compare.sh` into the tables and the chart of BENCHMARKS.md.

mod report;
mod scenario;
mod stats;
mod target;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use crier_client::Encoding;

#[derive(Parser)]
#[command(
    name = "crier-bench",
    about = "Load generator for Crier (and the same scenarios against NATS over WebSocket)"
)]
struct Cli {
    /// The broker to load.
    #[arg(long, value_enum, default_value = "crier", global = true)]
    target: target::Kind,
    /// Its WebSocket URL. Several (repeated, or comma-separated) for the nodes of one cluster:
    /// the i-th subscriber and the i-th publisher connect to URL i mod their number.
    #[arg(
        long,
        default_value = "ws://127.0.0.1:8080/ws",
        global = true,
        value_delimiter = ','
    )]
    url: Vec<String>,
    /// Crier's wire encoding.
    #[arg(long, value_enum, default_value = "msgpack", global = true)]
    encoding: Enc,
    /// A token (JWT or API key) every Crier connection presents, for a broker that requires
    /// one.
    #[arg(long, env = "CRIER_BENCH_TOKEN", global = true)]
    token: Option<String>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Enc {
    Json,
    Msgpack,
}

#[derive(Subcommand)]
enum Scenario {
    /// S subscribers on one topic, P publishers: throughput, latency, losses.
    Fanout(scenario::FanoutArgs),
    /// Many topics with a few subscribers each (a dashboard farm).
    Topics(scenario::TopicsArgs),
    /// Open many idle connections: connect rate and the broker's memory per connection.
    Connections(scenario::ConnectionsArgs),
    /// One subscriber stops reading among fast ones.
    Slow(scenario::SlowArgs),
    /// Writes the results of bench/compare.sh into BENCHMARKS.md and a chart.
    Report {
        /// JSON lines written by the scenarios.
        #[arg(long)]
        input: PathBuf,
        /// The Markdown file to update (between its results markers).
        #[arg(long, default_value = "BENCHMARKS.md")]
        markdown: PathBuf,
        /// The SVG chart to write.
        #[arg(long, default_value = "bench/fanout.svg")]
        chart: PathBuf,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let target = target::Target {
        kind: cli.target,
        urls: cli.url,
        encoding: match cli.encoding {
            Enc::Json => Encoding::Json,
            Enc::Msgpack => Encoding::Msgpack,
        },
        token: cli.token,
    };
    let summary = match &cli.scenario {
        Scenario::Fanout(args) => scenario::fanout(&target, args).await,
        Scenario::Topics(args) => scenario::topics(&target, args).await,
        Scenario::Connections(args) => scenario::connections(&target, args).await,
        Scenario::Slow(args) => scenario::slow(&target, args).await,
        Scenario::Report {
            input,
            markdown,
            chart,
        } => report::write(input, markdown, chart),
    };
    match summary {
        Ok(serde_json::Value::Null) => {}
        Ok(summary) => stats::report(&summary),
        Err(e) => {
            eprintln!("crier-bench: {e}");
            std::process::exit(1);
        }
    }
}
