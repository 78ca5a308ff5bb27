//! The smallest real training loop: a 2-layer MLP on a fixed random regression task.

use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// Trains for `steps` AdamW steps and returns the loss of each step.
pub fn train(steps: usize, seed: i64) -> Vec<f64> {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = nn::seq()
        .add(nn::linear(vs.root() / "fc1", 16, 32, Default::default()))
        .add_fn(|x| x.gelu("none"))
        .add(nn::linear(vs.root() / "fc2", 32, 1, Default::default()));
    let x = Tensor::randn([64, 16], (Kind::Float, Device::Cpu));
    let y = x.sum_dim_intlist(1, true, Kind::Float).sin();
    let mut opt = nn::AdamW::default().build(&vs, 1e-2).expect("optimizer");
    (0..steps)
        .map(|_| {
            let loss = net.forward(&x).mse_loss(&y, tch::Reduction::Mean);
            opt.backward_step(&loss);
            loss.double_value(&[])
        })
        .collect()
}

/// `ferroclip-worker smoke`: trains for `steps` and prints each step's loss.
pub fn run(steps: usize) {
    let losses = train(steps, 0);
    for (i, l) in losses.iter().enumerate() {
        println!("step {i:>3} loss {l:.4}");
    }
}
