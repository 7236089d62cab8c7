//! ABI 0.4 communicators: an in-process `Comm` merging the partials of 2 ranks equals attention over
//! all keys (whole rounds with `merge_all`, per-thread rounds with `contribute`), and the errors.
use kvplug::*;

const T: usize = 3;
const H: usize = 2;
const D: usize = 32;
const N: usize = 41; // keys: rank 0 holds [0, SPLIT), rank 1 [SPLIT, N)
const SPLIT: usize = 17;

fn val(i: usize, salt: u64) -> f64 {
    let mut x = (i as u64).wrapping_mul(0x9E3779B97F4A7C15) ^ salt.wrapping_mul(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ceb9fe1a85ec53);
    x ^= x >> 33;
    (x >> 11) as f64 / 9007199254740992.0 * 2.0 - 1.0
}

/// f64 attention of the T x H query rows over keys [lo, hi): out [T, H, D], lse [T, H].
fn states(lo: usize, hi: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut out, mut lse) = (vec![0.0; T * H * D], vec![f64::NEG_INFINITY; T * H]);
    for t in 0..T {
        for h in 0..H {
            let logits: Vec<f64> = (lo..hi)
                .map(|j| (0..D).map(|x| val((t * H + h) * D + x, 1) * val((j * H + h) * D + x, 2)).sum::<f64>() * 0.7)
                .collect();
            if logits.is_empty() {
                continue;
            }
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = logits.iter().map(|s| (s - m).exp()).sum();
            for (jj, j) in (lo..hi).enumerate() {
                let w = (logits[jj] - m).exp() / sum;
                for x in 0..D {
                    out[(t * H + h) * D + x] += w * val((j * H + h) * D + x, 3);
                }
            }
            lse[t * H + h] = m + sum.ln();
        }
    }
    (out, lse)
}

fn f32s(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

fn max_diff(got: &[f32], want: &[f64]) -> f64 {
    got.iter().zip(want).map(|(&g, &w)| if g.is_nan() { f64::NAN } else { (g as f64 - w).abs() }).fold(0.0, f64::max)
}

fn ctx() -> Context {
    Context::with_options(&ContextOptions { num_threads: 2, ..Default::default() }).unwrap()
}

fn comm(ctx: &Context) -> Comm<'_> {
    Comm::new(ctx, &CommOptions::in_process(2, 8, H as i32, D as i32, KvDtype::F32)).unwrap()
}

/// The two ranks' partials as f32 buffers: (out0, lse0, out1, lse1).
fn partials() -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let (o0, l0) = states(0, SPLIT);
    let (o1, l1) = states(SPLIT, N);
    (f32s(&o0), f32s(&l0), f32s(&o1), f32s(&l1))
}

#[test]
fn merging_two_partials_is_attention_over_all_keys() {
    let ctx = ctx();
    let mut comm = comm(&ctx);
    assert_eq!(comm.pending().unwrap(), 0);
    let (want, want_lse) = states(0, N);
    for round in 0..2 {
        let (mut o0, mut l0, mut o1, mut l1) = partials();
        let mut ps = [
            PartialState::new(TensorMut::f32(&mut o0, &[T, H, D]).unwrap(), TensorMut::f32(&mut l0, &[T, H]).unwrap()),
            PartialState::new(TensorMut::f32(&mut o1, &[T, H, D]).unwrap(), TensorMut::f32(&mut l1, &[T, H]).unwrap()),
        ];
        comm.merge_all(&mut ps).unwrap();
        drop(ps);
        // Every rank holds the merge.
        for (o, l) in [(&o0, &l0), (&o1, &l1)] {
            assert!(max_diff(o, &want) < 1e-6, "round {round}: out off by {}", max_diff(o, &want));
            assert!(max_diff(l, &want_lse) < 1e-5, "round {round}: lse off by {}", max_diff(l, &want_lse));
        }
        assert_eq!(comm.pending().unwrap(), 0, "the round is closed");
    }
}

#[test]
fn an_empty_partial_weighs_nothing() {
    let ctx = ctx();
    let mut comm = comm(&ctx);
    let (want, want_lse) = states(0, N);
    let (mut o0, mut l0) = (f32s(&want), f32s(&want_lse));
    let (mut o1, mut l1) = (vec![0f32; T * H * D], vec![f32::NEG_INFINITY; T * H]);
    let mut ps = [
        PartialState::new(TensorMut::f32(&mut o0, &[T, H, D]).unwrap(), TensorMut::f32(&mut l0, &[T, H]).unwrap()),
        PartialState::new(TensorMut::f32(&mut o1, &[T, H, D]).unwrap(), TensorMut::f32(&mut l1, &[T, H]).unwrap()),
    ];
    comm.merge_all(&mut ps).unwrap();
    drop(ps);
    assert_eq!(o0, f32s(&want), "merging with an empty partial gives the other exactly");
    assert_eq!(o1, o0);
    assert!(l1.iter().all(|x| x.is_finite()), "{l1:?}");
}

