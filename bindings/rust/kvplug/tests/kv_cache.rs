//! The KV cache through the safe API: writes by slot mapping seen through layer views, both
//! layouts, block copies, swapping with the block manager's plans, state slots, caches over caller
//! tensors, bf16 storage.
mod common;

use common::*;
use kvplug::*;

const H: usize = 2;
const D: usize = 32;

fn kv(tokens: usize, salt: i32) -> (Vec<f32>, Vec<f32>) {
    let k = (0..tokens * H * D).map(|i| feature(i as u64, salt, 0, 0, 0, 0)).collect();
    let v = (0..tokens * H * D).map(|i| feature(i as u64, salt, 0, 0, 0, 1)).collect();
    (k, v)
}

/// The element of `view` holding key (kv = 0) or value (kv = 1) of `slot`, head h, dim x.
#[allow(clippy::too_many_arguments)]
fn at(
    view: &LayerView<'_>,
    data: &[f32],
    layout: KvLayout,
    block_size: usize,
    kv: usize,
    slot: usize,
    h: usize,
    x: usize,
) -> f32 {
    let (b, off) = (slot / block_size, slot % block_size);
    let index = match layout {
        KvLayout::KvFirst => [kv, b, off, h, x],
        KvLayout::BlockFirst => [b, kv, off, h, x],
    };
    data[view.offset(index).unwrap()]
}

fn write_and_read(layout: KvLayout) {
    let ctx = Context::new().unwrap();
    let mut o = KvCacheOptions::new(2, 8, 16, H as i32, D as i32, KvDtype::F32);
    o.layout = layout;
    let mut cache = KvCache::new(&ctx, &o).unwrap();
    let (k, v) = kv(3, 1);
    let slots = [5i64, 17, -1]; // -1: the third token is skipped
    cache.write(1, &TensorRef::f32(&k, &[3, H, D]).unwrap(), &TensorRef::f32(&v, &[3, H, D]).unwrap(), &slots).unwrap();
    let view = cache.layer_view(1, false).unwrap();
    let expect_shape = match layout {
        KvLayout::KvFirst => [2, 8, 16, H as i64, D as i64],
        KvLayout::BlockFirst => [8, 2, 16, H as i64, D as i64],
    };
    assert_eq!(view.shape(), expect_shape);
    let data = view.as_f32().unwrap();
    for (t, &slot) in slots.iter().enumerate().take(2) {
        for h in 0..H {
            for x in 0..D {
                assert_eq!(at(&view, data, layout, 16, 0, slot as usize, h, x), k[(t * H + h) * D + x]);
                assert_eq!(at(&view, data, layout, 16, 1, slot as usize, h, x), v[(t * H + h) * D + x]);
            }
        }
    }
    // Exactly the two written tokens' K and V are non-zero: nothing else (the -1 token, layer 0).
    assert_eq!(data.iter().filter(|&&x| x != 0.0).count(), 2 * 2 * H * D);
    let other = cache.layer_view(0, false).unwrap();
    assert!(other.as_f32().unwrap().iter().all(|&x| x == 0.0), "layer 0 untouched (pages start zeroed)");
}

#[test]
fn write_then_view_kv_first() {
    write_and_read(KvLayout::KvFirst);
}

#[test]
fn write_then_view_block_first() {
    write_and_read(KvLayout::BlockFirst);
}

#[test]
fn copy_blocks_copies_every_layer() {
    let ctx = Context::new().unwrap();
    let mut cache = KvCache::new(&ctx, &KvCacheOptions::new(2, 4, 4, H as i32, D as i32, KvDtype::F32)).unwrap();
    let (k, v) = kv(4, 2);
    for layer in 0..2 {
        cache
            .write(
                layer,
                &TensorRef::f32(&k, &[4, H, D]).unwrap(),
                &TensorRef::f32(&v, &[4, H, D]).unwrap(),
                &[0, 1, 2, 3],
            )
            .unwrap();
    }
    cache.copy_blocks(&[BlockCopy { src: 0, dst: 3 }]).unwrap();
    for layer in 0..2 {
        let view = cache.layer_view(layer, false).unwrap();
        let data = view.as_f32().unwrap();
        for kvi in 0..2 {
            for pos in 0..4 {
                let src = view.offset([kvi, 0, pos, 1, 7]).unwrap();
                let dst = view.offset([kvi, 3, pos, 1, 7]).unwrap();
                assert_eq!(data[src], data[dst], "layer {layer}");
                assert_ne!(data[dst], 0.0);
            }
        }
    }
}

