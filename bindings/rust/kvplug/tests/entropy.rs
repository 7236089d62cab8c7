//! ABI 0.4: the "entropy" backend (entropy-guided attention) on the CPU through the binding, and
//! `AttentionOutputs::entropy_summary`. Every check is against attention computed here in f64 from
//! the test's own probabilities: logits q.k / (t[h, p] sqrt(d)) with a `[num_q_heads, T]`
//! temperature table (positions >= T use the last entry), the outputs, lse, each row's entropy
//! -sum a ln a, and the per-head summary {rows, mean H, informative rows, mean H / E_max, collapse
//! rows, overload rows}. Then: empty or unit tables equal dense, the summary alone, and bad tables
//! and bad summary tensors refused with the right status.
mod common;

use common::*;
use kvplug::*;

const HQ: usize = 4;
const HK: usize = 2;
const D: usize = 64;
const PAGE: usize = 8;

/// A ragged step: a 12-token prefill (positions 0..11: inside and past a table of 8), a 9-token
/// chunk after 21 cached tokens, a decode at position 16, a one-token sequence (one key: a row
/// that counts but is not informative) and 3 tokens after 42 cached.
const SEQ_LENS: [usize; 5] = [12, 30, 17, 1, 45];
const Q_LENS: [usize; 5] = [12, 9, 1, 1, 3];

fn num_tokens() -> usize {
    Q_LENS.iter().sum()
}

fn k_at(seq: usize, pos: usize, g: usize, x: usize) -> f32 {
    feature(seq as u64 + 11, pos as i32, 0, g as i32, x as i32, 0)
}

fn v_at(seq: usize, pos: usize, g: usize, x: usize) -> f32 {
    feature(seq as u64 + 11, pos as i32, 0, g as i32, x as i32, 1)
}

/// Scaled so that t = 1 gives logits of standard deviation ~1.3: neither flat nor one-hot.
fn q_at(seq: usize, pos: usize, h: usize, x: usize) -> f32 {
    4.0 * feature(seq as u64 + 500, pos as i32, 0, h as i32, x as i32, 2)
}

/// `[HQ * positions]`: head 0 cold (its rows collapse), head 3 hot (overload), heads 1 and 2
/// across both bands and between; every entry differs from its neighbours, so position matters.
fn table(positions: usize) -> Vec<f32> {
    let mut t = Vec::with_capacity(HQ * positions);
    for h in 0..HQ {
        for p in 0..positions {
            let p = p as f32;
            t.push(match h {
                0 => 0.05 + 0.005 * p,
                1 => 0.25 + 0.05 * p,
                2 => 1.2 - 0.1 * (p % 10.0),
                _ => 20.0 + p,
            });
        }
    }
    t
}

