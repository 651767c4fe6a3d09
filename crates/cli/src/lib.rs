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
    init_tracing(&cli.log);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(commands::dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            // One sentence, with its causes, never a backtrace.
            eprintln!("error: {e:#}");
            // A refusal to start on a configuration that would do harm (2) is not a crash (1).
            let refused = e.chain().any(|c| c.is::<baton_orchestrator::DefinitionsChanged>());
            std::process::ExitCode::from(if refused { 2 } else { 1 })
        }
    }
}

fn init_tracing(default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
