//! The GPU engine's paged KV cache.
//!
//! The keys and values of every layer live in a pool of pages of
//! [`KV_PAGE`] tokens shared by all sequences; a [`GpuSequence`] owns a list
//! of pages. The pool doubles when it runs out (copying the old pages on
//! the GPU), a sequence's pages return to the pool when it is dropped, and
//! the pool shrinks back to its initial size once no sequence holds pages.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gpu::context::{GpuContext, GpuTensor};

/// Tokens per KV-cache page.
pub const KV_PAGE: usize = 16;
/// Pages in a fresh pool (per layer, for keys and for values each).
const INITIAL_PAGES: usize = 64;

/// Free pages of the pool. Shared with every [`GpuSequence`], which gives
/// its pages back when dropped.
#[derive(Debug, Default)]
struct PageAllocator {
    capacity: usize,
    free: Vec<u32>,
}

/// Per-layer key and value pools, each (capacity * KV_PAGE, Hkv * D).
pub(crate) struct KvPool {
    pub(crate) layers: Vec<(GpuTensor, GpuTensor)>,
}

/// A sequence's GPU state: its length and KV pages. Dropping it frees its pages.
pub struct GpuSequence {
    pub(crate) len: usize,
    pub(crate) pages: Vec<u32>,
    alloc: Arc<Mutex<PageAllocator>>,
}

impl GpuSequence {
    /// Tokens already in this sequence's KV cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets the tokens from position `len` on (nothing when `len` is not
    /// below [`GpuSequence::len`]) and frees the KV pages they alone used;
    /// the next forward step continues at position `len`. This re-runs
    /// decoding from a shared prompt, as `lynx bench` does per policy, or
    /// regenerates a reply without prefilling the conversation again.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        self.len = len;
        let freed = self.pages.split_off(len.div_ceil(KV_PAGE));
        lock_free_list(&self.alloc).free.extend(freed);
    }
}

impl Drop for GpuSequence {
    fn drop(&mut self) {
        lock_free_list(&self.alloc).free.append(&mut self.pages);
    }
}

/// A poisoned lock means another thread panicked mid-update; the free list
/// is still a list of page ids, so returning pages to it is safe.
fn lock_free_list(alloc: &Mutex<PageAllocator>) -> MutexGuard<'_, PageAllocator> {
    alloc.lock().unwrap_or_else(|p| p.into_inner())
}

/// The KV cache of every layer: the page pool and its allocator.
pub(crate) struct KvCache {
    alloc: Arc<Mutex<PageAllocator>>,
    pool: Mutex<KvPool>,
    /// Hkv * D: the width of one cached key (or value) row.
    width: usize,
    layers: usize,
}

impl KvCache {
    pub(crate) fn new(ctx: &GpuContext, cfg: &ModelConfig) -> Result<KvCache> {
        let width = cfg.num_kv_heads * cfg.head_dim;
        let pool = Self::new_pool(ctx, width, cfg.num_layers, INITIAL_PAGES)?;
        Ok(KvCache {
            alloc: Arc::new(Mutex::new(PageAllocator {
                capacity: INITIAL_PAGES,
                free: (0..INITIAL_PAGES as u32).rev().collect(),
            })),
            pool: Mutex::new(pool),
            width,
            layers: cfg.num_layers,
        })
    }

    fn new_pool(ctx: &GpuContext, width: usize, layers: usize, pages: usize) -> Result<KvPool> {
        let rows = pages * KV_PAGE;
        let bytes = (rows * width * 4) as u64;
        if bytes > ctx.max_binding_bytes() {
            return Err(Error::Gpu(format!(
                "the KV cache needs {pages} pages ({} MiB per layer for keys), more than one storage binding \
                 of this device holds ({} MiB); use fewer or shorter sequences",
                bytes >> 20,
                ctx.max_binding_bytes() >> 20
            )));
        }
        let mut out = Vec::with_capacity(layers);
        for l in 0..layers {
            out.push((
                ctx.zeros_f32(&format!("layers.{l} key cache ({pages} pages)"), &[rows, width])?,
                ctx.zeros_f32(&format!("layers.{l} value cache ({pages} pages)"), &[rows, width])?,
            ));
        }
        Ok(KvPool { layers: out })
    }

