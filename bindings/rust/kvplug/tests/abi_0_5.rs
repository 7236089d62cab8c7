//! ABI 0.5: `Attention::cache_layout` (dense and attamba, against attamba.h's formulas) and
//! `Attention::ssm` (one run on the CPU, and its error path).
use kvplug::*;

const PAGE: i32 = 8;
const HEAD: i32 = 32;
const P: i64 = 4; // chunk size
const L: i64 = 3; // window
const NUM_LAYERS: i64 = 2;
const LAYER: i64 = 1; // cyclic offset min(P - 1, 1 * (P / 2)) = 2

fn attamba_json(ssm_heads: i32) -> String {
    format!(
        r#"{{"backend_config_type": "AttambaConfig", "backend_config": {{"chunk_size": {P}, "window": {L},
            "layer_index": {LAYER}, "num_layers": {NUM_LAYERS}, "chunk_offsets": "Cyclic", "ssm_heads": {ssm_heads},
            "ssm_head_dim": 4, "state_size": 4, "ssm_groups": 1, "conv_width": 3}}}}"#
    )
}

fn attamba<'c>(ctx: &'c Context, json: &str) -> Attention<'c> {
    Attention::new(ctx, &AttentionOptions::new("attamba", 4, 2, HEAD, KvDtype::F32).with_config(Config::Json(json)))
        .unwrap()
}

/// Chunk ends among positions [0, n) as attamba.h lists them: 0 and j*P + P-1 - off.
fn chunk_ends(n: i64, off: i64) -> i64 {
    (0..n).filter(|&p| p == 0 || (0..=n / P + 1).any(|j| j * P + P - 1 - off == p)).count() as i64
}

fn expected(n: i64, p0: i64, bs: i64) -> CacheLayout {
    let rows: Vec<i64> = (0..NUM_LAYERS).map(|l| chunk_ends(n, (P - 1).min(l * (P / NUM_LAYERS)))).collect();
    let (most, least) = (*rows.iter().max().unwrap(), *rows.iter().min().unwrap());
    let comp_pages = (most + bs - 1) / bs;
    let first = (p0 - L).max(0) / bs;
    let win_pages = (n + bs - 1) / bs - first;
    CacheLayout {
        seq_len: (comp_pages * bs + n - first * bs) as i32,
        num_pages: (comp_pages + win_pages) as i32,
        compressed_rows: most as i32,
        compressed_pages: comp_pages as i32,
        stable_rows: least as i32,
        window_first_page: first as i32,
        window_pages: win_pages as i32,
    }
}

#[test]
fn dense_layout_is_the_token_stream() {
    let ctx = Context::new().unwrap();
    let dense = Attention::new(&ctx, &AttentionOptions::new("dense", 4, 2, HEAD, KvDtype::F32)).unwrap();
    for (n, p0) in [(0, 0), (1, 0), (17, 5), (64, 63)] {
        let l = dense.cache_layout(PAGE, n, p0).unwrap();
        let pages = (n + PAGE - 1) / PAGE;
        assert_eq!(
            l,
            CacheLayout { seq_len: n, num_pages: pages, window_pages: pages, ..CacheLayout::default() },
            "n={n} p0={p0}"
        );
    }
}

#[test]
fn attamba_layout_matches_the_header() {
    assert!(BINDING_ABI_VERSION.1 >= 5);
    let info = backend_device_info("attamba", DeviceType::Cpu).unwrap();
    assert!(info.available && info.experimental && info.needs_state_slots, "{info:?}");
    let ctx = Context::new().unwrap();
    let attn = attamba(&ctx, &attamba_json(0));
    for (n, p0) in [(1, 0), (4, 0), (38, 0), (40, 0), (46, 40), (100, 99), (100, 2), (9, 9)] {
        assert_eq!(
            attn.cache_layout(PAGE, n, p0).unwrap(),
            expected(n as i64, p0 as i64, PAGE as i64),
            "n={n} p0={p0}"
        );
    }
    // The layers' row counts differ at 38 (layer 0's ends 0, 3, .., 35; layer 1's 0, 1, 5, .., 37).
    let l = attn.cache_layout(PAGE, 38, 0).unwrap();
    assert_eq!((l.stable_rows, l.compressed_rows), (10, 11));
    let e = attn.cache_layout(0, 10, 0).unwrap_err();
    assert!(e.code == Status::InvalidArgument && e.message.contains("block_size=0"), "{e:?}");
    let e = attn.cache_layout(PAGE, 10, 11).unwrap_err();
    assert!(e.code == Status::InvalidArgument && e.message.contains("query_pos_start=11"), "{e:?}");
}

