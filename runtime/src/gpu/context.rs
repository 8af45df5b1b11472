//! `GpuContext`: the wgpu instance, the chosen adapter, its device and queue,
//! the optional features that are switched on, the limits we asked for, and
//! the pipeline cache. Also the plain buffer helpers every kernel uses
//! (`GpuTensor`, upload, read-back) and the mapping of wgpu errors into
//! [`Error::Gpu`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use wgpu::util::DeviceExt;

use crate::error::{Error, Result};
use crate::gpu::pipelines::PipelineCache;

/// How to pick and drive the GPU.
#[derive(Clone, Debug)]
pub struct GpuOptions {
    /// Only consider adapters whose name contains this text (case-insensitive).
    pub adapter_name: Option<String>,
    /// Wrap every submission (and buffer creation) in wgpu error scopes so a
    /// validation or out-of-memory error comes back as an `Err` naming the
    /// operation. Pipeline creation is always checked, because it runs once.
    pub check_errors: bool,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            adapter_name: None,
            check_errors: cfg!(debug_assertions),
        }
    }
}

impl GpuOptions {
    /// Defaults, with the adapter filter taken from `LYNX_GPU_ADAPTER` when set.
    /// (`WGPU_BACKEND` is honoured by the instance itself.)
    pub fn from_env() -> Self {
        let adapter_name = std::env::var("LYNX_GPU_ADAPTER").ok().filter(|s| !s.is_empty());
        GpuOptions {
            adapter_name,
            ..GpuOptions::default()
        }
    }
}

/// The optional wgpu features this engine can use, and whether each is on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuFeatures {
    pub shader_f16: bool,
    pub subgroup: bool,
    pub timestamp_query: bool,
}

/// Element type of a [`GpuTensor`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    F32,
    U32,
}

/// A dense f32 (activations) or u32 (token ids, positions) array on the GPU,
/// row-major with the given shape. A clone shares the buffer (as
/// `wgpu::Buffer` clones do): it is another handle, not a copy.
#[derive(Clone, Debug)]
pub struct GpuTensor {
    pub(crate) buffer: wgpu::Buffer,
    pub shape: Vec<usize>,
    pub elem: Elem,
}

impl GpuTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// Size of the data in bytes (the buffer may be larger: it is never empty).
    pub fn data_bytes(&self) -> u64 {
        self.numel() as u64 * 4
    }

    /// The same buffer seen with another shape of at most as many elements
    /// as it holds: a grow-only scratch buffer reused by a step with fewer
    /// tokens. Kernels take their sizes from the shape, so they touch only
    /// the view's elements.
    pub(crate) fn view(&self, shape: &[usize]) -> Result<GpuTensor> {
        let bytes = shape.iter().product::<usize>() as u64 * 4;
        if bytes > self.buffer.size() {
            return Err(Error::Gpu(format!(
                "a view of shape {shape:?} needs {bytes} bytes; its buffer has {}",
                self.buffer.size()
            )));
        }
        Ok(GpuTensor {
            buffer: self.buffer.clone(),
            shape: shape.to_vec(),
            elem: self.elem,
        })
    }

    /// [`GpuTensor::view`] with the first dimension set to `n`.
    pub(crate) fn rows(&self, n: usize) -> Result<GpuTensor> {
        let mut shape = self.shape.clone();
        if let Some(first) = shape.first_mut() {
            *first = n;
        }
        self.view(&shape)
    }
}

/// A command encoder that kernels record into; [`GpuContext::submit`] sends it.
pub struct GpuEncoder {
    pub(crate) encoder: wgpu::CommandEncoder,
    pub(crate) label: String,
    /// Number of dispatches recorded, for error messages and benchmarks.
    pub dispatches: u32,
}

