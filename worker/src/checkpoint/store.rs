//! Checkpoints at any object-store URL (plain path, file://, s3://, gs://, az://, memory://).
//! Object stores have no directory rename, so atomicity comes from order: every file of a
//! checkpoint is put under `step-NNNNNNNN/` first and the `COMMIT` marker last. COMMIT lists
//! each file with its size; readers skip directories without it and check the sizes, so a
//! reader never sees half a checkpoint. On the local file system every file is fsynced before
//! COMMIT is written. Every store call rides out an outage for `StoreOptions::retry_budget`.

use std::collections::BTreeMap;
use std::future::Future;

use bytes::Bytes;
use ferroclip_shards::store::Location;
use ferroclip_shards::StoreOptions;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use safetensors::tensor::{Dtype, SafeTensors, View};
use tch::{Kind, Tensor};

use ferroclip_shards::checkpoints::{self, step_name, COMMIT};
use ferroclip_shards::retry::store_retry;

use super::{optimizer_tensors, restore, CheckpointError, Result, TrainerState};
use crate::train::Trainer;

/// Files above this size go up as multipart uploads (S3 caps a single PUT at 5 GiB).
const MULTIPART_BYTES: usize = 64 << 20;

/// What COMMIT holds: the checkpoint's files and their sizes in bytes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Commit {
    step: u64,
    files: BTreeMap<String, u64>,
}

/// A checkpoint read into memory.
pub struct Checkpoint {
    /// The checkpoint's URL (`…/step-NNNNNNNN`).
    pub url: String,
    pub state: TrainerState,
    /// OpenCLIP-named tensors, then the MAE/MLM extras.
    pub tensors: Vec<(String, Tensor)>,
    /// AdamW moments (empty when not asked for).
    pub optim: Vec<(String, Tensor)>,
}

fn store_err(url: &str, e: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Store {
        url: url.to_string(),
        message: e.to_string(),
    }
}

fn invalid(url: &str, message: impl Into<String>) -> CheckpointError {
    CheckpointError::Invalid {
        path: url.to_string(),
        message: message.into(),
    }
}

fn open(url: &str, opts: &StoreOptions) -> Result<Location> {
    Location::open(url, opts).map_err(|e| store_err(url, e))
}

/// Runs store I/O to completion from sync code, also when called inside a tokio runtime.
fn block_on<F, Fut, T>(make: F) -> Result<T>
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = Result<T>>,
    T: Send,
{
    let run = move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| store_err("(runtime)", e))?
            .block_on(make())
    };
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| {
            s.spawn(run)
                .join()
                .unwrap_or_else(|_| Err(store_err("(runtime)", "checkpoint I/O thread panicked")))
        })
    } else {
        run()
    }
}

/// Tensor bytes as safetensors sees them.
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Named tensors → safetensors bytes (in memory; the caller uploads them).
pub fn encode_tensors(tensors: &[(String, Tensor)], origin: &str) -> Result<Vec<u8>> {
    let mut raws = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_device(tch::Device::Cpu).contiguous();
        let dtype = dtype_of(t.kind())
            .ok_or_else(|| invalid(origin, format!("{name}: unsupported dtype {:?}", t.kind())))?;
        let numel = t.numel();
        let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel)
            .map_err(|e| invalid(origin, format!("{name}: {e}")))?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        raws.push((name.clone(), Raw { dtype, shape, data }));
    }
    safetensors::tensor::serialize(raws, None).map_err(|e| invalid(origin, e.to_string()))
}

/// safetensors bytes → named tensors, in file order.
pub fn decode_tensors(bytes: &[u8], origin: &str) -> Result<Vec<(String, Tensor)>> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| invalid(origin, e.to_string()))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let kind = kind_of(view.dtype()).ok_or_else(|| {
            invalid(
                origin,
                format!("{name}: unsupported dtype {:?}", view.dtype()),
            )
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)
            .map_err(|e| invalid(origin, format!("{name}: {e}")))?;
        out.push((name, t));
    }
    Ok(out)
}

