//! The `baton` command: every component, one process or many, and the tools around them.
//!
//! Owns: flags and environment variables, logging set-up, signal handling and the graceful
//! shutdown of whatever runs in this process, and the commands' output. Must not touch:
//! business rules, saga logic, AMQP or SQLite details; it calls the crates that own them.

mod args;
mod commands;
mod inject;
mod shutdown;

pub use args::Cli;

/// Run a parsed command line; the exit code says how it went.
pub fn main(cli: Cli) -> std::process::ExitCode {
    // Dropped last, outside the runtime: the spans still waiting go out before the exit.
    let _telemetry = baton_telemetry::init(&quiet_lapin(&cli.log), cli.log_format, &cli.service_name());
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            say(format_args!("error: cannot start the async runtime: {e}"));
            return std::process::ExitCode::from(2);
        }
    };
    match rt.block_on(commands::dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            // One sentence, with its causes, never a backtrace.
            say(format_args!("error: {}", sentence(&e)));
            // 2: could not run (as clap's usage errors). 1 is kept for a check that ran and
            // found problems (audit inconsistencies, a refused space), which commands return as Ok.
            std::process::ExitCode::from(2)
        }
    }
}

/// An error and its causes as one line, as `{:#}` prints them, but with a cause left out when
/// the message before it already ends with it: the store's and the broker's errors keep their
/// cause as `source` and also say it in their own message.
fn sentence(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain().map(ToString::to_string) {
        if out.is_empty() {
            out = cause;
        } else if !out.ends_with(&cause) {
            out.push_str(": ");
            out.push_str(&cause);
        }
    }
    out
}

/// One line to stderr, whatever became of it: `eprintln!` panics when stderr is a closed pipe,
/// and the exit code must say how the command went, not that its reader went away.
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// lapin logs at ERROR what it also returns to Baton, which reports it once with what to do
/// (a refused handshake came out as five lapin lines before Baton's). Its own events are shown
/// only when the filter names it: `--log info,lapin=debug`.
fn quiet_lapin(spec: &str) -> String {
    if spec.contains("lapin") { spec.to_owned() } else { format!("{spec},lapin=off") }
}

#[cfg(test)]
mod tests {
    use super::{quiet_lapin, sentence};

    #[test]
    fn a_cause_already_in_the_message_is_said_once() {
        let source: baton_store::Cause = "unable to open database file".into();
        let e =
            anyhow::Error::new(baton_store::StoreError::Open { path: "/x/gateway.db".into(), cause: source })
                .context("starting the gateway");
        assert_eq!(
            sentence(&e),
            "starting the gateway: cannot open the store /x/gateway.db: unable to open database file"
        );
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(sentence(&e), "outer: inner");
    }

    #[test]
    fn lapin_is_quiet_unless_named() {
        assert_eq!(quiet_lapin("info"), "info,lapin=off");
        assert_eq!(quiet_lapin("debug,lapin=trace"), "debug,lapin=trace");
    }
}
