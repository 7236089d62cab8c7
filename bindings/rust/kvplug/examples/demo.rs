//! The C demo's scenario (bench/demo.cc) through the safe Rust API, with the dense backend: a block
//! manager with prefix caching, four requests sharing a 48-token system prompt admitted over
//! several steps, chunked prefill mixed with decode, a fork applied with copy-on-write through
//! `copy_blocks`, then decode steps. Every output is checked against a naive f64 attention; the
//! process exits with 2 if the max abs error is over 1e-5 for the float32 cache (1e-4 for bfloat16,
//! with the reference fed the same rounded K/V), 1 on any kvplug error.
//!
//! Run: `cargo run --offline --example demo` (in bindings/rust). Its counts (prefill, cached,
//! decode, cow, KV bytes) equal the C demo's row for the same backend and dtype.
use std::time::Instant;

use kvplug::*;

#[path = "../tests/common/naive.rs"]
#[allow(dead_code)]
mod naive;
use naive::*;

const LAYERS: i32 = 2;
const QH: usize = 8;
const KVH: usize = 2;
const HEAD: usize = 128;
const BLOCK: i32 = 16;
const BLOCKS: i32 = 96;
/// Prefill tokens per sequence per step (chunked prefill).
const CHUNK: usize = 32;

#[derive(Clone)]
struct Sequence {
    id: u64,
    tokens: Vec<i32>,
    /// Tokens whose K/V is in the cache.
    computed: usize,
    decode_left: usize,
}

#[derive(Default)]
struct Row {
    dtype: &'static str,
    seqs: usize,
    prefill_tokens: usize,
    decode_tokens: usize,
    cached_tokens: usize,
    cow_copies: usize,
    kv_bytes: i64,
    ms: f64,
    max_err: f64,
}