impl GpuEncoder {
    /// Records one compute dispatch in its own pass. Each pass ends with an
    /// implicit barrier, so a later kernel sees what an earlier one wrote.
    pub(crate) fn dispatch(
        &mut self,
        label: &str,
        pipeline: &wgpu::ComputePipeline,
        bind_group: &wgpu::BindGroup,
        grid: [u32; 3],
    ) {
        let mut pass = self.encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(label),
            timestamp_writes: None,
        });
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, bind_group, &[]);
        pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
        self.dispatches += 1;
    }

    /// An empty compute pass that writes a timestamp at its start or end; the
    /// benchmark brackets the kernels it times with two of these.
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    pub(crate) fn timestamp(&mut self, query_set: &wgpu::QuerySet, index: u32) {
        let _pass = self.encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("timestamp"),
            timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                query_set,
                beginning_of_pass_write_index: Some(index),
                end_of_pass_write_index: None,
            }),
        });
    }

    pub(crate) fn inner(&mut self) -> &mut wgpu::CommandEncoder {
        &mut self.encoder
    }
}

pub struct GpuContext {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    features: GpuFeatures,
    limits: wgpu::Limits,
    options: GpuOptions,
    pub(crate) pipelines: PipelineCache,
    /// Errors that no error scope caught. wgpu panics on those by default;
    /// we collect them instead and report them at the next submit or read.
    uncaptured: Arc<Mutex<Vec<String>>>,
    /// A 4-byte storage buffer bound where a kernel's optional input (such as
    /// a bias) is absent, because every binding of a layout must be filled.
    pub(crate) dummy: wgpu::Buffer,
    /// RoPE inverse-frequency tables by (theta bits, head dim), see `kernels::rope_heads`.
    pub(crate) rope_tables: Mutex<HashMap<(u32, usize), Arc<wgpu::Buffer>>>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuContext({})", self.adapter_report())
    }
}

/// The most storage buffers one kernel binds (split attention, grouped MoE).
const MAX_STORAGE_BINDINGS: u32 = 7;

/// Lower rank is preferred: real GPUs first, software rasterisers last.
fn device_type_rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

#[cfg(not(target_arch = "wasm32"))]
const NO_ADAPTER_FIX: &str = "install a Vulkan driver, e.g. `apt-get install mesa-vulkan-drivers` \
     for the software lavapipe driver (or set WGPU_BACKEND to a backend this machine has)";
#[cfg(target_arch = "wasm32")]
const NO_ADAPTER_FIX: &str = "the browser has WebGPU but handed out no adapter (it may be blocklisted here; \
     Chromium offers a software one with --enable-unsafe-webgpu)";

