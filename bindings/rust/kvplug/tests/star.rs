//! ABI 0.4: the "star" backend through the binding on the CPU (phase 1 against an f64 reference
//! over [anchor ; own block], phase 2 and no-context batches against dense), Batch's new optional
//! fields, `BlockManager::allocate_star`, and their errors.
mod common;

use common::*;
use kvplug::*;

const HQ: usize = 4;
const HK: usize = 2;
const D: usize = 64;
const PAGE: usize = 16;
const CBS: usize = 32; // context_block_size
const ANCHOR: usize = 16;
const CONTEXT: usize = 80; // context blocks [0, 32), [32, 64), [64, 80)
const LEN: usize = 100; // 20 query tokens after the context
const PAGES: usize = LEN.div_ceil(PAGE);

fn star_json(num_shards: i32, shard_rank: i32) -> String {
    format!(
        r#"{{"backend_config_type": "StarConfig", "backend_config": {{"context_block_size": {CBS}, "anchor_block_size": {ANCHOR}, "num_shards": {num_shards}, "shard_rank": {shard_rank}}}}}"#
    )
}

fn kv(pos: usize, h: usize, x: usize, which: i32) -> f32 {
    feature(7, pos as i32, 0, h as i32, x as i32, which)
}

fn q_at(pos: usize, h: usize, x: usize) -> f32 {
    feature(99, pos as i32, 0, h as i32, x as i32, 2)
}

/// Attention of query `pos` (all heads) over exactly `keys`, in f64: `[HQ * D]` out and `[HQ]` lse.
fn attend(pos: usize, keys: &[usize]) -> (Vec<f64>, Vec<f64>) {
    let scale = 1.0 / (D as f64).sqrt();
    let (mut out, mut lse) = (vec![0.0; HQ * D], vec![0.0; HQ]);
    for h in 0..HQ {
        let g = h / (HQ / HK);
        let logits: Vec<f64> = keys
            .iter()
            .map(|&j| (0..D).map(|x| q_at(pos, h, x) as f64 * kv(j, g, x, 0) as f64).sum::<f64>() * scale)
            .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = logits.iter().map(|s| (s - m).exp()).sum();
        for (jj, &j) in keys.iter().enumerate() {
            let w = (logits[jj] - m).exp() / sum;
            for x in 0..D {
                out[h * D + x] += w * kv(j, g, x, 1) as f64;
            }
        }
        lse[h] = m + sum.ln();
    }
    (out, lse)
}

struct Fixture {
    ctx: Context,
    q: Vec<f32>,
    table: Vec<i32>,
}

impl Fixture {
    fn new() -> Fixture {
        let q = (0..LEN).flat_map(|p| (0..HQ).flat_map(move |h| (0..D).map(move |x| q_at(p, h, x)))).collect();
        // Pages out of order, so the block table matters.
        let table = (0..PAGES as i32).rev().collect();
        Fixture {
            ctx: Context::with_options(&ContextOptions { num_threads: 2, ..Default::default() }).unwrap(),
            q,
            table,
        }
    }

