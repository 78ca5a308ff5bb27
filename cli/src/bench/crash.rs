//! A coordinator crash in the middle of the run: SIGKILL (nothing released, the newest writes
//! perhaps torn), a restart with the same arguments on the same ports, and what it resumed
//! compared with what it had acknowledged.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::probe;
use super::setup::{Coordinator, World};
use super::CoordinatorBench;

#[derive(Debug, Clone, Copy)]
pub struct CrashReport {
    /// The newest step the coordinator had answered as committed when it was killed.
    pub acked_step: u64,
    /// The committed step of the restarted coordinator (never below `acked_step`).
    pub resumed_step: u64,
    /// SIGKILL → serving again (a crashed owner's journal is taken over after its lease).
    pub resume_s: f64,
    /// Reading and replaying the journal (the restarted coordinator's log).
    pub load_s: Option<f64>,
}

/// Kills `coord`, optionally tears the journal's last entry (half an object, as a crash in
/// the middle of a write leaves on a store without atomic creates), restarts it, and reports.
pub async fn crash(
    world: &World,
    b: &CoordinatorBench,
    coord: &mut Coordinator,
    start: usize,
    acked_step: u64,
) -> Result<CrashReport> {
    coord.kill();
    let t = Instant::now();
    if b.crash_tear {
        tear(world).context("tearing the journal's last entry")?;
    }
    *coord = world.start_coordinator(b, start)?;
    coord.wait_ready(Duration::from_secs(60)).await?;
    let resume_s = t.elapsed().as_secs_f64();
    let resumed_step = probe::committed_step(coord.http).await.unwrap_or(0);
    Ok(CrashReport {
        acked_step,
        resumed_step,
        resume_s,
        load_s: probe::journal_load_s(&world.log_path(start)),
    })
}

/// Writes a torn entry after the newest one.
fn tear(world: &World) -> Result<()> {
    let dir = world.journal_dir();
    let newest = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.strip_prefix("snapshot-")?
                .strip_suffix(".json")?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap_or(0);
    let path = dir.join(format!("snapshot-{:020}.json", newest + 1));
    let mut f = std::fs::File::create(&path)?;
    f.write_all(br#"{"format_version":3,"owner":{"host":"#)?;
    Ok(())
}
