//! Memory-tier controller (vublk-tier).
//!
//! A sidecar that finds the cold pages of a guest's RAM (the shared memfd a
//! QEMU process runs its guest on) and moves them to a slower, cheaper tier
//! (zram or zswap-backed swap, swap on a device, a slower NUMA node) while
//! the guest keeps running unchanged.
//!
//! - [`target`]: the process (pidfd, pagemap, a never-touched mapping of its
//!   memory file for `mincore`), chosen through [`maps`];
//! - [`tracker`]: access tracking behind one trait: [`page_idle`] (idle page
//!   tracking), [`probe`] (eviction probe where the kernel lacks it) and
//!   [`wss`] (clear_refs + smaps working-set estimate);
//! - [`pages`]: per-page saturating age, refault streak, histogram;
//! - [`policy`]: the TOML policy; [`tiers`]: destinations and PSI;
//! - [`controller`]: the loop; [`status`]: the JSON status view;
//! - [`release`]: the shared-page handshake with the vublk daemon;
//! - [`zram`]: create and remove a zram swap device;
//! - [`sys`]: the system calls (all `unsafe` is there).

pub mod controller;
pub mod maps;
pub mod page_idle;
pub mod pages;
pub mod policy;
pub mod probe;
pub mod release;
pub mod status;
pub mod sys;
pub mod target;
pub mod tiers;
pub mod tracker;
pub mod wss;
pub mod zram;

pub use controller::{Controller, ControllerError, Options};
pub use policy::Policy;
pub use release::{request_release, spawn_release_server, ReleaseServer};
pub use status::Status;