/// Every file of a checkpoint, encoded.
fn encode(trainer: &Trainer, state: &TrainerState, url: &str) -> Result<Vec<(String, Bytes)>> {
    let extras: Vec<_> = trainer
        .model
        .state_dict(true)
        .into_iter()
        .filter(|(n, _)| crate::model::is_extra_key(n))
        .collect();
    let json = serde_json::to_vec_pretty(state).map_err(|e| invalid(url, e.to_string()))?;
    Ok(vec![
        (
            "model.safetensors".into(),
            encode_tensors(&trainer.model.state_dict(false), url)?.into(),
        ),
        (
            "extras.safetensors".into(),
            encode_tensors(&extras, url)?.into(),
        ),
        (
            "optim.safetensors".into(),
            encode_tensors(&optimizer_tensors(trainer), url)?.into(),
        ),
        ("trainer.json".into(), json.into()),
    ])
}

/// Puts one file (multipart above `MULTIPART_BYTES`), retrying an unavailable store, and makes
/// it durable on a local file system.
async fn put(loc: &Location, bytes: Bytes, opts: &StoreOptions) -> Result<()> {
    let url = loc.url();
    let what = format!("writing {url}");
    store_retry(&what, opts.retry_budget, || {
        let bytes = bytes.clone();
        async move {
            if bytes.len() <= MULTIPART_BYTES {
                return loc
                    .store
                    .put(&loc.path, PutPayload::from(bytes))
                    .await
                    .map(|_| ());
            }
            let upload = loc.store.put_multipart(&loc.path).await?;
            let mut w = WriteMultipart::new(upload);
            w.put(bytes);
            w.finish().await.map(|_| ())
        }
    })
    .await
    .map_err(|e| store_err(&url, e))?;
    loc.sync(&loc.path).map_err(|e| store_err(&url, e))
}

fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

/// Writes a checkpoint for `state.step` under the URL `root` (files first, COMMIT last) and
/// deletes committed ones beyond the newest `keep` (0 = keep all). Returns its URL.
pub fn save(
    root: &str,
    opts: &StoreOptions,
    trainer: &Trainer,
    state: &TrainerState,
    keep: usize,
) -> Result<String> {
    let root_loc = open(root, opts)?;
    let ckpt = root_loc.join(&step_name(state.step));
    let url = ckpt.url();
    let files = encode(trainer, state, &url)?;
    let commit = Commit {
        step: state.step,
        files: files
            .iter()
            .map(|(n, b)| (n.clone(), b.len() as u64))
            .collect(),
    };
    let marker = serde_json::to_vec_pretty(&commit).map_err(|e| invalid(&url, e.to_string()))?;
    let budget = opts.retry_budget;
    block_on(|| async move {
        // Rewriting a step (a rollback replays it): un-commit first so no reader mixes files.
        checkpoints::uncommit(&ckpt, budget)
            .await
            .map_err(|e| store_err(&ckpt.url(), e))?;
        let m = ckpt.join(COMMIT);
        for (name, bytes) in files {
            put(&ckpt.join(&name), bytes, opts).await?;
        }
        // Tests kill a worker here: the files are written, COMMIT is not.
        crate::fault::point("checkpoint");
        put(&m, Bytes::from(marker), opts).await?;
        if keep > 0 {
            let all = checkpoints::list_committed(&root_loc, budget)
                .await
                .map_err(|e| store_err(&root_loc.url(), e))?;
            for (_, old) in all.iter().rev().skip(keep) {
                checkpoints::delete(old, budget)
                    .await
                    .map_err(|e| store_err(&old.url(), e))?;
            }
        }
        Ok(())
    })?;
    Ok(url)
}

/// Committed checkpoints under the URL `root`, oldest first, as (step, URL).
pub fn committed(root: &str, opts: &StoreOptions) -> Result<Vec<(u64, String)>> {
    let loc = open(root, opts)?;
    let budget = opts.retry_budget;
    block_on(|| async move {
        Ok(checkpoints::list_committed(&loc, budget)
            .await
            .map_err(|e| store_err(&loc.url(), e))?
            .into_iter()
            .map(|(s, l)| (s, l.url()))
            .collect())
    })
}

/// The newest committed checkpoint under the URL `root`, if any.
pub fn latest(root: &str, opts: &StoreOptions) -> Result<Option<String>> {
    Ok(committed(root, opts)?.pop().map(|(_, u)| u))
}

