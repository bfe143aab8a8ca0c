//! Prints every message on the given topics (patterns allowed), reconnecting and recovering
//! when the connection drops. With `--publish TOPIC JSON` it publishes once first. A token in
//! `CRIER_TOKEN` is sent with the upgrade request; a `wss://` URL whose server has a self-signed
//! certificate needs that certificate's PEM file in `CRIER_ROOT_CERT`.
//!
//! ```sh
//! cargo run --release &                                  # the broker
//! cargo run -p crier-client --example tail -- ws://127.0.0.1:8080/ws 'news' 'metrics.>'
//! curl -H 'Content-Type: application/json' -d '"hello"' http://127.0.0.1:8080/api/topics/news
//! ```

use crier_client::{Client, Encoding, Event, SubscribeOptions};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        eprintln!("usage: tail URL [--publish TOPIC JSON] TOPIC...");
        std::process::exit(2);
    }
    let url = args.remove(0);
    let publish = match args.iter().position(|a| a == "--publish") {
        Some(i) if i + 2 < args.len() => {
            let mut flag: Vec<String> = args.drain(i..i + 3).collect();
            let value: serde_json::Value = serde_json::from_str(&flag.remove(2))?;
            Some((flag.remove(1), value))
        }
        _ => None,
    };

    let mut builder = Client::builder(url)
        .encoding(Encoding::Msgpack)
        .reconnect(true);
    if let Ok(token) = std::env::var("CRIER_TOKEN") {
        builder = builder.token(token);
    }
    if let Ok(path) = std::env::var("CRIER_ROOT_CERT") {
        builder = builder.root_certificate(std::fs::read(path)?);
    }
    let mut client = builder.connect().await?;
    println!(
        "connected as {} to {}",
        client.welcome().connection,
        client.welcome().server
    );
    for topic in &args {
        // The current value of each topic first, then live messages.
        let options = SubscribeOptions {
            rewind: Some(1),
            ..Default::default()
        };
        client.subscribe_with(topic, options).await?;
    }
    if let Some((topic, value)) = publish {
        let seq = client.publish(&topic, &value).await?;
        println!("published {topic} #{seq}");
    }
    while let Some(event) = client.next_event().await {
        match event {
            Event::Message(m) => println!(
                "{} #{} {}",
                m.topic(),
                m.seq(),
                m.decode::<serde_json::Value>()?
            ),
            Event::Reconnected { recovered } => println!("reconnected (recovered: {recovered:?})"),
            Event::ServerError { code, message } => eprintln!("server error {code}: {message}"),
            Event::SubscriptionEnded {
                topic,
                code,
                message,
            } => eprintln!("subscription to {topic} ended ({code}): {message}"),
            Event::TokenRefreshFailed(error) => eprintln!("token refresh failed: {error}"),
            Event::Closed(error) => {
                eprintln!("closed: {error}");
                break;
            }
        }
    }
    Ok(())
}
