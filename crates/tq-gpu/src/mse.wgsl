// TurboQuant_mse batch kernels: quantize (randomized Hadamard or dense Haar rotation, unit scaling, codebook
// search, bit-packing into the 32-row nibble-transposed block layout of tq-core::scan),
// dequantize, and exact scoring against a per-query table. One workgroup per row for the
// rotation kernels; the row lives in workgroup memory. Operation order follows the CPU path
// (tq-core::rotation / simd) so results agree bit for bit up to the documented ties.

struct Params {
    d: u32,            // dimension
    p: u32,            // power-of-two Hadamard block
    rows: u32,         // rows in this dispatch
    bits: u32,         // code width (1..=8)
    rounds: u32,       // Hadamard rounds
    has_perm: u32,     // 1 when the rounds permute (d not a power of two)
    has_scale: u32,    // 1 when block_scale is applied after each block transform
    row_bytes: u32,    // packed bytes per row
    block_scale: f32,  // 1/sqrt(p) when has_scale
    levels: u32,       // 2^bits
    dense: u32,        // 1: `signs` holds a row-major d x d rotation matrix (Haar), rounds = 0;
                       // 2: the same, already applied by `rotate_tiled` into `out`
    sign_word_off: u32,// Prod: first word of the sign blocks in `codes`
    s_off: u32,        // Prod: offset of the m x d QJL matrix in `signs`
    m: u32,            // Prod: sketch size
    sign_bytes: u32,   // Prod: packed sign bytes per row
    sign_scale: f32,   // Prod: sqrt(pi/2) / m
    scale_mode: u32,   // MSE: 0 norm, 1 least-squares, 2 unbiased (tq_quant::ScaleMode)
    mean_off: u32,     // MSE: offset of the mean in `signs`, or 0xffffffff when not centred
    pad2: u32,
    pad3: u32,
};

const WG: u32 = 64u;
const MAX_D: u32 = 1024u;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> signs: array<f32>;      // Hadamard signs, or the dense matrix
@group(0) @binding(2) var<storage, read> perm: array<u32>;
@group(0) @binding(3) var<storage, read> table: array<f32>;      // boundaries (quantize) or centroids (dequantize)
@group(0) @binding(4) var<storage, read> xs: array<f32>;         // rows (quantize) / unused
@group(0) @binding(5) var<storage, read_write> codes: array<atomic<u32>>;
@group(0) @binding(6) var<storage, read_write> norms: array<f32>;
@group(0) @binding(7) var<storage, read_write> out: array<f32>;  // dequantized rows / unused

var<workgroup> sh: array<f32, MAX_D>;
var<workgroup> tmp: array<f32, MAX_D>;
var<workgroup> cs: array<u32, MAX_D>;
var<workgroup> acc: array<f32, 8>;
var<workgroup> part: array<vec2<f32>, 64>;

fn fwht_block(off: u32, lid: u32) {
    var h = 1u;
    loop {
        if (h >= P.p) { break; }
        for (var k = lid; k < P.p / 2u; k = k + WG) {
            let j = off + (k / h) * 2u * h + (k % h);
            let u = sh[j];
            let v = sh[j + h];
            sh[j] = u + v;
            sh[j + h] = u - v;
        }
        workgroupBarrier();
        h = h * 2u;
    }
    if (P.has_scale == 1u) {
        for (var i = lid; i < P.p; i = i + WG) {
            sh[off + i] = sh[off + i] * P.block_scale;
        }
        workgroupBarrier();
    }
}

// Bit `g` of the LSB-first stream of `count` codes of `bits` bits held in `cs`.
fn stream_bit(g: u32, bits: u32, count: u32) -> u32 {
    if (g >= count * bits) { return 0u; }
    return (cs[g / bits] >> (g % bits)) & 1u;
}

// Word index and shift of nibble `n` of row `r` in the block layout of rows of `rb` bytes.
fn nibble_word_rb(r: u32, n: u32, rb: u32) -> vec2<u32> {
    let block = r / 32u;
    let slot = r % 32u;
    let byte = n * 16u + (slot % 16u);
    let shift = 4u * (slot / 16u) + 8u * (byte % 4u);
    return vec2<u32>(block * 8u * rb + byte / 4u, shift);
}

fn nibble_word(r: u32, n: u32) -> vec2<u32> {
    return nibble_word_rb(r, n, P.row_bytes);
}

