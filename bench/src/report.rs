//! Turns the JSON lines of bench/compare.sh into BENCHMARKS.md's results section and an SVG
//! chart of delivered messages per second.

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

use crate::target::Error;

const START: &str = "<!-- results:start -->";
const END: &str = "<!-- results:end -->";

fn num(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(0.0)
}

/// Messages subscribers never received, and how many of them the broker's slow-consumer policy
/// dropped (Crier reports it; NATS drops nothing without closing the connection).
fn lost(r: &Value) -> String {
    match r["broker_dropped"].as_u64() {
        Some(dropped) if dropped > 0 => format!("{} ({dropped} dropped)", r["lost"]),
        _ => r["lost"].to_string(),
    }
}

const LOST_NOTE: &str = "\n¹ Messages a subscriber never received; in parentheses, how many the broker's slow-consumer \
policy dropped (`crier_messages_dropped_total`), which is the only way Crier loses a message.\n";

fn fmt_rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// Of the runs of one configuration, the median one: by delivered messages per second for
/// throughput runs, by p99 latency for fixed-rate runs.
fn find<'a>(
    runs: &'a [Value],
    scenario: &str,
    target: &str,
    subscribers: u64,
    payload: u64,
    fixed_rate: bool,
) -> Option<&'a Value> {
    let mut matching: Vec<&Value> = runs
        .iter()
        .filter(|r| {
            r["scenario"] == scenario
                && r["target"] == target
                && r["subscribers"].as_u64() == Some(subscribers)
                && r["payload"].as_u64() == Some(payload)
                && r["rate"].is_null() != fixed_rate
        })
        .collect();
    let key = |r: &Value| {
        if fixed_rate {
            r["latency_us"]["p99"].as_f64().unwrap_or(0.0)
        } else {
            num(r, "delivered_per_s")
        }
    };
    matching.sort_by(|a, b| key(a).total_cmp(&key(b)));
    matching.get(matching.len() / 2).copied()
}

