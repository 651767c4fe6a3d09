//! The report for people: one table with the floor's rows above Baton's, the ratio to the floor
//! on each row, the orchestrator's RSS with many sagas in flight, then what each component cost.

use std::fmt::Write as _;

use crate::sagas::CLASSIC;
use crate::{Latency, MessageCount, Report, Throughput, nominal_messages};

const HEADER: &str = "run                      in flight    done  errors     per s   p50 ms   p99 ms     msgs/s  vs floor  CPU ms/op";

fn latency_row(out: &mut String, label: &str, l: &Latency, ratio: Option<f64>) {
    let ratio = ratio.map_or("-".into(), |r| format!("{r:.2}"));
    let _ = writeln!(
        out,
        "{label:<24} {:>9} {:>7} {:>7} {:>9} {:>8.2} {:>8.2} {:>10} {ratio:>9} {:>10}",
        1,
        l.samples - l.errors,
        l.errors,
        "-",
        l.p50_ms,
        l.p99_ms,
        "-",
        "-",
    );
}

fn throughput_row(out: &mut String, label: &str, t: &Throughput, msgs: f64, ratio: Option<f64>) {
    let ratio = ratio.map_or("-".into(), |r| format!("{r:.2}"));
    let _ = writeln!(
        out,
        "{label:<24} {:>9} {:>7} {:>7} {:>9.1} {:>8.2} {:>8.2} {:>10.0} {ratio:>9} {:>10.3}",
        t.in_flight, t.completed, t.errors, t.per_second, t.p50_ms, t.p99_ms, msgs, t.cpu_ms_per_op,
    );
}

/// The report as a table.
pub fn table(r: &Report) -> String {
    let mut out = String::new();
    heading(&mut out, r);
    out.push('\n');
    out.push_str(HEADER);
    out.push('\n');
    runs(&mut out, r);
    out.push('\n');
    notes(&mut out, r);
    scaling(&mut out, r);
    instrumentation(&mut out, r);
    stages(&mut out, r);
    hold(&mut out, r);
    out.push('\n');
    components(&mut out, r);
    out
}

/// The machine and the settings of the run.
fn heading(out: &mut String, r: &Report) {
    let [l1, l5, _] = r.machine.load_average;
    let _ = writeln!(
        out,
        "baton bench: {} CPUs (load average {l1:.2} / {l5:.2} at the start), {} one at a time after {} warm-up, \
         {} s per loaded saga run, {} s of floor; took {:.0} s",
        r.machine.cpus,
        r.settings.sequential,
        r.settings.warmup,
        r.settings.duration_s,
        r.settings.floor_duration_s,
        r.elapsed_s,
    );
    let s = &r.settings;
    let _ = writeln!(
        out,
        "workflow {} ({} steps), {} process{} of each service{}",
        s.workflow,
        s.steps,
        s.instances,
        if s.instances == 1 { "" } else { "es" },
        if s.prefill > 0 {
            format!(", {} create-space sagas run before each mode (not counted)", s.prefill)
        } else {
            String::new()
        },
    );
}

/// The floor's rows, then each mode's: one at a time, then loaded.
fn runs(out: &mut String, r: &Report) {
    let f = &r.floor;
    latency_row(out, "floor  round trip", &f.sequential, None);
    throughput_row(out, "floor  round trip", &f.loaded, f.messages_per_second, Some(1.0));
    for m in &r.modes {
        let mode = m.label();
        latency_row(out, &format!("{mode:<8} HTTP"), &m.http_sequential, Some(m.ratios.http_latency));
        for (t, rate) in m.http_loaded.iter().zip(&m.ratios.http_messages) {
            throughput_row(out, &format!("{mode:<8} HTTP"), t, rate.messages_per_second, Some(rate.of_floor));
        }
        if let Some(l) = &m.direct_sequential {
            latency_row(out, &format!("{mode:<8} orchestrator"), l, m.ratios.direct_latency);
        }
        if let (Some(t), Some(rate)) = (&m.direct_loaded, &m.ratios.direct_messages) {
            throughput_row(
                out,
                &format!("{mode:<8} orchestrator"),
                t,
                rate.messages_per_second,
                Some(rate.of_floor),
            );
        }
    }
}

