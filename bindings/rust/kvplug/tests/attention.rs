//! Attention through the safe API against the f64 reference: ragged prefill with a chunked
//! sequence, decode steps, GQA, log-sum-exp, both block-table forms, cache dtypes, configs, and
//! half-precision tensors.
mod common;

use common::*;
use kvplug::*;

const LAYERS: i32 = 2;
const HQ: usize = 4;
const HK: usize = 2;
const D: usize = 64;
const BLOCK: i32 = 16;
const BLOCKS: i32 = 32;

/// `{"backend_config_type": "DenseConfig", "backend_config": {"window_left": 4}}` as a binary
/// FlatBuffer, made with `flatc -b abi/schema/kvplug_config.fbs w4.json` (flatc 2.0.8). Aligned as
/// a FlatBuffers builder would leave it.
#[repr(C, align(8))]
struct Aligned<const N: usize>([u8; N]);
static DENSE_WINDOW_4_BIN: Aligned<44> = Aligned([
    0x10, 0x00, 0x00, 0x00, 0x4b, 0x56, 0x50, 0x43, 0x08, 0x00, 0x0e, 0x00, 0x07, 0x00, 0x08, 0x00, 0x08, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x01, 0x0c, 0x00, 0x00, 0x00, 0x00, 0x00, 0x06, 0x00, 0x08, 0x00, 0x04, 0x00, 0x06, 0x00,
    0x00, 0x00, 0x04, 0x00, 0x00, 0x00,
]);

/// Three sequences (5, 37 and 16 prompt tokens; the 37 is prefilled in two chunks), then decode:
/// step 1 prefills [5, 20, 16] tokens, step 2 decodes 1 token for seqs 1 and 3 and prefills the
/// last 17 of seq 2, step 3 decodes one token for each. Returns each step's outputs and errors.
fn scenario(kv_dtype: KvDtype, config: Config<'_>, p: NaiveParams, csr: bool) -> Vec<StepOut> {
    let ctx = Context::new().unwrap();
    let mut cache =
        KvCache::new(&ctx, &KvCacheOptions::new(LAYERS, BLOCKS, BLOCK, HK as i32, D as i32, kv_dtype)).unwrap();
    let opts = AttentionOptions::new("dense", HQ as i32, HK as i32, D as i32, kv_dtype)
        .with_config(config)
        .with_sm_scale(p.sm_scale as f32);
    let attn = Attention::new(&ctx, &opts).unwrap();
    let mut plan = Plan::new(&ctx, &PlanOptions { max_num_seqs: 8, max_num_tokens: 256, max_num_blocks: 64 }).unwrap();
    let mut bm = BlockManager::new(&BlockManagerOptions::new(BLOCK, BLOCKS)).unwrap();
    let mut seqs: Vec<Seq> = [(1u64, 5usize), (2, 37), (3, 16)]
        .iter()
        .map(|&(id, n)| Seq { id, tokens: (0..n as i32).map(|i| 100 * id as i32 + i).collect(), computed: 0 })
        .collect();
    for s in &seqs {
        assert_eq!(bm.allocate(s.id, &s.tokens, 0).unwrap(), 0, "no prefix caching: nothing is cached");
    }
    let cfg = StepConfig { layers: LAYERS, csr, kv_round: if kv_dtype == KvDtype::BF16 { bf16_round } else { exact } };
    let mut outs = Vec::new();
    outs.push(step(&attn, &mut plan, &mut cache, &mut bm, &mut seqs, &[5, 20, 16], &p, cfg).unwrap());
    for (k, decode) in [[true, false, true], [true, true, true]].iter().enumerate() {
        let mut q_lens = [0usize; 3];
        for (b, s) in seqs.iter_mut().enumerate() {
            if decode[b] {
                let tok = 7 + 31 * s.id as i32 + k as i32;
                // No forks here, so no block is shared and no copy-on-write is due.
                assert_eq!(bm.append(s.id, &[tok]).unwrap(), None);
                s.tokens.push(tok);
            }
            q_lens[b] = s.tokens.len() - s.computed;
        }
        outs.push(step(&attn, &mut plan, &mut cache, &mut bm, &mut seqs, &q_lens, &p, cfg).unwrap());
    }
    outs
}

