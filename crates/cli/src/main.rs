//! `baton`: parse the command line and hand over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    baton_cli::main(baton_cli::Cli::parse())
}
