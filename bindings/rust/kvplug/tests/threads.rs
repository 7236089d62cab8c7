//! Thread safety as the header states it and the Send/Sync impls claim it.
mod common;

use common::*;
use kvplug::*;

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn handles_are_send_and_sync() {
    // Compile-time: each impl carries its justification in the source.
    assert_send_sync::<Context>();
    assert_send_sync::<BlockManager>();
    assert_send_sync::<KvCache<'static>>();
    assert_send_sync::<Plan<'static>>();
    assert_send_sync::<Attention<'static>>();
    assert_send_sync::<TensorRef<'static>>();
    assert_send_sync::<TensorMut<'static>>();
    assert_send_sync::<Error>();
}

#[test]
fn concurrent_runs_on_shared_handles_match_a_serial_run() {
    // The header: runs on one attention handle from several threads are safe with different
    // outputs, and so are concurrent reads of one cache and one plan. All through `&`.
    const HQ: usize = 8;
    const HK: usize = 2;
    const D: usize = 64;
    const N: usize = 40;
    let ctx = Context::new().unwrap();
    let mut cache = KvCache::new(&ctx, &KvCacheOptions::new(1, 4, 16, HK as i32, D as i32, KvDtype::F32)).unwrap();
    let attn =
        Attention::new(&ctx, &AttentionOptions::new("dense", HQ as i32, HK as i32, D as i32, KvDtype::F32)).unwrap();
    let mut plan = Plan::new(&ctx, &PlanOptions { max_num_seqs: 1, max_num_tokens: 64, max_num_blocks: 4 }).unwrap();
    let slots: Vec<i64> = (0..N as i64).collect();
    plan.update(&Batch {
        block_size: 16,
        query_start_loc: &[0, N as i32],
        seq_lens: &[N as i32],
        block_table: BlockTable::Dense { table: &[0, 1, 2], stride: 3 },
        slot_mapping: Some(&slots),
        state_slots: None,
        context_lens: None,
        query_pos_starts: None,
    })
    .unwrap();
    let k: Vec<f32> = (0..N * HK * D).map(|i| feature(i as u64, 1, 0, 0, 0, 0)).collect();
    let v: Vec<f32> = (0..N * HK * D).map(|i| feature(i as u64, 1, 0, 0, 0, 1)).collect();
    attn.write_kv(
        &plan,
        &mut cache,
        0,
        &TensorRef::f32(&k, &[N, HK, D]).unwrap(),
        &TensorRef::f32(&v, &[N, HK, D]).unwrap(),
    )
    .unwrap();
    let queries: Vec<Vec<f32>> =
        (0..6).map(|t| (0..N * HQ * D).map(|i| feature(i as u64, 2 + t, 0, 0, 0, 2)).collect()).collect();
    let run = |q: &[f32]| {
        let mut out = vec![0f32; N * HQ * D];
        attn.run(
            &plan,
            &cache,
            0,
            &TensorRef::f32(q, &[N, HQ, D]).unwrap(),
            &mut TensorMut::f32(&mut out, &[N, HQ, D]).unwrap(),
            None,
        )
        .unwrap();
        out
    };
    let serial: Vec<Vec<f32>> = queries.iter().map(|q| run(q)).collect();
    // Six threads, five runs each, all at once on the same attention, plan and cache.
    let parallel: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
        let hs: Vec<_> = queries.iter().map(|q| s.spawn(|| (0..5).map(|_| run(q)).collect::<Vec<_>>())).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (t, runs) in parallel.iter().enumerate() {
        for r in runs {
            assert!(r == &serial[t], "thread {t}: concurrent runs must compute what serial runs do");
        }
    }
    assert!(serial[0] != serial[1], "different queries give different outputs (the comparison is not vacuous)");
}

#[test]
fn block_manager_queries_run_concurrently_and_it_moves_between_threads() {
    let mut bm = BlockManager::new(&BlockManagerOptions::new(16, 64)).unwrap();
    for id in 0..8u64 {
        bm.allocate_tokens(id, 10 + 7 * id as i64).unwrap();
    }
    let expected: Vec<Vec<i32>> = (0..8).map(|id| bm.block_table(id).unwrap()).collect();
    std::thread::scope(|s| {
        for t in 0..4 {
            let (bm, expected) = (&bm, &expected);
            s.spawn(move || {
                for round in 0..200 {
                    let id = ((t + round) % 8) as u64;
                    assert_eq!(&bm.block_table(id).unwrap(), &expected[id as usize]);
                    assert_eq!(bm.num_tokens(id).unwrap(), 10 + 7 * id as i64);
                    assert_eq!(bm.stats().unwrap().num_sequences, 8);
                }
            });
        }
    });
    // Send: mutate and drop on another thread.
    let used = std::thread::spawn(move || {
        bm.free(3).unwrap();
        bm.stats().unwrap().num_sequences
    })
    .join()
    .unwrap();
    assert_eq!(used, 7);
}

#[test]
fn error_messages_are_per_thread() {
    // kvp_last_error is thread-local: each thread's Error carries its own failure's message.
    let msgs: Vec<String> = std::thread::scope(|s| {
        // Both threads fail repeatedly, interleaved, so a shared message would show up crossed.
        let a = s.spawn(|| {
            let mut bm = BlockManager::new(&BlockManagerOptions::new(16, 4)).unwrap();
            let mut msg = String::new();
            for _ in 0..100 {
                msg = bm.free(1111).unwrap_err().message;
                assert!(msg.contains("1111"), "{msg}");
            }
            msg
        });
        let b = s.spawn(|| {
            let mut msg = String::new();
            for _ in 0..100 {
                msg = backend_info("zzz_backend").unwrap_err().message;
                assert!(msg.contains("zzz_backend"), "{msg}");
            }
            msg
        });
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    assert!(msgs[0].contains("1111") && !msgs[0].contains("zzz_backend"), "{msgs:?}");
    assert!(msgs[1].contains("zzz_backend") && !msgs[1].contains("1111"), "{msgs:?}");
}
