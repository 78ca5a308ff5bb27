//! LiT tower locking as OpenCLIP's `lock_image_tower` / `lock_text_tower`: a locked tower's
//! parameters stop requiring grad (so no gradient is computed, bucketed, all-reduced or applied
//! for them), except its last `unlocked` groups.
//!
//! OpenCLIP's groups, first to last, for both towers: the embeddings (image: conv1, class and
//! positional embeddings, ln_pre; text: token and positional embeddings), one group per
//! transformer block but the last, the last block with the final norm (ln_post / ln_final), and
//! the projection.

use tch::Tensor;

use super::Clip;

/// Which towers are locked and how many of their last groups stay trainable
/// (`model.lock_image`, `model.lock_image_unlocked_groups`, and the text equivalents).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lock {
    pub image: Option<u32>,
    pub text: Option<u32>,
}

/// A tower's names: its prefix, first-group members, final norm and projection.
struct Tower {
    prefix: &'static str,
    embeddings: &'static [&'static str],
    final_norm: &'static str,
    projection: &'static str,
    layers: i64,
}

impl Tower {
    /// The group index of `name` (with the tower's prefix removed) and the number of groups;
    /// None when the name is not this tower's.
    fn group(&self, name: &str) -> Option<(i64, i64)> {
        let rest = name.strip_prefix(self.prefix)?;
        let count = self.layers + 2;
        let in_part = |part: &str| rest == part || rest.starts_with(&format!("{part}."));
        if self.embeddings.iter().any(|e| in_part(e)) {
            return Some((0, count));
        }
        if let Some(block) = rest.strip_prefix("transformer.resblocks.") {
            let i: i64 = block.split('.').next()?.parse().ok()?;
            // Block i is group 1 + i; the last block shares its group with the final norm.
            return Some((1 + i, count));
        }
        if in_part(self.final_norm) {
            return Some((self.layers, count));
        }
        (rest == self.projection).then_some((self.layers + 1, count))
    }
}

impl Clip {
    fn towers(&self) -> [Tower; 2] {
        [
            Tower {
                prefix: "visual.",
                embeddings: &["conv1", "class_embedding", "positional_embedding", "ln_pre"],
                final_norm: "ln_post",
                projection: "proj",
                layers: self.config.vision_layers,
            },
            Tower {
                prefix: "",
                embeddings: &["token_embedding", "positional_embedding"],
                final_norm: "ln_final",
                projection: "text_projection",
                layers: self.config.text_layers,
            },
        ]
    }

    /// Whether `lock` freezes the parameter `name`.
    pub fn is_locked(&self, name: &str, lock: Lock) -> bool {
        let [image, text] = self.towers();
        for (tower, unlocked) in [(image, lock.image), (text, lock.text)] {
            // The image tower's names all start with "visual.", so it is asked first.
            if let Some((group, count)) = tower.group(name) {
                return unlocked.is_some_and(|u| group < count - i64::from(u));
            }
        }
        false
    }

    /// Freezes the parameters `lock` names (they stop requiring grad); returns their names.
    pub fn apply_lock(&self, lock: Lock) -> Vec<String> {
        let mut locked = Vec::new();
        for (name, p) in self.params.iter() {
            if self.is_locked(name, lock) {
                let _: Tensor = p.set_requires_grad(false);
                locked.push(name.clone());
            }
        }
        locked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Heads, ModelConfig};
    use tch::Kind;

    fn model() -> Clip {
        let c = ModelConfig::preset("tiny").expect("tiny");
        Clip::new(&c, Heads::default(), 0, Kind::Float).expect("model")
    }

    fn locked(m: &Clip, lock: Lock) -> Vec<String> {
        m.params
            .iter()
            .filter(|(n, _)| m.is_locked(n, lock))
            .map(|(n, _)| n.clone())
            .collect()
    }

    #[test]
    fn a_locked_image_tower_freezes_every_visual_parameter_and_nothing_else() {
        let m = model();
        let names = locked(
            &m,
            Lock {
                image: Some(0),
                text: None,
            },
        );
        let visual = m
            .params
            .iter()
            .filter(|(n, _)| n.starts_with("visual."))
            .count();
        assert_eq!(names.len(), visual);
        assert!(names.iter().all(|n| n.starts_with("visual.")));
    }

    #[test]
    fn unlocked_groups_follow_openclip_from_the_projection_backwards() {
        let m = model(); // 4 layers per tower: 6 groups
        let image = |u| Lock {
            image: Some(u),
            text: None,
        };
        let text = |u| Lock {
            image: None,
            text: Some(u),
        };
        // 1: only the projection trains.
        assert!(!m.is_locked("visual.proj", image(1)));
        assert!(m.is_locked("visual.ln_post.weight", image(1)));
        assert!(!m.is_locked("text_projection", text(1)));
        assert!(m.is_locked("ln_final.bias", text(1)));
        // 2: the last block and the final norm too.
        assert!(!m.is_locked("visual.ln_post.weight", image(2)));
        assert!(!m.is_locked("visual.transformer.resblocks.3.mlp.c_fc.weight", image(2)));
        assert!(m.is_locked("visual.transformer.resblocks.2.mlp.c_fc.weight", image(2)));
        assert!(!m.is_locked("transformer.resblocks.3.ln_1.weight", text(2)));
        assert!(m.is_locked("transformer.resblocks.2.ln_1.weight", text(2)));
        // 5: everything but the embeddings; 6 or more: everything.
        assert!(!m.is_locked(
            "visual.transformer.resblocks.0.attn.in_proj_weight",
            image(5)
        ));
        assert!(m.is_locked("visual.conv1.weight", image(5)));
        assert!(m.is_locked("visual.class_embedding", image(5)));
        assert!(m.is_locked("token_embedding.weight", text(5)));
        assert!(locked(&m, image(6)).is_empty());
        assert!(locked(&m, text(99)).is_empty());
        // The logit scale is never locked; the text tower's lock leaves the image tower alone.
        assert!(!m.is_locked("logit_scale", text(0)));
        assert!(!m.is_locked("visual.positional_embedding", text(0)));
        assert!(m.is_locked("positional_embedding", text(0)));
    }
}