fn serve(ctx: &Context, kv_dtype: KvDtype) -> Result<Row> {
    let mut row = Row { dtype: if kv_dtype == KvDtype::F32 { "float32" } else { "bfloat16" }, ..Default::default() };
    let mut bo = BlockManagerOptions::new(BLOCK, BLOCKS);
    bo.enable_prefix_caching = true;
    bo.watermark = 0.01;
    let mut bm = BlockManager::new(&bo)?;
    let mut cache = KvCache::new(ctx, &KvCacheOptions::new(LAYERS, BLOCKS, BLOCK, KVH as i32, HEAD as i32, kv_dtype))?;
    let attn = Attention::new(ctx, &AttentionOptions::new("dense", QH as i32, KVH as i32, HEAD as i32, kv_dtype))?;
    let mut plan = Plan::new(ctx, &PlanOptions { max_num_seqs: 16, max_num_tokens: 512, max_num_blocks: BLOCKS })?;

    // A 48-token system prompt shared by every request, then ragged user prompts. Request r
    // arrives at step arrival[r]: the later ones find the system prompt already computed.
    let system: Vec<i32> = (0..48).map(|i| 1000 + i).collect();
    let user_lens = [13usize, 29, 7, 50];
    let arrival = [0usize, 2, 2, 3];
    let mut seqs: Vec<Sequence> = Vec::new();
    let mut admitted = 0;
    let p = NaiveParams::new(QH, KVH, HEAD);
    let round = |f: f32| -> f64 {
        if kv_dtype == KvDtype::F32 {
            f as f64
        } else {
            bf16_to_f32(f32_to_bf16(f)) as f64
        }
    };
    let mut forked = false;
    let mut peak_used_blocks = 0i64;

    for step in 0.. {
        while admitted < 4 && arrival[admitted] <= step {
            let r = admitted;
            let mut s = Sequence { id: r as u64 + 1, tokens: system.clone(), computed: 0, decode_left: 8 };
            s.tokens.extend((0..user_lens[r] as i32).map(|i| 5000 + 100 * r as i32 + i));
            let cached = bm.allocate(s.id, &s.tokens, 0)? as usize;
            s.computed = cached;
            row.cached_tokens += cached;
            seqs.push(s);
            admitted += 1;
        }
        // Schedule: each sequence contributes its next prefill chunk, or one decode token.
        let mut batch: Vec<usize> = Vec::new();
        let mut q_lens: Vec<usize> = Vec::new();
        for (i, s) in seqs.iter_mut().enumerate() {
            let pending = s.tokens.len() - s.computed;
            if pending > 0 {
                batch.push(i);
                q_lens.push(pending.min(CHUNK));
                continue;
            }
            if s.decode_left == 0 {
                continue;
            }
            // Decode: append the next token (greedy stand-in: a function of the sequence and step).
            let next = (7 + (s.id * 131 + s.tokens.len() as u64 * 17) % 9000) as i32;
            if let Some(copy) = bm.append(s.id, &[next])? {
                // The last block was shared with a fork: make the private copy before writing K/V.
                cache.copy_blocks(&[copy])?;
                row.cow_copies += 1;
            }
            s.tokens.push(next);
            s.decode_left -= 1;
            row.decode_tokens += 1;
            batch.push(i);
            q_lens.push(1);
        }
        if batch.is_empty() && admitted == 4 {
            break;
        }
        if batch.is_empty() {
            continue;
        }
        let ids: Vec<u64> = batch.iter().map(|&i| seqs[i].id).collect();
        let mut qsl = vec![0i32];
        for &q in &q_lens {
            qsl.push(qsl.last().unwrap() + q as i32);
        }
        let t = *qsl.last().unwrap() as usize;
        let (table, mut lens) = bm.block_tables(&ids, BLOCKS as usize)?;
        // seq_lens for attention: tokens computed after this step (the rest of a prompt comes later).
        let mut slots = vec![0i64; t];
        for (b, &i) in batch.iter().enumerate() {
            let start = seqs[i].computed;
            lens[b] = (start + q_lens[b]) as i32;
            bm.slot_mapping_into(ids[b], start as i64, &mut slots[qsl[b] as usize..qsl[b + 1] as usize])?;
        }
        let t0 = Instant::now();
        plan.update(&Batch {
            block_size: BLOCK,
            query_start_loc: &qsl,
            seq_lens: &lens,
            block_table: BlockTable::Dense { table: &table, stride: BLOCKS as usize },
            slot_mapping: Some(&slots),
            state_slots: None,
            context_lens: None,
            query_pos_starts: None,
        })?;
        row.ms += t0.elapsed().as_secs_f64() * 1e3;

        for layer in 0..LAYERS {
            let mut k = vec![0f32; t * KVH * HEAD];
            let mut v = vec![0f32; k.len()];
            let mut q = vec![0f32; t * QH * HEAD];
            let mut out = vec![0f32; q.len()];
            let mut lse = vec![0f32; t * QH];
            for (b, &i) in batch.iter().enumerate() {
                let s = &seqs[i];
                for j in 0..q_lens[b] {
                    let pos = s.computed + j;
                    let row_t = qsl[b] as usize + j;
                    let tok = s.tokens[pos] as u64;
                    for h in 0..KVH {
                        for x in 0..HEAD {
                            k[(row_t * KVH + h) * HEAD + x] = feature(tok, pos as i32, layer, h as i32, x as i32, 0);
                            v[(row_t * KVH + h) * HEAD + x] = feature(tok, pos as i32, layer, h as i32, x as i32, 1);
                        }
                    }
                    for h in 0..QH {
                        for x in 0..HEAD {
                            q[(row_t * QH + h) * HEAD + x] =
                                feature(tok ^ s.id, pos as i32, layer, h as i32, x as i32, 2);
                        }
                    }
                }
            }
            let t1 = Instant::now();
            attn.write_kv(
                &plan,
                &mut cache,
                layer,
                &TensorRef::f32(&k, &[t, KVH, HEAD])?,
                &TensorRef::f32(&v, &[t, KVH, HEAD])?,
            )?;
            attn.run(
                &plan,
                &cache,
                layer,
                &TensorRef::f32(&q, &[t, QH, HEAD])?,
                &mut TensorMut::f32(&mut out, &[t, QH, HEAD])?,
                Some(&mut TensorMut::f32(&mut lse, &[t, QH])?),
            )?;
            row.ms += t1.elapsed().as_secs_f64() * 1e3;
            // Reference: contiguous K/V of each sequence rebuilt from the features, in f64.
            for (b, &i) in batch.iter().enumerate() {
                let s = &seqs[i];
                let len = lens[b] as usize;
                let (mut kd, mut vd) = (Vec::new(), Vec::new());
                for pos in 0..len {
                    let tok = s.tokens[pos] as u64;
                    for h in 0..KVH {
                        for x in 0..HEAD {
                            kd.push(round(feature(tok, pos as i32, layer, h as i32, x as i32, 0)));
                            vd.push(round(feature(tok, pos as i32, layer, h as i32, x as i32, 1)));
                        }
                    }
                }
                let r0 = qsl[b] as usize * QH * HEAD;
                let qd: Vec<f64> = q[r0..qsl[b + 1] as usize * QH * HEAD].iter().map(|&x| x as f64).collect();
                let (reference, _) = naive_attention(&p, len, q_lens[b], &qd, &kd, &vd);
                for (j, r) in reference.iter().enumerate() {
                    row.max_err = row.max_err.max((r - out[r0 + j] as f64).abs());
                }
            }
        }
        for (b, &i) in batch.iter().enumerate() {
            seqs[i].computed += q_lens[b];
            bm.mark_computed(seqs[i].id, seqs[i].computed as i64)?;
        }
        peak_used_blocks = peak_used_blocks.max(bm.stats()?.num_used_blocks as i64);
        // Once request 1's prompt is in, fork it (parallel sampling): its partial last block is
        // shared until the first append copies it.
        if !forked && seqs[0].computed == seqs[0].tokens.len() {
            bm.fork(1, 99)?;
            let mut child = seqs[0].clone();
            child.id = 99;
            child.decode_left = 8;
            seqs.push(child);
            forked = true;
        }
    }
    let bytes_per_block = 2 * BLOCK as i64 * KVH as i64 * HEAD as i64 * kv_dtype.size_bytes() as i64 * LAYERS as i64;
    row.kv_bytes = peak_used_blocks * bytes_per_block; // peak, all layers
    row.seqs = seqs.len();
    let prompt_total: usize = user_lens.iter().map(|u| 48 + u).sum();
    row.prefill_tokens = prompt_total - row.cached_tokens;
    for s in &seqs {
        bm.free(s.id)?;
    }
    let end = bm.stats()?;
    if end.num_used_blocks != 0 {
        eprintln!("block leak: {} used after freeing all", end.num_used_blocks);
        std::process::exit(1);
    }
    Ok(row)
}

