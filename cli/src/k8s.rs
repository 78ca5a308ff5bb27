//! `ferroclip k8s …`: Kubernetes manifests for a run.

use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct K8sArgs {
    #[command(subcommand)]
    pub command: K8sCommand,
}

#[derive(Subcommand, Debug)]
pub enum K8sCommand {}

pub fn run(args: K8sArgs) -> anyhow::Result<()> {
    match args.command {}
}
