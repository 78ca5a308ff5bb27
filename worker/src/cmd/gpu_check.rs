//! `ferroclip-worker gpu-check`: what one GPU machine can do, in one command (run by
//! scripts/gpu-check.sh): device facts, a 1-rank NCCL self-test, and training steps/s and model
//! FLOPs utilisation of a preset (ViT-B-16 by default) in bf16 at the largest batch that fits.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use tch::{Device, Kind, Tensor};

use crate::collective::nccl::{self, NcclCollective};
use crate::collective::{Collective, Single};
use crate::data::tokenizer;
use crate::model::ModelConfig;
use crate::train::Trainer;

#[derive(Args, Debug, Clone)]
pub struct GpuCheckArgs {
    /// "cuda", "cuda:N" (or "cpu", to try the command itself without a GPU).
    #[arg(long, default_value = "cuda")]
    pub device: String,
    #[arg(long, default_value = "ViT-B-16")]
    pub preset: String,
    /// Batch per step; 0 = the largest of --batches that fits in memory.
    #[arg(long, default_value_t = 0)]
    pub batch: i64,
    /// Batches tried, largest first, when --batch is 0.
    #[arg(long, value_delimiter = ',', default_value = "256,128,64,32,16,8")]
    pub batches: Vec<i64>,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// autocast-bf16 (fp32 weights, bf16 matmuls), bf16 (weights in bf16) or fp32.
    #[arg(long, default_value = "autocast-bf16")]
    pub precision: String,
    /// Dense bf16 peak of the GPU in TFLOP/s for MFU (default: from the device name).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    #[arg(long)]
    pub skip_nccl: bool,
}

/// Matmul FLOPs of one training sample (forward + backward = 3 × forward) of a CLIP shape:
/// both towers' patch/QKV/out/MLP projections and attention, and the output projections.
pub fn clip_train_flops_per_sample(c: &ModelConfig) -> f64 {
    let f = |x: i64| x as f64;
    let patches = f((c.image_size / c.patch_size).pow(2));
    let n = patches + 1.0;
    let (w, t, wt) = (f(c.vision_width), f(c.context_length), f(c.text_width));
    let layer =
        |tokens: f64, width: f64| 24.0 * tokens * width * width + 4.0 * tokens * tokens * width;
    let vision = 2.0 * patches * f(3 * c.patch_size * c.patch_size) * w
        + f(c.vision_layers) * layer(n, w)
        + 2.0 * w * f(c.embed_dim);
    let text = f(c.text_layers) * layer(t, wt) + 2.0 * wt * f(c.embed_dim);
    3.0 * (vision + text)
}