fn run() -> Result<bool> {
    let (major, minor, patch) = abi_version();
    println!(
        "kvplug {} (ABI {major}.{minor}.{patch}), Rust binding for ABI {:?}",
        version_string(),
        BINDING_ABI_VERSION
    );
    println!("backends: {}", backend_names()?.join(" "));
    println!(
        "model: {LAYERS} layers, {QH} query / {KVH} KV heads, head size {HEAD}, block size {BLOCK}; 4 requests sharing a \
         48-token system prompt, chunked prefill ({CHUNK} tokens), a fork, 8 decode steps each\n"
    );
    let ctx = Context::new()?;
    let info = backend_info("dense")?;
    let mut rows = vec![serve(&ctx, KvDtype::F32)?];
    if info.supports_dtype(KvDtype::BF16) {
        rows.push(serve(&ctx, KvDtype::BF16)?);
    }
    println!(
        "{:<10} {:<6} {:<9} {:>5} {:>8} {:>7} {:>7} {:>4} {:>10} {:>9} {:>12}",
        "backend",
        "device",
        "kv dtype",
        "seqs",
        "prefill",
        "cached",
        "decode",
        "cow",
        "KV bytes",
        "time ms",
        "max |err|"
    );
    let mut ok = true;
    for r in &rows {
        let tol = if r.dtype == "float32" { 1e-5 } else { 1e-4 };
        ok &= r.max_err <= tol;
        println!(
            "{:<10} {:<6} {:<9} {:>5} {:>8} {:>7} {:>7} {:>4} {:>10} {:>9.2} {:>12.3e}{}",
            "dense",
            "cpu",
            r.dtype,
            r.seqs,
            r.prefill_tokens,
            r.cached_tokens,
            r.decode_tokens,
            r.cow_copies,
            r.kv_bytes,
            r.ms,
            r.max_err,
            if r.max_err <= tol { "" } else { "  <-- over tolerance" }
        );
    }
    println!(
        "\nmax |err|: against naive contiguous attention in f64 (tolerance 1e-5 for a float32 cache; 1e-4 for \
         bfloat16, with the reference fed the same rounded K/V)."
    );
    Ok(ok)
}

fn main() {
    match run() {
        Ok(true) => {}
        Ok(false) => std::process::exit(2),
        Err(e) => {
            eprintln!("kvplug error: {e}");
            std::process::exit(1);
        }
    }
}
