//! The comparison for people: a progress bar while it runs, a table on stdout, and a
//! self-contained HTML report with inline SVG charts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};

use baton_audit::row_name;
use baton_protocol::{Mode, Service};

use crate::{Comparison, ModeRun, esc};

/// A progress bar on stderr, redrawn every 2 %.
pub struct Progress {
    mode: Mode,
    total: usize,
    shown: AtomicUsize,
    on: bool,
}

impl Progress {
    pub fn new(mode: Mode, total: usize, on: bool) -> Progress {
        Progress { mode, total: total.max(1), shown: AtomicUsize::new(0), on }
    }

    /// Redraw after `done` requests: in place on a terminal, a line every 25 % elsewhere.
    pub fn update(&self, done: usize) {
        use std::io::IsTerminal as _;
        if !self.on {
            return;
        }
        let pct = done * 100 / self.total;
        let tty = std::io::stderr().is_terminal();
        let step = if tty { pct / 2 } else { pct / 25 };
        // Workers finish out of order: draw only steps not drawn yet.
        if self.shown.fetch_max(step, Ordering::Relaxed) >= step && done != self.total {
            return;
        }
        let bar: String = (0..40).map(|i| if i * 100 / 40 < pct { '#' } else { '.' }).collect();
        let mut err = std::io::stderr().lock();
        let line = format!("{:<8} [{bar}] {pct:>3}%  {done}/{} requests", self.mode.as_str(), self.total);
        let _ = if tty { write!(err, "\r{line}") } else { writeln!(err, "{line}") };
        let _ = err.flush();
    }
}

/// The rows of the table: a label and one cell per mode.
fn rows(c: &Comparison) -> Vec<(String, Vec<String>)> {
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |label: &str, f: &dyn Fn(&ModeRun) -> String| {
        rows.push((label.to_owned(), c.runs.iter().map(f).collect()));
    };
    row("requests", &|r| r.stats.requests.to_string());
    row("200 / 4xx / 5xx / 504", &|r| {
        format!(
            "{} / {} / {} / {}",
            r.stats.ok,
            r.stats.client_errors,
            r.stats.server_errors + r.stats.no_answer,
            r.stats.timeouts
        )
    });
    row("latency as measured p50 / p99 (ms)", &|r| {
        format!("{:.1} / {:.1}", r.stats.measured_p50_ms, r.stats.measured_p99_ms)
    });
    row("latency p50 / p95 / p99 (ms, corrected for stalls)", &|r| {
        format!("{:.1} / {:.1} / {:.1}", r.stats.p50_ms, r.stats.p95_ms, r.stats.p99_ms)
    });
    row("latency max (ms)", &|r| format!("{:.1}", r.stats.max_ms));
    row("throughput (requests/s)", &|r| format!("{:.0}", r.stats.per_second));
    row("messages per request", &|r| format!("{:.1}", r.messages_per_request()));
    row("settled after the load (ms)", &|r| {
        format!("{}{}", r.quiesce_ms, if r.quiescent { "" } else { " (not settled)" })
    });
    for s in [Service::Records, Service::Placement, Service::Entitlements, Service::Routing] {
        let label = format!("orphaned {}s", row_name(s));
        row(&label, &move |r| r.audit.orphans.get(&s).copied().unwrap_or(0).to_string());
    }
    row("emails for spaces that do not exist", &|r| r.audit.emails_without_space.to_string());
    if c.retry_timeouts.is_some() {
        row("504s before retries / retried (retries sent)", &|r| {
            format!("{} / {} ({})", r.stats.first_timeouts, r.stats.retried, r.stats.retries)
        });
        row("504s answered by a retry", &|r| r.stats.fixed_by_retry.to_string());
        row("retried requests: latency p50 / max (ms)", &|r| {
            if r.stats.retried == 0 {
                "-".to_owned()
            } else {
                format!("{:.1} / {:.1}", r.stats.retried_p50_ms, r.stats.retried_max_ms)
            }
        });
    }
    row("504s whose space later completed", &|r| r.timeouts_split().0.to_string());
    row("504s whose space never completed", &|r| r.timeouts_split().1.to_string());
    row("audit: inconsistent spaces", &|r| r.audit.inconsistencies.len().to_string());
    row("audit: uncertain spaces (told 504, all or nothing)", &|r| r.audit.uncertain.len().to_string());
    row("reconcile: spaces scanned / scan (ms)", &|r| {
        r.reconcile
            .as_ref()
            .map_or_else(|| "not needed".into(), |s| format!("{} / {}", s.spaces_scanned, s.scan_ms))
    });
    row("reconcile: spaces found / rows undone", &|r| {
        r.reconcile.as_ref().map_or_else(|| "not needed".into(), |s| format!("{} / {}", s.found, s.fixed()))
    });
    row("reconcile: took (ms)", &|r| {
        r.reconcile.as_ref().map_or_else(|| "-".into(), |s| s.took_ms.to_string())
    });
    row("audit after reconcile: inconsistent", &|r| {
        r.audit_after_reconcile.as_ref().map_or_else(|| "-".into(), |a| a.inconsistencies.len().to_string())
    });
    row("audit after reconcile: uncertain", &|r| {
        r.audit_after_reconcile.as_ref().map_or_else(|| "-".into(), |a| a.uncertain.len().to_string())
    });
    let kinds: std::collections::BTreeSet<&String> = c.runs.iter().flat_map(|r| r.injected.keys()).collect();
    for kind in kinds {
        let label = format!("faults injected: {kind}");
        row(&label, &|r| r.injected.get(kind).copied().unwrap_or(0).to_string());
    }
    row("components that exited and were restarted", &|r| {
        if r.restarted.is_empty() {
            "none".to_owned()
        } else {
            r.restarted.iter().map(|(name, n)| format!("{name} x{n}")).collect::<Vec<_>>().join(", ")
        }
    });
    rows
}