pub fn write(input: &Path, markdown: &Path, chart: &Path) -> Result<Value, Error> {
    let runs: Vec<Value> = std::fs::read_to_string(input)?
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let mut configs: Vec<(u64, u64)> = runs
        .iter()
        .filter(|r| r["scenario"] == "fanout" && r["rate"].is_null())
        .map(|r| {
            (
                r["payload"].as_u64().unwrap_or(0),
                r["subscribers"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    configs.sort();
    configs.dedup();

    let mut md = String::new();
    let repeats = runs
        .iter()
        .filter(|r| r["scenario"] == "fanout" && r["rate"].is_null())
        .count()
        / (configs.len() * 2).max(1);
    md.push_str(&format!(
        "### Fan-out throughput (as fast as subscribers keep up; median of {repeats} runs)\n\n"
    ));
    md.push_str("| subscribers | payload | Crier delivered/s | NATS-WS delivered/s | Crier ÷ NATS | Crier p99 | NATS p99 | lost (Crier / NATS) ¹ |\n");
    md.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let mut points: Vec<(String, f64, f64)> = Vec::new();
    for &(payload, subscribers) in &configs {
        let crier = find(&runs, "fanout", "crier", subscribers, payload, false);
        let nats = find(&runs, "fanout", "nats-ws", subscribers, payload, false);
        let (c, n) = (
            crier.map_or(0.0, |r| num(r, "delivered_per_s")),
            nats.map_or(0.0, |r| num(r, "delivered_per_s")),
        );
        let p99 =
            |r: Option<&Value>| r.map_or("-".into(), |r| format!("{} µs", r["latency_us"]["p99"]));
        md.push_str(&format!(
            "| {subscribers} | {payload} B | {} | {} | **{:.2}** | {} | {} | {} / {} |\n",
            fmt_rate(c),
            fmt_rate(n),
            if n > 0.0 { c / n } else { 0.0 },
            p99(crier),
            p99(nats),
            crier.map_or("-".into(), lost),
            nats.map_or("-".into(), lost),
        ));
        points.push((format!("{subscribers}×{payload}B"), c, n));
    }
    md.push_str(LOST_NOTE);

    let runs_ref = &runs;
    let fixed: Vec<&Value> = configs
        .iter()
        .flat_map(|&(payload, subscribers)| {
            ["crier", "nats-ws"]
                .into_iter()
                .filter_map(move |t| find(runs_ref, "fanout", t, subscribers, payload, true))
        })
        .collect();
    if !fixed.is_empty() {
        md.push_str(
            "\n### Latency at a fixed rate (50% of NATS-WS's maximum for the configuration)\n\n",
        );
        md.push_str("| subscribers | payload | rate (msg/s) | target | p50 | p90 | p99 | p99.9 | max | lost ¹ |\n");
        md.push_str("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|\n");
        for r in fixed {
            let l = &r["latency_us"];
            md.push_str(&format!(
                "| {} | {} B | {} | {} | {} µs | {} µs | {} µs | {} µs | {} µs | {} |\n",
                r["subscribers"],
                r["payload"],
                fmt_rate(num(r, "rate")),
                r["target"].as_str().unwrap_or("?"),
                l["p50"],
                l["p90"],
                l["p99"],
                l["p99_9"],
                l["max"],
                lost(r),
            ));
        }
        md.push_str(LOST_NOTE);
    }
    for r in runs.iter().filter(|r| r["scenario"] == "connections") {
        md.push_str(&format!(
            "\n### Idle connections ({})\n\n{} connections opened at {} per second; broker RSS {} → {} KiB: **{} KiB per connection**.\n",
            r["target"].as_str().unwrap_or("?"),
            r["open"],
            fmt_rate(num(r, "connects_per_s")),
            r["broker_rss_kib"]["before"],
            r["broker_rss_kib"]["after_hold"],
            r["broker_rss_kib_per_connection"],
        ));
    }
    for r in runs.iter().filter(|r| r["scenario"] == "slow") {
        md.push_str(&format!(
            "\n### A slow subscriber among {} fast ones ({})\n\nFast subscribers' p50 / p99: {} / {} µs without it, {} / {} µs with it; broker RSS {} KiB before, at most {} KiB with it.\n",
            r["fast_subscribers"],
            r["target"].as_str().unwrap_or("?"),
            r["latency_us_without_slow"]["p50"],
            r["latency_us_without_slow"]["p99"],
            r["latency_us_with_slow"]["p50"],
            r["latency_us_with_slow"]["p99"],
            r["broker_rss_kib"]["before_slow"],
            r["broker_rss_kib"]["max_with_slow"],
        ));
    }

    let existing = std::fs::read_to_string(markdown).unwrap_or_default();
    let updated = match (existing.find(START), existing.find(END)) {
        (Some(s), Some(e)) if s < e => format!("{}{START}\n{md}{}", &existing[..s], &existing[e..]),
        _ => format!("{existing}\n{START}\n{md}{END}\n"),
    };
    std::fs::write(markdown, updated)?;
    chart_svg(chart, &points)?;
    Ok(Value::Null)
}

fn chart_svg(path: &Path, points: &[(String, f64, f64)]) -> Result<(), Error> {
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = points
        .iter()
        .flat_map(|(_, c, n)| [*c, *n])
        .fold(1.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Fan-out: delivered messages per second (higher is better)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.5f64..(points.len() as f64 - 0.5), 0f64..top)?;
    chart
        .configure_mesh()
        .x_labels(points.len())
        .x_label_formatter(&|x| {
            let i = x.round() as usize;
            if (x - i as f64).abs() < 0.01 {
                points.get(i).map(|p| p.0.clone()).unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| fmt_rate(*y))
        .x_desc("subscribers × payload")
        .draw()?;
    for (index, (name, color)) in [
        ("Crier", RGBColor(214, 39, 40)),
        ("NATS over WebSocket", RGBColor(31, 119, 180)),
    ]
    .into_iter()
    .enumerate()
    {
        let series: Vec<(f64, f64)> = points
            .iter()
            .enumerate()
            .map(|(i, p)| (i as f64, if index == 0 { p.1 } else { p.2 }))
            .collect();
        chart
            .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(
            series
                .into_iter()
                .map(|p| Circle::new(p, 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(())
}
