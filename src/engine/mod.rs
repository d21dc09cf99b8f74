//! I/O engines. The queue threads drive io_uring directly (`uring`); the
//! null disk completes requests inline without any system call.

pub mod uring;
