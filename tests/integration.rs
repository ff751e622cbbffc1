//! The platform's end-to-end tests (the `sfaas` binary), in one binary: one test file a module, so that the
//! workspace links one test program a crate instead of one a file (less link time, a
//! tenth of the disk). `cargo test -p <crate> --test integration <file>::` runs one file.

mod billing_e2e;
mod billing_state;
mod cli;
mod collector_durability;
mod common;
mod dashboard_browser;
mod etl;
mod etl_e2e;
mod export_faults;
mod flow_resume;
mod logs;
mod other_hosts;