fn entropy_json(temperature: &[f32]) -> String {
    let list: Vec<String> = temperature.iter().map(|t| format!("{t:?}")).collect();
    format!(r#"{{"backend_config_type": "EntropyConfig", "backend_config": {{"temperature": [{}]}}}}"#, list.join(", "))
}

/// The step's cache, plan and queries.
struct Step {
    ctx: Context,
    q: Vec<f32>,
    qsl: Vec<i32>,
    table: Vec<i32>,
    stride: usize,
}

/// What one run wrote; NaN where it wrote nothing.
#[derive(Debug, PartialEq)]
struct Written {
    out: Vec<f32>,
    lse: Vec<f32>,
    entropy: Vec<f32>,
    summary: Vec<f32>,
}

impl Step {
    fn new() -> Step {
        let mut qsl = vec![0i32];
        let mut q = vec![];
        for (b, (&len, &ql)) in SEQ_LENS.iter().zip(&Q_LENS).enumerate() {
            qsl.push(qsl.last().unwrap() + ql as i32);
            for pos in len - ql..len {
                for h in 0..HQ {
                    for x in 0..D {
                        q.push(q_at(b, pos, h, x));
                    }
                }
            }
        }
        // Pages handed out from the top down: no sequence's pages are contiguous or in order.
        let stride = SEQ_LENS.iter().map(|l| l.div_ceil(PAGE)).max().unwrap();
        let mut table = vec![-1i32; SEQ_LENS.len() * stride];
        let mut next = Self::pages() as i32;
        for (b, &len) in SEQ_LENS.iter().enumerate() {
            for j in 0..len.div_ceil(PAGE) {
                next -= 1;
                table[b * stride + j] = next;
            }
        }
        let ctx = Context::with_options(&ContextOptions { num_threads: 2, ..Default::default() }).unwrap();
        Step { ctx, q, qsl, table, stride }
    }

    fn pages() -> usize {
        SEQ_LENS.iter().map(|l| l.div_ceil(PAGE)).sum()
    }

    fn cache(&self) -> KvCache<'_> {
        let o = KvCacheOptions::new(1, Self::pages() as i32, PAGE as i32, HK as i32, D as i32, KvDtype::F32);
        let mut cache = KvCache::new(&self.ctx, &o).unwrap();
        for (b, &len) in SEQ_LENS.iter().enumerate() {
            let (mut k, mut v, mut slots) = (vec![], vec![], vec![]);
            for pos in 0..len {
                for g in 0..HK {
                    for x in 0..D {
                        k.push(k_at(b, pos, g, x));
                        v.push(v_at(b, pos, g, x));
                    }
                }
                slots.push(self.table[b * self.stride + pos / PAGE] as i64 * PAGE as i64 + (pos % PAGE) as i64);
            }
            let shape = [len, HK, D];
            cache.write(0, &TensorRef::f32(&k, &shape).unwrap(), &TensorRef::f32(&v, &shape).unwrap(), &slots).unwrap();
        }
        cache
    }

    fn attention(&self, backend: &str, config: Config<'_>) -> Result<Attention<'_>> {
        Attention::new(
            &self.ctx,
            &AttentionOptions::new(backend, HQ as i32, HK as i32, D as i32, KvDtype::F32).with_config(config),
        )
    }

    /// One run_with of `attn` over the step, asking for the outputs the flags name.
    fn run(&self, attn: &Attention<'_>, entropy: bool, summary: bool) -> Result<Written> {
        let cache = self.cache();
        let mut plan = Plan::new(&self.ctx, &PlanOptions { max_num_seqs: 8, max_num_tokens: 64, max_num_blocks: 32 })?;
        let seq_lens: Vec<i32> = SEQ_LENS.iter().map(|&l| l as i32).collect();
        plan.update(&Batch::new(
            PAGE as i32,
            &self.qsl,
            &seq_lens,
            BlockTable::Dense { table: &self.table, stride: self.stride },
        ))?;
        let t = num_tokens();
        let mut w = Written {
            out: vec![f32::NAN; t * HQ * D],
            lse: vec![f32::NAN; t * HQ],
            entropy: vec![f32::NAN; t * HQ],
            summary: vec![f32::NAN; HQ * ENTROPY_SUMMARY_FIELDS],
        };
        let mut o = AttentionOutputs::new(TensorMut::f32(&mut w.out, &[t, HQ, D])?)
            .with_lse(TensorMut::f32(&mut w.lse, &[t, HQ])?);
        if entropy {
            o = o.with_entropy(TensorMut::f32(&mut w.entropy, &[t, HQ])?);
        }
        if summary {
            o = o.with_entropy_summary(TensorMut::f32(&mut w.summary, &[HQ, ENTROPY_SUMMARY_FIELDS])?);
        }
        attn.run_with(&plan, &cache, 0, &TensorRef::f32(&self.q, &[t, HQ, D])?, &mut o)?;
        Ok(w)
    }
}

/// The reference of one step: out `[T, HQ, D]`, lse and entropy `[T, HQ]`, and the keys each row
/// saw, with temperature `temp(h, pos)`.
struct Reference {
    out: Vec<f64>,
    lse: Vec<f64>,
    entropy: Vec<f64>,
    keys: Vec<usize>,
}

fn reference(temp: impl Fn(usize, usize) -> f64) -> Reference {
    let scale = 1.0 / (D as f64).sqrt();
    let mut r = Reference { out: vec![], lse: vec![], entropy: vec![], keys: vec![] };
    for (b, (&len, &ql)) in SEQ_LENS.iter().zip(&Q_LENS).enumerate() {
        for pos in len - ql..len {
            r.keys.push(pos + 1);
            for h in 0..HQ {
                let g = h / (HQ / HK);
                let logits: Vec<f64> = (0..=pos)
                    .map(|j| {
                        let dot: f64 = (0..D).map(|x| q_at(b, pos, h, x) as f64 * k_at(b, j, g, x) as f64).sum();
                        dot * scale / temp(h, pos)
                    })
                    .collect();
                let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = logits.iter().map(|s| (s - m).exp()).sum();
                let a: Vec<f64> = logits.iter().map(|s| (s - m).exp() / z).collect();
                for x in 0..D {
                    r.out.push((0..=pos).map(|j| a[j] * v_at(b, j, g, x) as f64).sum());
                }
                r.lse.push(m + z.ln());
                // The definition from the probabilities, not the kernels' lse identity.
                r.entropy.push(a.iter().filter(|&&p| p > 0.0).map(|&p| -p * p.ln()).sum());
            }
        }
    }
    r
}

/// The reference summary of `entropy` (`[rows, HQ]`) with `keys` per row, as `[HQ]` rows of
/// {rows, mean H, informative, mean H / E_max, collapse, overload}, and for each head the number of
/// rows within `slack` of a band edge (whose band an f32 kernel may legitimately call otherwise).
fn summarize(entropy: &[f64], keys: &[usize], slack: f64) -> (Vec<[f64; 6]>, Vec<usize>) {
    let mut s = vec![[0f64; 6]; HQ];
    let mut near_edge = vec![0usize; HQ];
    for (row, &n) in keys.iter().enumerate() {
        for h in 0..HQ {
            let e = entropy[row * HQ + h];
            if n == 0 {
                continue;
            }
            s[h][0] += 1.0;
            s[h][1] += e;
            if n < 2 {
                continue;
            }
            let e_max = (n as f64).ln();
            s[h][2] += 1.0;
            s[h][3] += e / e_max;
            s[h][4] += f64::from(u8::from(e <= e_max / 4.0));
            s[h][5] += f64::from(u8::from(e >= 3.0 * e_max / 4.0));
            if (e - e_max / 4.0).abs() < slack || (e - 3.0 * e_max / 4.0).abs() < slack {
                near_edge[h] += 1;
            }
        }
    }
    for row in &mut s {
        row[1] = if row[0] > 0.0 { row[1] / row[0] } else { 0.0 };
        row[3] = if row[2] > 0.0 { row[3] / row[2] } else { 0.0 };
    }
    (s, near_edge)
}

/// max |reference - got|, infinite for a NaN (an output left unwritten).
fn max_err(reference: &[f64], got: &[f32]) -> f64 {
    assert_eq!(reference.len(), got.len());
    reference.iter().zip(got).fold(0.0, |m, (r, &g)| {
        let e = (r - g as f64).abs();
        if e.is_nan() {
            f64::INFINITY
        } else {
            m.max(e)
        }
    })
}

fn check_summary(got: &[f32], entropy: &[f64], keys: &[usize]) {
    let (want, near_edge) = summarize(entropy, keys, 1e-4);
    let heads = HeadEntropy::from_summary(got);
    assert_eq!(heads.len(), HQ);
    for h in 0..HQ {
        let (g, w) = (&heads[h], &want[h]);
        assert_eq!(g.rows as f64, w[0], "head {h}: rows {g:?} vs {w:?}");
        assert_eq!(g.informative_rows as f64, w[2], "head {h}: informative rows {g:?} vs {w:?}");
        assert!((g.mean_entropy as f64 - w[1]).abs() < 2e-5, "head {h}: mean H {g:?} vs {w:?}");
        assert!((g.mean_normalized_entropy as f64 - w[3]).abs() < 2e-5, "head {h}: mean H/E_max {g:?} vs {w:?}");
        let slack = near_edge[h] as f64;
        assert!((g.collapse_rows as f64 - w[4]).abs() <= slack, "head {h}: collapse {g:?} vs {w:?}");
        assert!((g.overload_rows as f64 - w[5]).abs() <= slack, "head {h}: overload {g:?} vs {w:?}");
        // The raw layout the header documents, field by field.
        let raw = &got[h * ENTROPY_SUMMARY_FIELDS..(h + 1) * ENTROPY_SUMMARY_FIELDS];
        assert_eq!(
            (raw[0], raw[1], raw[2], raw[3], raw[4], raw[5]),
            (
                g.rows as f32,
                g.mean_entropy,
                g.informative_rows as f32,
                g.mean_normalized_entropy,
                g.collapse_rows as f32,
                g.overload_rows as f32
            )
        );
    }
}

#[test]
fn entropy_is_registered_with_telemetry() {
    let names = backend_names().unwrap();
    for want in ["dense", "star", "entropy"] {
        assert!(names.contains(&want), "{want} is not registered: {names:?}");
    }
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), names.len(), "a backend is listed twice: {names:?}");
    let info = backend_device_info("entropy", DeviceType::Cpu).unwrap();
    assert!(info.available && info.supports_lse && info.supports_entropy && !info.needs_state_slots, "{info:?}");
    assert!(info.supports_head_size(D as i32) && info.supports_dtype(KvDtype::F32), "{info:?}");
    let s = Step::new();
    assert_eq!(s.attention("entropy", Config::Default).unwrap().state_bytes().unwrap(), 0);
}

