//! `ferroclip-worker bench-step`: times training steps of a preset on random data (forward,
//! backward, optimizer) in one process and prints one JSON line.

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use tch::{Device, Kind, Tensor};

use crate::collective::Single;
use crate::data::tokenizer;
use crate::train::Trainer;

#[derive(Args, Debug)]
pub struct BenchStepArgs {
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    #[arg(long, default_value_t = 64)]
    pub batch: i64,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// libtorch intra-op threads (0 = libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    /// `model.grad_checkpointing`: recompute each block's activations in backward.
    #[arg(long)]
    pub grad_checkpointing: bool,
    /// `optim.micro_batch`: rows per forward pass (GradCache exact accumulation; 0 = all).
    #[arg(long, default_value_t = 0)]
    pub micro_batch: u32,
    /// `objectives.itm`: the weight of image-text matching (needs a `-fusion` preset).
    #[arg(long, default_value_t = 0.0)]
    pub itm: f64,
}

/// Mean seconds per phase over `steps` timed steps after `warmup` untimed ones. Batches are
/// made before timing, so data wait is zero here (the loader's wait is measured by train).
pub fn run(args: BenchStepArgs) -> Result<()> {
    let BenchStepArgs {
        preset,
        batch,
        steps,
        warmup,
        threads,
        grad_checkpointing,
        micro_batch,
        itm,
    } = args;
    if threads > 0 {
        tch::set_num_threads(threads);
    }
    let mut cfg = ferroclip_proto::config::RunConfig::default();
    cfg.model.preset = preset.clone();
    cfg.run.seed = 0;
    cfg.model.grad_checkpointing = grad_checkpointing;
    cfg.optim.micro_batch = micro_batch;
    cfg.objectives.itm = itm;
    let mut tr = Trainer::new(&cfg, (steps + warmup) as u64)?;
    let c = tr.model.config.clone();
    let images = Tensor::randn(
        [batch, 3, c.image_size, c.image_size],
        (Kind::Float, Device::Cpu),
    );
    let tokens = tokenizer::random_clip_rows(batch, c.context_length, Device::Cpu);
    let (mut fwd, mut bwd, mut opt, mut total) = (0.0, 0.0, 0.0, 0.0);
    for i in 0..steps + warmup {
        let t = Instant::now();
        let l = tr.compute_grads_tensors(&images, &tokens, batch as usize, &mut Single)?;
        let to = Instant::now();
        tr.apply_update()?;
        let o = to.elapsed().as_secs_f64();
        if i >= warmup {
            fwd += tr.last_times.forward_s;
            bwd += tr.last_times.backward_s;
            opt += o;
            total += t.elapsed().as_secs_f64();
        }
        tracing::debug!(step = i, loss = l.total);
    }
    let n = steps as f64;
    println!(
        "{{\"impl\": \"ferroclip\", \"preset\": \"{preset}\", \"batch\": {batch}, \"grad_checkpointing\": {grad_checkpointing}, \"micro_batch\": {micro_batch}, \"itm\": {itm}, \"threads\": {}, \"params\": {}, \"data_s\": 0.0, \"forward_s\": {:.5}, \"backward_s\": {:.5}, \"optimizer_s\": {:.5}, \"step_s\": {:.5}}}",
        tch::get_num_threads(),
        tr.model.num_clip_params(),
        fwd / n,
        bwd / n,
        opt / n,
        total / n
    );
    Ok(())
}