/// `url` itself when it is a committed checkpoint, else the newest committed one below it.
pub fn resolve(url: &str, opts: &StoreOptions) -> Result<String> {
    let loc = open(url, opts)?;
    let m = loc.join(COMMIT);
    let budget = opts.retry_budget;
    let is_checkpoint = block_on(|| async move {
        match store_retry(&format!("reading {}", m.url()), budget, || {
            m.store.head(&m.path)
        })
        .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(store_err(&m.url(), e)),
        }
    })?;
    if is_checkpoint {
        return Ok(loc.url());
    }
    latest(url, opts)?.ok_or_else(|| {
        invalid(
            url,
            "neither a committed checkpoint (no COMMIT) nor a directory holding one",
        )
    })
}

async fn get(loc: &Location, budget: std::time::Duration) -> Result<Option<Bytes>> {
    let what = format!("reading {}", loc.url());
    let r = store_retry(&what, budget, || async {
        loc.store.get(&loc.path).await?.bytes().await
    })
    .await;
    match r {
        Ok(b) => Ok(Some(b)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(store_err(&loc.url(), e)),
    }
}

/// The bytes of the object at `url` (None if it does not exist), with the store's retries.
pub fn read_object(url: &str, opts: &StoreOptions) -> Result<Option<Bytes>> {
    let loc = open(url, opts)?;
    let budget = opts.retry_budget;
    block_on(|| async move { get(&loc, budget).await })
}

/// Reads the committed checkpoint at `url` (optimizer moments only if `with_optim`).
pub fn read(url: &str, opts: &StoreOptions, with_optim: bool) -> Result<Checkpoint> {
    let loc = open(url, opts)?;
    let url = loc.url();
    let budget = opts.retry_budget;
    let (commit, files) = {
        let url = url.clone();
        block_on(|| async move {
            let Some(marker) = get(&loc.join(COMMIT), budget).await? else {
                return Err(invalid(
                    &url,
                    "no COMMIT marker: the checkpoint is incomplete",
                ));
            };
            // Older local checkpoints hold just the name in COMMIT; ours list the files.
            let commit: Option<Commit> = serde_json::from_slice(&marker).ok();
            let mut names = vec!["trainer.json", "model.safetensors", "extras.safetensors"];
            if with_optim {
                names.push("optim.safetensors");
            }
            let mut files = BTreeMap::new();
            for name in names {
                let f = loc.join(name);
                let bytes = get(&f, budget)
                    .await?
                    .ok_or_else(|| invalid(&f.url(), "missing from a committed checkpoint"))?;
                files.insert(name.to_string(), bytes);
            }
            Ok((commit, files))
        })?
    };
    if let Some(c) = &commit {
        for (name, bytes) in &files {
            let want = c.files.get(name).copied();
            if want != Some(bytes.len() as u64) {
                return Err(invalid(
                    &url,
                    format!("{name} has {} bytes, COMMIT says {want:?}", bytes.len()),
                ));
            }
        }
    }
    let file = |name: &str| -> Result<&Bytes> {
        files
            .get(name)
            .ok_or_else(|| invalid(&url, format!("{name} not read")))
    };
    let state: TrainerState = serde_json::from_slice(file("trainer.json")?)
        .map_err(|e| invalid(&format!("{url}/trainer.json"), e.to_string()))?;
    let mut tensors = decode_tensors(file("model.safetensors")?, &url)?;
    tensors.extend(decode_tensors(file("extras.safetensors")?, &url)?);
    let optim = if with_optim {
        decode_tensors(file("optim.safetensors")?, &url)?
    } else {
        Vec::new()
    };
    Ok(Checkpoint {
        url,
        state,
        tensors,
        optim,
    })
}

/// Loads the committed checkpoint at `url` into `trainer` (model, optimizer, step).
pub fn load(url: &str, opts: &StoreOptions, trainer: &mut Trainer) -> Result<TrainerState> {
    let c = read(url, opts, true)?;
    restore(trainer, &c.state, &c.tensors, c.optim, &c.url)?;
    Ok(c.state)
}