#[test]
fn ranks_contribute_from_their_own_threads() {
    let ctx = ctx();
    let comm = comm(&ctx);
    let (want, _) = states(0, N);
    let (mut o0, mut l0, mut o1, mut l1) = partials();
    {
        let mut t0 = (TensorMut::f32(&mut o0, &[T, H, D]).unwrap(), TensorMut::f32(&mut l0, &[T, H]).unwrap());
        let mut t1 = (TensorMut::f32(&mut o1, &[T, H, D]).unwrap(), TensorMut::f32(&mut l1, &[T, H]).unwrap());
        let comm = &comm;
        std::thread::scope(|s| {
            // SAFETY: both tensors stay borrowed (untouched) until both threads are joined, by which
            // time both ranks contributed and the round is complete.
            s.spawn(move || unsafe { comm.contribute(1, &mut t1.0, &mut t1.1) }.unwrap());
            s.spawn(move || unsafe { comm.contribute(0, &mut t0.0, &mut t0.1) }.unwrap());
        });
    }
    assert_eq!(comm.pending().unwrap(), 0);
    assert!(max_diff(&o0, &want) < 1e-6 && max_diff(&o1, &want) < 1e-6);
}

#[test]
fn contributing_twice_and_mismatched_rounds_are_refused() {
    let ctx = ctx();
    let mut comm = comm(&ctx);
    let (mut o0, mut l0, mut o1, mut l1) = partials();
    let (mut a, mut b) = (TensorMut::f32(&mut o0, &[T, H, D]).unwrap(), TensorMut::f32(&mut l0, &[T, H]).unwrap());
    let (mut c, mut d) = (TensorMut::f32(&mut o1, &[T, H, D]).unwrap(), TensorMut::f32(&mut l1, &[T, H]).unwrap());
    // SAFETY: a and b stay borrowed and untouched until rank 1 completes the round below.
    unsafe { comm.contribute(0, &mut a, &mut b) }.unwrap();
    assert_eq!(comm.pending().unwrap(), 1);
    // SAFETY: refused: nothing is kept.
    let e = unsafe { comm.contribute(0, &mut c, &mut d) }.unwrap_err();
    assert_eq!(e.code, Status::FailedPrecondition, "{e}");
    // A rank-1 partial of another row count than the round's first: the library refuses it.
    let (mut o2, mut l2) = (vec![0f32; 2 * H * D], vec![0f32; 2 * H]);
    let (mut e2, mut f2) = (TensorMut::f32(&mut o2, &[2, H, D]).unwrap(), TensorMut::f32(&mut l2, &[2, H]).unwrap());
    // SAFETY: refused: nothing is kept.
    let e = unsafe { comm.contribute(1, &mut e2, &mut f2) }.unwrap_err();
    assert_eq!(e.code, Status::InvalidArgument, "{e}");
    // merge_all refuses while a round is open; merge refuses on a comm of several ranks.
    let e = comm.merge(1, &mut c, &mut d).unwrap_err();
    assert_eq!(e.code, Status::FailedPrecondition, "{e}");
    // SAFETY: completes the round.
    unsafe { comm.contribute(1, &mut c, &mut d) }.unwrap();
    assert_eq!(comm.pending().unwrap(), 0);
    drop((a, b, c, d));
    let (want, _) = states(0, N);
    assert!(max_diff(&o0, &want) < 1e-6 && max_diff(&o1, &want) < 1e-6);
}

