//! Checks of a parsed config that serde cannot express: ranges, finiteness, combinations.
//! Every error names the dotted key.

use super::{ConfigError, RunConfig};

impl RunConfig {
    pub(super) fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |field: &str, message: String| ConfigError::Invalid {
            path: origin.to_string(),
            field: field.to_string(),
            message,
        };
        if self.optim.global_batch == 0 {
            return Err(bad("optim.global_batch", "must be at least 1".into()));
        }
        // Every number that reaches a Duration, a division or an index is finite and in range.
        let positive = |field: &'static str, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(bad(field, format!("must be a finite number > 0, got {v}")))
            }
        };
        let non_negative = |field: &'static str, v: f64| {
            if v >= 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(bad(field, format!("must be a finite number >= 0, got {v}")))
            }
        };
        positive("optim.lr", self.optim.lr)?;
        positive("optim.eps", self.optim.eps)?;
        non_negative("optim.weight_decay", self.optim.weight_decay)?;
        non_negative("optim.grad_clip", self.optim.grad_clip)?;
        for (field, v) in [
            ("optim.beta1", self.optim.beta1),
            ("optim.beta2", self.optim.beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(bad(field, format!("must be in [0, 1), got {v}")));
            }
        }
        let c = &self.cluster;
        non_negative("cluster.settle_s", c.settle_s)?;
        positive("cluster.heartbeat_interval_s", c.heartbeat_interval_s)?;
        positive("cluster.heartbeat_timeout_s", c.heartbeat_timeout_s)?;
        positive("cluster.collective_timeout_s", c.collective_timeout_s)?;
        non_negative("cluster.bucket_mb", c.bucket_mb)?;
        positive("store.retry_budget_s", self.store.retry_budget_s)?;
        if c.heartbeat_interval_s >= c.heartbeat_timeout_s {
            return Err(bad(
                "cluster.heartbeat_interval_s",
                format!(
                    "{} must be below cluster.heartbeat_timeout_s ({}), or every worker is declared dead",
                    c.heartbeat_interval_s, c.heartbeat_timeout_s
                ),
            ));
        }
        if self.run.steps == 0 && self.run.epochs == 0 {
            return Err(bad(
                "run.epochs",
                "must be at least 1 when run.steps is 0 (else the run has no step)".into(),
            ));
        }
        for (field, v) in [
            ("objectives.patch_dropout", self.objectives.patch_dropout),
            ("objectives.mlm_ratio", self.objectives.mlm_ratio),
            ("objectives.mae_ratio", self.objectives.mae_ratio),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(bad(field, format!("must be in [0, 1), got {v}")));
            }
        }
        let o = &self.objectives;
        non_negative("objectives.contrastive", o.contrastive)?;
        non_negative("objectives.siglip", o.siglip)?;
        non_negative("objectives.mlm", o.mlm)?;
        non_negative("objectives.mae", o.mae)?;
        non_negative("objectives.itm", o.itm)?;
        if o.contrastive + o.siglip + o.mlm + o.mae + o.itm <= 0.0 {
            return Err(bad(
                "objectives",
                "at least one objective needs a weight > 0".into(),
            ));
        }
        if self.cluster.min_workers == 0 || self.cluster.min_workers > self.cluster.max_workers {
            return Err(bad(
                "cluster.min_workers",
                format!(
                    "need 1 <= min_workers ({}) <= max_workers ({})",
                    self.cluster.min_workers, self.cluster.max_workers
                ),
            ));
        }
        let m = &self.model;
        for (field, lock, unlocked) in [
            (
                "model.lock_image_unlocked_groups",
                m.lock_image,
                m.lock_image_unlocked_groups,
            ),
            (
                "model.lock_text_unlocked_groups",
                m.lock_text,
                m.lock_text_unlocked_groups,
            ),
        ] {
            if unlocked > 0 && !lock {
                return Err(bad(
                    field,
                    format!("is {unlocked}, but its tower is not locked (set the lock too)"),
                ));
            }
        }
        if let Some(v) = m.fusion_layers.filter(|&v| v < 0) {
            return Err(bad("model.fusion_layers", format!("must be >= 0, got {v}")));
        }
        if o.itm > 0.0 {
            // A preset's fusion layers (`-fusion`) or an `init` checkpoint's own shape count too;
            // the worker checks the resolved model again.
            let none = match m.fusion_layers {
                Some(v) => v == 0,
                None => !m.preset.ends_with("-fusion") && m.init.is_empty(),
            };
            if none {
                return Err(bad(
                    "model.fusion_layers",
                    "objectives.itm needs a fusion encoder: set model.fusion_layers > 0 or a -fusion preset".into(),
                ));
            }
            // GradCache would have to cache the gradients of every token sequence, not only of
            // the pooled features; not implemented, so refused rather than inexact.
            if self.optim.micro_batch > 0 {
                return Err(bad(
                    "optim.micro_batch",
                    "cannot be combined with objectives.itm (set micro_batch = 0)".into(),
                ));
            }
        }
        self.validate_sources(origin)?;
        if self.data.lanes > self.optim.global_batch {
            // A lane feeds global_batch / lanes samples a step: more lanes than samples would
            // leave some feeding nothing, every step.
            return Err(bad(
                "data.lanes",
                format!(
                    "is {}, more than optim.global_batch ({}): each lane feeds a share of every step",
                    self.data.lanes, self.optim.global_batch
                ),
            ));
        }
        let [lo, hi] = self.data.crop_scale;
        // Written so that NaN fails every comparison into the error.
        if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
            return Err(bad(
                "data.crop_scale",
                format!("{:?} is not 0 < lo <= hi <= 1", self.data.crop_scale),
            ));
        }
        Ok(())
    }

    fn validate_sources(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |field: String, message: String| ConfigError::Invalid {
            path: origin.to_string(),
            field,
            message,
        };
        let d = &self.data;
        if d.root.is_some() && !d.sources.is_empty() {
            return Err(bad(
                "data.sources".into(),
                "is set together with data.root: give one dataset as data.root or several as data.sources, not both".into(),
            ));
        }
        for (i, s) in d.sources.iter().enumerate() {
            if s.root.trim().is_empty() {
                return Err(bad(format!("data.sources[{i}].root"), "is empty".into()));
            }
            // Written so that NaN fails the comparison into the error.
            if !(s.weight > 0.0 && s.weight.is_finite()) {
                return Err(bad(
                    format!("data.sources[{i}].weight"),
                    format!("must be a finite number > 0, got {}", s.weight),
                ));
            }
            let root = s.root.trim_end_matches('/');
            if let Some(j) = d.sources[..i]
                .iter()
                .position(|o| o.root.trim_end_matches('/') == root)
            {
                return Err(bad(
                    format!("data.sources[{i}].root"),
                    format!("{root} is also data.sources[{j}]: a dataset is one source"),
                ));
            }
        }
        Ok(())
    }
}
