//! The dashboard's integration tests, in one binary: one test file a module, so that the
//! workspace links one test program a crate instead of one a file (less link time, a
//! tenth of the disk). `cargo test -p <crate> --test integration <file>::` runs one file.

mod differential;
mod jaeger;
mod loki;
mod prometheus;
mod ui_attacks;