#[test]
fn attamba_ssm_runs_and_checks_which() {
    let ctx = Context::new().unwrap();
    let attn = attamba(&ctx, &attamba_json(2));
    let state = attn.state_bytes().unwrap();
    // attamba.h: two SSMs of (conv_width - 1) * conv_dim + heads * head_dim * state floats.
    let (d_inner, conv_dim, heads) = (8usize, 16usize, 2usize);
    assert_eq!(state, 2 * (2 * conv_dim as i64 + 8 * 4) * 4);
    let mut o = KvCacheOptions::new(1, 8, PAGE, 2, HEAD, KvDtype::F32);
    o.num_state_slots = 1;
    o.state_bytes_per_layer = state;
    let mut cache = KvCache::new(&ctx, &o).unwrap();
    let mut plan = Plan::new(&ctx, &PlanOptions { max_num_seqs: 1, max_num_tokens: 16, max_num_blocks: 8 }).unwrap();
    plan.attach(&attn).unwrap();
    let t = 10usize;
    let l = attn.cache_layout(PAGE, t as i32, 0).unwrap();
    let table: Vec<i32> = (0..l.num_pages).collect();
    let (qsl, lens, slots, starts) = ([0, t as i32], [l.seq_len], [0], [0]);
    let batch = Batch::new(PAGE, &qsl, &lens, BlockTable::Dense { table: &table, stride: table.len() })
        .with_state_slots(&slots)
        .with_query_pos_starts(&starts);
    plan.update(&batch).unwrap();
    let in_dim = 2 * d_inner + 2 * 4 + heads;
    let input: Vec<f32> = (0..t * in_dim).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let conv: Vec<f32> = (0..conv_dim * 3).map(|i| ((i * 13 % 17) as f32 / 17.0) - 0.5).collect();
    let a_log = vec![0.1f32; heads];
    let mut out = vec![f32::NAN; t * d_inner];
    for which in [0, 1, 2] {
        let mut args = SsmArgs::new(
            TensorRef::f32(&input, &[t, in_dim]).unwrap(),
            TensorRef::f32(&conv, &[conv_dim, 3]).unwrap(),
            TensorRef::f32(&a_log, &[heads]).unwrap(),
            TensorMut::f32(&mut out, &[t, d_inner]).unwrap(),
        );
        args.which = which;
        let r = attn.ssm(&plan, &mut cache, 0, &mut args);
        if which < 2 {
            r.unwrap();
        } else {
            let e = r.unwrap_err();
            assert!(e.code == Status::InvalidArgument && e.message.contains("which=2"), "{e:?}");
        }
    }
    assert!(out.iter().all(|x| x.is_finite()) && out.iter().any(|&x| x != 0.0));
    // dense has no SSM.
    let dense = Attention::new(&ctx, &AttentionOptions::new("dense", 4, 2, HEAD, KvDtype::F32)).unwrap();
    let mut args = SsmArgs::new(
        TensorRef::f32(&input, &[t, in_dim]).unwrap(),
        TensorRef::f32(&conv, &[conv_dim, 3]).unwrap(),
        TensorRef::f32(&a_log, &[heads]).unwrap(),
        TensorMut::f32(&mut out, &[t, d_inner]).unwrap(),
    );
    assert_eq!(dense.ssm(&plan, &mut cache, 0, &mut args).unwrap_err().code, Status::NotSupported);
}