// ORs the stream of `count` codes of `bits` bits in `cs` into row `r` of the block layout of
// `rb`-byte rows starting at word `off` of `codes`.
fn pack_row(r: u32, lid: u32, bits: u32, count: u32, rb: u32, off: u32) {
    for (var n = lid; n < 2u * rb; n = n + WG) {
        let g = 4u * n;
        let v = stream_bit(g, bits, count) | (stream_bit(g + 1u, bits, count) << 1u)
            | (stream_bit(g + 2u, bits, count) << 2u) | (stream_bit(g + 3u, bits, count) << 3u);
        if (v != 0u) {
            let w = nibble_word_rb(r, n, rb);
            atomicOr(&codes[off + w.x], v << w.y);
        }
    }
}

// sqrt of the sum of squares of sh[0..d] in the order of simd::sum_squares_fixed (8 lanes over
// chunks of 8, fixed tree).
fn norm_fixed(lid: u32) -> f32 {
    if (lid < 8u) {
        var a = 0.0;
        for (var i = lid; i < P.d; i = i + 8u) {
            a = a + sh[i] * sh[i];
        }
        acc[lid] = a;
    }
    workgroupBarrier();
    let n = sqrt(((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])));
    workgroupBarrier();
    return n;
}

// Loads row `row`, rotates it, codes the unit vector and packs the codes; leaves the unit rotated
// row in `sh` and the codes in `cs`; returns the norm.
fn encode_mse(row: u32, lid: u32) -> f32 {
    let d = P.d;
    let base = row * d;
    for (var i = lid; i < d; i = i + WG) {
        var v = xs[base + i];
        if (P.mean_off != 0xffffffffu) { v = v - signs[P.mean_off + i]; }
        sh[i] = v;
    }
    workgroupBarrier();
    let norm = norm_fixed(lid);
    if (P.dense == 2u) {
        // Rotated by `rotate_tiled` into `out`.
        for (var i = lid; i < d; i = i + WG) {
            sh[i] = out[base + i];
        }
        workgroupBarrier();
    }
    if (P.dense == 1u) {
        // y = M x, one output coordinate per thread, j ascending.
        for (var i = lid; i < d; i = i + WG) {
            var a = 0.0;
            for (var j = 0u; j < d; j = j + 1u) {
                a = a + signs[i * d + j] * sh[j];
            }
            tmp[i] = a;
        }
        workgroupBarrier();
        for (var i = lid; i < d; i = i + WG) {
            sh[i] = tmp[i];
        }
        workgroupBarrier();
    }
    for (var r = 0u; r < P.rounds; r = r + 1u) {
        for (var i = lid; i < d; i = i + WG) {
            sh[i] = sh[i] * signs[r * d + i];
        }
        workgroupBarrier();
        if (P.has_perm == 1u) {
            for (var i = lid; i < d; i = i + WG) {
                tmp[i] = sh[perm[r * d + i]];
            }
            workgroupBarrier();
            for (var i = lid; i < d; i = i + WG) {
                sh[i] = tmp[i];
            }
            workgroupBarrier();
        }
        fwht_block(0u, lid);
        if (P.p < d) {
            fwht_block(d - P.p, lid);
        }
    }
    var inv = 0.0;
    if (norm > 0.0) { inv = 1.0 / norm; }
    let nb = P.levels - 1u;
    for (var i = lid; i < d; i = i + WG) {
        var y = 0.0;
        if (norm > 0.0) { y = sh[i] * inv; }
        var c = 0u;
        for (var k = 0u; k < nb; k = k + 1u) {
            if (y > table[k]) { c = c + 1u; }
        }
        cs[i] = c;
        sh[i] = y;
    }
    workgroupBarrier();
    pack_row(row, lid, P.bits, d, P.row_bytes, 0u);
    workgroupBarrier();
    return norm;
}

// The stored per-vector scale (MseQuantizer::scale_of) of the unit row in `sh` with codes in
// `cs`: the norm, or norm * <y, c> / |c|^2 (least-squares), or norm / <y, c> (unbiased), with
// centroids at table[levels - 1 ..]. Sums in f32 (the CPU sums in f64).
fn scale_of(norm: f32, lid: u32) -> f32 {
    if (P.scale_mode == 0u || norm == 0.0) { return norm; }
    let c0 = P.levels - 1u;
    var yc = 0.0;
    var cc = 0.0;
    for (var i = lid; i < P.d; i = i + WG) {
        let c = table[c0 + cs[i]];
        yc = yc + sh[i] * c;
        cc = cc + c * c;
    }
    part[lid] = vec2<f32>(yc, cc);
    workgroupBarrier();
    var t = vec2<f32>(0.0, 0.0);
    for (var k = 0u; k < WG; k = k + 1u) {
        t = t + part[k];
    }
    workgroupBarrier();
    if (P.scale_mode == 1u && t.y > 0.0) { return norm * t.x / t.y; }
    if (P.scale_mode == 2u && t.x > 0.0) { return norm / t.x; }
    return norm;
}

