//! A flat, ordered list of named parameters. Names are OpenCLIP's state-dict keys, so saving and
//! loading checkpoints is a matter of matching strings; the order (creation order) is fixed, so
//! the distributed code can broadcast "all parameters" as one list.

use tch::{Kind, Tensor};

#[derive(Debug, Default)]
pub struct Params {
    list: Vec<(String, Tensor)>,
}

impl Params {
    /// A new leaf parameter that requires grad.
    fn push(&mut self, name: String, t: Tensor) -> Tensor {
        let t = t.set_requires_grad(true);
        self.list.push((name, t.shallow_clone()));
        t
    }

    pub fn normal(&mut self, name: String, shape: &[i64], std: f64, kind: Kind) -> Tensor {
        let t = Tensor::randn(shape, (Kind::Float, tch::Device::Cpu)) * std;
        self.push(name, t.to_kind(kind))
    }

    pub fn constant(&mut self, name: String, shape: &[i64], value: f64, kind: Kind) -> Tensor {
        self.push(name, Tensor::full(shape, value, (kind, tch::Device::Cpu)))
    }

    pub fn iter(&self) -> impl Iterator<Item = &(String, Tensor)> {
        self.list.iter()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.list.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// Total number of scalars.
    pub fn numel(&self) -> i64 {
        self.list.iter().map(|(_, t)| t.numel() as i64).sum()
    }
}

/// Building blocks hand out names under a prefix ("visual.transformer.resblocks.0.").
#[derive(Debug, Clone)]
pub struct Scope {
    prefix: String,
    pub kind: Kind,
}

impl Scope {
    pub fn root(kind: Kind) -> Self {
        Self {
            prefix: String::new(),
            kind,
        }
    }

    pub fn sub(&self, name: impl std::fmt::Display) -> Self {
        Self {
            prefix: format!("{}{}.", self.prefix, name),
            kind: self.kind,
        }
    }

    pub fn name(&self, leaf: &str) -> String {
        format!("{}{}", self.prefix, leaf)
    }
}

/// A LayerNorm's gain and bias (`<scope>.weight`, `<scope>.bias`), eps 1e-5 like PyTorch.
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl LayerNorm {
    pub fn new(p: &mut Params, s: &Scope, dim: i64) -> Self {
        Self {
            weight: p.constant(s.name("weight"), &[dim], 1.0, s.kind),
            bias: p.constant(s.name("bias"), &[dim], 0.0, s.kind),
        }
    }

    /// A second handle on the same parameters.
    pub fn shallow_clone(&self) -> Self {
        Self {
            weight: self.weight.shallow_clone(),
            bias: self.bias.shallow_clone(),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let dim = self.weight.size()[0];
        x.layer_norm([dim], Some(&self.weight), Some(&self.bias), 1e-5, true)
    }
}

/// A linear layer with PyTorch's [out, in] weight layout.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(p: &mut Params, s: &Scope, d_in: i64, d_out: i64, std: f64) -> Self {
        Self {
            weight: p.normal(s.name("weight"), &[d_out, d_in], std, s.kind),
            bias: Some(p.constant(s.name("bias"), &[d_out], 0.0, s.kind)),
        }
    }

    /// A second handle on the same parameters.
    pub fn shallow_clone(&self) -> Self {
        Self {
            weight: self.weight.shallow_clone(),
            bias: self.bias.as_ref().map(Tensor::shallow_clone),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}