/// How the ratios are taken, the prefills, and how messages were counted.
fn notes(out: &mut String, r: &Report) {
    let f = &r.floor;
    let steps: Vec<String> = r.modes.iter().map(|m| format!("{} in {} mode", m.steps, m.mode)).collect();
    let _ = writeln!(
        out,
        "vs floor: one at a time, p50 / (steps x the floor's p50 of {:.2} ms), steps being {}\n          (targets: workflow at most 1.5, events at most 1.0);",
        f.sequential.p50_ms,
        steps.join(", ")
    );
    let _ = writeln!(
        out,
        "          under load, broker messages/s / the floor's {:.0} messages/s (2 per round trip)\n          (targets: workflow at least 0.6 at 64 in flight and 0.75 at 256, events at least 0.75).",
        f.messages_per_second
    );
    for m in &r.modes {
        if let Some(p) = &m.prefill {
            let _ = writeln!(
                out,
                "prefill, {}: databases held {} spaces before the run ({} sagas at {} in flight in {:.1} s, {} failed; not counted)",
                m.mode, p.spaces, p.requested, p.in_flight, p.seconds, p.failed
            );
        }
    }
    for m in &r.modes {
        let how = match m.messages_counted {
            MessageCount::Databases => {
                "counted from the databases (relays' published + one per request)".to_owned()
            }
            MessageCount::Nominal => {
                format!("nominal: {} per {} saga", nominal_messages(m.mode, m.steps), m.mode)
            }
        };
        let _ = writeln!(
            out,
            "messages per saga, {}: {:.2} over {} sagas, {how}{}",
            m.label(),
            m.messages_per_saga,
            m.sagas,
            if m.settled { "" } else { " (work still going on at the end: not settled)" }
        );
    }
    let _ = writeln!(
        out,
        "CPU ms/op: the components' CPU time per completed saga (the floor: the bench process's own, both ends)."
    );
    if r.modes.iter().any(|m| m.label() == CLASSIC) {
        let _ = writeln!(
            out,
            "{CLASSIC}: workflow mode with classic queues (--queue-type classic: no delivery limit; the floor stays on quorum queues)."
        );
    }
}

/// The scaling rows, when the run measured them.
fn scaling(out: &mut String, r: &Report) {
    if !r.scaling.is_empty() {
        let _ = writeln!(
            out,
            "\nscaling, workflow mode through HTTP: N orchestrators and N of each service sharing one store \
             (one gateway), next to the floor above"
        );
        let _ = writeln!(
            out,
            "{:<10} {:>9}  {:>14}  {:>10}  {:>12}  {:>12}  {:>11}  {:>11}  {:>15}  {:>17}",
            "backend",
            "instances",
            "p50 1-at-a-time",
            "vs floor",
            "sagas/s",
            "p99 loaded",
            "msgs vs floor",
            "CPU ms/saga",
            "conflicts/1000",
            "CPU vs 1, same/s"
        );
        for row in &r.scaling {
            let rate = row.ratios.http_messages.first().map_or(0.0, |m| m.of_floor);
            let conflicts = row.conflicts_per_1000_sagas.map_or("-".into(), |c| format!("{c:.1}"));
            let same_rate = row.cpu_vs_one_at_same_rate.map_or("-".into(), |r| format!("{r:.2}"));
            let _ = writeln!(
                out,
                "{:<10} {:>9}  {:>12.2}ms  {:>10.2}  {:>7.0} @{:<4}  {:>10.1}ms  {:>13.2}  {:>11.2}  {conflicts:>15}  {same_rate:>17}",
                row.backend,
                row.instances,
                row.sequential.p50_ms,
                row.ratios.http_latency,
                row.loaded.per_second,
                row.loaded.in_flight,
                row.loaded.p99_ms,
                rate,
                row.cpu_ms_per_saga,
            );
        }
        let _ = writeln!(
            out,
            "CPU ms/saga: the components' CPU time per saga of the loaded run; conflicts/1000: PostgreSQL \
             transactions retried after a conflict with another instance's, per 1,000 sagas of the row; \
             CPU vs 1, same/s: the row's CPU per saga over one instance's at the same sagas/s, read between \
             the one-instance row's probes (fewer in flight):"
        );
        for row in r.scaling.iter().filter(|row| !row.probes.is_empty()) {
            let probes: Vec<String> = row
                .probes
                .iter()
                .map(|p| format!("{} in flight {:.0}/s {:.2} ms", p.in_flight, p.per_second, p.cpu_ms_per_op))
                .collect();
            let _ = writeln!(out, "  {} with 1 instance: {}", row.backend, probes.join(", "));
        }
    }
}