@compute @workgroup_size(64)
fn quantize(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let row = wid.x + wid.y * 65535u;
    if (row >= P.rows) { return; }
    let norm = encode_mse(row, l.x);
    let scale = scale_of(norm, l.x);
    if (l.x == 0u) {
        norms[row] = scale;
    }
}

// TurboQuant_prod: the (b-1)-bit MSE codes as above, then the rotated-domain residual
// r = y - c[codes] (centroids at table[levels - 1 ..]), gamma = |r| in the fixed order, and the
// signs of S r (bit = projection >= 0) packed as a 1-bit stream into the sign blocks, which start
// at word `sign_word_off` of `codes`. Norms go to norms[row], gammas to norms[rows + row].
@compute @workgroup_size(64)
fn quantize_prod(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let row = wid.x + wid.y * 65535u;
    if (row >= P.rows) { return; }
    let lid = l.x;
    let d = P.d;
    let norm = encode_mse(row, lid);
    let c0 = P.levels - 1u;
    for (var i = lid; i < d; i = i + WG) {
        sh[i] = sh[i] - table[c0 + cs[i]];
    }
    workgroupBarrier();
    let gamma = norm_fixed(lid);
    for (var j = lid; j < P.m; j = j + WG) {
        var a = 0.0;
        for (var i = 0u; i < d; i = i + 1u) {
            a = a + signs[P.s_off + j * d + i] * sh[i];
        }
        cs[j] = select(0u, 1u, a >= 0.0);
    }
    workgroupBarrier();
    pack_row(row, lid, 1u, P.m, P.sign_bytes, P.sign_word_off);
    if (lid == 0u) {
        norms[row] = norm;
        norms[P.rows + row] = gamma;
    }
}

// Code of coordinate `j` of global row `r` read back from the block layout.
fn read_code(r: u32, j: u32) -> u32 {
    var c = 0u;
    for (var k = 0u; k < P.bits; k = k + 1u) {
        let gbit = j * P.bits + k;
        let w = nibble_word(r, gbit / 4u);
        let nib = (atomicLoad(&codes[w.x]) >> w.y) & 15u;
        c = c | (((nib >> (gbit % 4u)) & 1u) << k);
    }
    return c;
}

fn ifwht_block(off: u32, lid: u32) {
    // The normalised WHT is its own inverse: same butterflies, same scale.
    fwht_block(off, lid);
}

// Inverse rotation of the rotated-domain row in `sh`, times the norm, into `out`.
fn inverse_and_store(row: u32, lid: u32) {
    let d = P.d;
    for (var rr = 0u; rr < P.rounds; rr = rr + 1u) {
        let r = P.rounds - 1u - rr;
        if (P.p < d) {
            ifwht_block(d - P.p, lid);
        }
        ifwht_block(0u, lid);
        if (P.has_perm == 1u) {
            for (var i = lid; i < d; i = i + WG) {
                tmp[i] = sh[i];
            }
            workgroupBarrier();
            for (var i = lid; i < d; i = i + WG) {
                sh[perm[r * d + i]] = tmp[i];
            }
            workgroupBarrier();
        }
        for (var i = lid; i < d; i = i + WG) {
            sh[i] = sh[i] * signs[r * d + i];
        }
        workgroupBarrier();
    }
    if (P.dense == 1u) {
        // x = M^T y.
        for (var j = lid; j < d; j = j + WG) {
            var a = 0.0;
            for (var i = 0u; i < d; i = i + 1u) {
                a = a + signs[i * d + j] * sh[i];
            }
            tmp[j] = a;
        }
        workgroupBarrier();
        for (var i = lid; i < d; i = i + WG) {
            sh[i] = tmp[i];
        }
        workgroupBarrier();
    }
    let norm = norms[row];
    for (var i = lid; i < d; i = i + WG) {
        var v = sh[i] * norm;
        if (P.mean_off != 0xffffffffu) { v = v + signs[P.mean_off + i]; }
        out[row * d + i] = v;
    }
}

