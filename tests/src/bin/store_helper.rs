//! Test helper for cross-process store tests.
//!
//! `lease`: take the lease `--key` `--count` times; while holding it, create the marker file
//! with `O_EXCL` (fails if another holder is inside too: prints VIOLATION, exits 3), then
//! remove it and release. `seq`: print `--count` values of namespace `--ns`, one a line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use thinpipe::store::{Holder, Store};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    db: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Lease {
        #[arg(long)]
        key: String,
        #[arg(long)]
        count: u32,
        #[arg(long)]
        marker: PathBuf,
    },
    Seq {
        #[arg(long)]
        ns: String,
        #[arg(long)]
        count: u32,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let store = Store::open(&args.db)?;
    match args.cmd {
        Cmd::Lease { key, count, marker } => {
            let me = Holder::this_process();
            let mut held = 0;
            let mut contended = 0u64;
            while held < count {
                if !store.acquire_lease(&key, me, Duration::from_secs(30))? {
                    contended += 1;
                    std::thread::yield_now();
                    continue;
                }
                match std::fs::OpenOptions::new().write(true).create_new(true).open(&marker) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        println!("VIOLATION: {me} holds {key} while another holder is inside");
                        std::process::exit(3);
                    }
                    Err(e) => return Err(e.into()),
                }
                std::fs::remove_file(&marker)?;
                anyhow::ensure!(store.release_lease(&key, me)?, "{me} could not release its own lease");
                held += 1;
            }
            println!("held={held} contended={contended}");
        }
        Cmd::Seq { ns, count } => {
            let mut out = String::new();
            for _ in 0..count {
                out.push_str(&store.next_id(&ns)?.to_string());
                out.push('\n');
            }
            print!("{out}");
        }
    }
    Ok(())
}