impl GpuContext {
    /// Creates the instance (honouring `WGPU_BACKEND` and the other wgpu
    /// environment variables), picks an adapter and opens its device.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new(opts: GpuOptions) -> Result<GpuContext> {
        pollster::block_on(Self::new_async(opts))
    }

    /// The async form of [`GpuContext::new`], for targets that cannot block (wasm).
    pub async fn new_async(opts: GpuOptions) -> Result<GpuContext> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = Self::pick_adapter(&instance, &opts).await?;
        let info = adapter.get_info();
        let adapter_features = adapter.features();
        let wanted = wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY;
        let required_features = adapter_features & wanted;
        let features = GpuFeatures {
            shader_f16: required_features.contains(wgpu::Features::SHADER_F16),
            subgroup: required_features.contains(wgpu::Features::SUBGROUP),
            timestamp_query: required_features.contains(wgpu::Features::TIMESTAMP_QUERY),
        };
        // wgpu gives a device the conservative WebGPU defaults unless we ask
        // for more. We ask for everything the adapter offers: the engine needs
        // its real storage-binding, buffer and workgroup-memory limits to size
        // weight chunks and tiles, and larger limits cost nothing.
        let required_limits = adapter.limits();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("lynx device"),
                required_features,
                required_limits,
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::Gpu(format!("opening a device on adapter `{}` failed: {e}", info.name)))?;

        let uncaptured = Arc::new(Mutex::new(Vec::new()));
        let sink = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));
        let limits = device.limits();
        // Every WebGPU adapter allows 8; a native one could allow fewer, and
        // then kernels would fail to build with a much less direct message.
        if limits.max_storage_buffers_per_shader_stage < MAX_STORAGE_BINDINGS {
            return Err(Error::Gpu(format!(
                "adapter `{}` allows {} storage buffers per shader stage; the attention and MoE kernels bind \
                 {MAX_STORAGE_BINDINGS}",
                info.name, limits.max_storage_buffers_per_shader_stage
            )));
        }
        let dummy = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("dummy (absent optional input)"),
            size: 4,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        Ok(GpuContext {
            device,
            queue,
            info,
            features,
            limits,
            options: opts,
            pipelines: PipelineCache::default(),
            uncaptured,
            dummy,
            rope_tables: Mutex::new(HashMap::new()),
        })
    }

    async fn pick_adapter(instance: &wgpu::Instance, opts: &GpuOptions) -> Result<wgpu::Adapter> {
        let mut adapters = instance.enumerate_adapters(wgpu::Backends::all()).await;
        if adapters.is_empty() {
            // The browser's WebGPU cannot enumerate; it hands out one adapter on request.
            if let Ok(a) = instance
                .request_adapter(&wgpu::RequestAdapterOptions {
                    power_preference: wgpu::PowerPreference::HighPerformance,
                    ..Default::default()
                })
                .await
            {
                adapters.push(a);
            }
        }
        if adapters.is_empty() {
            return Err(Error::Gpu(format!("no GPU adapter was found; {NO_ADAPTER_FIX}")));
        }
        let all_names: Vec<String> = adapters
            .iter()
            .map(|a| format!("{} ({:?})", a.get_info().name, a.get_info().backend))
            .collect();
        if let Some(want) = &opts.adapter_name {
            let want = want.to_lowercase();
            adapters.retain(|a| a.get_info().name.to_lowercase().contains(&want));
            if adapters.is_empty() {
                return Err(Error::Gpu(format!(
                    "no adapter name contains `{want}`; available: {}",
                    all_names.join(", ")
                )));
            }
        }
        // Stable sort: among adapters of one type, wgpu's order (native
        // backends before GL) decides.
        adapters.sort_by_key(|a| device_type_rank(a.get_info().device_type));
        Ok(adapters.remove(0))
    }

    /// GPU memory the allocator has handed out, where the backend reports
    /// it (Vulkan, DX12, Metal through gpu-allocator); `None` elsewhere.
    pub fn allocated_bytes(&self) -> Option<u64> {
        self.device.generate_allocator_report().map(|r| r.total_allocated_bytes)
    }

    /// One line describing the chosen adapter, its driver and what we enabled.
    pub fn adapter_report(&self) -> String {
        let i = &self.info;
        format!(
            "adapter `{}` on {:?}, device type {:?}, driver `{}` ({}); {}",
            i.name,
            i.backend,
            i.device_type,
            i.driver,
            i.driver_info,
            self.capabilities()
        )
    }

    /// The optional features that are on and the limits that size weight
    /// chunks and tiles, in one line (part of [`GpuContext::adapter_report`]).
    pub fn capabilities(&self) -> String {
        let f = self.features;
        let on: Vec<&str> = [
            ("shader-f16", f.shader_f16),
            ("subgroup", f.subgroup),
            ("timestamp-query", f.timestamp_query),
        ]
        .iter()
        .filter(|(_, on)| *on)
        .map(|(n, _)| *n)
        .collect();
        format!(
            "features: {}; max storage binding {} MiB, max buffer {} MiB, workgroup memory {} KiB",
            if on.is_empty() {
                "none".to_string()
            } else {
                on.join(", ")
            },
            self.limits.max_storage_buffer_binding_size >> 20,
            self.limits.max_buffer_size >> 20,
            self.limits.max_compute_workgroup_storage_size >> 10,
        )
    }

    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    pub fn features(&self) -> GpuFeatures {
        self.features
    }

    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// The largest byte size one storage binding may have, capped at 2 GiB so
    /// that byte offsets inside a binding always fit a shader's u32.
    pub fn max_binding_bytes(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
            .min(1 << 31)
    }

    /// Runs `f` inside validation and out-of-memory error scopes and turns
    /// anything they catch into `Error::Gpu` naming `what`. Natively the
    /// scopes' results are ready at once, so this waits for them.
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn scoped<T>(&self, what: &str, f: impl FnOnce() -> T) -> Result<T> {
        let scopes = ErrorScopes::push(&self.device);
        let out = f();
        pollster::block_on(scopes.pop(what.to_string())).map(|()| out)
    }

    /// In the browser a scope's result arrives on the JS event loop, and
    /// blocking for it would hang the page. The scopes are popped at once
    /// (so later work is outside them) and their results are awaited on the
    /// event loop; an error is recorded, naming `what`, and reported by the
    /// next submit or read-back, like an uncaptured error.
    #[cfg(target_arch = "wasm32")]
    pub(crate) fn scoped<T>(&self, what: &str, f: impl FnOnce() -> T) -> Result<T> {
        let scopes = ErrorScopes::push(&self.device);
        let out = f();
        let caught = scopes.pop(what.to_string());
        let sink = self.uncaptured.clone();
        wasm_bindgen_futures::spawn_local(async move {
            if let Err(e) = caught.await
                && let Ok(mut list) = sink.lock()
            {
                list.push(e.to_string());
            }
        });
        Ok(out)
    }

    /// Like [`GpuContext::scoped`] when `check_errors` is on; otherwise just runs `f`.
    pub(crate) fn maybe_scoped<T>(&self, what: &str, f: impl FnOnce() -> T) -> Result<T> {
        if self.options.check_errors {
            self.scoped(what, f)
        } else {
            Ok(f())
        }
    }

    /// Returns (and clears) the errors no scope caught, as one `Err`.
    pub(crate) fn take_uncaptured(&self, what: &str) -> Result<()> {
        let mut v: MutexGuard<'_, Vec<String>> = match self.uncaptured.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if v.is_empty() {
            return Ok(());
        }
        let msg = v.join("; ");
        v.clear();
        Err(Error::Gpu(format!("{what}: {msg}")))
    }

    /// A fresh encoder for kernels to record into.
    pub fn encoder(&self, label: &str) -> GpuEncoder {
        let encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
        GpuEncoder {
            encoder,
            label: label.to_string(),
            dispatches: 0,
        }
    }

    /// Finishes and submits `enc` without waiting for the GPU.
    pub fn submit(&self, enc: GpuEncoder) -> Result<wgpu::SubmissionIndex> {
        let what = format!("submitting `{}` ({} dispatches)", enc.label, enc.dispatches);
        self.take_uncaptured(&what)?;
        let index = self.maybe_scoped(&what, || self.queue.submit([enc.encoder.finish()]))?;
        self.take_uncaptured(&what)?;
        Ok(index)
    }

    /// Blocks until all submitted work has finished.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("waiting for the GPU: {e}")))?;
        self.take_uncaptured("waiting for the GPU")
    }

    /// A storage buffer (also copyable both ways). `uniform` adds the UNIFORM
    /// usage, so small activation tensors can also be bound as uniforms.
    fn create_storage(&self, label: &str, bytes: u64, contents: Option<&[u8]>, uniform: bool) -> Result<wgpu::Buffer> {
        // Buffers are never empty (a zero-sized binding is invalid) and are a
        // whole number of 16-byte vec4s, so that kernels may view any f32
        // tensor as `array<vec4<f32>>` and still reach its last values.
        let size = bytes.max(16).div_ceil(16) * 16;
        if size > self.limits.max_buffer_size {
            return Err(Error::Gpu(format!(
                "buffer `{label}` needs {size} bytes, more than this adapter's max_buffer_size {}",
                self.limits.max_buffer_size
            )));
        }
        let mut usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        if uniform {
            usage |= wgpu::BufferUsages::UNIFORM;
        }
        let what = format!("creating buffer `{label}` ({size} bytes)");
        self.maybe_scoped(&what, || match contents {
            Some(data) => {
                let mut padded;
                let data = if data.len() as u64 == size {
                    data
                } else {
                    padded = data.to_vec();
                    padded.resize(size as usize, 0);
                    &padded[..]
                };
                self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: data,
                    usage,
                })
            }
            None => self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            }),
        })
    }

    /// An empty weight buffer of `bytes` (rounded up to whole vec4s) that
    /// `gpu::upload` fills with `write_buffer`; `uniform` as for activations.
    pub(crate) fn weight_buffer(&self, label: &str, bytes: u64, uniform: bool) -> Result<wgpu::Buffer> {
        self.create_storage(label, bytes, None, uniform)
    }

    /// A storage buffer holding `bytes` (padded with zeros to whole vec4s).
    pub(crate) fn upload_bytes(&self, label: &str, bytes: &[u8]) -> Result<wgpu::Buffer> {
        self.create_storage(label, bytes.len() as u64, Some(bytes), false)
    }

    fn check_len(label: &str, len: usize, shape: &[usize]) -> Result<()> {
        let want: usize = shape.iter().product();
        if len != want {
            return Err(Error::InvalidArgument(format!(
                "GPU tensor `{label}`: {len} values do not fill shape {shape:?} ({want} values)"
            )));
        }
        Ok(())
    }

    pub fn upload_f32(&self, label: &str, data: &[f32], shape: &[usize]) -> Result<GpuTensor> {
        Self::check_len(label, data.len(), shape)?;
        let buffer = self.create_storage(label, data.len() as u64 * 4, Some(bytemuck::cast_slice(data)), true)?;
        Ok(GpuTensor {
            buffer,
            shape: shape.to_vec(),
            elem: Elem::F32,
        })
    }

    pub fn upload_u32(&self, label: &str, data: &[u32], shape: &[usize]) -> Result<GpuTensor> {
        Self::check_len(label, data.len(), shape)?;
        let buffer = self.upload_bytes(label, bytemuck::cast_slice(data))?;
        Ok(GpuTensor {
            buffer,
            shape: shape.to_vec(),
            elem: Elem::U32,
        })
    }

    /// An f32 tensor of zeros (wgpu zero-initialises new buffers).
    pub fn zeros_f32(&self, label: &str, shape: &[usize]) -> Result<GpuTensor> {
        let n: usize = shape.iter().product();
        let buffer = self.create_storage(label, n as u64 * 4, None, true)?;
        Ok(GpuTensor {
            buffer,
            shape: shape.to_vec(),
            elem: Elem::F32,
        })
    }

    /// A u32 tensor of zeros.
    pub fn zeros_u32(&self, label: &str, shape: &[usize]) -> Result<GpuTensor> {
        let n: usize = shape.iter().product();
        let buffer = self.create_storage(label, n as u64 * 4, None, false)?;
        Ok(GpuTensor {
            buffer,
            shape: shape.to_vec(),
            elem: Elem::U32,
        })
    }

    /// Overwrites the contents of a u32 tensor from the host.
    pub fn write_u32(&self, t: &GpuTensor, data: &[u32]) -> Result<()> {
        if t.elem != Elem::U32 || data.len() != t.numel() {
            return Err(Error::InvalidArgument(format!(
                "write_u32: {} values into a {:?} tensor of shape {:?}",
                data.len(),
                t.elem,
                t.shape
            )));
        }
        self.queue.write_buffer(&t.buffer, 0, bytemuck::cast_slice(data));
        Ok(())
    }

    /// Overwrites the contents of an f32 tensor from the host.
    pub fn write_f32(&self, t: &GpuTensor, data: &[f32]) -> Result<()> {
        if t.elem != Elem::F32 || data.len() != t.numel() {
            return Err(Error::InvalidArgument(format!(
                "write_f32: {} values into a {:?} tensor of shape {:?}",
                data.len(),
                t.elem,
                t.shape
            )));
        }
        self.queue.write_buffer(&t.buffer, 0, bytemuck::cast_slice(data));
        Ok(())
    }

    /// Starts copying `bytes` bytes from the start of `src` back to the
    /// host: submits the copy and asks for the staging buffer to be mapped.
    /// [`GpuContext::finish_read`] waits for the map. Starting several reads
    /// before finishing any lets one GPU wait serve them all.
    pub(crate) fn start_read(&self, src: &wgpu::Buffer, bytes: u64, what: &str) -> Result<PendingRead> {
        let size = bytes.max(4).div_ceil(4) * 4;
        let staging = self.maybe_scoped(what, || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("read-back staging"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })?;
        let mut enc = self.encoder(what);
        enc.inner().copy_buffer_to_buffer(src, 0, &staging, 0, size);
        self.submit(enc)?;
        let (tx, mapped) = oneshot();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| tx.send(r));
        Ok(PendingRead {
            staging,
            bytes,
            what: what.to_string(),
            mapped,
        })
    }

    /// Waits for a read started by [`GpuContext::start_read`] and returns
    /// its bytes. The map callback fires inside `device.poll` on native
    /// targets, so this polls until it has; in the browser `poll` does
    /// nothing and the callback fires from the JS event loop, which the
    /// `await` yields to. Either way the same future completes the read.
    pub(crate) async fn finish_read(&self, read: PendingRead) -> Result<Vec<u8>> {
        let PendingRead {
            staging,
            bytes,
            what,
            mapped,
        } = read;
        #[cfg(not(target_arch = "wasm32"))]
        self.poll_until(&mapped, &what)?;
        match mapped.await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(Error::Gpu(format!("{what}: mapping the read-back buffer failed: {e}"))),
            None => return Err(Error::Gpu(format!("{what}: the read-back buffer was never mapped"))),
        }
        let out = {
            let view = staging
                .slice(..)
                .get_mapped_range()
                .map_err(|e| Error::Gpu(format!("{what}: reading the mapped buffer failed: {e}")))?;
            view[..bytes as usize].to_vec()
        };
        staging.unmap();
        self.take_uncaptured(&what)?;
        Ok(out)
    }

    /// Polls the device until `rx` has its value. When several threads
    /// share the device, another thread's `poll` may be running our
    /// callback just as our own wait returns, so this waits for the
    /// callback itself, polling again while it has not come.
    #[cfg(not(target_arch = "wasm32"))]
    fn poll_until<T>(&self, rx: &OneshotRx<T>, what: &str) -> Result<()> {
        let start = web_time::Instant::now();
        loop {
            self.wait()?;
            if rx.is_ready() {
                return Ok(());
            }
            if start.elapsed().as_secs() >= 600 {
                return Err(Error::Gpu(format!("{what}: the read-back buffer was never mapped")));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Copies `bytes` bytes from the start of `src` back to the host, after
    /// all work submitted before it.
    pub(crate) async fn read_bytes_async(&self, src: &wgpu::Buffer, bytes: u64, what: &str) -> Result<Vec<u8>> {
        let read = self.start_read(src, bytes, what)?;
        self.finish_read(read).await
    }

    /// [`GpuContext::read_bytes_async`], blocking (native only: a browser
    /// page cannot block on the GPU).
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn read_bytes(&self, src: &wgpu::Buffer, bytes: u64, what: &str) -> Result<Vec<u8>> {
        pollster::block_on(self.read_bytes_async(src, bytes, what))
    }

    /// Reads a u32 tensor back, after all submitted work.
    pub async fn read_u32_async(&self, t: &GpuTensor) -> Result<Vec<u32>> {
        if t.elem != Elem::U32 {
            return Err(Error::InvalidArgument(format!("read_u32 on a {:?} tensor", t.elem)));
        }
        let bytes = self
            .read_bytes_async(&t.buffer, t.data_bytes(), "reading a tensor back")
            .await?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Reads an f32 tensor back, after all submitted work.
    pub async fn read_f32_async(&self, t: &GpuTensor) -> Result<Vec<f32>> {
        if t.elem != Elem::F32 {
            return Err(Error::InvalidArgument(format!("read_f32 on a {:?} tensor", t.elem)));
        }
        let bytes = self
            .read_bytes_async(&t.buffer, t.data_bytes(), "reading a tensor back")
            .await?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Reads a u32 tensor back (waits for all submitted work; native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_u32(&self, t: &GpuTensor) -> Result<Vec<u32>> {
        pollster::block_on(self.read_u32_async(t))
    }

    /// Reads an f32 tensor back (waits for all submitted work; native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_f32(&self, t: &GpuTensor) -> Result<Vec<f32>> {
        pollster::block_on(self.read_f32_async(t))
    }
}

/// A validation and an out-of-memory error scope, pushed together.
struct ErrorScopes {
    oom: wgpu::ErrorScopeGuard,
    validation: wgpu::ErrorScopeGuard,
}

impl ErrorScopes {
    fn push(device: &wgpu::Device) -> ErrorScopes {
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        ErrorScopes { oom, validation }
    }

    /// Pops both scopes now, so that later work is outside them; the future
    /// resolves to what they caught, as `Error::Gpu` naming `what`. This is
    /// the one implementation of error checking on every target.
    fn pop(self, what: String) -> impl std::future::Future<Output = Result<()>> {
        // Scopes pop in reverse order of their pushes.
        let validation = self.validation.pop();
        let oom = self.oom.pop();
        async move {
            match (validation.await, oom.await) {
                (None, None) => Ok(()),
                (Some(e), _) => Err(Error::Gpu(format!("{what}: validation error: {e}"))),
                (None, Some(e)) => Err(Error::Gpu(format!("{what}: out of GPU memory: {e}"))),
            }
        }
    }
}

/// A read-back in flight (see [`GpuContext::start_read`]).
pub(crate) struct PendingRead {
    staging: wgpu::Buffer,
    bytes: u64,
    what: String,
    mapped: OneshotRx<std::result::Result<(), wgpu::BufferAsyncError>>,
}

/// One value handed from a wgpu callback to a future. The callback may run
/// on another thread (inside its `poll`) natively, or on the JS event loop
/// in the browser; the receiver is polled by whoever awaits the read.
struct Slot<T> {
    value: Option<T>,
    /// The sender was dropped without sending.
    closed: bool,
    waker: Option<std::task::Waker>,
}

pub(crate) struct OneshotTx<T>(Arc<Mutex<Slot<T>>>);
pub(crate) struct OneshotRx<T>(Arc<Mutex<Slot<T>>>);

pub(crate) fn oneshot<T>() -> (OneshotTx<T>, OneshotRx<T>) {
    let slot = Arc::new(Mutex::new(Slot {
        value: None,
        closed: false,
        waker: None,
    }));
    (OneshotTx(slot.clone()), OneshotRx(slot))
}

fn lock_slot<T>(slot: &Mutex<Slot<T>>) -> MutexGuard<'_, Slot<T>> {
    // A poisoned slot still holds a valid Option; a panicking sender cannot
    // have left it half-written.
    match slot.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl<T> OneshotTx<T> {
    pub(crate) fn send(self, value: T) {
        let waker = {
            let mut s = lock_slot(&self.0);
            s.value = Some(value);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Drop for OneshotTx<T> {
    fn drop(&mut self) {
        let waker = {
            let mut s = lock_slot(&self.0);
            s.closed = true;
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> OneshotRx<T> {
    /// Whether the value (or the sender's drop) has arrived.
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    pub(crate) fn is_ready(&self) -> bool {
        let s = lock_slot(&self.0);
        s.value.is_some() || s.closed
    }
}

impl<T> std::future::Future for OneshotRx<T> {
    /// `None` when the sender was dropped without sending.
    type Output = Option<T>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<T>> {
        let mut s = lock_slot(&self.0);
        if let Some(v) = s.value.take() {
            return std::task::Poll::Ready(Some(v));
        }
        if s.closed {
            return std::task::Poll::Ready(None);
        }
        s.waker = Some(cx.waker().clone());
        std::task::Poll::Pending
    }
}
