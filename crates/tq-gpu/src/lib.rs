//! GPU batch kernels for TurboQuant_mse and TurboQuant_prod, written in WGSL and driven through `wgpu`: quantize
//! (randomized Hadamard or dense Haar rotation, codebook search, bit-packing into the CPU's 32-row block
//! layout), dequantize and exact scoring. The codes are those of the CPU path (tq-quant), so a
//! batch quantized here is an ordinary [`MseBatch`].
//!
//! - [`GpuContext`]: adapter and device selection (a discrete GPU first, then any adapter,
//!   Mesa's software Vulkan included), pipelines compiled once, typed errors for a missing
//!   adapter, shader validation, out-of-memory and a lost device.
//! - [`GpuContext::quantize_mse`], [`GpuContext::dequantize_mse`], [`GpuContext::upload`] (a
//!   resident batch) and [`ResidentBatch::score`] / [`ResidentBatch::top_k`]. Batches larger
//!   than one dispatch or one storage binding are split into chunks of whole 32-row blocks.
//!
//! ```
//! use std::sync::Arc;
//! use tq_gpu::GpuContext;
//! use tq_quant::{MseConfig, MseQuantizer, RotationKind};
//!
//! let q = Arc::new(MseQuantizer::new(MseConfig::new(128, 4, RotationKind::Hadamard, 42))?);
//! let xs: Vec<f32> = (0..128 * 100).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
//! if let Ok(gpu) = GpuContext::new() {           // a GPU, or lavapipe (scripts/setup.sh)
//!     let batch = gpu.quantize_mse(&q, &xs)?;    // an ordinary MseBatch, the CPU's codes
//!     let on_device = gpu.upload(&batch)?;       // kept resident for repeated queries
//!     let best = on_device.top_k(&xs[..128], 5)?;
//!     assert_eq!(best[0].0, 0);
//! }
//! # Ok::<(), tq_gpu::Error>(())
//! ```
//!
//! Scope: MSE quantizers (any scale mode, centred or not) and Prod (`bits >= 2`), Hadamard or
//! dense Haar rotation, `d <= 1024`
//! (one row lives in workgroup memory). Other configurations are [`Error::Unsupported`].
//! Codes equal the CPU's except where a rotated coordinate lies within float rounding of a
//! codebook boundary (the GPU's `sqrt` and division may differ from the CPU's by an ulp).

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};
use tq_quant::{
    MseBatch, MseQuantizer, PackedRows, ProdBatch, ProdQuantizer, RotationKind, ScaleMode,
};
use wgpu::util::DeviceExt;

/// Errors of tq-gpu.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No adapter was found (no GPU and no software rasterizer such as lavapipe).
    #[error("no GPU adapter found (install Mesa's software Vulkan: scripts/setup.sh)")]
    NoAdapter,
    /// The adapter refused to create a device.
    #[error("cannot create a device on {adapter}: {reason}")]
    RequestDevice {
        /// The adapter's name.
        adapter: String,
        /// wgpu's reason.
        reason: String,
    },
    /// The device reported a validation error (shader or pipeline).
    #[error("GPU validation error: {0}")]
    Validation(String),
    /// The device ran out of memory.
    #[error("GPU out of memory: {0}")]
    OutOfMemory(String),
    /// The device was lost or a map or poll failed.
    #[error("GPU device error: {0}")]
    Device(String),
    /// The quantizer or request is outside what the kernels implement.
    #[error("not supported on the GPU path: {0}")]
    Unsupported(String),
    /// The input was rejected by tq-quant's checks.
    #[error(transparent)]
    Quant(#[from] tq_quant::Error),
}

/// Result alias of tq-gpu.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Largest dimension the kernels hold in workgroup memory.
pub const MAX_DIM: usize = 1024;
/// Rows per dispatch dimension (WebGPU's minimum guaranteed workgroup count).
const MAX_GROUPS: u32 = 65535;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug)]
struct Params {
    d: u32,
    p: u32,
    rows: u32,
    bits: u32,
    rounds: u32,
    has_perm: u32,
    has_scale: u32,
    row_bytes: u32,
    block_scale: f32,
    levels: u32,
    dense: u32,
    sign_word_off: u32,
    s_off: u32,
    m: u32,
    sign_bytes: u32,
    sign_scale: f32,
    scale_mode: u32,
    mean_off: u32,
    pad2: u32,
    pad3: u32,
}