    fn cache(&self) -> KvCache<'_> {
        let mut cache = KvCache::new(
            &self.ctx,
            &KvCacheOptions::new(1, PAGES as i32, PAGE as i32, HK as i32, D as i32, KvDtype::F32),
        )
        .unwrap();
        let k: Vec<f32> =
            (0..LEN).flat_map(|p| (0..HK).flat_map(move |h| (0..D).map(move |x| kv(p, h, x, 0)))).collect();
        let v: Vec<f32> =
            (0..LEN).flat_map(|p| (0..HK).flat_map(move |h| (0..D).map(move |x| kv(p, h, x, 1)))).collect();
        let slots: Vec<i64> = (0..LEN).map(|p| (self.table[p / PAGE] as usize * PAGE + p % PAGE) as i64).collect();
        let shape = [LEN, HK, D];
        cache.write(0, &TensorRef::f32(&k, &shape).unwrap(), &TensorRef::f32(&v, &shape).unwrap(), &slots).unwrap();
        cache
    }

    /// out and lse of `backend` over the whole sequence as one prefill step.
    fn run(&self, backend: &str, config: Config<'_>, context_lens: Option<&[i32]>) -> Result<(Vec<f32>, Vec<f32>)> {
        let cache = self.cache();
        let attn = Attention::new(
            &self.ctx,
            &AttentionOptions::new(backend, HQ as i32, HK as i32, D as i32, KvDtype::F32).with_config(config),
        )?;
        let mut plan = Plan::new(&self.ctx, &PlanOptions { max_num_seqs: 4, max_num_tokens: 128, max_num_blocks: 16 })?;
        plan.attach(&attn)?;
        let (qsl, seq_lens) = ([0, LEN as i32], [LEN as i32]);
        let mut batch =
            Batch::new(PAGE as i32, &qsl, &seq_lens, BlockTable::Dense { table: &self.table, stride: PAGES });
        if let Some(c) = context_lens {
            batch = batch.with_context_lens(c);
        }
        plan.update(&batch)?;
        let (mut out, mut lse) = (vec![f32::NAN; LEN * HQ * D], vec![f32::NAN; LEN * HQ]);
        attn.run(
            &plan,
            &cache,
            0,
            &TensorRef::f32(&self.q, &[LEN, HQ, D])?,
            &mut TensorMut::f32(&mut out, &[LEN, HQ, D])?,
            Some(&mut TensorMut::f32(&mut lse, &[LEN, HQ])?),
        )?;
        Ok((out, lse))
    }
}

fn max_err(out: &[f32], lse: &[f32], pos: usize, keys: &[usize]) -> f64 {
    let (ro, rl) = attend(pos, keys);
    let o = ro.iter().zip(&out[pos * HQ * D..(pos + 1) * HQ * D]).map(|(r, &g)| (r - g as f64).abs());
    let l = rl.iter().zip(&lse[pos * HQ..(pos + 1) * HQ]).map(|(r, &g)| (r - g as f64).abs());
    o.chain(l).fold(0.0, f64::max)
}

#[test]
fn star_is_registered_and_runs_on_the_cpu() {
    assert!(backend_names().unwrap().contains(&"star"), "{:?}", backend_names());
    let info = backend_device_info("star", DeviceType::Cpu).unwrap();
    assert!(info.available && info.supports_head_size(D as i32) && info.supports_dtype(KvDtype::F32), "{info:?}");
    config_check("star", &Config::Json(&star_json(1, 0))).unwrap();
}

#[test]
fn phase_1_sees_the_anchor_and_its_own_block() {
    let f = Fixture::new();
    let json = star_json(1, 0);
    let (out, lse) = f.run("star", Config::Json(&json), Some(&[CONTEXT as i32])).unwrap();
    let mut worst: f64 = 0.0;
    for pos in 0..LEN {
        let keys: Vec<usize> = if pos >= CONTEXT {
            (0..=pos).collect() // phase 2: every context key, the query keys causally
        } else if pos < CBS {
            (0..=pos).collect() // block 0: causal over itself (it holds the anchor)
        } else {
            let start = pos / CBS * CBS; // block k > 0: [anchor ; block k up to pos]
            (0..ANCHOR).chain(start..=pos).collect()
        };
        worst = worst.max(max_err(&out, &lse, pos, &keys));
    }
    assert!(worst < 2e-5, "max |star - reference| = {worst}");
    // A block-1 token really differs from dense (it does not see [ANCHOR, 32)).
    let (dense, _) = f.run("dense", Config::Default, None).unwrap();
    let p = 40 * HQ * D;
    let diff = (0..HQ * D).map(|i| (dense[p + i] - out[p + i]).abs()).fold(0f32, f32::max);
    assert!(diff > 1e-3, "star equals dense at position 40: {diff}");
}

