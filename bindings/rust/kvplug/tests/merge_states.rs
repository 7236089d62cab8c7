//! `merge_states` (ABI 0.3): partial attention states over disjoint key sets, computed naively here
//! in f64, merge into attention over all the keys; an empty partial (lse = -inf) weighs nothing;
//! malformed inputs are refused without writing.
mod common;

use common::feature;
use kvplug::*;

/// Query rows, heads, head size, keys.
const T: usize = 5;
const H: usize = 3;
const D: usize = 16;
const N: usize = 24;

/// q `[T, H, D]`, k and v `[N, H, D]`. Keys from N/2 on are scaled up so the halves' lse differ by
/// a few units and the merge weights are far from equal.
struct Problem {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
}

fn problem() -> Problem {
    let mut p = Problem { q: vec![], k: vec![], v: vec![] };
    for t in 0..T {
        for h in 0..H {
            for x in 0..D {
                p.q.push(feature(t as u64, t as i32, 0, h as i32, x as i32, 2) as f64);
            }
        }
    }
    for j in 0..N {
        let scale = if j >= N / 2 { 5.0 } else { 1.0 };
        for h in 0..H {
            for x in 0..D {
                p.k.push(scale * feature(j as u64, j as i32, 0, h as i32, x as i32, 0) as f64);
                p.v.push(feature(j as u64, j as i32, 0, h as i32, x as i32, 1) as f64);
            }
        }
    }
    p
}

/// Attention of every query over the keys in `keys`, in f64: out `[T, H, D]`, lse and entropy
/// `[T, H]` (natural log, nats).
fn naive_state(p: &Problem, keys: std::ops::Range<usize>) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let scale = 1.0 / (D as f64).sqrt();
    let (mut out, mut lse, mut ent) = (vec![0.0; T * H * D], vec![0.0; T * H], vec![0.0; T * H]);
    for t in 0..T {
        for h in 0..H {
            let logits: Vec<f64> = keys
                .clone()
                .map(|j| (0..D).map(|x| p.q[(t * H + h) * D + x] * p.k[(j * H + h) * D + x]).sum::<f64>() * scale)
                .collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = logits.iter().map(|s| (s - m).exp()).sum();
            for (jj, j) in keys.clone().enumerate() {
                let a = (logits[jj] - m).exp() / sum;
                ent[t * H + h] -= a * a.ln();
                for x in 0..D {
                    out[(t * H + h) * D + x] += a * p.v[(j * H + h) * D + x];
                }
            }
            lse[t * H + h] = m + sum.ln();
        }
    }
    (out, lse, ent)
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// The partial states over `parts` stacked: partial_out `[S, T, H, D]`, partial_lse and
/// partial_entropy `[S, T, H]`, as f32.
fn partials(p: &Problem, parts: &[std::ops::Range<usize>]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mut o, mut l, mut e) = (vec![], vec![], vec![]);
    for r in parts {
        let (po, pl, pe) = naive_state(p, r.clone());
        o.extend(f32s(&po));
        l.extend(f32s(&pl));
        e.extend(f32s(&pe));
    }
    (o, l, e)
}

/// Merged out, lse, entropy.
fn merge(ctx: &Context, po: &[f32], pl: &[f32], pe: &[f32]) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let s = pl.len() / (T * H);
    let (mut out, mut lse, mut ent) = (vec![f32::NAN; T * H * D], vec![f32::NAN; T * H], vec![f32::NAN; T * H]);
    merge_states(
        ctx,
        &TensorRef::f32(po, &[s, T, H, D])?,
        &TensorRef::f32(pl, &[s, T, H])?,
        &mut TensorMut::f32(&mut out, &[T, H, D])?,
        Some(&mut TensorMut::f32(&mut lse, &[T, H])?),
        Some(&TensorRef::f32(pe, &[s, T, H])?),
        Some(&mut TensorMut::f32(&mut ent, &[T, H])?),
    )?;
    Ok((out, lse, ent))
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
fn disjoint_partials_merge_into_attention_over_all_keys() {
    let ctx = Context::new().unwrap();
    let p = problem();
    let (ro, rl, re) = naive_state(&p, 0..N);
    for parts in [vec![0..N / 2, N / 2..N], vec![0..5, 5..6, 6..N]] {
        let (po, pl, pe) = partials(&p, &parts);
        let (out, lse, ent) = merge(&ctx, &po, &pl, &pe).unwrap();
        assert!(max_err(&ro, &out) <= 1e-6, "{parts:?}: max |out - ref| = {}", max_err(&ro, &out));
        assert!(max_err(&rl, &lse) <= 1e-6, "{parts:?}: max |lse - ref| = {}", max_err(&rl, &lse));
        assert!(max_err(&re, &ent) <= 1e-6, "{parts:?}: max |entropy - ref| = {}", max_err(&re, &ent));
        // Not vacuous: each partial alone is far from the whole.
        for (i, r) in parts.iter().enumerate() {
            let alone = &po[i * T * H * D..(i + 1) * T * H * D];
            assert!(max_err(&ro, alone) > 1e-2, "{parts:?}: partial {r:?} already equals the whole");
        }
    }
    // The scaled half dominates but does not swamp the other (a real weighting to get right).
    let (_, pl, _) = partials(&p, &[0..N / 2, N / 2..N]);
    let gap = (0..T * H).map(|i| (pl[T * H + i] - pl[i]).abs()).fold(0f32, f32::max);
    assert!(gap > 1.5 && gap < 30.0, "lse gap {gap}");
}

