//! Turns the JSON lines of bench/compare.sh into BENCHMARKS.md's results section and an SVG
//! chart: per configuration, Crier's and NATS's delivered messages per second and broker CPU per
//! delivered message, as bars side by side.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;

use crate::target::Error;

const START: &str = "<!-- results:start -->";
const END: &str = "<!-- results:end -->";

const TARGETS: [&str; 2] = ["crier", "nats-ws"];
const BROKER_CPU: &str = "broker_cpu_us_per_delivery";
const CLIENT_CPU: &str = "client_cpu_us_per_delivery";

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

const CPU_NOTE: &str = "\n² CPU time per delivered message (lower is better), the median of the runs: the broker's \
utime + stime (`/proc/PID/stat`) around the run, connection set-up included, over the messages delivered; the \
client's, the load generator's own rusage, the same way (`bench/cost.sh`). Both share the machine's cores.\n";

fn fmt_rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn fmt_cpu(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.3} µs"))
}

fn fmt_ratio(crier: Option<f64>, nats: Option<f64>) -> String {
    match (crier, nats) {
        (Some(c), Some(n)) if n > 0.0 => format!("**{:.2}**", c / n),
        _ => "-".into(),
    }
}

/// The runs of one fan-out configuration against one target.
fn matching<'a>(
    runs: &'a [Value],
    scenario: &str,
    target: &str,
    subscribers: u64,
    payload: u64,
    fixed_rate: bool,
) -> Vec<&'a Value> {
    runs.iter()
        .filter(|r| {
            r["scenario"] == scenario
                && r["target"] == target
                && r["subscribers"].as_u64() == Some(subscribers)
                && r["payload"].as_u64() == Some(payload)
                && r["rate"].is_null() != fixed_rate
        })
        .collect()
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
    let mut matching = matching(runs, scenario, target, subscribers, payload, fixed_rate);
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

