//! Shared by the integration tests: the f64 reference and a one-step serving harness.
#![allow(dead_code)]
pub mod naive;

use kvplug::*;
pub use naive::*;

/// IEEE half bits -> f32 (normals, subnormals, zero; the tests make no infinities or NaNs).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let man = (h & 0x3ff) as f32;
    if exp == 0 {
        sign * man * 2f32.powi(-24)
    } else {
        sign * (1.0 + man / 1024.0) * 2f32.powi(exp - 15)
    }
}

/// f32 in [-2, 2] -> some nearby f16 bits (truncating; tiny values become 0). The tests feed the
/// reference `f16_to_f32` of the very bits they pass, so exact rounding does not matter.
pub fn f32_to_f16_trunc(f: f32) -> u16 {
    let sign = if f.is_sign_negative() { 0x8000u16 } else { 0 };
    let a = f.abs();
    if a < 6.2e-5 {
        return sign;
    }
    let e = a.log2().floor() as i32;
    let man = ((a / 2f32.powi(e) - 1.0) * 1024.0) as u16 & 0x3ff;
    sign | (((e + 15) as u16) << 10) | man
}

/// A sequence being served: its tokens and how many have K/V in the cache.
#[derive(Clone, Debug)]
pub struct Seq {
    pub id: u64,
    pub tokens: Vec<i32>,
    pub computed: usize,
}

pub struct StepOut {
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
    /// max |out - reference| and max |lse - reference lse| over every layer.
    pub max_err: f64,
    pub max_lse_err: f64,
}

/// How the harness builds a step.
#[derive(Clone, Copy, Debug)]
pub struct StepConfig {
    pub layers: i32,
    /// Feed the block table in CSR form instead of dense.
    pub csr: bool,
    /// What the reference sees of a K/V value stored in the cache (rounding of the cache dtype).
    pub kv_round: fn(f32) -> f64,
}

pub fn exact(f: f32) -> f64 {
    f as f64
}

pub fn bf16_round(f: f32) -> f64 {
    bf16_to_f32(f32_to_bf16(f)) as f64
}

/// One step: sequence `seqs[b]` contributes `q_lens[b]` tokens (its next ones, which must already be
/// in the block manager). Writes their K/V through the backend, runs every layer, compares each
/// output with the reference over all K/V so far, and advances `computed` (marking it computed).
#[allow(clippy::too_many_arguments)]
pub fn step(
    attn: &Attention<'_>,
    plan: &mut Plan<'_>,
    cache: &mut KvCache<'_>,
    bm: &mut BlockManager,
    seqs: &mut [Seq],
    q_lens: &[usize],
    p: &NaiveParams,
    cfg: StepConfig,
) -> Result<StepOut> {
    let (hq, hk, d) = (p.num_q_heads, p.num_kv_heads, p.head_size);
    let bs = bm.block_size() as usize;
    let ids: Vec<u64> = seqs.iter().map(|s| s.id).collect();
    let mut qsl = vec![0i32];
    for &q in q_lens {
        qsl.push(qsl.last().unwrap() + q as i32);
    }
    let t = *qsl.last().unwrap() as usize;
    let seq_lens: Vec<i32> = seqs.iter().zip(q_lens).map(|(s, &q)| (s.computed + q) as i32).collect();
    let max_blocks = seqs.iter().map(|s| s.tokens.len().div_ceil(bs)).max().unwrap();
    let (table, _) = bm.block_tables(&ids, max_blocks)?;
    let mut slots = vec![0i64; t];
    for (b, s) in seqs.iter().enumerate() {
        bm.slot_mapping_into(s.id, s.computed as i64, &mut slots[qsl[b] as usize..qsl[b + 1] as usize])?;
    }
    // CSR form of the same table: each row's non-padding entries.
    let mut indptr = vec![0i32];
    let mut indices = Vec::new();
    for b in 0..seqs.len() {
        indices.extend(table[b * max_blocks..(b + 1) * max_blocks].iter().filter(|&&x| x >= 0));
        indptr.push(indices.len() as i32);
    }
    let block_table = if cfg.csr {
        BlockTable::Csr { indptr: &indptr, indices: &indices }
    } else {
        BlockTable::Dense { table: &table, stride: max_blocks }
    };
    plan.update(&Batch {
        block_size: bm.block_size(),
        query_start_loc: &qsl,
        seq_lens: &seq_lens,
        block_table,
        slot_mapping: Some(&slots),
        state_slots: None,
        context_lens: None,
        query_pos_starts: None,
    })?;

    let mut res = StepOut { out: vec![], lse: vec![], max_err: 0.0, max_lse_err: 0.0 };
    for layer in 0..cfg.layers {
        let mut k = vec![0f32; t * hk * d];
        let mut v = vec![0f32; t * hk * d];
        let mut q = vec![0f32; t * hq * d];
        for (b, s) in seqs.iter().enumerate() {
            for i in 0..q_lens[b] {
                let pos = s.computed + i;
                let row = qsl[b] as usize + i;
                let tok = s.tokens[pos] as u64;
                for h in 0..hk {
                    for x in 0..d {
                        k[(row * hk + h) * d + x] = feature(tok, pos as i32, layer, h as i32, x as i32, 0);
                        v[(row * hk + h) * d + x] = feature(tok, pos as i32, layer, h as i32, x as i32, 1);
                    }
                }
                for h in 0..hq {
                    for x in 0..d {
                        q[(row * hq + h) * d + x] = feature(tok ^ s.id, pos as i32, layer, h as i32, x as i32, 2);
                    }
                }
            }
        }
        let mut out = vec![0f32; t * hq * d];
        let mut lse = vec![0f32; t * hq];
        attn.write_kv(plan, cache, layer, &TensorRef::f32(&k, &[t, hk, d])?, &TensorRef::f32(&v, &[t, hk, d])?)?;
        attn.run(
            plan,
            cache,
            layer,
            &TensorRef::f32(&q, &[t, hq, d])?,
            &mut TensorMut::f32(&mut out, &[t, hq, d])?,
            Some(&mut TensorMut::f32(&mut lse, &[t, hq])?),
        )?;
        for (b, s) in seqs.iter().enumerate() {
            let len = seq_lens[b] as usize;
            let (mut kd, mut vd) = (Vec::new(), Vec::new());
            for pos in 0..len {
                let tok = s.tokens[pos] as u64;
                for h in 0..hk {
                    for x in 0..d {
                        kd.push((cfg.kv_round)(feature(tok, pos as i32, layer, h as i32, x as i32, 0)));
                        vd.push((cfg.kv_round)(feature(tok, pos as i32, layer, h as i32, x as i32, 1)));
                    }
                }
            }
            let (r0, r1) = (qsl[b] as usize, qsl[b + 1] as usize);
            let qd: Vec<f64> = q[r0 * hq * d..r1 * hq * d].iter().map(|&x| x as f64).collect();
            let (ro, rl) = naive_attention(p, len, q_lens[b], &qd, &kd, &vd);
            for (i, r) in ro.iter().enumerate() {
                res.max_err = res.max_err.max((r - out[r0 * hq * d + i] as f64).abs());
            }
            for (i, r) in rl.iter().enumerate() {
                res.max_lse_err = res.max_lse_err.max((r - lse[r0 * hq + i] as f64).abs());
            }
        }
        res.out.extend_from_slice(&out);
        res.lse.extend_from_slice(&lse);
    }
    for (b, s) in seqs.iter_mut().enumerate() {
        s.computed += q_lens[b];
        bm.mark_computed(s.id, s.computed as i64)?;
    }
    Ok(res)
}
