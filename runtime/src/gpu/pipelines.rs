//! The shader registry and the compute-pipeline cache.
//!
//! WGSL sources are embedded at compile time from `shaders/`. A pipeline is
//! built from a [`ShaderSpec`]: the kernel file, its entry point, "defines"
//! (typed constants prepended as `const NAME: type = value;` lines, so a
//! kernel can size arrays and loops with them) and "includes" (other files
//! prepended verbatim, such as the weight decoder `dequant_q8_0.wgsl`). The
//! composed source is
//!
//! ```text
//! // lynx: <file> defines ...
//! const NAME: u32 = 8u;       (one line per define, sorted by name)
//! <include 1> ...             (in the order given)
//! <kernel file>
//! ```
//!
//! Pipelines are cached by the whole spec, so each variant compiles once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::gpu::context::GpuContext;

/// Every shader file, by name. Kernels refer to files by these names.
const SHADERS: &[(&str, &str)] = &[
    ("dequant_common.wgsl", include_str!("../../shaders/dequant_common.wgsl")),
    ("dequant_f32.wgsl", include_str!("../../shaders/dequant_f32.wgsl")),
    ("dequant_q8_0.wgsl", include_str!("../../shaders/dequant_q8_0.wgsl")),
    ("dequant_q4_0.wgsl", include_str!("../../shaders/dequant_q4_0.wgsl")),
    ("dequant_q4_1.wgsl", include_str!("../../shaders/dequant_q4_1.wgsl")),
    ("dequant_q5_0.wgsl", include_str!("../../shaders/dequant_q5_0.wgsl")),
    ("dequant_q5_1.wgsl", include_str!("../../shaders/dequant_q5_1.wgsl")),
    ("dequant_q2_k.wgsl", include_str!("../../shaders/dequant_q2_k.wgsl")),
    ("dequant_q3_k.wgsl", include_str!("../../shaders/dequant_q3_k.wgsl")),
    ("dequant_q4_k.wgsl", include_str!("../../shaders/dequant_q4_k.wgsl")),
    ("dequant_q5_k.wgsl", include_str!("../../shaders/dequant_q5_k.wgsl")),
    ("dequant_q6_k.wgsl", include_str!("../../shaders/dequant_q6_k.wgsl")),
    ("matmul_nt_wq.wgsl", include_str!("../../shaders/matmul_nt_wq.wgsl")),
    (
        "matmul_x_storage.wgsl",
        include_str!("../../shaders/matmul_x_storage.wgsl"),
    ),
    (
        "matmul_x_uniform.wgsl",
        include_str!("../../shaders/matmul_x_uniform.wgsl"),
    ),
    ("embed_rows_wq.wgsl", include_str!("../../shaders/embed_rows_wq.wgsl")),
    (
        "rms_norm_rows_f32.wgsl",
        include_str!("../../shaders/rms_norm_rows_f32.wgsl"),
    ),
    ("rope_heads_f32.wgsl", include_str!("../../shaders/rope_heads_f32.wgsl")),
    ("silu_mul_f32.wgsl", include_str!("../../shaders/silu_mul_f32.wgsl")),
    ("add_f32.wgsl", include_str!("../../shaders/add_f32.wgsl")),
    (
        "moe_route_topk_f32.wgsl",
        include_str!("../../shaders/moe_route_topk_f32.wgsl"),
    ),
    ("moe_group_u32.wgsl", include_str!("../../shaders/moe_group_u32.wgsl")),
    (
        "moe_matmul_nt_wq.wgsl",
        include_str!("../../shaders/moe_matmul_nt_wq.wgsl"),
    ),
    (
        "moe_combine_f32.wgsl",
        include_str!("../../shaders/moe_combine_f32.wgsl"),
    ),
    ("kv_append_f32.wgsl", include_str!("../../shaders/kv_append_f32.wgsl")),
    (
        "attention_split_f32.wgsl",
        include_str!("../../shaders/attention_split_f32.wgsl"),
    ),
    (
        "attention_merge_f32.wgsl",
        include_str!("../../shaders/attention_merge_f32.wgsl"),
    ),
    (
        "gather_rows_f32.wgsl",
        include_str!("../../shaders/gather_rows_f32.wgsl"),
    ),
    ("clamp_f32.wgsl", include_str!("../../shaders/clamp_f32.wgsl")),
    ("lynx_bin_f32.wgsl", include_str!("../../shaders/lynx_bin_f32.wgsl")),
    ("lynx_score_f32.wgsl", include_str!("../../shaders/lynx_score_f32.wgsl")),
    (
        "moe_active_set_u32.wgsl",
        include_str!("../../shaders/moe_active_set_u32.wgsl"),
    ),
    ("moe_remap_f32.wgsl", include_str!("../../shaders/moe_remap_f32.wgsl")),
];

pub fn shader_source(name: &str) -> Result<&'static str> {
    SHADERS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .ok_or_else(|| Error::Gpu(format!("no embedded shader named `{name}`")))
}

/// A typed WGSL constant value for a define.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DefineValue {
    U32(u32),
    I32(i32),
    Bool(bool),
    /// f32 stored as its bits so the key stays hashable and exact.
    F32Bits(u32),
}

impl DefineValue {
    fn ty(&self) -> &'static str {
        match self {
            DefineValue::U32(_) => "u32",
            DefineValue::I32(_) => "i32",
            DefineValue::Bool(_) => "bool",
            DefineValue::F32Bits(_) => "f32",
        }
    }

    fn literal(&self) -> String {
        match self {
            DefineValue::U32(v) => format!("{v}u"),
            DefineValue::I32(v) => format!("{v}i"),
            DefineValue::Bool(v) => format!("{v}"),
            // `{:?}` prints enough digits to round-trip and always a `.`,
            // which WGSL needs to read the literal as a float.
            DefineValue::F32Bits(b) => format!("{:?}f", f32::from_bits(*b)),
        }
    }
}

