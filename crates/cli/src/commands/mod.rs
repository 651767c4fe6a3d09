//! What each subcommand does: a module per command or group of commands.

mod dlq;
mod runs;
mod tools;
mod up;
mod workflows;

use std::process::ExitCode;

use anyhow::anyhow;

use crate::args::{Cli, Command, WorkflowsCommand};

pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Up(args) => up::up(args).await,
        Command::Run { component } => up::run(component).await,
        Command::CreateSpace { name, owner, gateway, idempotency_key } => {
            tools::create_space(&gateway, &name, &owner, idempotency_key.as_deref()).await
        }
        Command::Audit { data, json } => tools::audit(&data, json).await,
        Command::Reconcile { data, amqp_url, older_than, every, metrics, json } => {
            tools::reconcile(data, amqp_url, older_than, every, metrics, json).await
        }
        Command::Load { requests, concurrency, gateway, seed, refusal_rate, json, retry_timeouts } => {
            tools::load(requests, concurrency, gateway, seed, refusal_rate, json, retry_timeouts).await
        }
        Command::Compare(args) => runs::compare(args).await,
        Command::Chaos(args) => runs::chaos(args).await,
        Command::Bench(args) => runs::bench(args).await,
        Command::Workflows { command: WorkflowsCommand::Retry { id, data, broker } } => {
            workflows::retry(id, data, broker).await
        }
        Command::Workflows { command: WorkflowsCommand::Cancel { id, mode, data, broker } } => {
            workflows::cancel(id, mode, data, broker).await
        }
        Command::Workflows { command } => workflows::workflows(command).await,
        Command::Dlq { command } => dlq::dlq(command).await,
        Command::Completions { shell } => {
            // Into a buffer first: clap_complete panics on a failed write, and a reader such
            // as `head` may close the pipe early.
            let mut script = Vec::new();
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "baton",
                &mut script,
            );
            match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    Err(anyhow!(e).context("writing the completion script to stdout"))
                }
                _ => Ok(ExitCode::SUCCESS),
            }
        }
    }
}