@compute @workgroup_size(64)
fn dequantize(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let row = wid.x + wid.y * 65535u;
    if (row >= P.rows) { return; }
    for (var i = l.x; i < P.d; i = i + WG) {
        sh[i] = table[read_code(row, i)];
    }
    workgroupBarrier();
    inverse_and_store(row, l.x);
}

// Sign bit `j` of row `r` from the sign blocks.
fn read_sign(r: u32, j: u32) -> u32 {
    let w = nibble_word_rb(r, j / 4u, P.sign_bytes);
    return (atomicLoad(&codes[P.sign_word_off + w.x]) >> (w.y + j % 4u)) & 1u;
}

// TurboQuant_prod decode: norm * Pi^T (c[codes] + gamma * sqrt(pi/2)/m * S^T signs).
@compute @workgroup_size(64)
fn dequantize_prod(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let row = wid.x + wid.y * 65535u;
    if (row >= P.rows) { return; }
    let w = norms[P.rows + row] * P.sign_scale;
    for (var i = l.x; i < P.d; i = i + WG) {
        var y = table[read_code(row, i)];
        for (var j = 0u; j < P.m; j = j + 1u) {
            let s = select(-w, w, read_sign(row, j) == 1u);
            y = y + s * signs[P.s_off + j * P.d + i];
        }
        sh[i] = y;
    }
    workgroupBarrier();
    inverse_and_store(row, l.x);
}

// Exact scores: score[row] = norm[row] * sum_j T[j * levels + code_j], one thread per row.
// `table` holds T (d x levels, the query's rotated coordinates times the centroids) and `out` the
// scores.
@compute @workgroup_size(64)
fn score(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row = gid.x + gid.y * 65535u * 64u;
    if (row >= P.rows) { return; }
    var s = 0.0;
    for (var j = 0u; j < P.d; j = j + 1u) {
        s = s + table[j * P.levels + read_code(row, j)];
    }
    out[row] = s * norms[row];
}

// Prod scores: norm * (sum_j T[j][code_j] + gamma * sqrt(pi/2)/m * sum_i (+-) sq_i), with the
// query sketch sq = S Pi q stored after T in `table` (at d * levels).
@compute @workgroup_size(64)
fn score_prod(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row = gid.x + gid.y * 65535u * 64u;
    if (row >= P.rows) { return; }
    var s = 0.0;
    for (var j = 0u; j < P.d; j = j + 1u) {
        s = s + table[j * P.levels + read_code(row, j)];
    }
    var t = 0.0;
    let q0 = P.d * P.levels;
    for (var i = 0u; i < P.m; i = i + 1u) {
        let v = table[q0 + i];
        t = t + select(-v, v, read_sign(row, i) == 1u);
    }
    out[row] = (s + norms[P.rows + row] * P.sign_scale * t) * norms[row];
}

// Dense (Haar) rotation of a chunk as a tiled matrix product in workgroup memory:
// out[r][i] = sum_j xs[r][j] * M[i][j], 16 x 16 output tiles, the shared dimension walked in
// tiles of 16 with j ascending, so each sum has the same order as the per-row kernel.
const T: u32 = 16u;
var<workgroup> ta: array<array<f32, 16>, 16>;  // ta[r][j]: rows of xs
var<workgroup> tb: array<array<f32, 16>, 16>;  // tb[i][j]: rows of M

@compute @workgroup_size(16, 16)
fn rotate_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let d = P.d;
    let i = wid.x * T + l.x;       // output coordinate
    let r = wid.y * T + l.y;       // row
    var a = 0.0;
    let tiles = (d + T - 1u) / T;
    for (var t = 0u; t < tiles; t = t + 1u) {
        let j = t * T + l.x;
        var xv = 0.0;
        if (r < P.rows && j < d) { xv = xs[r * d + j]; }
        ta[l.y][l.x] = xv;
        let mi = wid.x * T + l.y;
        var mv = 0.0;
        if (mi < d && j < d) { mv = signs[mi * d + j]; }
        tb[l.y][l.x] = mv;
        workgroupBarrier();
        let jmax = min(T, d - t * T);
        for (var k = 0u; k < jmax; k = k + 1u) {
            a = a + tb[l.x][k] * ta[l.y][k];
        }
        workgroupBarrier();
    }
    if (r < P.rows && i < d) {
        out[r * d + i] = a;
    }
}