/// Which shader variant to build: the cache key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ShaderSpec {
    pub file: &'static str,
    pub entry: &'static str,
    /// Files prepended before `file`, in order.
    pub includes: Vec<&'static str>,
    /// Sorted by name (the builder methods keep it so), so equal sets of
    /// defines give equal keys whatever order they were added in.
    defines: Vec<(String, DefineValue)>,
}

impl ShaderSpec {
    pub fn new(file: &'static str, entry: &'static str) -> Self {
        ShaderSpec {
            file,
            entry,
            includes: Vec::new(),
            defines: Vec::new(),
        }
    }

    pub fn include(mut self, file: &'static str) -> Self {
        self.includes.push(file);
        self
    }

    pub fn define(mut self, name: &str, value: DefineValue) -> Self {
        self.defines.retain(|(n, _)| n != name);
        self.defines.push((name.to_string(), value));
        self.defines.sort();
        self
    }

    pub fn define_u32(self, name: &str, v: u32) -> Self {
        self.define(name, DefineValue::U32(v))
    }

    /// The defines as sorted `NAME=value` strings (for labels and messages).
    pub fn define_list(&self) -> Vec<String> {
        self.defines
            .iter()
            .map(|(n, v)| format!("{n}={}", v.literal()))
            .collect()
    }

    /// A readable label such as `matmul_nt_wq.wgsl:main[TILE_T=8u]+dequant_q8_0.wgsl`.
    pub fn label(&self) -> String {
        let mut s = format!("{}:{}[{}]", self.file, self.entry, self.define_list().join(","));
        for inc in &self.includes {
            s.push('+');
            s.push_str(inc);
        }
        s
    }

    /// The full WGSL text of this variant.
    pub fn compose(&self) -> Result<String> {
        let mut src = format!("// lynx: {}\n", self.label());
        for (n, v) in &self.defines {
            src.push_str(&format!("const {n}: {} = {};\n", v.ty(), v.literal()));
        }
        for inc in &self.includes {
            src.push_str(shader_source(inc)?);
            src.push('\n');
        }
        src.push_str(shader_source(self.file)?);
        Ok(src)
    }
}

/// A compiled pipeline with the bind-group layout its kernel declared.
#[derive(Debug)]
pub struct Kernel {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
    pub label: String,
}

#[derive(Default)]
pub struct PipelineCache {
    map: Mutex<HashMap<ShaderSpec, Arc<Kernel>>>,
}

impl PipelineCache {
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How a kernel binds one buffer.
#[derive(Clone, Copy, Debug)]
pub enum Bind {
    Uniform,
    StorageRead,
    StorageReadWrite,
}

fn layout_entries(binds: &[Bind]) -> Vec<wgpu::BindGroupLayoutEntry> {
    binds
        .iter()
        .enumerate()
        .map(|(i, b)| wgpu::BindGroupLayoutEntry {
            binding: i as u32,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: match b {
                    Bind::Uniform => wgpu::BufferBindingType::Uniform,
                    Bind::StorageRead => wgpu::BufferBindingType::Storage { read_only: true },
                    Bind::StorageReadWrite => wgpu::BufferBindingType::Storage { read_only: false },
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        })
        .collect()
}

impl GpuContext {
    /// The pipeline for `spec`, compiled on first use. `binds` is the
    /// kernel's explicit bind-group layout: binding i of group 0 is `binds[i]`.
    /// One host function owns each kernel file, so a spec always comes with
    /// the same layout.
    pub fn kernel(&self, spec: &ShaderSpec, binds: &[Bind]) -> Result<Arc<Kernel>> {
        if let Some(k) = self.pipelines.map.lock().map_err(|_| poisoned())?.get(spec) {
            return Ok(k.clone());
        }
        // Compile outside the lock: it is slow, and a rare duplicate
        // compilation by a racing thread is harmless (the first one wins).
        let kernel = Arc::new(self.build_kernel(spec, binds)?);
        let mut map = self.pipelines.map.lock().map_err(|_| poisoned())?;
        Ok(map.entry(spec.clone()).or_insert(kernel).clone())
    }

    fn build_kernel(&self, spec: &ShaderSpec, binds: &[Bind]) -> Result<Kernel> {
        let label = spec.label();
        let source = spec.compose()?;
        let entries = layout_entries(binds);
        let what = format!("building pipeline {label}");
        let (pipeline, layout) = self.scoped(&what, || {
            let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&label),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
            let layout = self.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(&format!("{label} bind group layout")),
                entries: &entries,
            });
            let pipeline_layout = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(&format!("{label} pipeline layout")),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
            let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&label),
                layout: Some(&pipeline_layout),
                module: &module,
                entry_point: Some(spec.entry),
                compilation_options: wgpu::PipelineCompilationOptions::default(),
                cache: None,
            });
            (pipeline, layout)
        })?;
        Ok(Kernel {
            pipeline,
            layout,
            label,
        })
    }

    /// A bind group for `kernel` with `buffers[i]` (whole buffer or a byte
    /// range) at binding i.
    pub(crate) fn bind_group(&self, kernel: &Kernel, buffers: &[wgpu::BufferBinding<'_>]) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry<'_>> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: wgpu::BindingResource::Buffer(b.clone()),
            })
            .collect();
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&format!("{} bind group", kernel.label)),
            layout: &kernel.layout,
            entries: &entries,
        })
    }
}

fn poisoned() -> Error {
    Error::Gpu("the pipeline cache lock was poisoned by a panic in another thread".into())
}
