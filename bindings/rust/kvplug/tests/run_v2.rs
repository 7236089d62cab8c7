//! ABI 0.3 runs: `Attention::run_with` (outputs struct with entropy) against the f64 reference on a
//! ragged batch, its agreement with `run`, `Plan::attach`, `Attention::state_bytes`, and the
//! errors of each.
mod common;

use common::*;
use kvplug::*;

const HQ: usize = 4;
const HK: usize = 2;
const D: usize = 64;
const BLOCK: usize = 16;
const BLOCKS: i32 = 16;

/// A ragged step: a prefill of 5, a chunk of 17 after 20 cached tokens, a decode after 15, and a
/// decode of a 1-token sequence (a row that sees a single key: entropy 0).
const SEQ_LENS: [usize; 4] = [5, 37, 16, 1];
const Q_LENS: [usize; 4] = [5, 17, 1, 1];
/// Each sequence's blocks, deliberately out of order.
const TABLE: [[i32; 3]; 4] = [[3, -1, -1], [7, 1, 5], [0, -1, -1], [9, -1, -1]];

fn kv(seq: usize, pos: usize, which: i32) -> Vec<f32> {
    let mut out = Vec::with_capacity(HK * D);
    for h in 0..HK {
        for x in 0..D {
            out.push(feature(seq as u64, pos as i32, 0, h as i32, x as i32, which));
        }
    }
    out
}

/// The whole batch, in the cache and a plan, plus its queries.
struct Step<'c> {
    cache: KvCache<'c>,
    plan: Plan<'c>,
    q: Vec<f32>,
    qsl: Vec<i32>,
    seq_lens: Vec<i32>,
    table: Vec<i32>,
}

fn num_tokens() -> usize {
    Q_LENS.iter().sum()
}

impl<'c> Step<'c> {
    fn new(ctx: &'c Context) -> Step<'c> {
        let mut cache =
            KvCache::new(ctx, &KvCacheOptions::new(1, BLOCKS, BLOCK as i32, HK as i32, D as i32, KvDtype::F32))
                .unwrap();
        // Every position's K/V (cached ones and this step's), written straight to its slot.
        for (b, &len) in SEQ_LENS.iter().enumerate() {
            let (mut k, mut v, mut slots) = (vec![], vec![], vec![]);
            for pos in 0..len {
                k.extend(kv(b, pos, 0));
                v.extend(kv(b, pos, 1));
                slots.push(TABLE[b][pos / BLOCK] as i64 * BLOCK as i64 + (pos % BLOCK) as i64);
            }
            let shape = [len, HK, D];
            cache.write(0, &TensorRef::f32(&k, &shape).unwrap(), &TensorRef::f32(&v, &shape).unwrap(), &slots).unwrap();
        }
        let mut qsl = vec![0i32];
        let mut q = vec![];
        for (b, (&len, &ql)) in SEQ_LENS.iter().zip(&Q_LENS).enumerate() {
            qsl.push(qsl.last().unwrap() + ql as i32);
            for pos in len - ql..len {
                for h in 0..HQ {
                    for x in 0..D {
                        q.push(feature(b as u64 ^ 77, pos as i32, 0, h as i32, x as i32, 2));
                    }
                }
            }
        }
        let plan = Plan::new(ctx, &PlanOptions { max_num_seqs: 8, max_num_tokens: 64, max_num_blocks: 16 }).unwrap();
        let mut s = Step {
            cache,
            plan,
            q,
            qsl,
            seq_lens: SEQ_LENS.iter().map(|&l| l as i32).collect(),
            table: TABLE.iter().flatten().copied().collect(),
        };
        s.update();
        s
    }

    fn update(&mut self) {
        let (qsl, seq_lens, table) = (self.qsl.clone(), self.seq_lens.clone(), self.table.clone());
        self.plan
            .update(&Batch {
                block_size: BLOCK as i32,
                query_start_loc: &qsl,
                seq_lens: &seq_lens,
                block_table: BlockTable::Dense { table: &table, stride: 3 },
                slot_mapping: None,
                state_slots: None,
                context_lens: None,
                query_pos_starts: None,
            })
            .unwrap();
    }

    fn query(&self) -> TensorRef<'_> {
        TensorRef::f32(&self.q, &[num_tokens(), HQ, D]).unwrap()
    }
}

fn dense(ctx: &Context) -> Attention<'_> {
    Attention::new(ctx, &AttentionOptions::new("dense", HQ as i32, HK as i32, D as i32, KvDtype::F32)).unwrap()
}

