//! All-reduce bus bandwidth of the ring (TCP on loopback, or shared memory), one process per
//! rank.
//!
//! `allreduce_bench --world 2` picks free ports, starts `world` copies of itself (one per rank)
//! and prints, from rank 0, one JSON line per size:
//! {"impl":"ferroclip-ring","transport":"tcp","world":2,"bytes":...,"ms":...,"busbw_gbs":...}
//! busbw = algbw × 2(n−1)/n, algbw = bytes / time (GB = 1e9 bytes), as nccl-tests reports.

use std::net::TcpListener;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use ferroclip_worker::collective::{
    Collective, RingCollective, RingOptions, Transport as RingTransport, WireDtype,
};
use tch::{Device, Kind, Tensor};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Dtype {
    F32,
    Bf16,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Transport {
    Auto,
    Tcp,
    Shm,
}

#[derive(Parser, Debug)]
struct Args {
    /// Number of ranks (processes).
    #[arg(long, default_value_t = 2)]
    world: usize,
    /// Buffer sizes in MiB of f32.
    #[arg(long, value_delimiter = ',', default_value = "1,16,100")]
    sizes_mib: Vec<usize>,
    /// Timed iterations per size (after 3 warm-up ones); 0 = about 1 GiB moved per size.
    #[arg(long, default_value_t = 0)]
    iters: usize,
    /// Wire format.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    /// Pipelining chunk in KiB (default: the library's).
    #[arg(long)]
    chunk_kib: Option<usize>,
    /// How all-reduce data moves between the ranks.
    #[arg(long, value_enum, default_value_t = Transport::Tcp)]
    transport: Transport,
    /// Shared-memory chunk (one doorbell each) in KiB (default: the library's).
    #[arg(long)]
    shm_chunk_kib: Option<usize>,
    /// Internal: this process's rank.
    #[arg(long)]
    rank: Option<usize>,
    /// Internal: every rank's address, comma separated.
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.rank {
        None => launch(&args),
        Some(rank) => run_rank(&args, rank),
    }
}

/// Start one child process per rank and wait for all of them.
fn launch(args: &Args) -> Result<()> {
    if args.world == 0 {
        bail!("--world must be at least 1");
    }
    // Reserve free ports, release them, hand them to the children (fine on a quiet loopback).
    let ports: Vec<String> = (0..args.world)
        .map(|_| {
            let l = TcpListener::bind("127.0.0.1:0")?;
            Ok(l.local_addr()?.to_string())
        })
        .collect::<Result<_>>()?;
    let exe = std::env::current_exe()?;
    let mut children: Vec<Child> = Vec::new();
    for rank in 0..args.world {
        let mut cmd = Command::new(&exe);
        cmd.arg("--world")
            .arg(args.world.to_string())
            .arg("--sizes-mib")
            .arg(
                args.sizes_mib
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .arg("--iters")
            .arg(args.iters.to_string())
            .arg("--dtype")
            .arg(format!("{:?}", args.dtype).to_lowercase())
            .arg("--transport")
            .arg(format!("{:?}", args.transport).to_lowercase())
            .arg("--rank")
            .arg(rank.to_string())
            .arg("--peers")
            .arg(ports.join(","));
        if let Some(c) = args.chunk_kib {
            cmd.arg("--chunk-kib").arg(c.to_string());
        }
        if let Some(c) = args.shm_chunk_kib {
            cmd.arg("--shm-chunk-kib").arg(c.to_string());
        }
        children.push(cmd.spawn().context("starting a rank")?);
    }
    let mut failed = false;
    for (rank, mut c) in children.into_iter().enumerate() {
        let status = c.wait()?;
        if !status.success() {
            eprintln!("rank {rank} exited with {status}");
            failed = true;
        }
    }
    if failed {
        bail!("a rank failed");
    }
    Ok(())
}

fn run_rank(args: &Args, rank: usize) -> Result<()> {
    // One thread for our own work: the ring has its own sender thread; the machine has 2 cores.
    tch::set_num_threads(1);
    let me = args.peers.get(rank).context("--peers lacks this rank")?;
    let listener = TcpListener::bind(me).with_context(|| format!("binding {me}"))?;
    let mut opts = RingOptions {
        timeout: Duration::from_secs(60),
        dtype: match args.dtype {
            Dtype::F32 => WireDtype::Fp32,
            Dtype::Bf16 => WireDtype::Bf16,
        },
        transport: match args.transport {
            Transport::Auto => RingTransport::Auto,
            Transport::Tcp => RingTransport::Tcp,
            Transport::Shm => RingTransport::Shm,
        },
        ..RingOptions::default()
    };
    if let Some(c) = args.chunk_kib {
        opts.chunk_bytes = c * 1024;
    }
    if let Some(c) = args.shm_chunk_kib {
        opts.shm_chunk_bytes = c * 1024;
    }
    let mut ring = RingCollective::connect(rank, &args.peers, listener, opts)?;
    let transport = ring.transport();
    // What was used: shared memory carries f32 whatever the wire dtype, in its own chunks.
    let (dtype, chunk_bytes) = match transport {
        RingTransport::Shm => (Dtype::F32, ring.options().shm_chunk_bytes),
        _ => (args.dtype, ring.options().chunk_bytes),
    };
    let n = ring.world_size();
    for &mib in &args.sizes_mib {
        let bytes = mib << 20;
        let iters = if args.iters > 0 {
            args.iters
        } else {
            (1024 / mib.max(1)).clamp(5, 200)
        };
        // Zeros: repeated sums stay finite (the values do not change the cost).
        let mut t = Tensor::zeros([(bytes / 4) as i64], (Kind::Float, Device::Cpu));
        for _ in 0..3 {
            ring.all_reduce_sum(&mut t)?;
        }
        ring.barrier()?;
        let start = Instant::now();
        for _ in 0..iters {
            ring.all_reduce_sum(&mut t)?;
        }
        let secs = start.elapsed().as_secs_f64() / iters as f64;
        ring.barrier()?;
        if rank == 0 {
            let algbw = bytes as f64 / secs / 1e9;
            let busbw = algbw * 2.0 * (n as f64 - 1.0) / n as f64;
            println!(
                "{{\"impl\":\"ferroclip-ring\",\"transport\":\"{}\",\"dtype\":\"{:?}\",\"chunk_kib\":{},\"world\":{n},\"bytes\":{bytes},\"iters\":{iters},\"ms\":{:.3},\"algbw_gbs\":{algbw:.3},\"busbw_gbs\":{busbw:.3}}}",
                format!("{transport:?}").to_lowercase(),
                dtype,
                chunk_bytes / 1024,
                secs * 1e3,
            );
        }
    }
    Ok(())
}
