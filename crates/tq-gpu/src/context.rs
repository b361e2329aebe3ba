//! The device context: adapter and device selection, the compiled pipelines, buffers, dispatch,
//! error scopes and read-back, shared by the MSE and Prod kernels.

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};
use tq_quant::{MseQuantizer, PackedRows, ProdQuantizer, RotationKind, ScaleMode};
use wgpu::util::DeviceExt;

use crate::{Error, Result};

/// Largest dimension the kernels hold in workgroup memory.
pub const MAX_DIM: usize = 1024;
/// Rows per dispatch dimension (WebGPU's minimum guaranteed workgroup count).
pub(crate) const MAX_GROUPS: u32 = 65535;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug)]
pub(crate) struct Params {
    pub(crate) d: u32,
    pub(crate) p: u32,
    pub(crate) rows: u32,
    pub(crate) bits: u32,
    pub(crate) rounds: u32,
    pub(crate) has_perm: u32,
    pub(crate) has_scale: u32,
    pub(crate) row_bytes: u32,
    pub(crate) block_scale: f32,
    pub(crate) levels: u32,
    pub(crate) dense: u32,
    pub(crate) sign_word_off: u32,
    pub(crate) s_off: u32,
    pub(crate) m: u32,
    pub(crate) sign_bytes: u32,
    pub(crate) sign_scale: f32,
    pub(crate) scale_mode: u32,
    pub(crate) mean_off: u32,
    pub(crate) pad2: u32,
    pub(crate) pad3: u32,
}

/// A device, its queue and the compiled pipelines.
pub struct GpuContext {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) info: wgpu::AdapterInfo,
    pub(crate) max_binding: u64,
    pub(crate) layout: wgpu::BindGroupLayout,
    pub(crate) quantize: wgpu::ComputePipeline,
    pub(crate) dequantize: wgpu::ComputePipeline,
    pub(crate) score: wgpu::ComputePipeline,
    pub(crate) quantize_prod: wgpu::ComputePipeline,
    pub(crate) dequantize_prod: wgpu::ComputePipeline,
    pub(crate) score_prod: wgpu::ComputePipeline,
    pub(crate) rotate_tiled: wgpu::ComputePipeline,
    /// The first error reported outside an error scope (out of memory, validation, internal) or
    /// the reason the device was lost; returned by the next operation.
    pub(crate) fault: Arc<std::sync::Mutex<Option<Error>>>,
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
pub(crate) struct QuantBuffers {
    pub(crate) params: Params,
    pub(crate) signs: wgpu::Buffer,
    pub(crate) perm: wgpu::Buffer,
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

    pub(crate) fn quant_buffers(
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

    pub(crate) fn init(&self, bytes: &[u8], usage: wgpu::BufferUsages) -> wgpu::Buffer {
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

    pub(crate) fn zeroed(&self, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: size.max(4).div_ceil(4) * 4,
            usage,
            mapped_at_creation: false,
        })
    }

    /// Rows per chunk: whole 32-row blocks, within one dispatch dimension and within the storage
    /// binding limit for `bytes_per_row`.
    pub(crate) fn chunk_rows(&self, bytes_per_row: u64) -> usize {
        let by_binding = (self.max_binding / bytes_per_row.max(1)) as usize;
        let by_dispatch = MAX_GROUPS as usize;
        (by_binding.min(by_dispatch) / 32 * 32).max(32)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run(
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
    pub(crate) fn check(&self) -> Result<()> {
        match self.fault.lock() {
            Ok(mut f) => f.take().map_or(Ok(()), Err),
            Err(_) => Err(Error::Device("error state poisoned".into())),
        }
    }

    pub(crate) fn read(&self, buf: &wgpu::Buffer, size: u64) -> Result<Vec<u8>> {
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
    pub(crate) fn pre_rotate(
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

    /// Runs a decode pipeline over `chunks`, each writing `rows · d` floats.
    pub(crate) fn decode_chunks(
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

    /// Device buffers per chunk: code blocks (then sign blocks), norms (then residual norms).
    /// Chunks are sized so that the stored rows and `out_bytes_per_row` of output per row (d
    /// floats for decoding, one score for scoring) each fit one binding.
    pub(crate) fn chunks_of(
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
}

/// Checks that `xs` holds whole finite rows of dimension `d`.
pub(crate) fn check_rows(xs: &[f32], d: usize) -> Result<()> {
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

pub(crate) struct Chunk {
    pub(crate) rows: usize,
    /// Code blocks, then (Prod) sign blocks from word `sign_word_off`.
    pub(crate) codes: wgpu::Buffer,
    /// Norms, then (Prod) residual norms.
    pub(crate) norms: wgpu::Buffer,
    pub(crate) sign_word_off: u32,
}