/// out, lse, entropy of one run_with (lse and entropy requested as the flags say).
fn run_v2(attn: &Attention<'_>, s: &Step<'_>, plan: &Plan<'_>, lse: bool, entropy: bool) -> [Vec<f32>; 3] {
    let t = num_tokens();
    let mut out = vec![f32::NAN; t * HQ * D];
    let mut l = vec![f32::NAN; t * HQ];
    let mut e = vec![f32::NAN; t * HQ];
    let mut outputs = AttentionOutputs::new(TensorMut::f32(&mut out, &[t, HQ, D]).unwrap());
    if lse {
        outputs = outputs.with_lse(TensorMut::f32(&mut l, &[t, HQ]).unwrap());
    }
    if entropy {
        outputs = outputs.with_entropy(TensorMut::f32(&mut e, &[t, HQ]).unwrap());
    }
    attn.run_with(plan, &s.cache, 0, &s.query(), &mut outputs).unwrap();
    [out, l, e]
}

fn max_err(reference: &[f64], got: &[f32]) -> f64 {
    assert_eq!(reference.len(), got.len());
    // NaN-aware: f64::max would skip a NaN, hiding an output that was never written (NaN-filled).
    reference.iter().zip(got).fold(0.0, |m, (r, g)| {
        let e = (r - *g as f64).abs();
        if e.is_nan() {
            f64::INFINITY
        } else {
            m.max(e)
        }
    })
}

#[test]
fn dense_entropy_matches_naive_reference() {
    let ctx = Context::new().unwrap();
    let s = Step::new(&ctx);
    let attn = dense(&ctx);
    let [out, lse, entropy] = run_v2(&attn, &s, &s.plan, true, true);
    let p = NaiveParams::new(HQ, HK, D);
    let mut worst = [0f64; 3];
    let mut max_entropy = 0f64;
    for (b, (&len, &ql)) in SEQ_LENS.iter().zip(&Q_LENS).enumerate() {
        let kd: Vec<f64> = (0..len).flat_map(|pos| kv(b, pos, 0)).map(f64::from).collect();
        let vd: Vec<f64> = (0..len).flat_map(|pos| kv(b, pos, 1)).map(f64::from).collect();
        let (r0, r1) = (s.qsl[b] as usize, s.qsl[b + 1] as usize);
        let qd: Vec<f64> = s.q[r0 * HQ * D..r1 * HQ * D].iter().map(|&x| x as f64).collect();
        let (ro, rl) = naive_attention(&p, len, ql, &qd, &kd, &vd);
        let re = naive_entropy(&p, len, ql, &qd, &kd);
        worst[0] = worst[0].max(max_err(&ro, &out[r0 * HQ * D..r1 * HQ * D]));
        worst[1] = worst[1].max(max_err(&rl, &lse[r0 * HQ..r1 * HQ]));
        worst[2] = worst[2].max(max_err(&re, &entropy[r0 * HQ..r1 * HQ]));
        max_entropy = re.iter().cloned().fold(max_entropy, f64::max);
        for (i, h) in entropy[r0 * HQ..r1 * HQ].iter().enumerate() {
            // Each row's entropy lies in [0, ln(keys it saw)].
            let seen = len - ql + i / HQ + 1;
            assert!(*h >= 0.0 && (*h as f64) <= (seen as f64).ln() + 1e-5, "seq {b} row {i}: H={h}, {seen} keys");
        }
    }
    assert!(worst[0] <= 1e-5, "max |out - ref| = {}", worst[0]);
    assert!(worst[1] <= 1e-5, "max |lse - ref| = {}", worst[1]);
    assert!(worst[2] <= 1e-5, "max |entropy - ref| = {} (nats expected)", worst[2]);
    // The 37-key rows are far from a one-hot: a vacuous all-zero entropy would fail above, and here.
    assert!(max_entropy > 2.0, "reference entropies look degenerate ({max_entropy})");
    // The 1-token sequence's rows see one key: zero entropy.
    let last = s.qsl[3] as usize;
    assert!(entropy[last * HQ..(last + 1) * HQ].iter().all(|h| h.abs() <= 1e-6), "{:?}", &entropy[last * HQ..]);
}

#[test]
fn run_with_equals_run() {
    let ctx = Context::new().unwrap();
    let s = Step::new(&ctx);
    let attn = dense(&ctx);
    let t = num_tokens();
    let mut out = vec![0f32; t * HQ * D];
    let mut lse = vec![0f32; t * HQ];
    attn.run(
        &s.plan,
        &s.cache,
        0,
        &s.query(),
        &mut TensorMut::f32(&mut out, &[t, HQ, D]).unwrap(),
        Some(&mut TensorMut::f32(&mut lse, &[t, HQ]).unwrap()),
    )
    .unwrap();
    let [out2, lse2, untouched] = run_v2(&attn, &s, &s.plan, true, false);
    assert_eq!(out, out2);
    assert_eq!(lse, lse2);
    assert!(untouched.iter().all(|x| x.is_nan()), "entropy was not requested but was written");
    // The entropy output does not change the others, nor does leaving lse out.
    let [out3, _, _] = run_v2(&attn, &s, &s.plan, false, true);
    assert_eq!(out, out3);
    assert!(out.iter().any(|&x| x.abs() > 0.05), "outputs look empty");
}