#[test]
fn bad_inputs() {
    let ctx = ctx();
    let create = |o: CommOptions| Comm::new(&ctx, &o).map(|_| ()).unwrap_err();
    let base = CommOptions::in_process(2, 8, H as i32, D as i32, KvDtype::F32);
    for (what, o) in [
        ("num_ranks", CommOptions { num_ranks: 0, ..base.clone() }),
        ("num_ranks", CommOptions { num_ranks: 1025, ..base.clone() }),
        ("max_num_tokens", CommOptions { max_num_tokens: 0, ..base.clone() }),
        ("num_heads", CommOptions { num_heads: 0, ..base.clone() }),
        ("head_size", CommOptions { head_size: -1, ..base.clone() }),
        ("out_dtype", CommOptions { out_dtype: KvDtype::Fp8E4m3, ..base.clone() }),
    ] {
        let e = create(o);
        assert_eq!(e.code, Status::InvalidArgument, "{what}: {e}");
        assert!(e.message.contains(what), "{what}: {}", e.message);
    }
    // An NCCL comm on a CPU context (or without NCCL) is refused, never created.
    let e = create(CommOptions::nccl(2, 0, [0; NCCL_UNIQUE_ID_BYTES], 8, H as i32, D as i32, KvDtype::F32));
    assert!(matches!(e.code, Status::InvalidArgument | Status::NotSupported), "{e}");
    match nccl_unique_id() {
        Ok(id) => assert_eq!(id.len(), NCCL_UNIQUE_ID_BYTES),
        Err(e) => assert!(matches!(e.code, Status::NotSupported | Status::Device), "{e}"),
    }

    let mut comm = comm(&ctx);
    let (mut o0, mut l0, mut o1, mut l1) = partials();
    {
        // One partial for two ranks.
        let mut ps = [PartialState::new(
            TensorMut::f32(&mut o0, &[T, H, D]).unwrap(),
            TensorMut::f32(&mut l0, &[T, H]).unwrap(),
        )];
        assert_eq!(comm.merge_all(&mut ps).unwrap_err().code, Status::InvalidArgument);
    }
    {
        // Wrong heads, wrong lse shape, wrong dtype, too many rows: refused before any contribution.
        let mut o16 = vec![0u16; T * H * D];
        let mut big = vec![0f32; 9 * H * D];
        let mut big_l = vec![0f32; 9 * H];
        let cases: Vec<[PartialState<'_>; 2]> = vec![[
            PartialState::new(
                TensorMut::f32(&mut o0, &[T, H * 2, D / 2]).unwrap(),
                TensorMut::f32(&mut l0, &[T, H]).unwrap(),
            ),
            PartialState::new(TensorMut::f32(&mut o1, &[T, H, D]).unwrap(), TensorMut::f32(&mut l1, &[T, H]).unwrap()),
        ]];
        for mut c in cases {
            assert_eq!(comm.merge_all(&mut c).unwrap_err().code, Status::InvalidArgument);
        }
        let mut l16 = vec![0f32; T * H];
        let mut ps = [
            PartialState::new(
                TensorMut::f16(&mut o16, &[T, H, D]).unwrap(),
                TensorMut::f32(&mut l16, &[T, H]).unwrap(),
            ),
            PartialState::new(
                TensorMut::f32(&mut big, &[9, H, D]).unwrap(),
                TensorMut::f32(&mut big_l, &[9, H]).unwrap(),
            ),
        ];
        let e = comm.merge_all(&mut ps).unwrap_err();
        assert_eq!(e.code, Status::InvalidArgument, "{e}");
        assert!(e.message.contains("dtype"), "{}", e.message);
        let mut ps2 = [
            PartialState::new(
                TensorMut::f32(&mut big, &[9, H, D]).unwrap(),
                TensorMut::f32(&mut big_l, &[9, H]).unwrap(),
            ),
            PartialState::new(TensorMut::f32(&mut o1, &[T, H, D]).unwrap(), TensorMut::f32(&mut l1, &[T, H]).unwrap()),
        ];
        let e = comm.merge_all(&mut ps2).unwrap_err();
        assert!(e.message.contains("max_num_tokens"), "{}", e.message);
    }
    assert_eq!(comm.pending().unwrap(), 0, "refused calls open no round");
    // The library's own checks, through the unsafe path: rows past max_num_tokens, a bad rank.
    let (mut bo, mut bl) = (vec![0f32; 9 * H * D], vec![0f32; 9 * H]);
    let (mut bt, mut blt) = (TensorMut::f32(&mut bo, &[9, H, D]).unwrap(), TensorMut::f32(&mut bl, &[9, H]).unwrap());
    // SAFETY: refused: nothing is kept.
    let e = unsafe { comm.contribute(0, &mut bt, &mut blt) }.unwrap_err();
    assert_eq!(e.code, Status::InvalidArgument, "{e}");
    let mut lo = TensorMut::f32(&mut o1, &[T, H, D]).unwrap();
    // SAFETY: refused (lse of the wrong shape): nothing is kept.
    let mut wrong_lse = vec![0f32; T * H * 2];
    let mut wl = TensorMut::f32(&mut wrong_lse, &[T, H * 2]).unwrap();
    let e = unsafe { comm.contribute(0, &mut lo, &mut wl) }.unwrap_err();
    assert_eq!(e.code, Status::InvalidArgument, "{e}");
    let mut l2 = vec![0f32; T * H];
    let mut l2t = TensorMut::f32(&mut l2, &[T, H]).unwrap();
    // SAFETY: refused: nothing is kept.
    let e = unsafe { comm.contribute(2, &mut lo, &mut l2t) }.unwrap_err();
    assert_eq!(e.code, Status::InvalidArgument, "{e}");
    assert_eq!(comm.pending().unwrap(), 0);
}

#[test]
fn a_single_rank_merges_in_one_call() {
    let ctx = ctx();
    let mut comm = Comm::new(&ctx, &CommOptions::in_process(1, 8, H as i32, D as i32, KvDtype::F32)).unwrap();
    let (want, want_lse) = states(0, N);
    let (mut o, mut l) = (f32s(&want), f32s(&want_lse));
    comm.merge(0, &mut TensorMut::f32(&mut o, &[T, H, D]).unwrap(), &mut TensorMut::f32(&mut l, &[T, H]).unwrap())
        .unwrap();
    assert!(max_diff(&o, &want) < 1e-6);
    assert_eq!(comm.pending().unwrap(), 0);
}