/// A device, its queue and the compiled pipelines.
pub struct GpuContext {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    max_binding: u64,
    layout: wgpu::BindGroupLayout,
    quantize: wgpu::ComputePipeline,
    dequantize: wgpu::ComputePipeline,
    score: wgpu::ComputePipeline,
    quantize_prod: wgpu::ComputePipeline,
    dequantize_prod: wgpu::ComputePipeline,
    score_prod: wgpu::ComputePipeline,
    rotate_tiled: wgpu::ComputePipeline,
    /// The first error reported outside an error scope (out of memory, validation, internal) or
    /// the reason the device was lost; returned by the next operation.
    fault: Arc<std::sync::Mutex<Option<Error>>>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .finish_non_exhaustive()
    }
}

fn storage_entry(binding: u32, read_only: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

/// Per-quantizer device buffers (rotation signs and permutations, one codebook table).
struct QuantBuffers {
    params: Params,
    signs: wgpu::Buffer,
    perm: wgpu::Buffer,
}

impl GpuContext {
    /// Picks an adapter (high-performance first, then any, software included), creates a device
    /// with the adapter's own limits and compiles the kernels.
    ///
    /// # Errors
    /// [`Error::NoAdapter`], [`Error::RequestDevice`], [`Error::Validation`] if a kernel does not
    /// compile on this adapter.
    pub fn new() -> Result<Self> {
        pollster::block_on(Self::new_async())
    }

    async fn new_async() -> Result<Self> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let mut adapters = instance.enumerate_adapters(wgpu::Backends::all()).await;
        // Discrete, integrated, virtual, CPU, other: the first kind present wins.
        let rank = |a: &wgpu::Adapter| match a.get_info().device_type {
            wgpu::DeviceType::DiscreteGpu => 0,
            wgpu::DeviceType::IntegratedGpu => 1,
            wgpu::DeviceType::VirtualGpu => 2,
            wgpu::DeviceType::Cpu => 3,
            wgpu::DeviceType::Other => 4,
        };
        adapters.sort_by_key(|a| (rank(a), a.get_info().backend != wgpu::Backend::Vulkan));
        let adapter = adapters.into_iter().next().ok_or(Error::NoAdapter)?;
        let info = adapter.get_info();
        let limits = adapter.limits();
        if limits.max_compute_workgroup_storage_size < 12_400 {
            return Err(Error::Unsupported(format!(
                "{} offers {} bytes of workgroup memory; the kernels need 12.4 KB",
                info.name, limits.max_compute_workgroup_storage_size
            )));
        }
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("tq-gpu"),
                required_features: wgpu::Features::empty(),
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::RequestDevice {
                adapter: info.name.clone(),
                reason: e.to_string(),
            })?;
        let fault: Arc<std::sync::Mutex<Option<Error>>> = Arc::default();
        let sink = fault.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let err = match &e {
                wgpu::Error::OutOfMemory { .. } => Error::OutOfMemory(e.to_string()),
                wgpu::Error::Validation { .. } => Error::Validation(e.to_string()),
                wgpu::Error::Internal { .. } => Error::Device(e.to_string()),
            };
            if let Ok(mut f) = sink.lock() {
                f.get_or_insert(err);
            }
        }));
        let sink = fault.clone();
        device.set_device_lost_callback(move |reason, msg| {
            if let Ok(mut f) = sink.lock() {
                f.get_or_insert(Error::Device(format!("device lost ({reason:?}): {msg}")));
            }
        });
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("mse.wgsl"),
            source: wgpu::ShaderSource::Wgsl(include_str!("mse.wgsl").into()),
        });
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        }];
        for b in 1..=4 {
            entries.push(storage_entry(b, true));
        }
        for b in 5..=7 {
            entries.push(storage_entry(b, false));
        }
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("tq-gpu mse"),
            entries: &entries,
        });
        let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("tq-gpu mse"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = |entry: &str| {
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: Some(&pl),
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            })
        };
        let (quantize, dequantize, score) = (
            pipeline("quantize"),
            pipeline("dequantize"),
            pipeline("score"),
        );
        let (quantize_prod, dequantize_prod, score_prod) = (
            pipeline("quantize_prod"),
            pipeline("dequantize_prod"),
            pipeline("score_prod"),
        );
        let rotate_tiled = pipeline("rotate_tiled");
        if let Some(e) = scope.pop().await {
            return Err(Error::Validation(e.to_string()));
        }
        Ok(Self {
            max_binding: limits.max_storage_buffer_binding_size as u64,
            device,
            queue,
            info,
            layout,
            quantize,
            dequantize,
            score,
            quantize_prod,
            dequantize_prod,
            score_prod,
            rotate_tiled,
            fault,
        })
    }

    /// Caps the bytes of one storage binding (never above the device's limit), so batches are
    /// split into more chunks: for bounding device memory per call, and for testing the chunking.
    pub fn with_binding_limit(mut self, bytes: u64) -> Self {
        self.max_binding = self.max_binding.min(bytes.max(4096));
        self
    }

    /// The adapter's name and backend, e.g. `llvmpipe (LLVM 15.0.6, 256 bits) (Vulkan)`.
    pub fn adapter(&self) -> String {
        format!("{} ({:?})", self.info.name, self.info.backend)
    }

    /// `true` for a CPU (software) adapter such as lavapipe.
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    fn quant_buffers(
        &self,
        q: &MseQuantizer,
        prod: Option<&ProdQuantizer>,
    ) -> Result<QuantBuffers> {
        let cfg = q.config();
        let d = q.dim();
        if d > MAX_DIM {
            return Err(Error::Unsupported(format!("d = {d} exceeds {MAX_DIM}")));
        }
        let bits = cfg.bits;
        let mut params = Params {
            d: d as u32,
            p: d as u32,
            rows: 0,
            bits,
            rounds: 0,
            has_perm: 0,
            has_scale: 0,
            row_bytes: q.row_bytes() as u32,
            block_scale: 1.0,
            levels: 1 << bits,
            dense: 0,
            sign_word_off: 0,
            s_off: 0,
            m: 0,
            sign_bytes: 0,
            sign_scale: 0.0,
            scale_mode: match cfg.scale {
                ScaleMode::Norm => 0,
                ScaleMode::LeastSquares => 1,
                ScaleMode::Unbiased => 2,
            },
            mean_off: u32::MAX,
            pad2: 0,
            pad3: 0,
        };
        let rot = q.rotation();
        let (signs, perm) = match (cfg.rotation, rot.hadamard_params(), rot.dense_matrix()) {
            (RotationKind::Hadamard, Some(h), _) => {
                let signs: Vec<f32> = h.rounds.iter().flat_map(|r| r.0.iter().copied()).collect();
                let perm: Vec<u32> = h.rounds.iter().flat_map(|r| r.1.iter().copied()).collect();
                params.p = h.block as u32;
                params.rounds = h.rounds.len() as u32;
                params.has_perm = h.rounds.iter().any(|r| !r.1.is_empty()) as u32;
                params.has_scale = h.block_scale.is_some() as u32;
                params.block_scale = h.block_scale.unwrap_or(1.0);
                (signs, perm)
            }
            (RotationKind::Haar, _, Some(m)) => {
                params.dense = 1;
                (m.to_vec(), Vec::new())
            }
            _ => return Err(Error::Unsupported("unknown rotation".into())),
        };
        let mut signs = signs;
        if let Some(m) = q.mean() {
            params.mean_off = signs.len() as u32;
            signs.extend_from_slice(m);
        }
        if let Some(pq) = prod {
            let qjl = pq.qjl();
            params.s_off = signs.len() as u32;
            params.m = qjl.sketch_dim() as u32;
            params.sign_bytes = qjl.sign_bytes() as u32;
            params.sign_scale = tq_quant::qjl::SQRT_PI_OVER_2 / qjl.sketch_dim() as f32;
            signs.extend_from_slice(qjl.matrix());
        }
        Ok(QuantBuffers {
            params,
            signs: self.init(bytemuck::cast_slice(&signs), wgpu::BufferUsages::STORAGE),
            perm: self.init(bytemuck::cast_slice(&perm), wgpu::BufferUsages::STORAGE),
        })
    }

    fn init(&self, bytes: &[u8], usage: wgpu::BufferUsages) -> wgpu::Buffer {
        // Zero-length bindings are invalid: pad to one word.
        let pad = [0u8; 4];
        let contents = if bytes.is_empty() { &pad[..] } else { bytes };
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents,
                usage,
            })
    }

    fn zeroed(&self, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: size.max(4).div_ceil(4) * 4,
            usage,
            mapped_at_creation: false,
        })
    }

    /// Rows per chunk: whole 32-row blocks, within one dispatch dimension and within the storage
    /// binding limit for `bytes_per_row`.
    fn chunk_rows(&self, bytes_per_row: u64) -> usize {
        let by_binding = (self.max_binding / bytes_per_row.max(1)) as usize;
        let by_dispatch = MAX_GROUPS as usize;
        (by_binding.min(by_dispatch) / 32 * 32).max(32)
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        pipeline: &wgpu::ComputePipeline,
        params: Params,
        qb: &QuantBuffers,
        table: &wgpu::Buffer,
        xs: &wgpu::Buffer,
        codes: &wgpu::Buffer,
        norms: &wgpu::Buffer,
        out: &wgpu::Buffer,
        groups: (u32, u32),
    ) -> Result<()> {
        let uniform = self.init(bytemuck::bytes_of(&params), wgpu::BufferUsages::UNIFORM);
        let buffers = [&uniform, &qb.signs, &qb.perm, table, xs, codes, norms, out];
        // Chunking must keep every binding within the (possibly capped) limit.
        if let Some(b) = buffers[3..].iter().find(|b| b.size() > self.max_binding) {
            return Err(Error::Device(format!(
                "a binding of {} bytes exceeds the {}-byte limit",
                b.size(),
                self.max_binding
            )));
        }
        let entries: Vec<wgpu::BindGroupEntry<'_>> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect();
        self.check()?;
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &self.layout,
            entries: &entries,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups(groups.0, groups.1, 1);
        }
        self.queue.submit([enc.finish()]);
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Validation(e.to_string()));
        }
        if let Some(e) = pollster::block_on(oom.pop()) {
            return Err(Error::OutOfMemory(e.to_string()));
        }
        self.check()
    }

    /// The error the device reported outside a scope, or its loss, if any (taken once).
    fn check(&self) -> Result<()> {
        match self.fault.lock() {
            Ok(mut f) => f.take().map_or(Ok(()), Err),
            Err(_) => Err(Error::Device("error state poisoned".into())),
        }
    }

    fn read(&self, buf: &wgpu::Buffer, size: u64) -> Result<Vec<u8>> {
        let staging = self.zeroed(
            size,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        );
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(buf, 0, &staging, 0, size.div_ceil(4) * 4);
        self.queue.submit([enc.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Device(e.to_string()))?;
        rx.recv()
            .map_err(|e| Error::Device(e.to_string()))?
            .map_err(|e| Error::Device(e.to_string()))?;
        self.check()?;
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| Error::Device(e.to_string()))?;
        let out = view[..size as usize].to_vec();
        drop(view);
        staging.unmap();
        Ok(out)
    }

    /// For a dense (Haar) rotation: rotates the chunk `x` of `rows` rows with the tiled product
    /// into a new buffer and returns it with the parameters telling `quantize` to read it;
    /// otherwise `None` and the parameters unchanged.
    fn pre_rotate(
        &self,
        qb: &QuantBuffers,
        params: Params,
        x: &wgpu::Buffer,
        rows: usize,
    ) -> Result<(Params, Option<wgpu::Buffer>)> {
        if params.dense != 1 {
            return Ok((params, None));
        }
        let d = params.d as usize;
        let y = self.zeroed((rows * d * 4) as u64, wgpu::BufferUsages::STORAGE);
        // Unused bindings: distinct buffers (one buffer may not be bound read-only and
        // read-write in one dispatch).
        let unused = || self.zeroed(4, wgpu::BufferUsages::STORAGE);
        let (table, codes, norms) = (unused(), unused(), unused());
        let groups = ((d as u32).div_ceil(16), (rows as u32).div_ceil(16));
        self.run(
            &self.rotate_tiled,
            params,
            qb,
            &table,
            x,
            &codes,
            &norms,
            &y,
            groups,
        )?;
        Ok((Params { dense: 2, ..params }, Some(y)))
    }

    /// Quantizes `xs` (row-major, `n · d` finite f32) on the GPU into a batch of `quantizer`
    /// (same codes, layout and norms as [`MseBatch::extend`], up to boundary ties).
    ///
    /// # Errors
    /// [`Error::Unsupported`] for configurations the kernels do not implement; tq-quant's input
    /// errors; device errors.
    pub fn quantize_mse(&self, quantizer: &Arc<MseQuantizer>, xs: &[f32]) -> Result<MseBatch> {
        let d = quantizer.dim();
        check_rows(xs, d)?;
        let qb = self.quant_buffers(quantizer, None)?;
        // Boundaries, then centroids (for the least-squares and unbiased scales).
        let mut table = quantizer.codebook().boundaries().to_vec();
        table.extend_from_slice(quantizer.codebook().centroids());
        let table = self.init(bytemuck::cast_slice(&table), wgpu::BufferUsages::STORAGE);
        let n = xs.len() / d;
        let rb = quantizer.row_bytes();
        let chunk = self.chunk_rows((d * 4) as u64);
        let mut packed = PackedRows::new(rb);
        packed.resize_rows(n);
        let mut norms = Vec::with_capacity(n);
        let dummy = self.zeroed(4, wgpu::BufferUsages::STORAGE);
        for start in (0..n).step_by(chunk) {
            let rows = chunk.min(n - start);
            let x = self.init(
                bytemuck::cast_slice(&xs[start * d..(start + rows) * d]),
                wgpu::BufferUsages::STORAGE,
            );
            let blocks = rows.div_ceil(32);
            let code_bytes = (blocks * 32 * rb) as u64;
            let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
            let codes = self.zeroed(code_bytes, usage);
            let norm_buf = self.zeroed((rows * 4) as u64, usage);
            let params = Params {
                rows: rows as u32,
                ..qb.params
            };
            let (params, rotated) = self.pre_rotate(&qb, params, &x, rows)?;
            self.run(
                &self.quantize,
                params,
                &qb,
                &table,
                &x,
                &codes,
                &norm_buf,
                rotated.as_ref().unwrap_or(&dummy),
                (rows as u32, 1),
            )?;
            let bytes = self.read(&codes, code_bytes)?;
            let first_block = start / 32;
            packed.blocks_mut_from(first_block)[..bytes.len()].copy_from_slice(&bytes);
            let nb = self.read(&norm_buf, (rows * 4) as u64)?;
            norms.extend_from_slice(bytemuck::cast_slice::<u8, f32>(&nb));
        }
        Ok(MseBatch::from_parts(quantizer.clone(), packed, norms)?)
    }

    /// Decodes every row of `batch` on the GPU: `norm · Πᵀ c[codes]` (row-major `n · d`).
    ///
    /// # Errors
    /// As [`GpuContext::quantize_mse`].
    pub fn dequantize_mse(&self, batch: &MseBatch) -> Result<Vec<f32>> {
        let q = batch.quantizer();
        let qb = self.quant_buffers(q, None)?;
        let table = self.init(
            bytemuck::cast_slice(q.codebook().centroids()),
            wgpu::BufferUsages::STORAGE,
        );
        let chunks = self.chunks_of(batch.codes(), None, batch.norms(), None, q.dim() * 4)?;
        self.decode_chunks(&self.dequantize, &qb, &table, &chunks, q.dim(), batch.len())
    }

    /// Runs a decode pipeline over `chunks`, each writing `rows · d` floats.
    fn decode_chunks(
        &self,
        pipeline: &wgpu::ComputePipeline,
        qb: &QuantBuffers,
        table: &wgpu::Buffer,
        chunks: &[Chunk],
        d: usize,
        n: usize,
    ) -> Result<Vec<f32>> {
        let dummy = self.zeroed(4, wgpu::BufferUsages::STORAGE);
        let mut out = Vec::with_capacity(n * d);
        for ch in chunks {
            let bytes = (ch.rows * d * 4) as u64;
            let res = self.zeroed(
                bytes,
                wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            );
            let params = Params {
                rows: ch.rows as u32,
                sign_word_off: ch.sign_word_off,
                ..qb.params
            };
            self.run(
                pipeline,
                params,
                qb,
                table,
                &dummy,
                &ch.codes,
                &ch.norms,
                &res,
                (ch.rows as u32, 1),
            )?;
            out.extend_from_slice(bytemuck::cast_slice::<u8, f32>(&self.read(&res, bytes)?));
        }
        Ok(out)
    }

    /// Uploads `batch` once; the returned handle scores queries against it without re-uploading.
    ///
    /// # Errors
    /// As [`GpuContext::quantize_mse`].
    pub fn upload<'a>(&'a self, batch: &MseBatch) -> Result<ResidentBatch<'a>> {
        let q = batch.quantizer().clone();
        let qb = self.quant_buffers(&q, None)?;
        let chunks = self.chunks_of(batch.codes(), None, batch.norms(), None, 4)?;
        Ok(ResidentBatch {
            ctx: self,
            kind: Kind::Mse(q),
            qb,
            chunks,
            len: batch.len(),
        })
    }

    /// [`GpuContext::upload`] for a TurboQuant_prod batch (`bits >= 2`).
    ///
    /// # Errors
    /// As [`GpuContext::quantize_prod`].
    pub fn upload_prod<'a>(&'a self, batch: &ProdBatch) -> Result<ResidentBatch<'a>> {
        let q = batch.quantizer().clone();
        let mse = q
            .mse()
            .ok_or_else(|| Error::Unsupported("1-bit Prod (no MSE stage)".into()))?;
        let qb = self.quant_buffers(mse, Some(&q))?;
        let codes = batch
            .codes()
            .ok_or_else(|| Error::Unsupported("1-bit Prod (no MSE stage)".into()))?;
        let chunks = self.chunks_of(
            codes,
            Some(batch.signs()),
            batch.norms(),
            Some(batch.residual_norms()),
            4,
        )?;
        Ok(ResidentBatch {
            ctx: self,
            kind: Kind::Prod(q),
            qb,
            chunks,
            len: batch.len(),
        })
    }

    /// Device buffers per chunk: code blocks (then sign blocks), norms (then residual norms).
    /// Chunks are sized so that the stored rows and `out_bytes_per_row` of output per row (d
    /// floats for decoding, one score for scoring) each fit one binding.
    fn chunks_of(
        &self,
        codes: &PackedRows,
        signs: Option<&PackedRows>,
        norms: &[f32],
        gammas: Option<&[f32]>,
        out_bytes_per_row: usize,
    ) -> Result<Vec<Chunk>> {
        let (rb, sb) = (codes.row_bytes(), signs.map_or(0, PackedRows::row_bytes));
        let n = norms.len();
        let chunk = self.chunk_rows((rb + sb).max(out_bytes_per_row) as u64);
        let mut out = Vec::new();
        for start in (0..n).step_by(chunk) {
            let rows = chunk.min(n - start);
            let blocks = rows.div_ceil(32);
            let (c0, s0) = (start / 32 * 32 * rb, start / 32 * 32 * sb);
            let mut bytes = codes.blocks()[c0..c0 + blocks * 32 * rb].to_vec();
            let sign_word_off = (bytes.len() / 4) as u32;
            if let Some(sg) = signs {
                bytes.extend_from_slice(&sg.blocks()[s0..s0 + blocks * 32 * sb]);
            }
            let mut scal = norms[start..start + rows].to_vec();
            if let Some(g) = gammas {
                scal.extend_from_slice(&g[start..start + rows]);
            }
            out.push(Chunk {
                rows,
                codes: self.init(&bytes, wgpu::BufferUsages::STORAGE),
                norms: self.init(bytemuck::cast_slice(&scal), wgpu::BufferUsages::STORAGE),
                sign_word_off,
            });
        }
        Ok(out)
    }

    /// Quantizes `xs` with TurboQuant_prod (`bits >= 2`: the `(b-1)`-bit MSE stage, the residual
    /// norm and the QJL signs of the rotated-domain residual) into a [`ProdBatch`] equal to
    /// [`ProdBatch::extend`]'s up to ties (codes at boundaries; signs of projections within float
    /// rounding of zero, since the CPU projects with a matrix library in another order).
    ///
    /// # Errors
    /// As [`GpuContext::quantize_mse`]; 1-bit Prod is [`Error::Unsupported`].
    pub fn quantize_prod(&self, quantizer: &Arc<ProdQuantizer>, xs: &[f32]) -> Result<ProdBatch> {
        let mse = quantizer
            .mse()
            .ok_or_else(|| Error::Unsupported("1-bit Prod (no MSE stage)".into()))?;
        let d = quantizer.dim();
        check_rows(xs, d)?;
        let qb = self.quant_buffers(mse, Some(quantizer))?;
        let mut table = mse.codebook().boundaries().to_vec();
        table.extend_from_slice(mse.codebook().centroids());
        let table = self.init(bytemuck::cast_slice(&table), wgpu::BufferUsages::STORAGE);
        let n = xs.len() / d;
        let (rb, sb) = (mse.row_bytes(), quantizer.sign_bytes());
        let chunk = self.chunk_rows((d * 4) as u64);
        let (mut codes, mut signs) = (PackedRows::new(rb), PackedRows::new(sb));
        codes.resize_rows(n);
        signs.resize_rows(n);
        let (mut norms, mut gammas) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let dummy = self.zeroed(4, wgpu::BufferUsages::STORAGE);
        for start in (0..n).step_by(chunk) {
            let rows = chunk.min(n - start);
            let x = self.init(
                bytemuck::cast_slice(&xs[start * d..(start + rows) * d]),
                wgpu::BufferUsages::STORAGE,
            );
            let blocks = rows.div_ceil(32);
            let (code_bytes, sign_bytes) = ((blocks * 32 * rb) as u64, (blocks * 32 * sb) as u64);
            let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
            let buf = self.zeroed(code_bytes + sign_bytes, usage);
            let scal = self.zeroed((2 * rows * 4) as u64, usage);
            let params = Params {
                rows: rows as u32,
                sign_word_off: (code_bytes / 4) as u32,
                ..qb.params
            };
            let (params, rotated) = self.pre_rotate(&qb, params, &x, rows)?;
            self.run(
                &self.quantize_prod,
                params,
                &qb,
                &table,
                &x,
                &buf,
                &scal,
                rotated.as_ref().unwrap_or(&dummy),
                (rows as u32, 1),
            )?;
            let bytes = self.read(&buf, code_bytes + sign_bytes)?;
            let (cb, sgb) = bytes.split_at(code_bytes as usize);
            codes.blocks_mut_from(start / 32)[..cb.len()].copy_from_slice(cb);
            signs.blocks_mut_from(start / 32)[..sgb.len()].copy_from_slice(sgb);
            let sc = self.read(&scal, (2 * rows * 4) as u64)?;
            let sc: &[f32] = bytemuck::cast_slice(&sc);
            norms.extend_from_slice(&sc[..rows]);
            gammas.extend_from_slice(&sc[rows..]);
        }
        Ok(ProdBatch::from_parts(
            quantizer.clone(),
            Some(codes),
            signs,
            norms,
            gammas,
        )?)
    }

    /// Decodes every row of a TurboQuant_prod batch on the GPU:
    /// `norm · Πᵀ(c[codes] + γ·sqrt(π/2)/m · Sᵀ signs)`.
    ///
    /// # Errors
    /// As [`GpuContext::quantize_prod`].
    pub fn dequantize_prod(&self, batch: &ProdBatch) -> Result<Vec<f32>> {
        let q = batch.quantizer();
        let mse = q
            .mse()
            .ok_or_else(|| Error::Unsupported("1-bit Prod (no MSE stage)".into()))?;
        let codes = batch
            .codes()
            .ok_or_else(|| Error::Unsupported("1-bit Prod (no MSE stage)".into()))?;
        let qb = self.quant_buffers(mse, Some(q))?;
        let d = q.dim();
        let table = self.init(
            bytemuck::cast_slice(mse.codebook().centroids()),
            wgpu::BufferUsages::STORAGE,
        );
        let chunks = self.chunks_of(
            codes,
            Some(batch.signs()),
            batch.norms(),
            Some(batch.residual_norms()),
            d * 4,
        )?;
        self.decode_chunks(&self.dequantize_prod, &qb, &table, &chunks, d, batch.len())
    }
}

