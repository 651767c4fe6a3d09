//! `baton dlq`: the dead-letter queues, listed or replayed.

use std::process::ExitCode;

use anyhow::bail;

use crate::args::DlqCommand;

pub(super) async fn dlq(cmd: DlqCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DlqCommand::List { broker, peek, all, json } => {
            let b = baton_amqp::Broker::connect(&broker.amqp_url, "operator").await?;
            let queues =
                baton_amqp::dlq::list(&b, &baton_amqp::topology::all_queues(&broker.instance), peek).await?;
            b.close().await;
            let shown: Vec<_> = queues.into_iter().filter(|q| all || q.count > 0).collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&shown)?);
            } else {
                for q in &shown {
                    println!("{}: {} message{}", q.queue, q.count, if q.count == 1 { "" } else { "s" });
                    for m in &q.first {
                        println!(
                            "  {} {}: {}",
                            m.message_id.as_deref().unwrap_or("(no id)"),
                            m.kind.as_deref().unwrap_or("(no type)"),
                            m.reason
                        );
                    }
                }
                if shown.is_empty() {
                    eprintln!("every dead-letter queue is empty");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Replay { queue, broker, max } => {
            let known = baton_amqp::topology::all_queues(&broker.instance);
            if !known.iter().any(|q| q.name == queue) {
                let names: Vec<String> = known.into_iter().map(|q| q.name).collect();
                bail!("`{queue}` is not a work queue of Baton; one of: {}", names.join(", "));
            }
            let b = baton_amqp::Broker::connect(&broker.amqp_url, "operator").await?;
            let n = baton_amqp::dlq::replay(&b, &queue, max).await?;
            b.close().await;
            println!("replayed {n} message{} from {queue}.dlq onto {queue}", if n == 1 { "" } else { "s" });
            Ok(ExitCode::SUCCESS)
        }
    }
}
