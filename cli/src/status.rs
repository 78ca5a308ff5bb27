//! `ferroclip status`: a running coordinator's summary in the terminal.

use anyhow::{Context, Result};
use clap::Args;
use ferroclip_proto::v1::{coordinator_client::CoordinatorClient, StatusRequest};
use tonic::metadata::MetadataValue;

use crate::coordinator::TokenArgs;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Coordinator gRPC URL, e.g. http://127.0.0.1:50051.
    #[arg(long)]
    pub coordinator: String,
    #[command(flatten)]
    pub token: TokenArgs,
}

pub async fn run(args: StatusArgs) -> Result<()> {
    let token = args.token.resolve()?;
    let mut client = CoordinatorClient::connect(args.coordinator.clone())
        .await
        .with_context(|| format!("connecting to the coordinator at {}", args.coordinator))?;
    let mut req = tonic::Request::new(StatusRequest {});
    req.metadata_mut().insert(
        ferroclip_proto::AUTH_HEADER,
        MetadataValue::try_from(format!("Bearer {token}"))
            .context("run token has invalid characters")?,
    );
    let s = client
        .status(req)
        .await
        .map_err(|e| anyhow::anyhow!("status: {}", e.message()))?
        .into_inner();
    println!(
        "state {}  step {}  epoch {} ({:.0}%)  generation {}  workers {}",
        s.state,
        s.step,
        s.epoch,
        s.epoch_progress * 100.0,
        s.generation,
        s.workers.len()
    );
    for m in &s.metrics {
        println!("  {:<28} {:.5}", m.name, m.value);
    }
    println!(
        "  {:>4}  {:<20} {:<16} {:<8} {:>9} {:>10} {:>11} {:>11}",
        "rank", "worker", "host", "device", "heartbeat", "step_s", "data_wait_s", "allreduce_s"
    );
    for w in &s.workers {
        println!(
            "  {:>4}  {:<20} {:<16} {:<8} {:>8.1}s {:>10.3} {:>11.3} {:>11.3}",
            w.rank,
            w.worker_id,
            w.host,
            w.device,
            w.seconds_since_heartbeat,
            w.step_time_s,
            w.data_wait_s,
            w.allreduce_s
        );
    }
    if !s.last_checkpoint.is_empty() {
        println!("last checkpoint: {}", s.last_checkpoint);
    }
    Ok(())
}