/// The table, for a terminal.
pub fn table(c: &Comparison) -> String {
    let rows = rows(c);
    let w0 = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(10);
    let w = rows.iter().flat_map(|(_, v)| v.iter().map(String::len)).max().unwrap_or(10).max(10);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} requests at concurrency {}, seed {}, natural refusals {:.0}%, faults: {}",
        c.requests,
        c.concurrency,
        c.seed,
        c.refusal_rate * 100.0,
        c.plan
    );
    let _ = write!(out, "{:<w0$}", "");
    for r in &c.runs {
        let _ = write!(out, "  {:>w$}", r.mode.as_str());
    }
    let _ = writeln!(out);
    for (label, cells) in &rows {
        let _ = write!(out, "{label:<w0$}");
        for cell in cells {
            let _ = write!(out, "  {cell:>w$}");
        }
        let _ = writeln!(out);
    }
    out
}

const COLORS: [&str; 3] = ["#2b6cb0", "#dd6b20", "#2f855a"];

/// Grouped bars: one group per label, one bar per mode, each with its value written on it. A
/// logarithmic scale keeps small counts (the tail of a distribution) visible next to big ones.
fn bars(title: &str, labels: &[String], values: &[Vec<f64>], modes: &[Mode], log: bool) -> String {
    let (w, h, left, bottom, top) = (760.0, 330.0, 20.0, 110.0, 30.0);
    let scale = |v: f64| if log { (1.0 + v).log10() } else { v };
    let max = values.iter().flatten().copied().map(scale).fold(0.0_f64, f64::max).max(1e-9);
    let group = (w - left - 10.0) / labels.len().max(1) as f64;
    let bar = (group * 0.8) / modes.len().max(1) as f64;
    let base = h - bottom;
    let mut svg = format!(
        r#"<figure><figcaption>{}{}</figcaption><svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="100%" style="max-width:{w}px;height:auto" role="img">"#,
        esc(title),
        if log { " <span class=\"note\">(logarithmic scale)</span>" } else { "" }
    );
    let _ = write!(svg, r##"<line x1="{left}" y1="{base}" x2="{}" y2="{base}" stroke="#999"/>"##, w - 10.0);
    for (i, label) in labels.iter().enumerate() {
        let x0 = left + i as f64 * group + group * 0.1;
        for (m, v) in values.iter().enumerate() {
            let val = v.get(i).copied().unwrap_or(0.0);
            let bh = (base - top) * scale(val) / max;
            let x = x0 + m as f64 * bar;
            let _ = write!(
                svg,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{}"><title>{} {}: {val}</title></rect>"#,
                base - bh,
                bar * 0.95,
                COLORS[m % COLORS.len()],
                modes[m].as_str(),
                esc(label)
            );
            let _ = write!(
                svg,
                r##"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle" fill="#222">{val}</text>"##,
                x + bar * 0.475,
                base - bh - 3.0
            );
        }
        let cx = x0 + group * 0.4;
        let _ = write!(
            svg,
            r##"<text x="{cx:.1}" y="{}" font-size="11" text-anchor="end" transform="rotate(-30 {cx:.1} {})" fill="#333">{}</text>"##,
            base + 16.0,
            base + 16.0,
            esc(label)
        );
    }
    // The legend ends at the right edge, 90 px a mode.
    let legend = w - 10.0 - 90.0 * modes.len() as f64;
    for (m, mode) in modes.iter().enumerate() {
        let _ = write!(
            svg,
            r##"<rect x="{}" y="6" width="10" height="10" fill="{}"/><text x="{}" y="15" font-size="12" fill="#333">{}</text>"##,
            legend + m as f64 * 90.0,
            COLORS[m % COLORS.len()],
            legend + 14.0 + m as f64 * 90.0,
            mode.as_str()
        );
    }
    svg.push_str("</svg></figure>");
    svg
}

/// Latency buckets (upper bounds, ms) of the distribution chart.
const BUCKETS: [f64; 12] =
    [2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, f64::INFINITY];

fn histogram(r: &ModeRun) -> Vec<f64> {
    let mut counts = vec![0.0; BUCKETS.len()];
    for us in &r.latencies_us {
        let ms = *us as f64 / 1000.0;
        let i = BUCKETS.iter().position(|b| ms <= *b).unwrap_or(BUCKETS.len() - 1);
        counts[i] += 1.0;
    }
    counts
}

/// Latency over time, one chart per mode on the same scale, with the fault windows shaded.
fn timelines(c: &Comparison) -> String {
    let slowest =
        c.runs.iter().flat_map(|r| r.latencies_us.iter()).max().copied().unwrap_or(0) as f64 / 1000.0;
    // Up to the next power of ten, so the slowest dot sits under a labelled line.
    let y_max = 10f64.powf(slowest.max(10.0).log10().ceil());
    let mut out = String::from(
        r#"<figure><figcaption>Latency of each request over time <span class="note">(logarithmic scale; red bands: a fault in force; red dots: 5xx, 504 or no answer; grey: refused by a rule)</span></figcaption>"#,
    );
    for (i, r) in c.runs.iter().enumerate() {
        let faults: Vec<String> = r
            .faults
            .iter()
            .map(|f| format!("{} {:.1}–{:.1} s", f.kind, f.from_ms as f64 / 1000.0, f.to_ms as f64 / 1000.0))
            .collect();
        let _ = write!(
            out,
            r#"<p><b>{}</b> <span class="note">faults: {}</span></p>{}"#,
            r.mode.as_str(),
            esc(&if faults.is_empty() { "none".to_owned() } else { faults.join(", ") }),
            crate::timeline::chart(r, y_max, COLORS[i % COLORS.len()])
        );
    }
    out.push_str("</figure>");
    out
}

/// The self-contained HTML report: no script, no network, charts inline.
pub fn html(c: &Comparison) -> String {
    let modes: Vec<Mode> = c.runs.iter().map(|r| r.mode).collect();
    let title = format!("Baton: {}", modes.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(" vs "));
    let mut page = String::from(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>TITLE</title><style>
body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}
table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}
td:first-child,th:first-child{text-align:left}td{white-space:nowrap}figure{margin:1.5em 0}figcaption{font-weight:600;margin-bottom:.3em}
.note{color:#555;font-size:.9em}.verdict{font-size:1.1em;background:#f4f7fb;padding:.6em .8em;border-left:4px solid #2b6cb0}</style></head><body><h1>TITLE</h1>"#,
    )
    .replace("TITLE", &esc(&title));
    let _ = write!(
        page,
        r#"<p>{} requests at concurrency {}, seed {}, natural refusals {:.0}%.</p><p>Fault plan, the same in every mode:</p><ul>{}</ul>"#,
        c.requests,
        c.concurrency,
        c.seed,
        c.refusal_rate * 100.0,
        c.plan.split(", ").map(|p| format!("<li>{}</li>", esc(p))).collect::<String>()
    );
    let figures: Vec<_> = c.runs.iter().map(crate::verdict::Figures::of).collect();
    let _ = write!(page, r#"<p class="verdict">{}</p>"#, esc(&crate::verdict::verdict(&figures)));
    page.push_str("<table><tr><th></th>");
    for m in &modes {
        let _ = write!(page, "<th>{}</th>", m.as_str());
    }
    page.push_str("</tr>");
    for (label, cells) in rows(c) {
        let _ = write!(page, "<tr><td>{}</td>", esc(&label));
        for cell in cells {
            let _ = write!(page, "<td>{}</td>", esc(&cell));
        }
        page.push_str("</tr>");
    }
    page.push_str("</table>");
    let bucket_labels: Vec<String> = BUCKETS
        .iter()
        .enumerate()
        .map(|(i, b)| if b.is_infinite() { format!("> {} ms", BUCKETS[i - 1]) } else { format!("<= {b} ms") })
        .collect();
    let hist: Vec<Vec<f64>> = c.runs.iter().map(histogram).collect();
    page.push_str(&bars("Latency distribution: requests per bucket", &bucket_labels, &hist, &modes, true));
    page.push_str(&timelines(c));
    let outcome_labels: Vec<String> = ["200", "4xx", "5xx", "504"].map(String::from).to_vec();
    let outcomes: Vec<Vec<f64>> = c
        .runs
        .iter()
        .map(|r| {
            let s = &r.stats;
            vec![
                s.ok as f64,
                s.client_errors as f64,
                (s.server_errors + s.no_answer) as f64,
                s.timeouts as f64,
            ]
        })
        .collect();
    page.push_str(&bars("Outcomes: requests per answer", &outcome_labels, &outcomes, &modes, true));
    let kinds: Vec<String> = [
        "orphaned records",
        "orphaned placements",
        "orphaned licences",
        "orphaned routes",
        "emails without space",
        "504 then completed",
        "504 never completed",
    ]
    .map(String::from)
    .to_vec();
    let inconsistencies: Vec<Vec<f64>> = c
        .runs
        .iter()
        .map(|r| {
            let o = |s: Service| r.audit.orphans.get(&s).copied().unwrap_or(0) as f64;
            let (done, never) = r.timeouts_split();
            vec![
                o(Service::Records),
                o(Service::Placement),
                o(Service::Entitlements),
                o(Service::Routing),
                r.audit.emails_without_space as f64,
                done as f64,
                never as f64,
            ]
        })
        .collect();
    page.push_str(&bars(
        "Left inconsistent once settled, before reconcile",
        &kinds,
        &inconsistencies,
        &modes,
        false,
    ));
    page.push_str(r#"<p class="note">Made by <code>baton compare</code>. Each mode ran in its own vhost and data dir, every component as its own process; the audit checks that a space told 200 has all five rows and a space told it failed has none.</p></body></html>"#);
    page
}

/// The figures of a chaos run, for a terminal.
pub fn chaos_summary(r: &ModeRun, plan: &str, seconds: u64) -> String {
    let mut out = String::new();
    let s = &r.stats;
    let _ = writeln!(out, "chaos in {} mode for {seconds} s", r.mode.as_str());
    let _ = writeln!(out, "plan             {plan}");
    let _ = writeln!(
        out,
        "requests         {} (200: {}, 4xx: {}, 5xx: {}, 504: {}, no answer: {}), {:.0}/s",
        s.requests, s.ok, s.client_errors, s.server_errors, s.timeouts, s.no_answer, s.per_second
    );
    let _ = writeln!(out, "latency (ms)     p50 {:.1}, p99 {:.1}, max {:.1}", s.p50_ms, s.p99_ms, s.max_ms);
    let injected: Vec<String> = r.injected.iter().map(|(k, n)| format!("{k}: {n}")).collect();
    let _ = writeln!(
        out,
        "faults injected  {}",
        if injected.is_empty() { "none".into() } else { injected.join(", ") }
    );
    let by_kind = |list: &[baton_audit::Finding]| {
        let mut n: BTreeMap<&str, usize> = BTreeMap::new();
        for f in list {
            *n.entry(f.kind.as_str()).or_default() += 1;
        }
        let kinds: Vec<String> = n.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        if kinds.is_empty() { String::new() } else { format!(" ({})", kinds.join(", ")) }
    };
    let _ = writeln!(
        out,
        "audit            {} inconsistent{}, {} uncertain{} ({} spaces, {} complete)",
        r.audit.inconsistencies.len(),
        by_kind(&r.audit.inconsistencies),
        r.audit.uncertain.len(),
        by_kind(&r.audit.uncertain),
        r.audit.spaces,
        r.audit.complete
    );
    if let Some(rec) = &r.reconcile {
        let (after, unsure) =
            r.audit_after_reconcile.as_ref().map_or((0, 0), |a| (a.inconsistencies.len(), a.uncertain.len()));
        let _ = writeln!(
            out,
            "reconcile        scanned {} spaces in {} ms, undid {} rows of {} spaces, {} ms in all; {after} inconsistent, {unsure} uncertain after",
            rec.spaces_scanned,
            rec.scan_ms,
            rec.fixed(),
            rec.found,
            rec.took_ms
        );
        if !rec.failed.is_empty() {
            let _ = writeln!(
                out,
                "                 {} compensations not done, e.g. {}",
                rec.failed.len(),
                rec.failed.iter().take(3).cloned().collect::<Vec<_>>().join("; ")
            );
        }
    }
    let (planned, other) = crate::poison::tally(&r.dead_letters);
    if r.bad_inputs_sent() > 0 {
        let _ = writeln!(
            out,
            "bad input        {} sent to the work queues, {planned} dead-lettered with their reason (a consumer killed before its ack dead-letters one again)",
            r.bad_inputs_sent()
        );
    }
    if r.dead_letters.is_empty() {
        let _ = writeln!(out, "dead letters     none");
    } else {
        for q in &r.dead_letters {
            // Each reason once, with how often it was seen.
            let mut why: BTreeMap<&str, usize> = BTreeMap::new();
            for m in &q.first {
                *why.entry(m.reason.as_str()).or_default() += 1;
            }
            let why: Vec<String> = why.iter().map(|(w, n)| format!("{n} × {w}")).collect();
            let _ = writeln!(out, "dead letters     {}: {} ({})", q.queue, q.count, why.join("; "));
        }
    }
    let _ = writeln!(
        out,
        "lost             {}",
        if r.nothing_lost() {
            "nothing: every saga ended, every outbox is empty, no message dead-lettered but the bad input"
                .to_string()
        } else {
            format!(
                "{} sagas unfinished, {} messages left in outboxes, {other} real messages dead-lettered, {} of {} bad messages not dead-lettered",
                r.unfinished,
                r.left_in_outbox,
                r.bad_inputs_sent().saturating_sub(planned as usize),
                r.bad_inputs_sent()
            )
        }
    );
    let _ = writeln!(
        out,
        "settled after    {} ms{}",
        r.quiesce_ms,
        if r.quiescent { "" } else { " (did not settle in time)" }
    );
    out
}
