//! Memory-tier controller (vublk-tier).
