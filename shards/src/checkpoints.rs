//! The layout of a run's checkpoints on any store, shared by the worker (which writes and reads
//! them) and the coordinator (which records and prunes them): `<run.dir>/checkpoints/
//! step-NNNNNNNN/` holds a checkpoint's files and, written last, `COMMIT`. A directory without
//! COMMIT is no checkpoint; deleting one removes COMMIT first, so a half-deleted checkpoint is
//! already invisible.

use std::time::Duration;

use object_store::ObjectStoreExt;

use crate::error::ShardsError;
use crate::retry::store_retry;
use crate::store::{canonical_url, Location, StoreOptions};

/// The marker written last.
pub const COMMIT: &str = "COMMIT";

/// `step-NNNNNNNN`: names sort in step order.
pub fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Where the checkpoints of a run directory go.
pub fn root_url(run_dir: &str) -> String {
    format!("{}/checkpoints", run_dir.trim_end_matches('/'))
}

/// The URL of step `step`'s checkpoint under a checkpoints root.
pub fn step_url(root: &str, step: u64) -> String {
    format!("{}/{}", root.trim_end_matches('/'), step_name(step))
}

/// The step of `url` when it is exactly a checkpoint directory of `root` (`root/step-N`).
/// Local paths compare as the absolute paths they name: a relative `run.dir` (the demo's
/// `runs/demo`) and the absolute URL a worker's store reports are the same directory.
pub fn step_of(root: &str, url: &str) -> Option<u64> {
    let (root, url) = (canonical_url(root), canonical_url(url));
    let rest = url
        .trim_end_matches('/')
        .strip_prefix(root.trim_end_matches('/'))?
        .strip_prefix('/')?;
    let step: u64 = rest.strip_prefix("step-")?.parse().ok()?;
    (step_name(step) == rest).then_some(step)
}

fn not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

/// Committed checkpoints under `root`, oldest first.
pub async fn list_committed(
    root: &Location,
    budget: Duration,
) -> Result<Vec<(u64, Location)>, ShardsError> {
    let what = format!("listing {}", root.url());
    let listed = match store_retry(&what, budget, || {
        root.store.list_with_delimiter(Some(&root.path))
    })
    .await
    {
        Ok(l) => l,
        Err(e) if not_found(&e) => return Ok(Vec::new()),
        Err(e) => return Err(ShardsError::store(root.url(), e)),
    };
    let mut out = Vec::new();
    for prefix in listed.common_prefixes {
        let Some(step) = prefix
            .filename()
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        let loc = root.with_path(prefix);
        let m = loc.join(COMMIT);
        match store_retry(&format!("reading {}", m.url()), budget, || {
            m.store.head(&m.path)
        })
        .await
        {
            Ok(_) => out.push((step, loc)),
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(ShardsError::store(m.url(), e)),
        }
    }
    out.sort_by_key(|(s, _)| *s);
    Ok(out)
}

/// Deletes a checkpoint directory's COMMIT (absent is fine): from then on no reader takes it
/// for a checkpoint, whatever its files.
pub async fn uncommit(loc: &Location, budget: Duration) -> Result<(), ShardsError> {
    let m = loc.join(COMMIT);
    match store_retry(&format!("deleting {}", m.url()), budget, || {
        m.store.delete(&m.path)
    })
    .await
    {
        Ok(()) => Ok(()),
        Err(e) if not_found(&e) => Ok(()),
        Err(e) => Err(ShardsError::store(m.url(), e)),
    }
}

/// Deletes a checkpoint directory: COMMIT first, then every object under it.
pub async fn delete(loc: &Location, budget: Duration) -> Result<(), ShardsError> {
    uncommit(loc, budget).await?;
    let listed = store_retry(&format!("listing {}", loc.url()), budget, || {
        loc.store.list_with_delimiter(Some(&loc.path))
    })
    .await
    .map_err(|e| ShardsError::store(loc.url(), e))?;
    for o in listed.objects {
        match store_retry(
            &format!("deleting {}", loc.display(&o.location)),
            budget,
            || loc.store.delete(&o.location),
        )
        .await
        {
            Ok(()) => {}
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(ShardsError::store(loc.display(&o.location), e)),
        }
    }
    Ok(())
}

/// Deletes the checkpoint at `url`, which must be a `step-N` directory of `root` (anything
/// else is refused: pruning never touches what it did not write).
pub async fn delete_url(root: &str, url: &str, opts: &StoreOptions) -> Result<(), ShardsError> {
    if step_of(root, url).is_none() {
        return Err(ShardsError::BadUrl {
            url: url.to_string(),
            reason: format!("not a checkpoint directory of {root} (step-NNNNNNNN)"),
        });
    }
    delete(&Location::open(url, opts)?, opts.retry_budget).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_step_directories_of_the_root_have_a_step() {
        let root = "s3://b/run/checkpoints";
        assert_eq!(
            step_of(root, "s3://b/run/checkpoints/step-00000012"),
            Some(12)
        );
        assert_eq!(
            step_of(root, "s3://b/run/checkpoints/step-00000012/"),
            Some(12)
        );
        assert_eq!(step_of(root, &step_url(root, 7)), Some(7));
        for bad in [
            "s3://b/run/checkpoints",
            "s3://b/run/checkpoints/step-12",
            "s3://b/run/checkpoints/step-00000012/model.safetensors",
            "s3://b/other/checkpoints/step-00000012",
            "s3://b/run/checkpoints/../data/step-00000012",
            "s3://b/run/checkpointsx/step-00000012",
        ] {
            assert_eq!(step_of(root, bad), None, "{bad}");
        }
        assert_eq!(root_url("/r/run/"), "/r/run/checkpoints");
    }

    #[test]
    fn a_relative_local_root_matches_the_absolute_url_a_store_reports() {
        let cwd = std::env::current_dir().expect("cwd");
        let root = root_url("runs/demo");
        let abs = format!("{}/runs/demo/checkpoints/step-00000100", cwd.display());
        assert_eq!(step_of(&root, &abs), Some(100));
        assert_eq!(step_of(&root, &format!("file://{abs}")), Some(100));
        assert_eq!(
            step_of(&root, "runs/demo/checkpoints/step-00000100"),
            Some(100)
        );
        let other = format!("{}/runs/other/checkpoints/step-00000100", cwd.display());
        assert_eq!(step_of(&root, &other), None);
        assert_eq!(step_of(&root, "/runs/demo/checkpoints/step-00000100"), None);
    }

    #[tokio::test]
    async fn delete_removes_commit_first_and_refuses_foreign_urls() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = format!("{}/checkpoints", dir.path().display());
        let opts = StoreOptions::default();
        let ckpt = Location::open(&step_url(&root, 3), &opts).expect("loc");
        for name in ["model.safetensors", COMMIT] {
            let f = ckpt.join(name);
            f.store
                .put(&f.path, b"x".to_vec().into())
                .await
                .expect("put");
        }
        let root_loc = Location::open(&root, &opts).expect("root");
        let listed = list_committed(&root_loc, opts.retry_budget)
            .await
            .expect("list");
        assert_eq!(listed.len(), 1);
        let foreign = format!("{}/data", dir.path().display());
        let err = delete_url(&root, &foreign, &opts)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a checkpoint directory"), "{err}");
        delete_url(&root, &step_url(&root, 3), &opts)
            .await
            .expect("delete");
        assert!(list_committed(&root_loc, opts.retry_budget)
            .await
            .expect("list")
            .is_empty());
        assert!(!dir
            .path()
            .join("checkpoints/step-00000003/model.safetensors")
            .exists());
    }
}
