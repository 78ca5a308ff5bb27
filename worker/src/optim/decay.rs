//! Which parameters AdamW's weight decay applies to (`optim.weight_decay_rule`).

use ferroclip_proto::config::WeightDecayRule;

/// OpenCLIP's `exclude` (open_clip_train/main.py), literally: parameters with fewer than 2
/// dims, and names containing "bn", "ln", "bias" or "logit_scale" (so `logit_bias` too) are
/// not decayed. `NoEmbeddings` also spares the embeddings (token, positional, class) and the
/// MAE/MLM learned vectors, as ferroclip did before OpenCLIP's rule became the default.
pub fn decays(rule: WeightDecayRule, name: &str, shape: &[i64]) -> bool {
    let openclip_excludes = shape.len() < 2
        || name.contains("bn")
        || name.contains("ln")
        || name.contains("bias")
        || name.contains("logit_scale");
    match rule {
        WeightDecayRule::Openclip => !openclip_excludes,
        WeightDecayRule::NoEmbeddings => {
            !(openclip_excludes || name.contains("embedding") || name.contains("pos_embed"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Clip, Heads, ModelConfig};
    use std::collections::BTreeSet;
    use tch::Kind;

    /// The decayed parameter names of the tiny preset with both heads, block indices folded
    /// to `N` so the list reads as one block of each kind.
    fn decayed(rule: WeightDecayRule) -> BTreeSet<String> {
        let c = ModelConfig::preset("tiny").expect("tiny preset");
        let heads = Heads {
            siglip: true,
            mlm: true,
            mae: true,
        };
        let m = Clip::new(&c, heads, 0, Kind::Float).expect("tiny model");
        m.params
            .iter()
            .filter(|(n, t)| decays(rule, n, &t.size()))
            .map(|(n, _)| {
                n.split('.')
                    .map(|p| if p.parse::<u32>().is_ok() { "N" } else { p })
                    .collect::<Vec<_>>()
                    .join(".")
            })
            .collect()
    }

    const BLOCK: [&str; 4] = [
        "attn.in_proj_weight",
        "attn.out_proj.weight",
        "mlp.c_fc.weight",
        "mlp.c_proj.weight",
    ];

    fn blocks(prefix: &str) -> Vec<String> {
        BLOCK.iter().map(|w| format!("{prefix}.N.{w}")).collect()
    }

    #[test]
    fn openclip_decays_matrices_and_embeddings_but_not_gains_biases_or_the_scale() {
        let mut want: BTreeSet<String> = [
            "visual.conv1.weight",
            "visual.positional_embedding",
            "visual.proj",
            "token_embedding.weight",
            "positional_embedding",
            "text_projection",
            "mae.decoder_embed.weight",
            "mae.decoder_pos_embed",
            "mae.decoder_pred.weight",
            "mlm.dense.weight",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        want.extend(blocks("visual.transformer.resblocks"));
        want.extend(blocks("transformer.resblocks"));
        want.extend(blocks("mae.decoder.resblocks"));
        assert_eq!(decayed(WeightDecayRule::Openclip), want);
    }

    #[test]
    fn no_embeddings_also_spares_every_embedding() {
        let open = decayed(WeightDecayRule::Openclip);
        let spared: Vec<String> = open
            .difference(&decayed(WeightDecayRule::NoEmbeddings))
            .cloned()
            .collect();
        assert_eq!(
            spared,
            [
                "mae.decoder_pos_embed",
                "positional_embedding",
                "token_embedding.weight",
                "visual.positional_embedding",
            ]
        );
    }

    #[test]
    fn the_rule_reads_names_as_openclip_does() {
        let r = WeightDecayRule::Openclip;
        assert!(decays(r, "w", &[2, 2]));
        assert!(!decays(r, "w", &[4]));
        assert!(!decays(r, "x.ln_1.weight", &[2, 2]));
        assert!(!decays(r, "x.bn.weight", &[2, 2]));
        assert!(!decays(r, "x.bias", &[2, 2]));
        assert!(!decays(r, "logit_scale", &[1, 1]));
        assert!(!decays(r, "logit_bias", &[1, 1]));
    }
}