#[test]
fn temperature_tables_match_the_reference() {
    let s = Step::new();
    // T = 1: per head only; T = 8: positions 8.. of the prefill, the chunk and the decode lie past
    // the table; T = 64: every position has its own entry.
    for positions in [1usize, 8, 64] {
        let t = table(positions);
        let json = entropy_json(&t);
        config_check("entropy", &Config::Json(&json)).unwrap();
        let attn = s.attention("entropy", Config::Json(&json)).unwrap();
        let got = s.run(&attn, true, true).unwrap();
        let temp = |h: usize, pos: usize| t[h * positions + pos.min(positions - 1)] as f64;
        let r = reference(temp);
        let (eo, el, ee) = (max_err(&r.out, &got.out), max_err(&r.lse, &got.lse), max_err(&r.entropy, &got.entropy));
        assert!(eo < 2e-5 && el < 5e-5 && ee < 5e-5, "T={positions}: max err out {eo}, lse {el}, entropy {ee}");
        check_summary(&got.summary, &r.entropy, &r.keys);

        // Not vacuous: the cold head collapses, the hot head overloads, the rows are not all one-hot.
        let heads = HeadEntropy::from_summary(&got.summary);
        assert!(heads[0].collapse_rows >= 10, "T={positions}: {:?}", heads[0]);
        assert!(heads[3].overload_rows >= 10, "T={positions}: {:?}", heads[3]);
        assert!(heads[0].mean_entropy < heads[1].mean_entropy && heads[2].mean_entropy < heads[3].mean_entropy);
        assert!(r.entropy.iter().cloned().fold(0.0, f64::max) > 2.0);
        // The rows that saw one key: entropy 0, counted but not informative.
        assert_eq!(heads[1].rows as usize, num_tokens());
        assert_eq!(heads[1].informative_rows as usize, num_tokens() - 2);
        let single = Q_LENS[..3].iter().sum::<usize>() * HQ;
        let single = &got.entropy[single..single + HQ];
        assert!(single.iter().chain(&got.entropy[..HQ]).all(|&e| e.abs() < 1e-6), "{single:?}");

        // The table's indexing is what the outputs depend on: other readings are far off.
        if positions > 1 {
            let per_head = reference(|h, _| t[h * positions] as f64);
            assert!(max_err(&per_head.out, &got.out) > 1e-3, "T={positions}: the position does not matter");
        }
        if positions == 8 {
            // Past the table the last entry holds, not the first, and the table does not wrap.
            let first = reference(|h, pos| t[h * positions + if pos < positions { pos } else { 0 }] as f64);
            let wrap = reference(|h, pos| t[h * positions + pos % positions] as f64);
            assert!(max_err(&first.out, &got.out) > 1e-3 && max_err(&wrap.out, &got.out) > 1e-3);
        }
    }
}

