//! `ferroclip shards …`: the command-line face of this crate.

use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct ShardsArgs {
    #[command(subcommand)]
    pub command: ShardsCommand,
}

#[derive(Subcommand, Debug)]
pub enum ShardsCommand {}

pub async fn run(args: ShardsArgs) -> anyhow::Result<()> {
    match args.command {}
}