#[test]
fn without_context_lens_star_is_dense() {
    let f = Fixture::new();
    let json = star_json(1, 0);
    let (star, star_lse) = f.run("star", Config::Json(&json), None).unwrap();
    let (dense, dense_lse) = f.run("dense", Config::Default, None).unwrap();
    let d =
        star.iter().zip(&dense).chain(star_lse.iter().zip(&dense_lse)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(d < 1e-5, "max |star - dense| = {d}");
    // And a context of 0 tokens is the same as none.
    let (zero, _) = f.run("star", Config::Json(&json), Some(&[0])).unwrap();
    let d = zero.iter().zip(&dense).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(d < 1e-5, "context_lens = [0]: max |star - dense| = {d}");
}

#[test]
fn dense_ignores_context_lens() {
    let f = Fixture::new();
    let (with, _) = f.run("dense", Config::Default, Some(&[CONTEXT as i32])).unwrap();
    let (without, _) = f.run("dense", Config::Default, None).unwrap();
    assert_eq!(with, without);
}

#[test]
fn star_errors() {
    let bad = |json: &str| config_check("star", &Config::Json(json)).unwrap_err();
    let e = bad(&star_json(2, 2));
    assert_eq!(e.code, Status::InvalidConfig, "{e}");
    let e = bad(
        r#"{"backend_config_type": "StarConfig", "backend_config": {"context_block_size": 16, "anchor_block_size": 32}}"#,
    );
    assert_eq!(e.code, Status::InvalidConfig, "{e}");
    let e = bad(r#"{"backend_config_type": "DenseConfig", "backend_config": {}}"#);
    assert_eq!(e.code, Status::InvalidConfig, "{e}");

    let f = Fixture::new();
    // The binding checks the lengths of the new arrays (the library reads num_seqs entries).
    let ctx = &f.ctx;
    let mut plan = Plan::new(ctx, &PlanOptions { max_num_seqs: 4, max_num_tokens: 128, max_num_blocks: 16 }).unwrap();
    let (qsl, seq_lens) = ([0, LEN as i32], [LEN as i32]);
    let batch = Batch::new(PAGE as i32, &qsl, &seq_lens, BlockTable::Dense { table: &f.table, stride: PAGES });
    for b in [batch.with_context_lens(&[1, 2]), batch.with_query_pos_starts(&[])] {
        let e = plan.update(&b).unwrap_err();
        assert_eq!(e.code, Status::InvalidArgument, "{e}");
        assert!(e.message.contains("context_lens") || e.message.contains("query_pos_starts"), "{}", e.message);
    }
    // The library checks their values.
    let e = plan.update(&batch.with_context_lens(&[-1])).unwrap_err();
    assert_eq!(e.code, Status::InvalidArgument, "{e}");
    // Two shards need query_pos_starts to tell the phases apart.
    let json = star_json(2, 0);
    let e = f.run("star", Config::Json(&json), Some(&[CONTEXT as i32])).unwrap_err();
    assert_eq!(e.code, Status::InvalidArgument, "{e}");
    assert!(e.message.contains("query_pos_starts"), "{}", e.message);
    // One shard: query_pos_starts must be where the step's tokens sit.
    let attn = Attention::new(
        ctx,
        &AttentionOptions::new("star", HQ as i32, HK as i32, D as i32, KvDtype::F32)
            .with_config(Config::Json(&star_json(1, 0))),
    )
    .unwrap();
    plan.attach(&attn).unwrap();
    let e = plan.update(&batch.with_context_lens(&[CONTEXT as i32]).with_query_pos_starts(&[3])).unwrap_err();
    assert_eq!(e.code, Status::InvalidArgument, "{e}");
    assert!(e.message.contains("query_pos_starts"), "{}", e.message);
    plan.update(&batch.with_context_lens(&[CONTEXT as i32]).with_query_pos_starts(&[0])).unwrap();
}

// ------------------------------------------------------------------------------------------------
// allocate_star
// ------------------------------------------------------------------------------------------------

const BS: i32 = 4;

fn manager(caching: bool) -> BlockManager {
    let mut o = BlockManagerOptions::new(BS, 32);
    o.enable_prefix_caching = caching;
    BlockManager::new(&o).unwrap()
}

/// 29 tokens: three context blocks of 8 (the middle one starting at `middle`) and 5 query tokens.
fn doc(middle: i32) -> Vec<i32> {
    (100..108).chain(middle..middle + 8).chain(300..308).chain(900..905).collect()
}

const LAYOUT: StarLayout = StarLayout { context_len: 24, context_block_size: 8, anchor_size: 4 };

#[test]
fn allocate_star_reuses_blocks_after_a_changed_middle_block() {
    let mut bm = manager(true);
    let first = bm.allocate_star(1, &doc(200), 0, &LAYOUT).unwrap();
    assert_eq!(first.cached_blocks, vec![false; 8]);
    assert_eq!(first.num_cached_tokens, 0);
    bm.mark_computed(1, 29).unwrap();
    // The middle block differs: the anchor's block and the one after the change are hits, the
    // query blocks (chained from the whole context) are not.
    let second = bm.allocate_star(2, &doc(250), 0, &LAYOUT).unwrap();
    assert_eq!(second.cached_blocks, vec![true, true, false, false, true, true, false, false]);
    assert_eq!(second.num_cached_tokens, 16);
    // The same blocks as the first sequence.
    let (t1, t2) = (bm.block_table(1).unwrap(), bm.block_table(2).unwrap());
    assert_eq!((t1[0], t1[1], t1[4], t1[5]), (t2[0], t2[1], t2[4], t2[5]));
    assert_ne!(t1[2], t2[2]);
    // Another extra key shares nothing.
    let other = bm.allocate_star(4, &doc(200), 7, &LAYOUT).unwrap();
    assert_eq!(other.num_cached_tokens, 0);
    // Without prefix caching, ids may be absent and nothing is cached.
    let mut plain = manager(false);
    let a = plain.allocate_star_tokens(1, 29, &LAYOUT).unwrap();
    assert_eq!((a.cached_blocks.len(), a.num_cached_tokens), (8, 0));
}

#[test]
fn allocate_star_errors() {
    let mut bm = manager(true);
    let d = doc(200);
    for (what, layout) in [
        ("context_block_size", StarLayout { context_block_size: 6, ..LAYOUT }),
        ("anchor_size", StarLayout { anchor_size: 0, ..LAYOUT }),
        ("anchor_size", StarLayout { anchor_size: 9, ..LAYOUT }),
        ("context_len", StarLayout { context_len: -1, ..LAYOUT }),
    ] {
        let e = bm.allocate_star(1, &d, 0, &layout).unwrap_err();
        assert_eq!(e.code, Status::InvalidArgument, "{what}: {e}");
        assert!(e.message.contains(what), "{what}: {}", e.message);
    }
    let e = bm.allocate_star(1, &[], 0, &LAYOUT).unwrap_err();
    assert_eq!(e.code, Status::InvalidArgument, "{e}");
    let e = bm.allocate_star_tokens(1, 29, &LAYOUT).unwrap_err();
    assert_eq!(e.code, Status::InvalidArgument, "{e}");
    assert!(e.message.contains("token_ids"), "{}", e.message);
    assert_eq!(bm.stats().unwrap().num_sequences, 0, "failed calls change nothing");
    bm.allocate_star(1, &d, 0, &LAYOUT).unwrap();
    assert_eq!(bm.allocate_star(1, &d, 0, &LAYOUT).unwrap_err().code, Status::AlreadyExists);
    let mut small =
        BlockManager::new(&BlockManagerOptions { enable_prefix_caching: true, ..BlockManagerOptions::new(BS, 4) })
            .unwrap();
    assert_eq!(small.allocate_star(1, &d, 0, &LAYOUT).unwrap_err().code, Status::NoFreeBlocks);
}
