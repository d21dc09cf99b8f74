//! Operating vublk: what an operator and systemd see of the daemon.
//!
//! - `notify`: sd_notify (READY=1, STATUS=, STOPPING=1, WATCHDOG=1).
//! - `listen`: socket activation (LISTEN_FDS), the listener on fd 3.
//! - `control`: the control socket (newline-delimited JSON).
//! - `metrics`: Prometheus text exposition over a tiny HTTP/1.0 responder.
//! - `cli`: `vublk stat` and `vublk top`, clients of the control socket.
//! - `privileges`: socket mode and group, dropping root.
//! - `seccomp`: per-thread-kind syscall allowlists.
//! - `state`: the live view (counters, QoS, alarms) all of them report.
//! - `assets`: man pages and shell completions generated from clap.
//!
//! [`start`] wires them around a bound [`Server`]: main calls it once
//! after binding and before [`Server::run`].

pub mod assets;
pub mod cli;
pub mod control;
pub mod listen;
pub mod metrics;
pub mod notify;
pub mod privileges;
pub mod seccomp;
pub mod state;

use std::sync::Arc;

use crate::config::Config;
use crate::vhost_user::server::{Server, ServerEvent};
use crate::worker::DiskContext;

pub use state::{OpsState, Report, RunState};

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Privileges(#[from] privileges::PrivilegeError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error(transparent)]
    Notify(#[from] notify::NotifyError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
}

/// The running operator-facing side; tells systemd we stop when dropped.
pub struct Ops {
    pub state: Arc<OpsState>,
    notifier: Option<Arc<notify::Notifier>>,
}

/// Everything after the vhost-user socket is bound, in the order that keeps
/// the sandbox tight: socket permissions, control and metrics sockets and
/// their threads, dropping root, the listener's seccomp filter, and last
/// READY=1 (the socket listens already, so a frontend may connect).
pub fn start(
    config: &Config,
    ctx: &Arc<DiskContext>,
    server: &mut Server,
    activated: bool,
) -> Result<Ops, OpsError> {
    seccomp::configure(config.ops.seccomp);
    if !activated {
        privileges::set_socket_access(
            &config.socket,
            config.ops.socket_mode,
            config.ops.socket_group.as_deref(),
        )?;
    }
    let identity =
        privileges::Identity::resolve(config.ops.user.as_deref(), config.ops.group.as_deref())?;
    let state = Arc::new(OpsState::new(config, Arc::clone(ctx)));
    let notifier = notify::Notifier::from_env()?.map(Arc::new);

    // Unconfined helper that runs alarm commands (seccomp is per thread and
    // inherited by children, so /bin/sh must not start from a filtered one).
    seccomp::start_spawner();
    // Bind as root; start the (confined) threads only after dropping root:
    // glibc makes every thread run set*id, which their filters refuse.
    let control = match &config.ops.control {
        Some(path) => Some(control::ControlServer::bind(path)?),
        None => None,
    };
    let metrics = match &config.ops.metrics {
        Some(addr) => Some(metrics::MetricsServer::bind(addr)?),
        None => None,
    };
    if let Some(id) = &identity {
        id.drop_privileges()?;
    }
    if let Some(c) = control {
        c.spawn(Arc::clone(&state))?;
    }
    if let Some(m) = metrics {
        m.spawn(Arc::clone(&state))?;
    }
    if let Some(n) = &notifier {
        notify::spawn_status(Arc::clone(n), Arc::clone(&state))?;
    }

    let observer_state = Arc::clone(&state);
    let observer_notifier = notifier.clone();
    server.on_event(Box::new(move |event| {
        observer_state.set_run_state(match event {
            ServerEvent::Listening => RunState::Listening,
            ServerEvent::Connected => RunState::Serving,
            ServerEvent::Disconnected => RunState::Listening,
            ServerEvent::Stopping => RunState::Stopping,
        });
        if let Some(n) = &observer_notifier {
            n.status(&observer_state.status_line());
        }
    }));

    // The listener thread spawns the queue workers, which inherit this
    // filter: it covers both kinds (see `seccomp`).
    seccomp::enter(seccomp::ThreadKind::Listener)?;
    if let Some(n) = &notifier {
        // A manager that cannot be told is no reason not to serve.
        if let Err(e) = n.ready(&state.status_line()) {
            log::warn!("{e}");
        }
    }
    Ok(Ops { state, notifier })
}

impl Drop for Ops {
    fn drop(&mut self) {
        self.state.set_run_state(RunState::Stopping);
        if let Some(n) = &self.notifier {
            n.stopping();
        }
    }
}
