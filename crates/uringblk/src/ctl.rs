//! `uringblk ctl`: the control socket's client, for operators and scripts. Prints the reply's
//! result as JSON on stdout; an error reply or an unreachable server is one line on stderr.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use control::{Command, Reply};

#[derive(Parser, Debug)]
#[command(
    name = "uringblk ctl",
    about = "Ask a running uringblk (started with --control PATH) what it is doing"
)]
pub struct CtlCli {
    /// The server's control socket (its --control PATH).
    #[arg(long, value_name = "PATH")]
    control: PathBuf,

    /// Seconds to wait for the reply (a flush lasts as long as the disk needs).
    #[arg(long, default_value_t = 60, value_name = "S")]
    timeout: u64,

    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand, Debug)]
enum CtlCommand {
    /// Per-queue and per-iothread statistics (the same JSON as SIGUSR1 prints).
    Stats,
    /// The image, its size, the device's features, queues and iothreads.
    Info,
    /// Make everything written so far durable (fdatasync of the image).
    Flush,
    /// The write-cache mode in force, as the driver negotiated it.
    WriteCache,
    /// Grow the disk while the guest runs, and tell the guest (its /sys/block/vdX/size
    /// changes). A file image: give SIZE, it is grown to SIZE (never shrunk; whole logical
    /// blocks; not read-only). A block device: grow it first (e.g. `losetup -c` after growing
    /// a loop device's file), then run `resize` without SIZE to take the size it has now, or
    /// with SIZE to insist that it be exactly that.
    Resize {
        /// New size in bytes (suffixes K, M, G, T as for --create); leave it out for a block
        /// device to re-read its size.
        #[arg(value_name = "SIZE", value_parser = crate::cli::parse_size)]
        size: Option<u64>,
    },
}

/// Runs `uringblk ctl ARGS` (`args` starts with the program name).
pub fn run(args: impl Iterator<Item = String>) -> ExitCode {
    let cli = CtlCli::parse_from(args);
    let command = match cli.command {
        CtlCommand::Stats => Command::Stats,
        CtlCommand::Info => Command::Info,
        CtlCommand::Flush => Command::Flush,
        CtlCommand::WriteCache => Command::WriteCache,
        CtlCommand::Resize { size } => Command::Resize { size },
    };
    match control::request(&cli.control, &command, Duration::from_secs(cli.timeout)) {
        Ok(Reply::Ok(result)) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&result).unwrap_or_else(|_| result.to_string())
            );
            ExitCode::SUCCESS
        }
        Ok(Reply::Error(e)) => {
            eprintln!("uringblk ctl: error: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("uringblk ctl: error: {e}");
            ExitCode::from(2)
        }
    }
}