/// Dense bf16 tensor-core peak (TFLOP/s) of well-known data-centre and desk GPUs by name.
pub fn peak_bf16_tflops(name: &str) -> Option<f64> {
    let n = name.to_ascii_uppercase();
    let table: &[(&str, f64)] = &[
        ("B200", 2250.0),
        ("H200", 989.0),
        ("H100 PCIE", 756.0),
        ("H100", 989.0),
        ("H800", 989.0),
        ("GH200", 989.0),
        ("A100", 312.0),
        ("A800", 312.0),
        ("L40S", 362.0),
        ("L40", 181.0),
        ("L4", 121.0),
        ("A10G", 70.0),
        ("A10", 125.0),
        ("RTX 4090", 165.0),
        ("RTX 6000 ADA", 364.0),
        ("A6000", 155.0),
        ("RTX 3090", 71.0),
    ];
    table.iter().find(|(k, _)| n.contains(k)).map(|(_, v)| *v)
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn device_report(device: Device) -> Option<String> {
    let Device::Cuda(i) = device else {
        println!("device: cpu (no GPU requested)");
        return None;
    };
    println!(
        "CUDA: found (libtorch {}, {} GPU(s) visible, cuDNN {})",
        crate::libtorch::version(),
        tch::Cuda::device_count(),
        if tch::Cuda::cudnn_is_available() {
            "available"
        } else {
            "absent"
        }
    );
    match nccl::probe() {
        Ok(info) => println!("NCCL: found (version {})", info.version_string()),
        Err(e) => println!("NCCL: NOT found: {e}"),
    }
    let ctx = std::panic::catch_unwind(|| cudarc::driver::CudaContext::new(i));
    match ctx {
        Ok(Ok(ctx)) => {
            let name = ctx.name().unwrap_or_else(|e| format!("unknown ({e:?})"));
            let mem = ctx.total_mem().map(|b| b as f64 / 1e9).unwrap_or(0.0);
            println!("GPU cuda:{i}: {name}, {mem:.1} GB");
            Some(name)
        }
        _ => {
            println!("GPU cuda:{i}: name unknown (CUDA driver API not loadable)");
            None
        }
    }
}

/// One rank: the sums must equal the inputs, the gather the input, the broadcast a no-op.
fn nccl_self_test(device: Device) -> Result<()> {
    let Device::Cuda(i) = device else {
        bail!("NCCL needs a CUDA device");
    };
    let id = nccl::unique_id()?;
    let mut c = NcclCollective::new(&id, 0, 1, i, Duration::from_secs(60))?;
    let x = Tensor::arange(1 << 20, (Kind::Float, device));
    let mut y = x.copy();
    let t0 = Instant::now();
    c.all_reduce_sum(&mut y)?;
    let dt = t0.elapsed().as_secs_f64();
    let diff = (&y - &x).abs().max().double_value(&[]);
    if diff != 0.0 {
        bail!("1-rank all-reduce changed the data (max diff {diff})");
    }
    let mut b = x.to_kind(Kind::BFloat16);
    c.all_reduce_sum(&mut b)?;
    let g = c.all_gather(&x.narrow(0, 0, 1000).view([10, 100]))?;
    if g.size() != [10, 100] || !g.view([-1]).equal(&x.narrow(0, 0, 1000)) {
        bail!("1-rank all-gather returned {:?}", g.size());
    }
    c.broadcast(&mut y, 0)?;
    c.barrier()?;
    println!(
        "NCCL 1-rank self-test: ok (all-reduce f32 4 MiB {:.2} ms, bf16, all-gather, broadcast, barrier)",
        dt * 1e3
    );
    Ok(())
}

struct Inputs {
    images: Tensor,
    tokens: Tensor,
}

fn inputs(c: &ModelConfig, batch: i64, device: Device) -> Inputs {
    let images = Tensor::randn(
        [batch, 3, c.image_size, c.image_size],
        (Kind::Float, device),
    );
    let tokens = tokenizer::random_clip_rows(batch, c.context_length, device);
    Inputs { images, tokens }
}

fn step(tr: &mut Trainer, x: &Inputs, batch: i64, autocast: bool) -> Result<f64> {
    let l = tch::autocast(autocast, || {
        tr.compute_grads_tensors(&x.images, &x.tokens, batch as usize, &mut Single)
    })?;
    tr.apply_update()?;
    Ok(l.total)
}

/// One step at `batch`, catching libtorch's out-of-memory panic.
fn fits(tr: &mut Trainer, c: &ModelConfig, batch: i64, device: Device, autocast: bool) -> bool {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let x = inputs(c, batch, device);
        let r = step(tr, &x, batch, autocast);
        sync(device);
        r
    }));
    match r {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            println!("  batch {batch}: {e:#}");
            tr.zero_grad();
            false
        }
        Err(_) => {
            println!("  batch {batch}: does not fit (libtorch error above)");
            tr.zero_grad();
            false
        }
    }
}