    /// A fresh sequence with no cached tokens.
    pub(crate) fn new_sequence(&self) -> GpuSequence {
        GpuSequence {
            len: 0,
            pages: Vec::new(),
            alloc: self.alloc.clone(),
        }
    }

    /// Whether `seq` was made by this cache (and not another model's).
    pub(crate) fn owns(&self, seq: &GpuSequence) -> bool {
        Arc::ptr_eq(&seq.alloc, &self.alloc)
    }

    /// Bytes of KV cache currently allocated on the GPU (all layers).
    pub(crate) fn bytes(&self) -> u64 {
        self.pool.lock().map_or(0, |kv| {
            kv.layers.iter().map(|(k, v)| k.data_bytes() + v.data_bytes()).sum()
        })
    }

    /// The pool, for recording a step's kernels.
    pub(crate) fn pool(&self) -> Result<MutexGuard<'_, KvPool>> {
        self.pool.lock().map_err(|_| Error::Gpu("KV pool lock poisoned".into()))
    }

    /// Gives each sequence the pages it needs to hold `new[i]` more tokens
    /// after its cached ones, growing the pool first if it has too few free.
    pub(crate) fn assign_pages(&self, ctx: &GpuContext, seqs: &mut [&mut GpuSequence], new: &[usize]) -> Result<()> {
        let pages_for = |s: &GpuSequence, n: usize| (s.len + n).div_ceil(KV_PAGE);
        let need = seqs
            .iter()
            .zip(new)
            .map(|(s, &n)| pages_for(s, n).saturating_sub(s.pages.len()))
            .sum();
        self.reserve(ctx, need)?;
        let mut a = self
            .alloc
            .lock()
            .map_err(|_| Error::Gpu("KV page allocator lock poisoned".into()))?;
        for (s, &n) in seqs.iter_mut().zip(new) {
            while s.pages.len() < pages_for(s, n) {
                let p = a
                    .free
                    .pop()
                    .ok_or_else(|| Error::Gpu("KV page allocator ran dry".into()))?;
                s.pages.push(p);
            }
        }
        Ok(())
    }

    /// Makes sure `need` free pages exist, growing the pool (and copying the
    /// cached keys and values) if not; shrinks an idle, grown pool first.
    fn reserve(&self, ctx: &GpuContext, need: usize) -> Result<()> {
        let mut a = self
            .alloc
            .lock()
            .map_err(|_| Error::Gpu("KV page allocator lock poisoned".into()))?;
        let mut kv = self.pool()?;
        if a.free.len() == a.capacity && a.capacity > INITIAL_PAGES && need <= INITIAL_PAGES {
            // No sequence holds pages: give the grown pool's memory back.
            *kv = Self::new_pool(ctx, self.width, self.layers, INITIAL_PAGES)?;
            a.capacity = INITIAL_PAGES;
            a.free = (0..INITIAL_PAGES as u32).rev().collect();
        }
        if a.free.len() >= need {
            return Ok(());
        }
        let in_use = a.capacity - a.free.len();
        let new_cap = (a.capacity * 2).max(in_use + need);
        let new = Self::new_pool(ctx, self.width, self.layers, new_cap)?;
        let mut enc = ctx.encoder("grow KV cache");
        for ((ok, ov), (nk, nv)) in kv.layers.iter().zip(&new.layers) {
            enc.inner()
                .copy_buffer_to_buffer(&ok.buffer, 0, &nk.buffer, 0, ok.data_bytes());
            enc.inner()
                .copy_buffer_to_buffer(&ov.buffer, 0, &nv.buffer, 0, ov.data_bytes());
        }
        ctx.submit(enc)?;
        let old_cap = a.capacity;
        a.free.extend((old_cap as u32..new_cap as u32).rev());
        a.capacity = new_cap;
        *kv = new;
        Ok(())
    }
}