#[test]
fn swap_round_trip_restores_kv() {
    let ctx = Context::new().unwrap();
    let mut o = KvCacheOptions::new(1, 4, 8, H as i32, D as i32, KvDtype::F32);
    o.num_host_blocks = 4;
    let mut cache = KvCache::new(&ctx, &o).unwrap();
    let mut bo = BlockManagerOptions::new(8, 4);
    bo.num_host_blocks = 4;
    let mut bm = BlockManager::new(&bo).unwrap();
    bm.allocate_tokens(1, 12).unwrap();
    let (k, v) = kv(12, 3);
    let slots = bm.slot_mapping(1, 0, 12).unwrap();
    cache
        .write(0, &TensorRef::f32(&k, &[12, H, D]).unwrap(), &TensorRef::f32(&v, &[12, H, D]).unwrap(), &slots)
        .unwrap();
    let before = cache.layer_view(0, false).unwrap().as_f32().unwrap().to_vec();

    let out = bm.swap_out(1).unwrap();
    cache.swap_out(&out).unwrap();
    // The host pages hold the data now.
    {
        let host = cache.layer_view(0, true).unwrap();
        let hd = host.as_f32().unwrap();
        assert_eq!(hd[host.offset([0, out[0].dst as usize, 0, 0, 0]).unwrap()], k[0]);
    }
    // Another sequence reuses (and overwrites) the device blocks.
    bm.allocate_tokens(2, 32).unwrap();
    let slots2 = bm.slot_mapping(2, 0, 32).unwrap();
    let (k2, v2) = kv(32, 4);
    cache
        .write(0, &TensorRef::f32(&k2, &[32, H, D]).unwrap(), &TensorRef::f32(&v2, &[32, H, D]).unwrap(), &slots2)
        .unwrap();
    assert_ne!(cache.layer_view(0, false).unwrap().as_f32().unwrap(), &before[..]);
    bm.free(2).unwrap();

    let back = bm.swap_in(1).unwrap();
    cache.swap_in(&back).unwrap();
    let view = cache.layer_view(0, false).unwrap();
    let data = view.as_f32().unwrap();
    for (t, &slot) in bm.slot_mapping(1, 0, 12).unwrap().iter().enumerate() {
        let (b, off) = (slot as usize / 8, slot as usize % 8);
        assert_eq!(data[view.offset([0, b, off, 1, 3]).unwrap()], k[(t * H + 1) * D + 3], "token {t}");
        assert_eq!(data[view.offset([1, b, off, 0, 0]).unwrap()], v[(t * H) * D], "token {t}");
    }
}

#[test]
fn state_slots_hold_bytes_and_copy() {
    let ctx = Context::new().unwrap();
    let mut o = KvCacheOptions::new(2, 2, 4, 1, 32, KvDtype::F32);
    o.num_state_slots = 2;
    o.state_bytes_per_layer = 16;
    let mut cache = KvCache::new(&ctx, &o).unwrap();
    for layer in 0..2 {
        let s = cache.state(layer, 0).unwrap();
        assert_eq!(s.len(), 16);
        assert!(s.iter().all(|&b| b == 0), "state starts zeroed");
        s.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8 + 10 * layer as u8);
    }
    cache.copy_state(0, 1).unwrap();
    for layer in 0..2 {
        let copied = cache.state(layer, 1).unwrap().to_vec();
        assert_eq!(copied, (0..16).map(|i| i as u8 + 10 * layer as u8).collect::<Vec<_>>(), "layer {layer}");
    }
}