fn train_bench(args: &GpuCheckArgs, device: Device, gpu_name: Option<&str>) -> Result<()> {
    let mut cfg = ferroclip_proto::config::RunConfig::default();
    cfg.model.preset = args.preset.clone();
    cfg.run.seed = 0;
    let total = (args.steps + args.warmup + args.batches.len()) as u64;
    let (kind, mut autocast, mut label) = match args.precision.as_str() {
        "autocast-bf16" => (
            Kind::Float,
            true,
            "bf16 autocast, fp32 master weights and grads",
        ),
        "bf16" => (Kind::BFloat16, false, "bf16 weights (no autocast)"),
        "fp32" => (Kind::Float, false, "fp32"),
        other => bail!("--precision {other:?}: autocast-bf16, bf16 or fp32"),
    };
    let mut kind = kind;
    if autocast && device != Device::Cpu {
        if let Err(e) = crate::device::set_autocast_bf16() {
            println!("bf16 autocast unavailable ({e:#}): running the model in bf16 instead");
            (kind, autocast, label) =
                (Kind::BFloat16, false, "bf16 weights (autocast unavailable)");
        }
    } else if autocast {
        autocast = false;
        label = "fp32 (autocast is CUDA-only)";
    }
    let mut tr = Trainer::with_kind(&cfg, total, kind).context("building the model")?;
    tr.to_device(device);
    let c = tr.model.config.clone();
    let batch = if args.batch > 0 {
        args.batch
    } else {
        let mut chosen = None;
        for &b in &args.batches {
            if fits(&mut tr, &c, b, device, autocast) {
                chosen = Some(b);
                break;
            }
        }
        chosen.context("no batch of --batches fits")?
    };
    let x = inputs(&c, batch, device);
    for _ in 0..args.warmup {
        step(&mut tr, &x, batch, autocast)?;
    }
    sync(device);
    let t0 = Instant::now();
    let mut loss = 0.0;
    for _ in 0..args.steps {
        loss = step(&mut tr, &x, batch, autocast)?;
    }
    sync(device);
    let secs = t0.elapsed().as_secs_f64();
    let steps_s = args.steps as f64 / secs;
    let samples_s = steps_s * batch as f64;
    let flops = clip_train_flops_per_sample(&c);
    let achieved = samples_s * flops / 1e12;
    let peak = args
        .peak_tflops
        .or_else(|| gpu_name.and_then(peak_bf16_tflops));
    let mfu = peak.map(|p| achieved / p);
    println!(
        "ferroclip {} {label}: batch {batch}, {steps_s:.2} steps/s, {samples_s:.1} samples/s, \
         {achieved:.1} TFLOP/s achieved ({:.1} GFLOP/sample), MFU {}, last loss {loss:.3}",
        args.preset,
        flops / 1e9,
        mfu.map(|m| format!("{:.1}%", m * 100.0))
            .unwrap_or_else(|| "unknown (pass --peak-tflops)".into())
    );
    println!(
        "{{\"impl\": \"ferroclip\", \"preset\": \"{}\", \"precision\": \"{}\", \"batch\": {batch}, \"steps_per_s\": {steps_s:.4}, \"samples_per_s\": {samples_s:.2}, \"tflops\": {achieved:.2}, \"flops_per_sample\": {flops:.4e}, \"peak_tflops\": {}, \"mfu\": {}}}",
        args.preset,
        args.precision,
        peak.map(|p| p.to_string()).unwrap_or_else(|| "null".into()),
        mfu.map(|m| format!("{m:.4}")).unwrap_or_else(|| "null".into())
    );
    Ok(())
}

/// Every part runs even when an earlier one failed; the exit status says whether all passed.
pub fn run(args: GpuCheckArgs) -> Result<()> {
    let device = crate::device::select(&args.device)?;
    let name = device_report(device);
    let mut failed = Vec::new();
    if !args.skip_nccl && device != Device::Cpu {
        if let Err(e) = nccl_self_test(device) {
            println!("NCCL 1-rank self-test: FAILED: {e:#}");
            failed.push("nccl");
        }
    }
    if let Err(e) = train_bench(&args, device, name.as_deref()) {
        println!("training benchmark: FAILED: {e:#}");
        failed.push("train");
    }
    if !failed.is_empty() {
        bail!("gpu-check failed: {}", failed.join(", "));
    }
    Ok(())
}