/// The median of one figure over runs, taken as `find` takes its run (the upper one of an even
/// number); `None` if no run has it, as in results from before compare.sh measured CPU.
fn median(runs: &[&Value], key: &str) -> Option<f64> {
    let mut values: Vec<f64> = runs.iter().filter_map(|r| r[key].as_f64()).collect();
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

/// One configuration (subscribers × payload) of the chart: Crier's figure, then NATS's.
struct Bars {
    label: String,
    delivered_per_s: [Option<f64>; 2],
    broker_cpu: [Option<f64>; 2],
}

pub fn write(input: &Path, markdown: &Path, chart: &Path) -> Result<Value, Error> {
    let runs: Vec<Value> = std::fs::read_to_string(input)?
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let (md, bars) = results(&runs);
    let existing = std::fs::read_to_string(markdown).unwrap_or_default();
    std::fs::write(markdown, splice(&existing, &md))?;
    chart_svg(chart, &bars)?;
    Ok(Value::Null)
}

/// `existing` with `md` between its results markers (appended with them if it has none).
fn splice(existing: &str, md: &str) -> String {
    match (existing.find(START), existing.find(END)) {
        (Some(s), Some(e)) if s < e => format!("{}{START}\n{md}{}", &existing[..s], &existing[e..]),
        _ => format!("{existing}\n{START}\n{md}{END}\n"),
    }
}

/// The results section's Markdown, and the chart's bars.
fn results(runs: &[Value]) -> (String, Vec<Bars>) {
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
    md.push_str(
        "| subscribers | payload | Crier delivered/s | NATS-WS delivered/s | Crier ÷ NATS \
         | Crier broker CPU ² | NATS-WS broker CPU ² | Crier ÷ NATS (CPU) | client CPU (Crier / NATS) ² \
         | Crier p99 | NATS p99 | lost (Crier / NATS) ¹ |\n",
    );
    md.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let mut bars: Vec<Bars> = Vec::new();
    for &(payload, subscribers) in &configs {
        let [crier, nats] = TARGETS.map(|t| find(runs, "fanout", t, subscribers, payload, false));
        let [crier_runs, nats_runs] =
            TARGETS.map(|t| matching(runs, "fanout", t, subscribers, payload, false));
        let delivered = [crier, nats].map(|r| r.map(|r| num(r, "delivered_per_s")));
        let broker_cpu = [&crier_runs, &nats_runs].map(|runs| median(runs, BROKER_CPU));
        let client_cpu = [&crier_runs, &nats_runs].map(|runs| median(runs, CLIENT_CPU));
        let p99 =
            |r: Option<&Value>| r.map_or("-".into(), |r| format!("{} µs", r["latency_us"]["p99"]));
        md.push_str(&format!(
            "| {subscribers} | {payload} B | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} / {} |\n",
            fmt_rate(delivered[0].unwrap_or(0.0)),
            fmt_rate(delivered[1].unwrap_or(0.0)),
            fmt_ratio(delivered[0], delivered[1]),
            fmt_cpu(broker_cpu[0]),
            fmt_cpu(broker_cpu[1]),
            fmt_ratio(broker_cpu[0], broker_cpu[1]),
            fmt_cpu(client_cpu[0]),
            fmt_cpu(client_cpu[1]),
            p99(crier),
            p99(nats),
            crier.map_or("-".into(), lost),
            nats.map_or("-".into(), lost),
        ));
        bars.push(Bars {
            label: format!("{subscribers}×{payload}B"),
            delivered_per_s: delivered,
            broker_cpu,
        });
    }
    md.push_str(LOST_NOTE);
    md.push_str(CPU_NOTE);

    // Each configuration's median-latency run per target, with the CPU medians of its runs.
    let fixed: Vec<(&Value, [Option<f64>; 2])> = configs
        .iter()
        .flat_map(|&(payload, subscribers)| {
            TARGETS.into_iter().filter_map(move |t| {
                let all = matching(runs, "fanout", t, subscribers, payload, true);
                let run = find(runs, "fanout", t, subscribers, payload, true)?;
                Some((run, [BROKER_CPU, CLIENT_CPU].map(|key| median(&all, key))))
            })
        })
        .collect();
    if !fixed.is_empty() {
        md.push_str(
            "\n### Latency at a fixed rate (50% of NATS-WS's maximum for the configuration)\n\n",
        );
        md.push_str(
            "| subscribers | payload | rate (msg/s) | target | p50 | p90 | p99 | p99.9 | max \
             | broker CPU ² | client CPU ² | lost ¹ |\n",
        );
        md.push_str("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for (r, [broker_cpu, client_cpu]) in fixed {
            let l = &r["latency_us"];
            md.push_str(&format!(
                "| {} | {} B | {} | {} | {} µs | {} µs | {} µs | {} µs | {} µs | {} | {} | {} |\n",
                r["subscribers"],
                r["payload"],
                fmt_rate(num(r, "rate")),
                r["target"].as_str().unwrap_or("?"),
                l["p50"],
                l["p90"],
                l["p99"],
                l["p99_9"],
                l["max"],
                fmt_cpu(broker_cpu),
                fmt_cpu(client_cpu),
                lost(r),
            ));
        }
        md.push_str(LOST_NOTE);
        md.push_str(CPU_NOTE);
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
    (md, bars)
}

const COLORS: [RGBColor; 2] = [RGBColor(214, 39, 40), RGBColor(31, 119, 180)];
const NAMES: [&str; 2] = ["Crier", "NATS over WebSocket"];

/// The chart: delivered messages per second, and below it (when the results have it) broker CPU
/// per delivered message; one group of bars per configuration, Crier's beside NATS's.
fn chart_svg(path: &Path, bars: &[Bars]) -> Result<(), Error> {
    let with_cpu = bars
        .iter()
        .any(|b| b.broker_cpu.iter().any(Option::is_some));
    let root = SVGBackend::new(path, (900, if with_cpu { 900 } else { 480 })).into_drawing_area();
    root.fill(&WHITE)?;
    let labels: Vec<&str> = bars.iter().map(|b| b.label.as_str()).collect();
    let delivered: Vec<[Option<f64>; 2]> = bars.iter().map(|b| b.delivered_per_s).collect();
    let caption = "Fan-out: delivered messages per second (higher is better)";
    let (throughput, cpu_area) = if with_cpu {
        let (top, bottom) = root.split_vertically(450);
        (top, Some(bottom))
    } else {
        (root.clone(), None)
    };
    bar_panel(
        &throughput,
        caption,
        "delivered/s",
        &fmt_rate,
        &fmt_rate,
        &labels,
        &delivered,
    )?;
    if let Some(bottom) = cpu_area {
        let cpu: Vec<[Option<f64>; 2]> = bars.iter().map(|b| b.broker_cpu).collect();
        bar_panel(
            &bottom,
            "Broker CPU per delivered message (lower is better)",
            "µs per delivery",
            &|v| format!("{v:.2}"),
            &|v| format!("{v:.3}"),
            &labels,
            &cpu,
        )?;
    }
    root.present()?;
    Ok(())
}

/// One panel of grouped bars: for configuration i, Crier's bar just left of i and NATS's just
/// right of it, each with its value on top; a missing value draws no bar.
fn bar_panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    caption: &str,
    y_desc: &str,
    axis_fmt: &dyn Fn(f64) -> String,
    value_fmt: &dyn Fn(f64) -> String,
    labels: &[&str],
    values: &[[Option<f64>; 2]],
) -> Result<(), Error> {
    let top = values
        .iter()
        .flatten()
        .flatten()
        .fold(0.0, |a: f64, &b| a.max(b));
    let top = if top > 0.0 { top * 1.2 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.5f64..(labels.len() as f64 - 0.5), 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(labels.len())
        .x_label_formatter(&|x| {
            let i = x.round() as usize;
            if (x - i as f64).abs() < 0.01 {
                labels.get(i).map(|l| l.to_string()).unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| axis_fmt(*y))
        .x_desc("subscribers × payload")
        .y_desc(y_desc)
        .draw()?;
    let value_style =
        TextStyle::from(("sans-serif", 11).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (side, (name, color)) in NAMES.into_iter().zip(COLORS).enumerate() {
        let bars: Vec<(f64, f64, f64)> = values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let left = i as f64 - 0.38 + side as f64 * 0.4;
                Some((left, left + 0.36, v[side]?))
            })
            .collect();
        chart
            .draw_series(
                bars.iter()
                    .map(|&(x0, x1, v)| Rectangle::new([(x0, 0.0), (x1, v)], color.filled())),
            )?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled()));
        chart.draw_series(bars.iter().map(|&(x0, x1, v)| {
            Text::new(value_fmt(v), ((x0 + x1) / 2.0, v), value_style.clone())
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A fan-out summary line as compare.sh writes it; `cpu` is (broker, client) µs per delivery.
    fn fanout(
        target: &str,
        subscribers: u64,
        rate: Option<f64>,
        delivered_per_s: f64,
        p99: u64,
        cpu: Option<(f64, f64)>,
    ) -> Value {
        let mut run = json!({
            "scenario": "fanout", "target": target, "subscribers": subscribers, "payload": 64,
            "rate": rate, "delivered_per_s": delivered_per_s, "lost": 0, "broker_dropped": 0,
            "latency_us": {"p50": 1, "p90": 2, "p99": p99, "p99_9": 4, "max": 5},
        });
        if let Some((broker, client)) = cpu {
            run[BROKER_CPU] = json!(broker);
            run[CLIENT_CPU] = json!(client);
        }
        run
    }

    fn row<'a>(md: &'a str, start: &str) -> &'a str {
        md.lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no row starting {start:?} in\n{md}"))
    }

    #[test]
    fn cpu_per_delivery_is_the_median_of_the_runs_beside_throughput() {
        let runs = vec![
            // The CPU figures' medians (0.2 and 0.4) come from other runs than the median
            // throughput (2 M for Crier, 4 M for NATS).
            fanout("crier", 100, None, 1e6, 10, Some((0.2, 0.5))),
            fanout("crier", 100, None, 2e6, 20, Some((0.3, 0.3))),
            fanout("crier", 100, None, 3e6, 30, Some((0.1, 0.6))),
            fanout("nats-ws", 100, None, 4e6, 40, Some((0.4, 0.7))),
            fanout("nats-ws", 100, None, 5e6, 50, Some((0.5, 0.9))),
            fanout("nats-ws", 100, None, 3e6, 60, Some((0.3, 0.8))),
            fanout("crier", 100, Some(1000.0), 1e5, 70, Some((0.25, 0.35))),
            fanout("nats-ws", 100, Some(1000.0), 1e5, 80, Some((0.45, 0.55))),
        ];
        let (md, bars) = results(&runs);
        assert!(md.contains("median of 3 runs"), "{md}");
        assert_eq!(
            row(&md, "| 100 | 64 B | 2.00 M"),
            "| 100 | 64 B | 2.00 M | 4.00 M | **0.50** | 0.200 µs | 0.400 µs | **0.50** \
             | 0.500 µs / 0.800 µs | 20 µs | 40 µs | 0 / 0 |"
        );
        assert_eq!(
            row(&md, "| 100 | 64 B | 1.0 k | crier"),
            "| 100 | 64 B | 1.0 k | crier | 1 µs | 2 µs | 70 µs | 4 µs | 5 µs | 0.250 µs | 0.350 µs | 0 |"
        );
        assert!(row(&md, "| 100 | 64 B | 1.0 k | nats-ws").contains("| 0.450 µs | 0.550 µs |"));
        assert_eq!(bars.len(), 1);
        assert_eq!(bars[0].label, "100×64B");
        assert_eq!(bars[0].delivered_per_s, [Some(2e6), Some(4e6)]);
        assert_eq!(bars[0].broker_cpu, [Some(0.2), Some(0.4)]);
    }

    #[test]
    fn results_from_before_cpu_was_measured_show_dashes() {
        let runs = vec![
            fanout("crier", 1, None, 1e6, 10, None),
            fanout("nats-ws", 1, None, 2e6, 20, None),
        ];
        let (md, bars) = results(&runs);
        assert_eq!(
            row(&md, "| 1 | 64 B"),
            "| 1 | 64 B | 1.00 M | 2.00 M | **0.50** | - | - | - | - / - | 10 µs | 20 µs | 0 / 0 |"
        );
        assert_eq!(bars[0].broker_cpu, [None, None]);
    }

    #[test]
    fn the_results_replace_only_what_is_between_the_markers() {
        let existing = format!("# Title\n\n{START}\nold\n{END}\n\nAfter.\n");
        assert_eq!(
            splice(&existing, "new\n"),
            format!("# Title\n\n{START}\nnew\n{END}\n\nAfter.\n")
        );
        assert_eq!(
            splice("# Title\n", "new\n"),
            format!("# Title\n\n{START}\nnew\n{END}\n")
        );
    }

    #[test]
    fn the_chart_draws_bars_side_by_side_and_no_lines_between_configurations() {
        let bars = vec![
            Bars {
                label: "1×64B".into(),
                delivered_per_s: [Some(1e6), Some(2e6)],
                broker_cpu: [Some(1.0), Some(0.5)],
            },
            Bars {
                label: "100×64B".into(),
                delivered_per_s: [Some(3e6), Some(4e6)],
                broker_cpu: [Some(0.2), None],
            },
        ];
        let path =
            std::env::temp_dir().join(format!("crier-bench-chart-{}.svg", std::process::id()));
        chart_svg(&path, &bars).expect("the chart is written");
        let svg = std::fs::read_to_string(&path).expect("the chart is readable");
        std::fs::remove_file(&path).ok();
        let [crier, nats] = COLORS.map(|c| format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2));
        let filled = |color: &str| {
            svg.lines()
                .filter(|l| l.starts_with("<rect") && l.contains(&format!("fill=\"{color}\"")))
                .count()
        };
        // Two panels: Crier has 2 + 2 bars and NATS 2 + 1 (its CPU is missing at 100), plus a
        // legend mark in each panel.
        assert_eq!(filled(&crier), 4 + 2, "{svg}");
        assert_eq!(filled(&nats), 3 + 2, "{svg}");
        assert!(svg.contains("Broker CPU per delivered message"));
        assert!(svg.contains("\n0.500\n"), "NATS's CPU at 1×64B on its bar");
        for color in [crier, nats] {
            assert!(
                !svg.lines()
                    .any(|l| l.starts_with("<polyline") && l.contains(&color)),
                "a line in {color}: {svg}"
            );
        }
    }
}
