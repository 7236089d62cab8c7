//! The reference every attention output is checked against: causal attention over the contiguous
//! K/V of one sequence, in f64, written as plainly as possible (a port of
//! tests/common/naive_attention.h). Shared by the tests and examples/demo.rs.

#[derive(Clone, Copy, Debug)]
pub struct NaiveParams {
    pub num_q_heads: usize,
    pub num_kv_heads: usize,
    pub head_size: usize,
    pub sm_scale: f64,
    /// < 0: unbounded.
    pub window_left: i64,
    /// 0: off.
    pub logits_soft_cap: f64,
}

impl NaiveParams {
    pub fn new(num_q_heads: usize, num_kv_heads: usize, head_size: usize) -> Self {
        NaiveParams {
            num_q_heads,
            num_kv_heads,
            head_size,
            sm_scale: 1.0 / (head_size as f64).sqrt(),
            window_left: -1,
            logits_soft_cap: 0.0,
        }
    }
}

/// k, v: `[seq_len][num_kv_heads][head_size]`; q: `[q_len][num_q_heads][head_size]`, the last q_len
/// positions of the sequence. Returns out `[q_len][num_q_heads][head_size]` and lse
/// `[q_len][num_q_heads]` (natural log).
pub fn naive_attention(
    p: &NaiveParams,
    seq_len: usize,
    q_len: usize,
    q: &[f64],
    k: &[f64],
    v: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let d = p.head_size;
    let group = p.num_q_heads / p.num_kv_heads;
    assert_eq!(q.len(), q_len * p.num_q_heads * d);
    assert_eq!(k.len(), seq_len * p.num_kv_heads * d);
    assert_eq!(v.len(), k.len());
    let mut out = vec![0.0; q_len * p.num_q_heads * d];
    let mut lse = vec![0.0; q_len * p.num_q_heads];
    for i in 0..q_len {
        let pos = seq_len - q_len + i;
        let lo = if p.window_left >= 0 { pos.saturating_sub(p.window_left as usize) } else { 0 };
        for h in 0..p.num_q_heads {
            let g = h / group;
            let logits: Vec<f64> = (lo..=pos)
                .map(|j| {
                    let dot: f64 =
                        (0..d).map(|x| q[(i * p.num_q_heads + h) * d + x] * k[(j * p.num_kv_heads + g) * d + x]).sum();
                    let s = dot * p.sm_scale;
                    if p.logits_soft_cap > 0.0 {
                        p.logits_soft_cap * (s / p.logits_soft_cap).tanh()
                    } else {
                        s
                    }
                })
                .collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = logits.iter().map(|s| (s - m).exp()).sum();
            for (jj, j) in (lo..=pos).enumerate() {
                let w = (logits[jj] - m).exp() / sum;
                for x in 0..d {
                    out[(i * p.num_q_heads + h) * d + x] += w * v[(j * p.num_kv_heads + g) * d + x];
                }
            }
            lse[i * p.num_q_heads + h] = m + sum.ln();
        }
    }
    (out, lse)
}

/// The attention entropy of each row of `naive_attention` (same arguments, same key sets): with
/// a_j = softmax_j of the scaled (and capped) logits, H = -sum_j a_j ln a_j in nats.
/// Returns `[q_len][num_q_heads]`.
pub fn naive_entropy(p: &NaiveParams, seq_len: usize, q_len: usize, q: &[f64], k: &[f64]) -> Vec<f64> {
    let d = p.head_size;
    let group = p.num_q_heads / p.num_kv_heads;
    assert_eq!(q.len(), q_len * p.num_q_heads * d);
    assert_eq!(k.len(), seq_len * p.num_kv_heads * d);
    let mut entropy = vec![0.0; q_len * p.num_q_heads];
    for i in 0..q_len {
        let pos = seq_len - q_len + i;
        let lo = if p.window_left >= 0 { pos.saturating_sub(p.window_left as usize) } else { 0 };
        for h in 0..p.num_q_heads {
            let g = h / group;
            let logits: Vec<f64> = (lo..=pos)
                .map(|j| {
                    let dot: f64 =
                        (0..d).map(|x| q[(i * p.num_q_heads + h) * d + x] * k[(j * p.num_kv_heads + g) * d + x]).sum();
                    let s = dot * p.sm_scale;
                    if p.logits_soft_cap > 0.0 {
                        p.logits_soft_cap * (s / p.logits_soft_cap).tanh()
                    } else {
                        s
                    }
                })
                .collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = logits.iter().map(|s| (s - m).exp()).sum();
            // Probabilities first, then -sum a ln a: the definition, not the lse identity the
            // kernels use, so the two are independent.
            let h_row: f64 = logits.iter().map(|s| (s - m).exp() / sum).filter(|&a| a > 0.0).map(|a| -a * a.ln()).sum();
            entropy[i * p.num_q_heads + h] = h_row;
        }
    }
    entropy
}

/// K, V and Q as functions of (token, position, layer, head, i): a shared prefix has the same K/V in
/// every sequence, as a real model's would. Bit-for-bit the C demo's Feature().
pub fn feature(token: u64, pos: i32, layer: i32, head: i32, i: i32, which: i32) -> f32 {
    let mut x = token.wrapping_mul(0x9E3779B97F4A7C15)
        ^ ((pos as u64) << 20)
        ^ ((layer as u64) << 40)
        ^ ((head as u64) << 48)
        ^ ((i as u64) << 8)
        ^ ((which as u64) << 60);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ceb9fe1a85ec53);
    x ^= x >> 33;
    ((x >> 11) as f64 / 9007199254740992.0 * 2.0 - 1.0) as f32
}

/// f32 -> bfloat16 bits, round to nearest even (as the C demo's reference rounds).
pub fn f32_to_bf16(f: f32) -> u16 {
    let u = f.to_bits();
    ((u.wrapping_add(0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}