#[test]
fn attach_then_run_equals_run_without_attach() {
    let ctx = Context::new().unwrap();
    let s = Step::new(&ctx);
    let attn = dense(&ctx);
    let baseline = run_v2(&attn, &s, &s.plan, true, true);

    // Attached after the batch is in (the attach builds for it) ...
    let mut after = Step::new(&ctx);
    after.plan.attach(&attn).unwrap();
    // ... and before (every update then plans for it); attaching twice is harmless.
    let mut before = Step::new(&ctx);
    before.plan.attach(&attn).unwrap();
    before.plan.attach(&attn).unwrap();
    before.update();
    for (name, step) in [("after update", &after), ("before update", &before)] {
        let got = run_v2(&attn, step, &step.plan, true, true);
        assert_eq!(got[0], baseline[0], "out, attached {name}");
        assert_eq!(got[1], baseline[1], "lse, attached {name}");
        assert_eq!(got[2], baseline[2], "entropy, attached {name}");
    }

    // The plan keeps what it needs past the attached attention's drop; another dense attention of
    // the same shape (the same step planner) runs on it to the same result.
    let mut orphan = Step::new(&ctx);
    {
        let first = dense(&ctx);
        orphan.plan.attach(&first).unwrap();
    }
    orphan.update();
    let second = dense(&ctx);
    assert_eq!(run_v2(&second, &orphan, &orphan.plan, true, true), baseline);
}

#[test]
fn attach_across_contexts_is_refused() {
    let ctx = Context::new().unwrap();
    let other = Context::with_options(&ContextOptions { num_threads: 1, ..Default::default() }).unwrap();
    let mut s = Step::new(&ctx);
    let foreign = dense(&other);
    let e = s.plan.attach(&foreign).unwrap_err();
    assert_eq!(e.code, Status::InvalidArgument, "{e}");
    assert!(e.message.contains("different contexts"), "{}", e.message);
    // The refused attach left the plan usable.
    let attn = dense(&ctx);
    let [out, _, _] = run_v2(&attn, &s, &s.plan, false, false);
    assert!(out.iter().all(|x| x.is_finite()));
}

#[test]
fn dense_keeps_no_state() {
    let ctx = Context::new().unwrap();
    assert_eq!(dense(&ctx).state_bytes().unwrap(), 0);
    let info = backend_device_info("dense", DeviceType::Cpu).unwrap();
    assert!(!info.needs_state_slots, "state_bytes 0 and needs_state_slots must agree");
}

/// Asserts code and message fragment together.
fn expect(e: Error, code: Status, fragment: &str) {
    assert_eq!(e.code, code, "{e}");
    assert!(e.message.contains(fragment), "message {:?} lacks {fragment:?}", e.message);
}

#[test]
fn run_with_bad_outputs_fail_and_write_nothing() {
    let ctx = Context::new().unwrap();
    let s = Step::new(&ctx);
    let attn = dense(&ctx);
    let t = num_tokens();
    let mut out = vec![-3f32; t * HQ * D];
    let mut lse = vec![-3f32; t * HQ];

    // Entropy with one row too few.
    let mut short = vec![-3f32; (t - 1) * HQ];
    let mut o = AttentionOutputs::new(TensorMut::f32(&mut out, &[t, HQ, D]).unwrap())
        .with_lse(TensorMut::f32(&mut lse, &[t, HQ]).unwrap())
        .with_entropy(TensorMut::f32(&mut short, &[t - 1, HQ]).unwrap());
    expect(attn.run_with(&s.plan, &s.cache, 0, &s.query(), &mut o).unwrap_err(), Status::InvalidArgument, "entropy");
    assert!(out.iter().chain(&lse).chain(&short).all(|&x| x == -3.0), "a failed run wrote its outputs");

    // Entropy of the wrong dtype.
    let mut half = vec![0u16; t * HQ];
    let mut o = AttentionOutputs::new(TensorMut::f32(&mut out, &[t, HQ, D]).unwrap())
        .with_entropy(TensorMut::f16(&mut half, &[t, HQ]).unwrap());
    expect(attn.run_with(&s.plan, &s.cache, 0, &s.query(), &mut o).unwrap_err(), Status::InvalidArgument, "entropy");

    // A layer past the cache's.
    let mut o = AttentionOutputs::new(TensorMut::f32(&mut out, &[t, HQ, D]).unwrap());
    expect(attn.run_with(&s.plan, &s.cache, 1, &s.query(), &mut o).unwrap_err(), Status::OutOfRange, "layer");

    // An empty plan.
    let empty = Plan::new(&ctx, &PlanOptions { max_num_seqs: 8, max_num_tokens: 64, max_num_blocks: 16 }).unwrap();
    let mut o = AttentionOutputs::new(TensorMut::f32(&mut out, &[t, HQ, D]).unwrap());
    expect(
        attn.run_with(&empty, &s.cache, 0, &s.query(), &mut o).unwrap_err(),
        Status::FailedPrecondition,
        "kvp_plan_update",
    );
    assert!(out.iter().all(|&x| x == -3.0), "a failed run wrote out");
}
