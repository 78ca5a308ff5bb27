//! The benchmark's world: a synthetic manifest (the coordinator reads only block row counts,
//! so no shard file exists), the run's config, and the coordinator process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferroclip_shards::{Manifest, ShardInfo, Split, Stats, FORMAT_VERSION, MANIFEST_FILE};

use super::{probe, CoordinatorBench};

/// The run token of benchmark runs (loopback only).
pub const TOKEN: &str = "bench-coordinator-token";
/// Row groups per synthetic shard.
const BLOCKS_PER_SHARD: u32 = 100;

pub struct World {
    pub dir: PathBuf,
    pub run_dir: String,
    config: PathBuf,
    /// Every start of the coordinator serves on these (workers reconnect after a restart).
    grpc: u16,
    http: u16,
}

impl World {
    pub fn prepare(dir: &Path, b: &CoordinatorBench) -> Result<Self> {
        let data = dir.join("data");
        std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        let manifest = synthetic_manifest(b.blocks.max(1), b.rows_per_block.max(1));
        std::fs::write(data.join(MANIFEST_FILE), serde_json::to_vec(&manifest)?)
            .context("writing the synthetic manifest")?;
        let run_dir = dir.join("run").display().to_string();
        let config = dir.join("run.toml");
        std::fs::write(&config, run_toml(b, &data, &run_dir)).context("writing run.toml")?;
        Ok(Self {
            dir: dir.to_path_buf(),
            run_dir,
            config,
            grpc: free_port()?,
            http: free_port()?,
        })
    }

    pub fn journal_dir(&self) -> PathBuf {
        PathBuf::from(&self.run_dir).join("journal")
    }

    pub fn log_path(&self, start: usize) -> PathBuf {
        self.dir.join(format!("coordinator-{start}.log"))
    }

    /// Starts `ferroclip coordinator` (this very binary) on free loopback ports; the first start
    /// (`start` 0) begins the run afresh, later ones resume its journal.
    pub fn start_coordinator(&self, b: &CoordinatorBench, start: usize) -> Result<Coordinator> {
        let (grpc, http) = (self.grpc, self.http);
        let exe = std::env::current_exe().context("locating the ferroclip binary")?;
        let pin = b.coordinator_core != "none" && has_taskset();
        let mut cmd = if pin {
            let mut c = Command::new("taskset");
            c.args(["-c", &b.coordinator_core]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.arg("coordinator")
            .arg("--config")
            .arg(&self.config)
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
            .args(["--http-addr", &format!("127.0.0.1:{http}")])
            .env("FERROCLIP_TOKEN", TOKEN)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null());
        if start == 0 {
            cmd.arg("--fresh");
        }
        let log = std::fs::File::create(self.log_path(start)).context("coordinator log")?;
        cmd.stdout(log.try_clone()?).stderr(log);
        let child = cmd.spawn().context("starting the coordinator")?;
        tracing::info!(
            pid = child.id(),
            grpc,
            http,
            pinned = pin,
            "coordinator started"
        );
        Ok(Coordinator {
            child,
            endpoint: format!("http://127.0.0.1:{grpc}"),
            http,
        })
    }
}

pub struct Coordinator {
    child: Child,
    pub endpoint: String,
    pub http: u16,
}

impl Coordinator {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until its HTTP side answers `/readyz` (the journal is claimed by then).
    pub async fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the coordinator exited ({status}) before serving");
            }
            if probe::http_get(self.http, "/readyz").await.is_some() {
                return Ok(());
            }
            if t.elapsed() > limit {
                bail!("the coordinator did not serve within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no clean stop, no released journal.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill();
    }
}

fn synthetic_manifest(blocks: u32, rows: u32) -> Manifest {
    let shards = (0..blocks.div_ceil(BLOCKS_PER_SHARD))
        .map(|s| {
            let n = BLOCKS_PER_SHARD.min(blocks - s * BLOCKS_PER_SHARD);
            ShardInfo {
                path: format!("train/shard-{s:05}.parquet"),
                rows: u64::from(n * rows),
                bytes: 0,
                sha256: String::new(),
                row_groups: vec![u64::from(rows); n as usize],
            }
        })
        .collect::<Vec<_>>();
    let total = u64::from(blocks) * u64::from(rows);
    Manifest {
        format_version: FORMAT_VERSION,
        splits: BTreeMap::from([(
            "train".to_string(),
            Split {
                shards,
                rows: total,
                bytes: 0,
            },
        )]),
        schema: Vec::new(),
        rejected: BTreeMap::new(),
        stats: Stats::default(),
        command: vec!["ferroclip bench coordinator".into()],
        build_id: "bench".into(),
        input_rows: total,
    }
}

fn run_toml(b: &CoordinatorBench, data: &Path, run_dir: &str) -> String {
    let n = b.workers;
    format!(
        r#"[run]
name = "bench-coordinator"
dir = "{run_dir}"
seed = 1
steps = {steps}
audit = false
[data]
root = "{data}"
shuffle_window_blocks = 4
lanes = {lanes}
[optim]
global_batch = {batch}
warmup_steps = 0
[checkpoint]
every_steps = {ckpt}
keep = 2
[cluster]
min_workers = {min}
max_workers = {n}
settle_s = 1.0
heartbeat_interval_s = {hb}
heartbeat_timeout_s = {hb_timeout}
"#,
        steps = b.steps,
        data = data.display(),
        batch = n * b.per_rank_batch,
        lanes = b.lanes,
        ckpt = b.checkpoint_every,
        hb = 1.0 / b.heartbeat_hz.max(0.01),
        hb_timeout = b.heartbeat_timeout_s,
        // With a death the survivors must be enough to form.
        min = if b.kill_at.is_some() {
            n.saturating_sub(1).max(1)
        } else {
            n
        },
    )
}

fn free_port() -> Result<u16> {
    Ok(ferroclip_proto::ports::spare_loopback_port()?)
}

/// Moves every thread of this process (the simulated workers) to the cores the coordinator is
/// not pinned to, so it has its core to itself and the load generator's threads do not queue
/// its calls. The cores left, as a taskset list; None when none are left or there is no taskset.
pub fn keep_off_core(core: &str) -> Option<String> {
    let core: u32 = core.parse().ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let allowed = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
    let others: Vec<String> = cpu_list(allowed.trim())
        .into_iter()
        .filter(|&c| c != core)
        .map(|c| c.to_string())
        .collect();
    if others.is_empty() || !has_taskset() {
        return None;
    }
    let list = others.join(",");
    let pid = std::process::id().to_string();
    let ok = Command::new("taskset")
        .args(["-a", "-c", "-p", &list, &pid])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(list)
}

/// `0-3,6` → [0, 1, 2, 3, 6] (the kernel's CPU list format); malformed parts are skipped.
fn cpu_list(s: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let bounds: Vec<Option<u32>> = part.split('-').map(|n| n.trim().parse().ok()).collect();
        match bounds.as_slice() {
            [Some(a)] => out.push(*a),
            [Some(a), Some(b)] if a <= b && b - a < 4096 => out.extend(*a..=*b),
            _ => {}
        }
    }
    out
}

fn has_taskset() -> bool {
    Command::new("taskset")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_lists_read_as_the_kernel_writes_them() {
        assert_eq!(super::cpu_list("0-3,6"), vec![0, 1, 2, 3, 6]);
        assert_eq!(super::cpu_list("1"), vec![1]);
        assert_eq!(super::cpu_list("x,2-1,5"), vec![5]);
    }
}