#[test]
fn unit_and_empty_tables_equal_dense_with_telemetry() {
    let s = Step::new();
    let dense = s.run(&s.attention("dense", Config::Default).unwrap(), true, true).unwrap();
    let ones = entropy_json(&[1.0; HQ]);
    let ones_per_position = entropy_json(&[1.0; HQ * 5]);
    let empty = entropy_json(&[]);
    for (what, config) in [
        ("no config", Config::Default),
        ("t = 1 per head", Config::Json(&ones)),
        ("t = 1 per position", Config::Json(&ones_per_position)),
        ("empty table", Config::Json(&empty)),
    ] {
        let got = s.run(&s.attention("entropy", config).unwrap(), true, true).unwrap();
        assert_eq!(got, dense, "{what}");
    }
    // Dense's telemetry is the reference's too.
    let r = reference(|_, _| 1.0);
    assert!(max_err(&r.entropy, &dense.entropy) < 2e-5);
    check_summary(&dense.summary, &r.entropy, &r.keys);
}

#[test]
fn the_summary_alone_equals_the_summary_with_entropy() {
    let s = Step::new();
    let json = entropy_json(&table(8));
    let attn = s.attention("entropy", Config::Json(&json)).unwrap();
    let both = s.run(&attn, true, true).unwrap();
    let alone = s.run(&attn, false, true).unwrap();
    assert_eq!(alone.summary, both.summary);
    assert_eq!((&alone.out, &alone.lse), (&both.out, &both.lse));
    assert!(alone.entropy.iter().all(|x| x.is_nan()), "entropy was written without being asked for");
    // And no summary asked for: none written, the rest the same.
    let none = s.run(&attn, true, false).unwrap();
    assert!(none.summary.iter().all(|x| x.is_nan()));
    assert_eq!((&none.out, &none.entropy), (&both.out, &both.entropy));
}