/// Checks that `xs` holds whole finite rows of dimension `d`.
fn check_rows(xs: &[f32], d: usize) -> Result<()> {
    if !xs.len().is_multiple_of(d) {
        return Err(tq_quant::Error::DimMismatch {
            expected: d,
            got: xs.len() % d,
        }
        .into());
    }
    if let Some(bad) = xs.iter().position(|v| !v.is_finite()) {
        return Err(Error::Unsupported(format!("value #{bad} is not finite")));
    }
    Ok(())
}

struct Chunk {
    rows: usize,
    /// Code blocks, then (Prod) sign blocks from word `sign_word_off`.
    codes: wgpu::Buffer,
    /// Norms, then (Prod) residual norms.
    norms: wgpu::Buffer,
    sign_word_off: u32,
}

/// The quantizer behind a resident batch.
enum Kind {
    Mse(Arc<MseQuantizer>),
    Prod(Arc<ProdQuantizer>),
}

/// A batch kept on the device for repeated scoring.
pub struct ResidentBatch<'a> {
    ctx: &'a GpuContext,
    kind: Kind,
    qb: QuantBuffers,
    chunks: Vec<Chunk>,
    len: usize,
}

impl std::fmt::Debug for ResidentBatch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResidentBatch")
            .field("len", &self.len)
            .field("chunks", &self.chunks.len())
            .finish_non_exhaustive()
    }
}

