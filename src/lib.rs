//! vublk: a vhost-user-blk backend daemon.
//!
//! The data path reads top to bottom: `vhost_user` (control plane, one
//! frontend at a time) starts one `worker` per virtqueue; a worker pops
//! descriptor chains, `virtio::request` parses and validates them, and
//! `engine::uring` turns them into io_uring operations on a `storage::Disk`.

pub mod config;
pub mod engine;
pub mod ops;
pub mod qos;
pub mod stats;
pub mod storage;
pub mod suspend;
pub mod tier;
pub mod vhost_user;
pub mod virtio;
pub mod worker;
