//! vublk-tier: the memory-tier controller sidecar.
//!
//! `vublk-tier --pid PID` manages the largest shared memfd mapping of
//! process PID (a QEMU guest's RAM) with the default policy;
//! `vublk-tier status` prints the status of a running controller.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use vublk::tier::maps::Selector;
use vublk::tier::policy::{parse_duration, Dur, Policy, TrackerChoice};
use vublk::tier::status::{default_path, Status};
use vublk::tier::{tiers, tracker, Controller, Options};

#[derive(Parser, Debug)]
#[command(
    name = "vublk-tier",
    version,
    about = "Move the cold pages of a guest's RAM to a slower tier (zram, swap, a slower NUMA node)",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Target process (QEMU): its largest shared memfd mapping is managed.
    #[arg(long)]
    pid: Option<i32>,
    /// Manage the largest shared mapping whose path contains this text
    /// (a memory backend name, or a /dev/shm or hugetlbfs file).
    #[arg(long, conflicts_with = "range")]
    mapping: Option<String>,
    /// Manage exactly this address range of the target (hex START-END).
    #[arg(long)]
    range: Option<String>,
    /// TOML policy file (see examples/tier-policy.toml).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Override the policy's scan interval (e.g. 10s, 500ms).
    #[arg(long, value_parser = parse_duration)]
    scan_interval: Option<Duration>,
    /// Override the policy's cold age, in scans.
    #[arg(long)]
    cold_age: Option<u8>,
    /// Override the tracker: auto, page-idle, probe or wss.
    #[arg(long)]
    tracker: Option<TrackerChoice>,
    /// Status file [default: /run/vublk-tier/PID.json].
    #[arg(long)]
    status: Option<PathBuf>,
    /// A vublk release socket (its --tier-socket), asked to drop its view
    /// of guest RAM before each pageout pass. Repeatable.
    #[arg(long = "vublk-socket")]
    vublk_socket: Vec<PathBuf>,
    /// Stop after this many scans.
    #[arg(long)]
    max_scans: Option<u64>,
    /// Print the effective policy as TOML and exit.
    #[arg(long)]
    print_policy: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print the status of a running (or finished) controller.
    Status {
        /// Status file to read.
        #[arg(long)]
        status: Option<PathBuf>,
        /// Read /run/vublk-tier/PID.json.
        #[arg(long)]
        pid: Option<i32>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print which trackers and tiers can run on this host.
    Capabilities {
        /// Target process (for the per-process checks).
        #[arg(long)]
        pid: Option<i32>,
    },
}

fn status_file(status: Option<PathBuf>, pid: Option<i32>) -> Result<PathBuf> {
    if let Some(s) = status {
        return Ok(s);
    }
    if let Some(p) = pid {
        return Ok(default_path(p));
    }
    let dir = Path::new("/run/vublk-tier");
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("no --status given and {} unreadable", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    match files.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("no status files in {}; give --status FILE", dir.display()),
        many => bail!(
            "several controllers ({}); give --status FILE or --pid PID",
            many.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn cmd_status(status: Option<PathBuf>, pid: Option<i32>, json: bool) -> Result<()> {
    let path = status_file(status, pid)?;
    let s = Status::read(&path)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", s.render());
    }
    Ok(())
}

fn cmd_capabilities(pid: Option<i32>) -> Result<()> {
    let pid = pid.unwrap_or(std::process::id() as i32);
    println!("trackers:");
    for a in tracker::availability(pid) {
        println!(
            "  {:<10} {:<4} {}",
            a.name,
            if a.available { "yes" } else { "no" },
            a.reason
        );
    }
    println!("tiers (default policy):");
    let (_, st) = tiers::resolve(&Policy::default().tiers, &tiers::HostFacts::read());
    for t in st {
        println!(
            "  {:<10} {:<4} {}",
            t.tier,
            if t.available { "yes" } else { "no" },
            t.detail
        );
    }
    Ok(())
}

fn cmd_run(a: RunArgs) -> Result<()> {
    let mut policy = match &a.policy {
        Some(p) => Policy::load(p)?,
        None => Policy::default(),
    };
    if let Some(i) = a.scan_interval {
        policy.scan_interval = Dur(i);
    }
    if let Some(c) = a.cold_age {
        policy.cold_age = c;
        policy.max_cold_age = policy.max_cold_age.max(c);
    }
    if let Some(t) = a.tracker {
        policy.tracker = t;
    }
    policy.validate()?;
    if a.print_policy {
        print!("{}", toml::to_string(&policy)?);
        return Ok(());
    }
    let Some(pid) = a.pid else {
        bail!("--pid PID is required (or a subcommand: status, capabilities)");
    };
    let selector = match (&a.mapping, &a.range) {
        (Some(m), _) => Selector::Name(m.clone()),
        (None, Some(r)) => Selector::parse_range(r)?,
        (None, None) => Selector::Auto,
    };
    let status_path = a.status.clone().unwrap_or_else(|| default_path(pid));
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    let mut c = Controller::new(Options {
        pid,
        selector,
        policy,
        status_path: Some(status_path.clone()),
        vublk_sockets: a.vublk_socket.clone(),
        max_scans: a.max_scans,
    })
    .with_context(|| format!("starting on process {pid}"))?;
    let st = c.status();
    log::info!(
        "managing {} of process {pid} with tracker {}; tiers: {}; status in {}",
        st.mapping,
        st.tracker.as_ref().map_or("?", |t| t.name.as_str()),
        st.tiers
            .iter()
            .map(|t| format!("{}={}", t.tier, if t.available { "yes" } else { "no" }))
            .collect::<Vec<_>>()
            .join(" "),
        status_path.display()
    );
    let end = c.run(&stop)?;
    log::info!(
        "{} after {} scans: moved {} MiB, refaulted {} MiB, {} pages skipped",
        end.state,
        end.scans,
        end.bytes.moved_total >> 20,
        end.bytes.refaulted_total >> 20,
        end.pages_skipped_total
    );
    Ok(())
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Status { status, pid, json }) => cmd_status(status, pid, json),
        Some(Cmd::Capabilities { pid }) => cmd_capabilities(pid),
        None => cmd_run(cli.run),
    }
}