impl ResidentBatch<'_> {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Exact scores of every row for query `q`: `⟨q, x̃_i⟩` for MSE (as
    /// [`MseBatch::score_exact_into`]) or the unbiased Prod estimate (as
    /// [`ProdBatch::score_exact_into`]), up to float summation order.
    ///
    /// # Errors
    /// tq-quant's query errors; device errors.
    pub fn score(&self, q: &[f32]) -> Result<Vec<f32>> {
        let ctx = self.ctx;
        let (mse, sketch, pipeline) = match &self.kind {
            Kind::Mse(m) => (m.as_ref(), None, &ctx.score),
            Kind::Prod(p) => {
                let mse = p
                    .mse()
                    .ok_or_else(|| Error::Unsupported("1-bit Prod".into()))?;
                (
                    mse,
                    Some(p.prepare_query(q)?.projected().to_vec()),
                    &ctx.score_prod,
                )
            }
        };
        let prepared = mse.prepare_query(q)?;
        // A centred MSE quantizer adds <q, mean> to every score (zero otherwise and for Prod).
        let offset = match &self.kind {
            Kind::Mse(_) => prepared.offset(),
            Kind::Prod(_) => 0.0,
        };
        let rotated = prepared.rotated().to_vec();
        let c = mse.codebook().centroids();
        let mut table: Vec<f32> = rotated
            .iter()
            .flat_map(|&r| c.iter().map(move |&cv| r * cv))
            .collect();
        if let Some(sq) = sketch {
            table.extend_from_slice(&sq);
        }
        let table = ctx.init(bytemuck::cast_slice(&table), wgpu::BufferUsages::STORAGE);
        let dummy = ctx.zeroed(4, wgpu::BufferUsages::STORAGE);
        let mut out = Vec::with_capacity(self.len);
        for ch in &self.chunks {
            let bytes = (ch.rows * 4) as u64;
            let res = ctx.zeroed(
                bytes,
                wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            );
            let params = Params {
                rows: ch.rows as u32,
                sign_word_off: ch.sign_word_off,
                ..self.qb.params
            };
            let groups = (ch.rows as u32).div_ceil(64);
            let (gx, gy) = if groups > MAX_GROUPS {
                (MAX_GROUPS, groups.div_ceil(MAX_GROUPS))
            } else {
                (groups, 1)
            };
            ctx.run(
                pipeline,
                params,
                &self.qb,
                &table,
                &dummy,
                &ch.codes,
                &ch.norms,
                &res,
                (gx, gy),
            )?;
            let scores = ctx.read(&res, bytes)?;
            out.extend(
                bytemuck::cast_slice::<u8, f32>(&scores)
                    .iter()
                    .map(|s| s + offset),
            );
        }
        Ok(out)
    }

    /// Scores of every row for each of `queries` (row-major, `m · d`): one vector per query.
    /// The batch stays on the device; each query costs one table upload and one dispatch per
    /// chunk.
    ///
    /// # Errors
    /// [`tq_quant::Error::DimMismatch`] unless `queries` holds whole rows; as
    /// [`ResidentBatch::score`].
    pub fn score_many(&self, queries: &[f32]) -> Result<Vec<Vec<f32>>> {
        let d = self.dim();
        check_rows(queries, d)?;
        queries.chunks_exact(d).map(|q| self.score(q)).collect()
    }

    /// The `k` best rows for each of `queries` (row-major), best first.
    ///
    /// # Errors
    /// As [`ResidentBatch::score_many`].
    pub fn top_k_many(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<(usize, f32)>>> {
        let d = self.dim();
        check_rows(queries, d)?;
        queries.chunks_exact(d).map(|q| self.top_k(q, k)).collect()
    }

    fn dim(&self) -> usize {
        match &self.kind {
            Kind::Mse(q) => q.dim(),
            Kind::Prod(q) => q.dim(),
        }
    }

    /// The `k` best rows for `q` by GPU scores (ties by index), best first.
    ///
    /// # Errors
    /// As [`ResidentBatch::score`].
    pub fn top_k(&self, q: &[f32], k: usize) -> Result<Vec<(usize, f32)>> {
        let s = self.score(q)?;
        let mut idx: Vec<usize> = (0..s.len()).collect();
        let k = k.min(idx.len());
        if k == 0 {
            return Ok(Vec::new());
        }
        let cmp = |a: &usize, b: &usize| s[*b].total_cmp(&s[*a]).then(a.cmp(b));
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
        idx.sort_by(cmp);
        Ok(idx.into_iter().map(|i| (i, s[i])).collect())
    }
}