fn expect(e: Error, code: Status, fragments: &[&str]) {
    assert_eq!(e.code, code, "{e}");
    for f in fragments {
        assert!(e.message.contains(f), "message {:?} lacks {f:?}", e.message);
    }
}

#[test]
fn bad_temperature_tables_are_refused() {
    let s = Step::new();
    // Values: refused when the config is parsed (by config_check and by creation alike).
    for (table, fragment) in [
        ("[1, 0, 1, 1]", "temperature[1]=0"),
        ("[1, 1, -0.5, 1]", "temperature[2]=-0.5"),
        ("[1, 1, 1, 1, 1, 1, 1, -2]", "temperature[7]=-2"),
        ("[nan, 1, 1, 1]", "temperature[0]"),
        ("[1, 1, 1, inf]", "temperature[3]"),
        ("[1, 1, 1, -inf]", "temperature[3]"),
    ] {
        let json =
            format!(r#"{{"backend_config_type": "EntropyConfig", "backend_config": {{"temperature": {table}}}}}"#);
        expect(config_check("entropy", &Config::Json(&json)).unwrap_err(), Status::InvalidConfig, &[fragment]);
        expect(s.attention("entropy", Config::Json(&json)).unwrap_err(), Status::InvalidConfig, &[fragment]);
    }
    // The table's shape needs num_q_heads, which only creation knows: config_check passes, creation
    // refuses the argument.
    for n in [3usize, 5, 7] {
        let json = entropy_json(&vec![1.0; n]);
        config_check("entropy", &Config::Json(&json)).unwrap();
        expect(
            s.attention("entropy", Config::Json(&json)).unwrap_err(),
            Status::InvalidArgument,
            &[&format!("{n} entries"), "num_q_heads=4"],
        );
    }
    // A temperature whose reciprocal overflows f32 (a subnormal: finite and > 0 when parsed).
    let json = entropy_json(&[1.0, 1.0, 1e-39, 1.0]);
    config_check("entropy", &Config::Json(&json)).unwrap();
    expect(s.attention("entropy", Config::Json(&json)).unwrap_err(), Status::InvalidArgument, &["temperature[2]"]);
    // Another backend's config, a misspelt field, a string where floats go.
    for json in [
        r#"{"backend_config_type": "DenseConfig", "backend_config": {}}"#,
        r#"{"backend_config_type": "EntropyConfig", "backend_config": {"temperatures": [1, 1, 1, 1]}}"#,
        r#"{"backend_config_type": "EntropyConfig", "backend_config": {"temperature": "hot"}}"#,
    ] {
        expect(config_check("entropy", &Config::Json(json)).unwrap_err(), Status::InvalidConfig, &[]);
        expect(s.attention("entropy", Config::Json(json)).unwrap_err(), Status::InvalidConfig, &[]);
    }
    // An EntropyConfig is not dense's.
    let json = entropy_json(&[1.0; HQ]);
    expect(config_check("dense", &Config::Json(&json)).unwrap_err(), Status::InvalidConfig, &[]);
}

#[test]
fn bad_summary_tensors_are_refused_and_nothing_is_written() {
    let s = Step::new();
    let json = entropy_json(&table(8));
    let attn = s.attention("entropy", Config::Json(&json)).unwrap();
    let cache = s.cache();
    let mut plan = Plan::new(&s.ctx, &PlanOptions { max_num_seqs: 8, max_num_tokens: 64, max_num_blocks: 32 }).unwrap();
    let seq_lens: Vec<i32> = SEQ_LENS.iter().map(|&l| l as i32).collect();
    plan.update(&Batch::new(PAGE as i32, &s.qsl, &seq_lens, BlockTable::Dense { table: &s.table, stride: s.stride }))
        .unwrap();
    let t = num_tokens();
    let q = TensorRef::f32(&s.q, &[t, HQ, D]).unwrap();
    let mut out = vec![-3f32; t * HQ * D];
    let mut f32s = vec![-3f32; (HQ + 1) * ENTROPY_SUMMARY_FIELDS];
    let mut halves = vec![0u16; HQ * ENTROPY_SUMMARY_FIELDS];
    for what in ["5 fields", "one head too many", "flat", "f16"] {
        let summary = match what {
            "5 fields" => TensorMut::f32(&mut f32s[..HQ * 5], &[HQ, 5]),
            "one head too many" => TensorMut::f32(&mut f32s, &[HQ + 1, ENTROPY_SUMMARY_FIELDS]),
            "flat" => TensorMut::f32(&mut f32s[..HQ * 6], &[HQ * 6]),
            _ => TensorMut::f16(&mut halves, &[HQ, ENTROPY_SUMMARY_FIELDS]),
        }
        .unwrap();
        let mut o = AttentionOutputs::new(TensorMut::f32(&mut out, &[t, HQ, D]).unwrap()).with_entropy_summary(summary);
        let e = attn.run_with(&plan, &cache, 0, &q, &mut o).unwrap_err();
        assert_eq!(e.code, Status::InvalidArgument, "{what}: {e}");
        assert!(e.message.contains("entropy_summary"), "{what}: {}", e.message);
        drop(o);
        assert!(out.iter().chain(&f32s).all(|&x| x == -3.0) && halves.iter().all(|&x| x == 0), "{what}: written");
    }
    // The right shape runs.
    let mut o = AttentionOutputs::new(TensorMut::f32(&mut out, &[t, HQ, D]).unwrap())
        .with_entropy_summary(TensorMut::f32(&mut f32s[..HQ * 6], &[HQ, ENTROPY_SUMMARY_FIELDS]).unwrap());
    attn.run_with(&plan, &cache, 0, &q, &mut o).unwrap();
    assert_eq!(HeadEntropy::from_summary(&f32s[..HQ * 6])[2].rows as usize, t);
    assert_eq!(&f32s[HQ * 6..], &[-3.0; 6], "wrote past the summary");
}

#[test]
fn head_entropy_reads_the_documented_layout() {
    let raw = [3.0, 0.5, 2.0, 0.25, 1.0, 0.0, 7.0, 1.5, 7.0, 0.8, 0.0, 6.0, 9.0];
    let heads = HeadEntropy::from_summary(&raw);
    assert_eq!(heads.len(), 2, "the trailing partial row is ignored");
    assert_eq!(
        heads[0],
        HeadEntropy {
            rows: 3,
            mean_entropy: 0.5,
            informative_rows: 2,
            mean_normalized_entropy: 0.25,
            collapse_rows: 1,
            overload_rows: 0
        }
    );
    assert_eq!((heads[1].rows, heads[1].overload_rows, heads[1].mean_normalized_entropy), (7, 6, 0.8));
}
