//! The report's opening paragraph: what the figures say, in one sentence or three, for any
//! number of modes.

use crate::ModeRun;

/// The figures a verdict is written from, for one mode.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    pub mode: String,
    /// Median latency as measured: what a typical request waited. (The corrected percentiles,
    /// which count the requests a stall kept from being sent, are in the table.)
    pub p50_ms: f64,
    /// Spaces the audit found inconsistent once the system settled.
    pub inconsistent: usize,
    /// Of those, still inconsistent after reconcile (`None`: no reconcile ran).
    pub after_reconcile: Option<usize>,
    pub timeouts: usize,
    /// Every saga ended, every outbox emptied, nothing dead-lettered but the bad input.
    pub nothing_lost: bool,
}

impl Figures {
    pub fn of(r: &ModeRun) -> Figures {
        Figures {
            mode: r.mode.as_str().to_owned(),
            p50_ms: r.stats.measured_p50_ms,
            inconsistent: r.audit.inconsistencies.len(),
            after_reconcile: r.audit_after_reconcile.as_ref().map(|a| a.inconsistencies.len()),
            timeouts: r.stats.timeouts,
            nothing_lost: r.nothing_lost(),
        }
    }
}

fn left(f: &Figures) -> String {
    match (f.inconsistent, f.after_reconcile) {
        (0, _) => "left none".to_owned(),
        (n, Some(after)) => format!("left {n} inconsistent spaces ({after} after reconcile)"),
        (n, None) => format!("left {n} inconsistent spaces"),
    }
}

/// One paragraph: which mode answered fastest at p50 and by how much, what each left
/// inconsistent, and which lost something.
pub fn verdict(modes: &[Figures]) -> String {
    let Some(fastest) = modes.iter().min_by(|a, b| a.p50_ms.total_cmp(&b.p50_ms)) else {
        return "No mode ran.".to_owned();
    };
    let mut out = String::new();
    let others: Vec<&Figures> = modes.iter().filter(|f| f.mode != fastest.mode).collect();
    if others.is_empty() {
        out.push_str(&format!(
            "{} answered in {:.1} ms at p50 and {}",
            fastest.mode,
            fastest.p50_ms,
            left(fastest)
        ));
    } else {
        let ratios: Vec<String> = others
            .iter()
            .map(|o| {
                format!(
                    "{:.1}x faster than {} ({:.1} ms against {:.1} ms)",
                    o.p50_ms / fastest.p50_ms.max(1e-3),
                    o.mode,
                    fastest.p50_ms,
                    o.p50_ms
                )
            })
            .collect();
        let fewest = modes.iter().map(|f| f.inconsistent).min().unwrap_or(0);
        let but = if fastest.inconsistent > fewest { "but" } else { "and" };
        out.push_str(&format!(
            "{} answered {} at p50 {but} {}",
            fastest.mode,
            ratios.join(", "),
            left(fastest)
        ));
        let rest: Vec<String> = others.iter().map(|o| format!("{} {}", o.mode, left(o))).collect();
        out.push_str(&format!("; {}", rest.join("; ")));
    }
    out.push('.');
    let lost: Vec<&str> = modes.iter().filter(|f| !f.nothing_lost).map(|f| f.mode.as_str()).collect();
    if lost.is_empty() {
        out.push_str(" No mode lost a message or left a saga open.");
    } else {
        out.push_str(&format!(" Lost messages or open sagas in: {}.", lost.join(", ")));
    }
    let timeouts: Vec<String> =
        modes.iter().filter(|f| f.timeouts > 0).map(|f| format!("{} {}", f.mode, f.timeouts)).collect();
    if !timeouts.is_empty() {
        out.push_str(&format!(" Requests answered 504: {}.", timeouts.join(", ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(mode: &str, p50_ms: f64, inconsistent: usize, after: Option<usize>) -> Figures {
        Figures {
            mode: mode.into(),
            p50_ms,
            inconsistent,
            after_reconcile: after,
            timeouts: 0,
            nothing_lost: true,
        }
    }

    #[test]
    fn the_faster_mode_is_named_with_its_ratio_and_what_it_left() {
        let v = verdict(&[figures("workflow", 29.0, 0, None), figures("events", 10.0, 42, Some(0))]);
        assert_eq!(
            v,
            "events answered 2.9x faster than workflow (10.0 ms against 29.0 ms) at p50 but left 42 \
             inconsistent spaces (0 after reconcile); workflow left none. No mode lost a message or left a saga open."
        );
    }

    #[test]
    fn a_third_mode_gets_its_own_ratio_and_clause() {
        let mut hybrid = figures("hybrid", 15.0, 0, None);
        hybrid.nothing_lost = false;
        hybrid.timeouts = 3;
        let v = verdict(&[figures("workflow", 30.0, 0, None), figures("events", 10.0, 0, Some(0)), hybrid]);
        assert!(v.starts_with("events answered 3.0x faster than workflow"), "{v}");
        assert!(v.contains("1.5x faster than hybrid (10.0 ms against 15.0 ms) at p50 and left none"), "{v}");
        assert!(v.contains("; workflow left none; hybrid left none."), "{v}");
        assert!(
            v.ends_with("Lost messages or open sagas in: hybrid. Requests answered 504: hybrid 3."),
            "{v}"
        );
    }

    #[test]
    fn one_mode_or_none_still_reads() {
        assert_eq!(verdict(&[]), "No mode ran.");
        let v = verdict(&[figures("workflow", 12.0, 2, None)]);
        assert!(v.starts_with("workflow answered in 12.0 ms at p50 and left 2 inconsistent spaces."), "{v}");
    }
}
