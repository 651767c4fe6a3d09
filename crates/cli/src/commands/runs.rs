//! `baton compare`, `baton chaos` and `baton bench`: runs of whole fleets of `baton run`
//! processes, each in a fresh vhost and data dir.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use baton_faults::FaultPlan;
use baton_protocol::Mode;

use crate::args::{BenchArgs, ChaosArgs, CompareArgs};

pub(super) async fn compare(args: CompareArgs) -> anyhow::Result<ExitCode> {
    if args.requests == 0 || args.concurrency == 0 {
        bail!("--requests and --concurrency must be at least 1");
    }
    if !(0.0..=1.0).contains(&args.refusal_rate) {
        bail!("--refusal-rate {}: give a share between 0 and 1", args.refusal_rate);
    }
    let faults = FaultPlan::parse(&args.faults, args.seed).map_err(|e| anyhow!("--faults: {e}"))?;
    let opts = baton_compare::Options {
        modes: args.modes.iter().map(|m| Mode::from(*m)).collect(),
        baton_bin: std::env::current_exe().context("finding the baton binary")?,
        amqp_base: args.broker.amqp_url.clone(),
        mgmt: args.broker.mgmt(),
        out_dir: args.out_dir.clone(),
        requests: args.requests,
        concurrency: args.concurrency,
        seed: args.seed,
        refusal_rate: args.refusal_rate,
        faults,
        quiesce_timeout: args.settle_timeout,
        keep_vhosts: args.keep_vhosts,
        progress: true,
        duration: None,
        broker_ctl: None,
        deadline: args.deadline,
        database_url: args.scale.database_url.clone(),
        instances: args.scale.instances,
        retry_timeouts: args.retry_timeouts,
        workflow: args.workflow.clone(),
    };
    let modes: Vec<&str> = opts.modes.iter().map(|m| m.as_str()).collect();
    eprintln!(
        "comparing {}: {} requests at concurrency {}, faults: {}",
        modes.join(", "),
        args.requests,
        args.concurrency,
        opts.faults
    );
    let result = baton_compare::compare(&opts).await?;
    if let Some(dir) = args.report.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.report, baton_compare::report::html(&result))
        .with_context(|| format!("writing the report to {}", args.report.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        print!("{}", baton_compare::report::table(&result));
    }
    eprintln!("report: {}", args.report.display());
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn chaos(args: ChaosArgs) -> anyhow::Result<ExitCode> {
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let faults = FaultPlan::parse(&args.faults, args.seed).map_err(|e| anyhow!("--faults: {e}"))?;
    let mode = Mode::from(args.mode);
    let opts = baton_compare::Options {
        modes: vec![mode],
        baton_bin: std::env::current_exe().context("finding the baton binary")?,
        amqp_base: args.broker.amqp_url.clone(),
        mgmt: args.broker.mgmt(),
        out_dir: args.out_dir.clone(),
        requests: 10_000_000,
        concurrency: args.concurrency,
        seed: args.seed,
        refusal_rate: args.refusal_rate,
        faults,
        quiesce_timeout: Duration::from_secs(120),
        keep_vhosts: args.keep_vhost,
        progress: true,
        duration: Some(args.duration),
        broker_ctl: args.broker_ctl.clone(),
        deadline: None,
        database_url: args.scale.database_url.clone(),
        instances: args.scale.instances,
        retry_timeouts: None,
        workflow: args.workflow.clone(),
    };
    eprintln!("chaos in {mode} mode for {} s: {}", args.duration.as_secs(), opts.faults);
    if opts.broker_ctl.is_none() && !opts.faults.broker_restarts.is_empty() {
        eprintln!(
            "(no --broker-ctl: the planned broker restart is skipped; e.g. --broker-ctl \"rabbitmqctl -n rabbit@localhost\")"
        );
    }
    if mode.runs_sagas()
        && !opts.faults.clock_jumps.is_empty()
        && baton_compare::clock::FakeClock::library().is_none()
    {
        eprintln!(
            "(no libfaketime: the planned clock jumps are skipped; install the Debian package `faketime`)"
        );
    }
    let run = baton_compare::chaos(&opts, mode).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&run)?);
    } else {
        print!(
            "{}",
            baton_compare::report::chaos_summary(&run, &opts.faults.to_string(), args.duration.as_secs())
        );
    }
    let ok = run.nothing_lost() && (mode == Mode::Events || run.audit.is_consistent());
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

pub(super) async fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let mut opts = baton_bench::Options::new(
        std::env::current_exe().context("finding the baton binary")?,
        args.broker.amqp_url.clone(),
        args.broker.mgmt(),
        args.out_dir.clone(),
    );
    opts.sequential = args.sequential;
    opts.warmup = args.warmup;
    opts.windows = args.windows.clone();
    opts.duration = args.duration;
    opts.modes = args.modes.iter().map(|m| Mode::from(*m)).collect();
    opts.workflow = args.workflow.clone();
    opts.workflow_files = args.workflow_files.clone();
    opts.instances = args.instances;
    opts.database_url = args.database_url.clone();
    opts.scaling = args.scaling.clone();
    opts.instrumentation = args.instrumentation;
    opts.stages = args.stages;
    opts.queue_type = args.queue_type;
    opts.classic_row = args.classic_row;
    opts.prefill = args.prefill;
    opts.hold = args.hold;
    if let Some(retain) = args.retain {
        opts.component_args.extend(["--retain".into(), humantime::format_duration(retain).to_string()]);
    }
    opts.progress = true;
    let report = baton_bench::run(&opts).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        eprint!("{}", baton_bench::table(&report));
    } else {
        print!("{}", baton_bench::table(&report));
    }
    Ok(ExitCode::SUCCESS)
}