#[test]
fn bf16_cache_stores_round_to_nearest_even() {
    let ctx = Context::new().unwrap();
    let mut cache = KvCache::new(&ctx, &KvCacheOptions::new(1, 2, 4, H as i32, D as i32, KvDtype::BF16)).unwrap();
    let (k, v) = kv(1, 5);
    cache.write(0, &TensorRef::f32(&k, &[1, H, D]).unwrap(), &TensorRef::f32(&v, &[1, H, D]).unwrap(), &[6]).unwrap();
    let view = cache.layer_view(0, false).unwrap();
    assert_eq!(view.dtype(), KvDtype::BF16);
    assert!(view.as_f32().is_err(), "an f32 slice of bf16 pages would misread them");
    let bits = view.as_u16().unwrap();
    for h in 0..H {
        for x in 0..D {
            assert_eq!(bits[view.offset([0, 1, 2, h, x]).unwrap()], f32_to_bf16(k[h * D + x]));
        }
    }
}

#[test]
fn cache_over_caller_tensors_is_zero_copy_and_matches_an_owned_cache() {
    const HQ: usize = 4;
    let ctx = Context::new().unwrap();
    let o = KvCacheOptions::new(2, 4, 16, H as i32, D as i32, KvDtype::F32);
    let numel: usize = o.layer_shape().iter().product();
    let (mut l0, mut l1) = (vec![0f32; numel], vec![0f32; numel]);
    let n = 20;
    let (k, v) = kv(n, 6);
    let q: Vec<f32> = (0..n * HQ * D).map(|i| feature(i as u64, 9, 0, 0, 0, 2)).collect();
    let slots: Vec<i64> = (0..n as i64).collect();
    let table = [0, 1];
    let attn =
        Attention::new(&ctx, &AttentionOptions::new("dense", HQ as i32, H as i32, D as i32, KvDtype::F32)).unwrap();
    let mut plan = Plan::new(&ctx, &PlanOptions { max_num_seqs: 1, max_num_tokens: 32, max_num_blocks: 4 }).unwrap();
    plan.update(&Batch {
        block_size: 16,
        query_start_loc: &[0, n as i32],
        seq_lens: &[n as i32],
        block_table: BlockTable::Dense { table: &table, stride: 2 },
        slot_mapping: Some(&slots),
        state_slots: None,
        context_lens: None,
        query_pos_starts: None,
    })
    .unwrap();
    let run = |cache: &mut KvCache<'_>| {
        let mut out = vec![0f32; n * HQ * D];
        for layer in 0..2 {
            attn.write_kv(
                &plan,
                cache,
                layer,
                &TensorRef::f32(&k, &[n, H, D]).unwrap(),
                &TensorRef::f32(&v, &[n, H, D]).unwrap(),
            )
            .unwrap();
        }
        attn.run(
            &plan,
            cache,
            1,
            &TensorRef::f32(&q, &[n, HQ, D]).unwrap(),
            &mut TensorMut::f32(&mut out, &[n, HQ, D]).unwrap(),
            None,
        )
        .unwrap();
        out
    };
    let shape = o.layer_shape();
    let mut external = KvCache::from_tensors(
        &ctx,
        &o,
        vec![TensorMut::f32(&mut l0, &shape).unwrap(), TensorMut::f32(&mut l1, &shape).unwrap()],
    )
    .unwrap();
    let out_external = run(&mut external);
    drop(external);
    let mut owned = KvCache::new(&ctx, &o).unwrap();
    let out_owned = run(&mut owned);
    assert_eq!(out_external, out_owned);
    // The writes went straight into the caller's buffers, laid out as the owned cache's pages.
    let owned_view = owned.layer_view(1, false).unwrap();
    assert_eq!(&l1[..], owned_view.as_f32().unwrap());
    assert_eq!(l1[owned_view.offset([0, 1, 3, 1, 2]).unwrap()], k[((16 + 3) * H + 1) * D + 2]);
}