fn params() -> NaiveParams {
    NaiveParams::new(HQ, HK, D)
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

#[test]
fn dense_f32_matches_reference() {
    let outs = scenario(KvDtype::F32, Config::Default, params(), false);
    for (i, o) in outs.iter().enumerate() {
        assert!(o.max_err <= 1e-5, "step {i}: max |out - ref| = {}", o.max_err);
        assert!(o.max_lse_err <= 1e-5, "step {i}: max |lse - ref| = {} (natural log expected)", o.max_lse_err);
        // Guard against a vacuous pass on all-zero outputs.
        assert!(max_abs(&o.out) > 0.05 && max_abs(&o.lse) > 0.5, "step {i}: outputs look empty");
    }
}

#[test]
fn csr_block_table_gives_the_same_outputs_as_dense() {
    let dense = scenario(KvDtype::F32, Config::Default, params(), false);
    let csr = scenario(KvDtype::F32, Config::Default, params(), true);
    for (i, (a, b)) in dense.iter().zip(&csr).enumerate() {
        assert!(b.max_err <= 1e-5, "step {i}: CSR max err {}", b.max_err);
        // The plan converts both forms to the same indices: the kernels see identical input.
        assert_eq!(a.out, b.out, "step {i}");
        assert_eq!(a.lse, b.lse, "step {i}");
    }
}

#[test]
fn bf16_cache_matches_reference_fed_rounded_kv() {
    let outs = scenario(KvDtype::BF16, Config::Default, params(), false);
    for (i, o) in outs.iter().enumerate() {
        assert!(o.max_err <= 1e-4, "step {i}: max err {}", o.max_err);
    }
}

#[test]
fn custom_sm_scale_is_applied() {
    let mut p = params();
    p.sm_scale = 0.3f32 as f64; // what the f32 option holds, exactly
    let outs = scenario(KvDtype::F32, Config::Default, p, false);
    let default = scenario(KvDtype::F32, Config::Default, params(), false);
    for (i, o) in outs.iter().enumerate() {
        assert!(o.max_err <= 1e-5, "step {i}: max err {}", o.max_err);
    }
    let diff = outs[0].out.iter().zip(&default[0].out).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff > 1e-3, "a different scale must change the outputs (diff {diff})");
}

#[test]
fn json_config_window_and_soft_cap_are_applied() {
    let json =
        r#"{"backend_config_type": "DenseConfig", "backend_config": {"window_left": 8, "logits_soft_cap": 0.5}}"#;
    config_check("dense", &Config::Json(json)).unwrap();
    let mut p = params();
    p.window_left = 8;
    p.logits_soft_cap = 0.5;
    let outs = scenario(KvDtype::F32, Config::Json(json), p, false);
    for (i, o) in outs.iter().enumerate() {
        assert!(o.max_err <= 1e-5, "step {i}: max err {} against the windowed, capped reference", o.max_err);
        assert!(o.max_lse_err <= 1e-5, "step {i}: lse err {}", o.max_lse_err);
    }
    let default = scenario(KvDtype::F32, Config::Default, params(), false);
    let diff = outs[0].out.iter().zip(&default[0].out).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff > 1e-3, "the config must change the outputs (diff {diff})");
}

#[test]
fn binary_config_is_applied() {
    let bin: &[u8] = &DENSE_WINDOW_4_BIN.0;
    config_check("dense", &Config::Binary(bin)).unwrap();
    let mut p = params();
    p.window_left = 4;
    let outs = scenario(KvDtype::F32, Config::Binary(bin), p, false);
    for (i, o) in outs.iter().enumerate() {
        assert!(o.max_err <= 1e-5, "step {i}: max err {} against the window-4 reference", o.max_err);
    }
    let default = scenario(KvDtype::F32, Config::Default, params(), false);
    let diff = outs[0].out.iter().zip(&default[0].out).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff > 1e-3, "the window must change the outputs (diff {diff})");
    // The same bytes at an odd address (the binding hands FlatBuffers an aligned copy).
    let mut shifted = vec![0u8; bin.len() + 1];
    shifted[1..].copy_from_slice(bin);
    let odd = &shifted[1..];
    assert_ne!(odd.as_ptr() as usize % 8, 0);
    let outs_odd = scenario(KvDtype::F32, Config::Binary(odd), p, false);
    assert_eq!(outs_odd[0].out, outs[0].out);
}

/// K, V and Q of one sequence of n tokens, all computed in one step.
struct Single {
    k: Vec<f32>,
    v: Vec<f32>,
    q: Vec<f32>,
}

fn single(n: usize) -> Single {
    let mut s = Single { k: vec![], v: vec![], q: vec![] };
    for pos in 0..n {
        for h in 0..HK {
            for x in 0..D {
                s.k.push(feature(pos as u64, pos as i32, 0, h as i32, x as i32, 0));
                s.v.push(feature(pos as u64, pos as i32, 0, h as i32, x as i32, 1));
            }
        }
        for h in 0..HQ {
            for x in 0..D {
                s.q.push(feature(pos as u64 ^ 9, pos as i32, 0, h as i32, x as i32, 2));
            }
        }
    }
    s
}

fn single_plan<'c>(ctx: &'c Context, n: usize, slots: &[i64]) -> Plan<'c> {
    let mut plan = Plan::new(ctx, &PlanOptions { max_num_seqs: 1, max_num_tokens: 64, max_num_blocks: 8 }).unwrap();
    let table: Vec<i32> = (0..n.div_ceil(BLOCK as usize) as i32).collect();
    plan.update(&Batch {
        block_size: BLOCK,
        query_start_loc: &[0, n as i32],
        seq_lens: &[n as i32],
        block_table: BlockTable::Dense { table: &table, stride: table.len() },
        slot_mapping: Some(slots),
        state_slots: None,
        context_lens: None,
        query_pos_starts: None,
    })
    .unwrap();
    plan
}

