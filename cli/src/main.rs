//! `lfmctl`: the command-line client of the lfmd daemon.
//!
//! The client commands (`ask`, `chat`, `status`, `info`, `tokenize`) arrive
//! with the daemon; today the binary only reports its version.

use clap::Parser;

/// Talk to a running lfmd daemon.
#[derive(Parser)]
#[command(name = "lfmctl", version, about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    eprintln!("lfmctl: no daemon commands yet; see `lfmd --help` for the offline tools");
    std::process::exit(2);
}