/// The stage tables (`--stages`): each mode's, then each scaling row's with one instance.
fn stages(out: &mut String, r: &Report) {
    let modes = r.modes.iter().filter_map(|m| m.stages.as_ref().map(|s| (m.label(), s)));
    let rows = r.scaling.iter().filter(|row| row.instances == 1);
    let scaled = rows.filter_map(|row| row.stages.as_ref().map(|s| ("workflow", s)));
    for (mode, s) in modes.chain(scaled) {
        stage_table(out, mode, s);
    }
}

/// One stage table: a hop's stages in order, each with how often it ran per saga, its mean and
/// median, and its mean times its count (what it adds to a saga, summed over components).
pub fn stage_table(out: &mut String, mode: &str, s: &crate::Stages) {
    let _ = writeln!(
        out,
        "\nstages, {mode} mode on {}: {} sagas one at a time through HTTP, {} processes read",
        s.backend, s.sagas, s.processes
    );
    let _ = writeln!(
        out,
        "{:<12} {:>9} {:>10} {:>10} {:>12}",
        "stage", "per saga", "mean µs", "p50 µs", "µs per saga"
    );
    for row in &s.rows {
        let _ = writeln!(
            out,
            "{:<12} {:>9.1} {:>10.1} {:>10.1} {:>12.0}",
            row.stage,
            row.per_saga,
            row.mean_us,
            row.p50_us,
            row.mean_us * row.per_saga
        );
    }
}

/// What metrics and traces cost, when measured.
fn instrumentation(out: &mut String, r: &Report) {
    let Some(first) = r.instrumentation.first() else { return };
    let _ = writeln!(
        out,
        "\ninstrumentation, workflow mode through HTTP: the mean of {} runs each, in mirrored order \
         (off, metrics, traced, traced, metrics, off)",
        first.runs
    );
    let _ = writeln!(
        out,
        "{:<26} {:>15}  {:>8}  {:>10}  {:>12}  {:>14}",
        "instrumentation", "p50 1-at-a-time", "sagas/s", "of off", "CPU ms/saga", "OTLP exported"
    );
    for row in &r.instrumentation {
        let _ = writeln!(
            out,
            "{:<26} {:>13.2}ms  {:>8.1}  {:>10.3}  {:>12.3}  {:>11.1} kB",
            row.instrumentation.label(),
            row.p50_ms,
            row.sagas_per_second,
            row.of_off,
            row.cpu_ms_per_saga,
            row.exported_bytes as f64 / 1024.0
        );
    }
    let _ = writeln!(out, "of off: sagas/s over the runs without instrumentation (target at least 0.95).");
}

/// The orchestrator's RSS with many sagas in flight, when measured.
fn hold(out: &mut String, r: &Report) {
    if let Some(h) = &r.hold {
        let _ = writeln!(
            out,
            "orchestrator RSS with {} sagas in flight: {:.1} MB, peak {:.1} MB (target < 100 MB){}",
            h.sagas,
            h.orchestrator_rss_kb as f64 / 1024.0,
            h.orchestrator_peak_rss_kb as f64 / 1024.0,
            if h.sagas < h.requested {
                format!(" (only {} of the {} started were in flight)", h.sagas, h.requested)
            } else {
                format!(
                    " ({:.1} s to take them in; services never answering, no timeout firing)",
                    h.seconds_to_fill
                )
            }
        );
    }
}

/// What each component cost.
fn components(out: &mut String, r: &Report) {
    let _ = writeln!(out, "{:<24} {:>9} {:>12}", "component", "CPU s", "peak RSS MB");
    for m in &r.modes {
        for c in &m.components {
            let _ = writeln!(
                out,
                "{:<24} {:>9.2} {:>12.1}",
                format!("{:<8} {}", m.label(), c.name()),
                c.cpu_ms / 1000.0,
                c.peak_rss_kb as f64 / 1024.0
            );
        }
    }
    let _ = writeln!(out, "{:<24} {:>9.2}", "bench (this process)", r.bench_cpu_ms / 1000.0);
}