#[test]
fn an_empty_partial_yields_the_other_exactly() {
    let ctx = Context::new().unwrap();
    let p = problem();
    // One partial over every key: the state the merge must reproduce.
    let (po, pl, pe) = naive_state(&p, 0..N);
    let (so, sl, se) = (f32s(&po), f32s(&pl), f32s(&pe));
    // Garbage where the empty partial's out and entropy would be: its weight must be exactly 0.
    let (eo, el, ee) = (vec![7.5f32; T * H * D], vec![f32::NEG_INFINITY; T * H], vec![9.0f32; T * H]);
    for empty_first in [true, false] {
        let cat = |a: &[f32], b: &[f32]| if empty_first { [a, b].concat() } else { [b, a].concat() };
        let (out, lse, ent) = merge(&ctx, &cat(&eo, &so), &cat(&el, &sl), &cat(&ee, &se)).unwrap();
        assert_eq!(out, so, "empty first: {empty_first}");
        assert_eq!(lse, sl, "empty first: {empty_first}");
        assert_eq!(ent, se, "empty first: {empty_first}");
    }
}

fn expect(e: Error, code: Status, fragment: &str) {
    assert_eq!(e.code, code, "{e}");
    assert!(e.message.contains(fragment), "message {:?} lacks {fragment:?}", e.message);
}

#[test]
fn malformed_inputs_are_refused_without_writing() {
    let ctx = Context::new().unwrap();
    let po = vec![0.5f32; 2 * T * H * D];
    let pl = vec![1f32; 2 * T * H];
    let pe = vec![1f32; 2 * T * H];
    let mut out = vec![-3f32; T * H * D];
    let mut lse = vec![-3f32; T * H];
    let mut ent = vec![-3f32; T * H];
    let po_t = TensorRef::f32(&po, &[2, T, H, D]).unwrap();
    let pl_t = TensorRef::f32(&pl, &[2, T, H]).unwrap();

    // partial_lse for 1 partial while partial_out has 2 (same element count, other shape).
    let pl_bad = TensorRef::f32(&pl, &[1, 2 * T, H]).unwrap();
    let e = merge_states(&ctx, &po_t, &pl_bad, &mut TensorMut::f32(&mut out, &[T, H, D]).unwrap(), None, None, None);
    expect(e.unwrap_err(), Status::InvalidArgument, "partial_lse shape");

    // out of the wrong shape.
    let e = merge_states(&ctx, &po_t, &pl_t, &mut TensorMut::f32(&mut out, &[H, T, D]).unwrap(), None, None, None);
    expect(e.unwrap_err(), Status::InvalidArgument, "out shape");

    // lse that is not float32.
    let mut half = vec![0u16; T * H];
    let e = merge_states(
        &ctx,
        &po_t,
        &pl_t,
        &mut TensorMut::f32(&mut out, &[T, H, D]).unwrap(),
        Some(&mut TensorMut::bf16(&mut half, &[T, H]).unwrap()),
        None,
        None,
    );
    expect(e.unwrap_err(), Status::InvalidArgument, "lse");

    // An entropy output needs the partials' entropies.
    let e = merge_states(
        &ctx,
        &po_t,
        &pl_t,
        &mut TensorMut::f32(&mut out, &[T, H, D]).unwrap(),
        Some(&mut TensorMut::f32(&mut lse, &[T, H]).unwrap()),
        None,
        Some(&mut TensorMut::f32(&mut ent, &[T, H]).unwrap()),
    );
    expect(e.unwrap_err(), Status::InvalidArgument, "partial_entropy");

    // partial_entropy of the wrong shape.
    let pe_bad = TensorRef::f32(&pe, &[2, H, T]).unwrap();
    let e = merge_states(
        &ctx,
        &po_t,
        &pl_t,
        &mut TensorMut::f32(&mut out, &[T, H, D]).unwrap(),
        None,
        Some(&pe_bad),
        Some(&mut TensorMut::f32(&mut ent, &[T, H]).unwrap()),
    );
    expect(e.unwrap_err(), Status::InvalidArgument, "partial_entropy");

    assert!(out.iter().chain(&lse).chain(&ent).all(|&x| x == -3.0), "a failed merge wrote its outputs");
    // The same buffers with well-formed shapes do merge (the failures above came from the shapes).
    merge_states(&ctx, &po_t, &pl_t, &mut TensorMut::f32(&mut out, &[T, H, D]).unwrap(), None, None, None).unwrap();
    assert!(out.iter().all(|&x| (x - 0.5).abs() < 1e-6), "two equal partials of 0.5 merge to 0.5");
}
