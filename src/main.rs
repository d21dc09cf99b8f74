use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

use vublk::config::{Args, Config};
use vublk::storage::Disk;
use vublk::tier::release::spawn_release_server;
use vublk::vhost_user::backend::release_guest_memory;
use vublk::vhost_user::{BlkBackend, Server};
use vublk::worker::DiskContext;

fn run(args: Args) -> anyhow::Result<()> {
    if let Some(command) = &args.command {
        return Ok(vublk::ops::cli::run(command, &args)?);
    }
    // Socket activation: systemd passes the listening socket as fd 3.
    let activated = vublk::ops::listen::take_listener()?;
    let config = match &activated {
        Some(a) => Config::load_activated(&args, &a.path)?,
        None => Config::load(&args)?,
    };
    let disk = Disk::open(&config.disk, config.cache, config.read_only)?;
    let g = disk.geometry();
    log::info!(
        "disk {}: {} bytes, {}-byte blocks, {} queue(s) of up to {}, {}{}",
        disk.path().display(),
        g.size,
        g.logical_block,
        config.num_queues,
        config.queue_size,
        if disk.direct() {
            "O_DIRECT"
        } else {
            "buffered"
        },
        if config.read_only { ", read-only" } else { "" },
    );
    let disk = Arc::new(disk);
    let ctx = Arc::new(DiskContext::new(Arc::clone(&disk), &config));
    let backend = BlkBackend::new(Arc::clone(&ctx), config.num_queues, config.queue_size);
    let _tier = match &config.ops.tier_socket {
        Some(path) => {
            let mem = backend.memory();
            let release = Arc::new(move || release_guest_memory(&mem));
            Some(
                spawn_release_server(path, release)
                    .with_context(|| format!("tier socket {}", path.display()))?,
            )
        }
        None => None,
    };
    let is_activated = activated.is_some();
    let mut server = match activated {
        Some(a) => Server::from_listener(a.listener, &a.path, backend)?,
        None => Server::bind(&config.socket, backend)?,
    };
    // Socket permissions, control/metrics sockets, dropping root, seccomp
    // and READY=1 for systemd.
    let ops = vublk::ops::start(&config, &ctx, &mut server, is_activated)?;
    // SIGHUP: re-read the config file; QoS limits and suspension apply live.
    server.on_reload(Box::new(move || match Config::reload(&args) {
        Ok((qos, suspend)) => {
            ctx.qos.set_limits(qos);
            ctx.suspension.set_config(suspend);
            log::info!("configuration reloaded: QoS {qos:?}");
        }
        Err(e) => log::error!("configuration not reloaded: {e}"),
    }));
    server.run()?;
    drop(ops);
    drop(server);
    disk.sync().context("final flush of the disk")?;
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // clap's message spans lines (usage, hints); keep the first.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            eprintln!("vublk: error: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, even when a cause (a TOML parser) spans several.
            let text = format!("{e:#}");
            let parts: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("vublk: error: {}", parts.join(": "));
            ExitCode::FAILURE
        }
    }
}
