use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

use vublk::config::{Args, Config};
use vublk::storage::Disk;
use vublk::vhost_user::{BlkBackend, Server};
use vublk::worker::DiskContext;

fn run(args: Args) -> anyhow::Result<()> {
    let config = Config::load(&args)?;
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
    let ctx = Arc::new(DiskContext::new(
        Arc::clone(&disk),
        &config.serial,
        config.poll,
    ));
    let backend = BlkBackend::new(ctx, config.num_queues, config.queue_size);
    let mut server = Server::bind(&config.socket, backend)?;
    server.run()?;
    drop(server);
    disk.sync().context("final flush of the disk")?;
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vublk: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
