//! The vhost-user control plane: the request handler of our virtio-blk
//! device (`backend`) and the socket server that accepts one frontend at a
//! time and keeps listening after it goes away (`server`).

pub mod backend;
pub mod inflight;
pub mod server;

pub use backend::BlkBackend;
pub use server::Server;