#[test]
fn f16_key_value_tensors_into_an_f32_cache() {
    // K/V arrive as f16 bits (converted to the f32 cache dtype by kvplug, exactly); the reference
    // is fed the values of those same bits.
    let n = 20;
    let s = single(n);
    let k16: Vec<u16> = s.k.iter().map(|&x| f32_to_f16_trunc(x)).collect();
    let v16: Vec<u16> = s.v.iter().map(|&x| f32_to_f16_trunc(x)).collect();
    let ctx = Context::new().unwrap();
    let mut cache = KvCache::new(&ctx, &KvCacheOptions::new(1, 4, BLOCK, HK as i32, D as i32, KvDtype::F32)).unwrap();
    let attn =
        Attention::new(&ctx, &AttentionOptions::new("dense", HQ as i32, HK as i32, D as i32, KvDtype::F32)).unwrap();
    let slots: Vec<i64> = (0..n as i64).collect();
    let plan = single_plan(&ctx, n, &slots);
    attn.write_kv(
        &plan,
        &mut cache,
        0,
        &TensorRef::f16(&k16, &[n, HK, D]).unwrap(),
        &TensorRef::f16(&v16, &[n, HK, D]).unwrap(),
    )
    .unwrap();
    let mut out = vec![0f32; n * HQ * D];
    // Without lse (optional).
    attn.run(
        &plan,
        &cache,
        0,
        &TensorRef::f32(&s.q, &[n, HQ, D]).unwrap(),
        &mut TensorMut::f32(&mut out, &[n, HQ, D]).unwrap(),
        None,
    )
    .unwrap();
    let kd: Vec<f64> = k16.iter().map(|&b| f16_to_f32(b) as f64).collect();
    let vd: Vec<f64> = v16.iter().map(|&b| f16_to_f32(b) as f64).collect();
    let qd: Vec<f64> = s.q.iter().map(|&x| x as f64).collect();
    let (r, _) = naive_attention(&params(), n, n, &qd, &kd, &vd);
    let err = r.iter().zip(&out).fold(0f64, |m, (a, b)| m.max((a - *b as f64).abs()));
    assert!(err <= 1e-5, "max err {err}");
    // The f16 values differ from the f32 originals: the test would notice them being ignored.
    assert!(kd.iter().zip(&s.k).any(|(a, b)| (a - *b as f64).abs() > 1e-5));
}

#[test]
fn bf16_query_and_output() {
    let n = 12;
    let s = single(n);
    let q16: Vec<u16> = s.q.iter().map(|&x| f32_to_bf16(x)).collect();
    let ctx = Context::new().unwrap();
    let mut cache = KvCache::new(&ctx, &KvCacheOptions::new(1, 4, BLOCK, HK as i32, D as i32, KvDtype::F32)).unwrap();
    let attn =
        Attention::new(&ctx, &AttentionOptions::new("dense", HQ as i32, HK as i32, D as i32, KvDtype::F32)).unwrap();
    let slots: Vec<i64> = (0..n as i64).collect();
    let plan = single_plan(&ctx, n, &slots);
    attn.write_kv(
        &plan,
        &mut cache,
        0,
        &TensorRef::f32(&s.k, &[n, HK, D]).unwrap(),
        &TensorRef::f32(&s.v, &[n, HK, D]).unwrap(),
    )
    .unwrap();
    let mut out16 = vec![0u16; n * HQ * D];
    let mut lse = vec![0f32; n * HQ];
    attn.run(
        &plan,
        &cache,
        0,
        &TensorRef::bf16(&q16, &[n, HQ, D]).unwrap(),
        &mut TensorMut::bf16(&mut out16, &[n, HQ, D]).unwrap(),
        Some(&mut TensorMut::f32(&mut lse, &[n, HQ]).unwrap()),
    )
    .unwrap();
    let qd: Vec<f64> = q16.iter().map(|&b| bf16_to_f32(b) as f64).collect();
    let kd: Vec<f64> = s.k.iter().map(|&x| x as f64).collect();
    let vd: Vec<f64> = s.v.iter().map(|&x| x as f64).collect();
    let (r, rl) = naive_attention(&params(), n, n, &qd, &kd, &vd);
    // Outputs are rounded to bf16 (8 significant bits): |out| < 1 gives errors below 2^-8.
    let err = r.iter().zip(&out16).fold(0f64, |m, (a, b)| m.max((a - bf16_to_f32(*b) as f64).abs()));
    assert!(err <= 4e-3, "max err {err}");
    let lse_err = rl.iter().zip(&lse).fold(0f64, |m, (a, b)| m.max((a - *b as f64).abs()));
    assert!(lse_err <= 1e-4, "lse err {lse_err}");
    assert!(out16.iter().any(|&b| b != 0));
}
