//! Error paths. Safe Rust cannot pass NULLs or dangling pointers, so these cover what it can get
//! wrong: values, shapes, dtypes, names, configs, pool exhaustion, unknown ids, call order. Each
//! checks the status code and that the message names the offending thing; where the header says a
//! failure changes nothing, that is checked too.
mod common;

use kvplug::*;

const HQ: usize = 4;
const HK: usize = 2;
const D: usize = 64;

fn err<T: std::fmt::Debug>(r: Result<T>) -> Error {
    r.expect_err("the call must fail")
}

/// Asserts code and message fragment together (so a failure shows both).
fn expect(e: Error, code: Status, fragment: &str) {
    assert_eq!(e.code, code, "{e}");
    assert!(e.message.contains(fragment), "message {:?} lacks {fragment:?}", e.message);
}

// ---------------------------------------------------------------- names and configs

#[test]
fn unknown_backend_is_not_found() {
    let ctx = Context::new().unwrap();
    let e = err(Attention::new(&ctx, &AttentionOptions::new("no_such_backend", 4, 2, 64, KvDtype::F32)));
    expect(e, Status::NotFound, "no_such_backend");
    expect(err(backend_info("no_such_backend")), Status::NotFound, "no_such_backend");
    expect(err(config_check("no_such_backend", &Config::Default)), Status::NotFound, "no_such_backend");
    // A name C cannot see whole is refused before the call.
    expect(err(backend_info("dense\0x")), Status::InvalidArgument, "NUL");
}

#[test]
fn backend_listing_and_info() {
    let names = backend_names().unwrap();
    assert!(names.contains(&"dense"), "{names:?}");
    let info = backend_info("dense").unwrap();
    assert_eq!(info.name, "dense");
    assert!(info.head_sizes.contains(&64) && info.head_sizes.contains(&128), "{:?}", info.head_sizes);
    assert!(info.supports_dtype(KvDtype::F32) && info.supports_dtype(KvDtype::BF16));
    assert!(info.supports_device(DeviceType::Cpu));
    assert!(info.supports_lse);
}

#[test]
fn bad_config_json_is_invalid_config() {
    expect(err(config_check("dense", &Config::Json("{ not json"))), Status::InvalidConfig, "JSON");
    // Valid JSON, but a field the schema lacks.
    expect(
        err(config_check(
            "dense",
            &Config::Json(r#"{"backend_config_type": "DenseConfig", "backend_config": {"window": 3}}"#),
        )),
        Status::InvalidConfig,
        "window",
    );
    // A config of another backend's type.
    expect(
        err(config_check("dense", &Config::Json(r#"{"backend_config_type": "StarConfig", "backend_config": {}}"#))),
        Status::InvalidConfig,
        "StarConfig",
    );
    // Parsed, but a value the backend refuses.
    expect(
        err(config_check(
            "dense",
            &Config::Json(r#"{"backend_config_type": "DenseConfig", "backend_config": {"logits_soft_cap": -1}}"#),
        )),
        Status::InvalidConfig,
        "logits_soft_cap",
    );
    // And through Attention::new, which must refuse it the same way.
    let ctx = Context::new().unwrap();
    let opts = AttentionOptions::new("dense", 4, 2, 64, KvDtype::F32).with_config(Config::Json("[1, 2"));
    assert_eq!(err(Attention::new(&ctx, &opts)).code, Status::InvalidConfig);
}

#[test]
fn bad_binary_config_is_invalid_config() {
    expect(err(config_check("dense", &Config::Binary(b"short"))), Status::InvalidConfig, "too short");
    // Long enough, wrong file identifier.
    expect(err(config_check("dense", &Config::Binary(&[0u8; 32]))), Status::InvalidConfig, "KVPC");
    // Right identifier, garbage offsets: must fail verification, not be read.
    let mut junk = [0xffu8; 32];
    junk[4..8].copy_from_slice(b"KVPC");
    expect(err(config_check("dense", &Config::Binary(&junk))), Status::InvalidConfig, "verification");
}

#[test]
fn unsupported_heads() {
    let ctx = Context::new().unwrap();
    expect(
        err(Attention::new(&ctx, &AttentionOptions::new("dense", 4, 2, 48, KvDtype::F32))),
        Status::NotSupported,
        "head_size=48",
    );
    expect(
        err(Attention::new(&ctx, &AttentionOptions::new("dense", 3, 2, 64, KvDtype::F32))),
        Status::InvalidArgument,
        "num_q_heads=3",
    );
    let bad_scale = AttentionOptions::new("dense", 4, 2, 64, KvDtype::F32).with_sm_scale(f32::NAN);
    expect(err(Attention::new(&ctx, &bad_scale)), Status::InvalidArgument, "sm_scale");
}

// ---------------------------------------------------------------- contexts and options

#[test]
fn context_options_are_checked() {
    let e = err(Context::with_options(&ContextOptions { num_threads: 1000, ..Default::default() }));
    expect(e, Status::InvalidArgument, "num_threads=1000");
    let e = err(Context::with_options(&ContextOptions { device_id: 1, ..Default::default() }));
    expect(e, Status::InvalidArgument, "device_id=1");
    if version_string().contains("(cpu)") {
        let e = err(Context::with_options(&ContextOptions { device: DeviceType::Cuda, ..Default::default() }));
        expect(e, Status::NotSupported, "without CUDA");
    }
}

#[test]
fn handle_options_are_checked() {
    expect(err(BlockManager::new(&BlockManagerOptions::new(0, 8))), Status::InvalidArgument, "block_size");
    let mut o = BlockManagerOptions::new(16, 8);
    o.watermark = 1.5;
    expect(err(BlockManager::new(&o)), Status::InvalidArgument, "watermark");
    let ctx = Context::new().unwrap();
    let e = err(KvCache::new(&ctx, &KvCacheOptions::new(0, 8, 16, 2, 64, KvDtype::F32)));
    expect(e, Status::InvalidArgument, "num_layers");
    let e = err(Plan::new(&ctx, &PlanOptions { max_num_seqs: 0, max_num_tokens: 1, max_num_blocks: 1 }));
    expect(e, Status::InvalidArgument, "max_num_seqs");
}

// ---------------------------------------------------------------- tensors: shapes and dtypes

#[test]
fn tensor_shape_must_cover_the_slice() {
    let data = vec![0f32; 10];
    expect(err(TensorRef::f32(&data, &[3, 4])), Status::InvalidArgument, "holds 12 elements but the slice has 10");
    // A slice longer than its shape is refused too: the extra elements would be silently ignored.
    expect(err(TensorRef::f32(&data, &[2, 4])), Status::InvalidArgument, "holds 8 elements but the slice has 10");
    expect(err(TensorRef::f32(&data, &[1, 1, 1, 1, 1, 10])), Status::InvalidArgument, "at most 5");
    expect(err(TensorRef::f32(&data, &[usize::MAX, 2])), Status::InvalidArgument, "too large");
    let mut h = vec![0u16; 4];
    expect(err(TensorMut::from_u16(&mut h, DType::F32, &[4])), Status::InvalidArgument, "not F16 or BF16");
    assert_eq!(TensorRef::f32(&data, &[2, 5]).unwrap().shape(), &[2, 5]);
}

/// A context and one sequence of `n` tokens in blocks [0, 1], with matching F32 caches, a dense
/// attention and a plan.
struct Fixture {
    ctx: Context,
    qsl: Vec<i32>,
    seq_lens: Vec<i32>,
    slots: Vec<i64>,
}

impl Fixture {
    fn new(n: usize) -> Fixture {
        Fixture {
            ctx: Context::new().unwrap(),
            qsl: vec![0, n as i32],
            seq_lens: vec![n as i32],
            slots: (0..n as i64).collect(),
        }
    }
    fn cache(&self, dtype: KvDtype) -> KvCache<'_> {
        KvCache::new(&self.ctx, &KvCacheOptions::new(2, 4, 16, HK as i32, D as i32, dtype)).unwrap()
    }
    fn attn(&self) -> Attention<'_> {
        Attention::new(&self.ctx, &AttentionOptions::new("dense", HQ as i32, HK as i32, D as i32, KvDtype::F32))
            .unwrap()
    }
    fn plan(&self) -> Plan<'_> {
        let mut plan =
            Plan::new(&self.ctx, &PlanOptions { max_num_seqs: 2, max_num_tokens: 32, max_num_blocks: 4 }).unwrap();
        plan.update(&self.batch(&[0, 1])).unwrap();
        plan
    }
    fn batch<'a>(&'a self, table: &'a [i32]) -> Batch<'a> {
        Batch {
            block_size: 16,
            query_start_loc: &self.qsl,
            seq_lens: &self.seq_lens,
            block_table: BlockTable::Dense { table, stride: table.len() },
            slot_mapping: Some(&self.slots),
            state_slots: None,
            context_lens: None,
            query_pos_starts: None,
        }
    }
}

#[test]
fn wrong_shapes_are_rejected_by_the_library() {
    let f = Fixture::new(5);
    let (mut cache, attn, plan) = (f.cache(KvDtype::F32), f.attn(), f.plan());
    let k = vec![0.5f32; 5 * HK * D];
    let q = vec![0.5f32; 5 * HQ * D];
    let mut out = vec![0f32; 5 * HQ * D];
    // A query with the KV head count instead of the query head count.
    let e = err(attn.run(
        &plan,
        &cache,
        0,
        &TensorRef::f32(&k, &[5, HK, D]).unwrap(),
        &mut TensorMut::f32(&mut out, &[5, HQ, D]).unwrap(),
        None,
    ));
    expect(e, Status::InvalidArgument, "query: expected shape [5, 4, 64]");
    // Key and value shapes differ.
    let v_short = vec![0.5f32; 4 * HK * D];
    let e = err(cache.write(
        0,
        &TensorRef::f32(&k, &[5, HK, D]).unwrap(),
        &TensorRef::f32(&v_short, &[4, HK, D]).unwrap(),
        &f.slots,
    ));
    expect(e, Status::InvalidArgument, "shapes differ");
    // Slot mapping of the wrong length.
    let e = err(cache.write(
        0,
        &TensorRef::f32(&k, &[5, HK, D]).unwrap(),
        &TensorRef::f32(&k, &[5, HK, D]).unwrap(),
        &f.slots[..3],
    ));
    expect(e, Status::InvalidArgument, "slot_mapping");
    // A 2-d key.
    let e = err(cache.write(
        0,
        &TensorRef::f32(&k, &[5, HK * D]).unwrap(),
        &TensorRef::f32(&k, &[5, HK * D]).unwrap(),
        &f.slots,
    ));
    expect(e, Status::InvalidArgument, "ndim=2");
    // lse of the wrong shape.
    let mut lse = vec![0f32; 5 * HQ + 1];
    let e = err(attn.run(
        &plan,
        &cache,
        0,
        &TensorRef::f32(&q, &[5, HQ, D]).unwrap(),
        &mut TensorMut::f32(&mut out, &[5, HQ, D]).unwrap(),
        Some(&mut TensorMut::f32(&mut lse, &[5 * HQ + 1]).unwrap()),
    ));
    expect(e, Status::InvalidArgument, "lse");
    // Nothing was written by the failed writes.
    assert!(cache.layer_view(0, false).unwrap().as_f32().unwrap().iter().all(|&x| x == 0.0));
}

#[test]
fn wrong_dtypes_are_rejected() {
    let f = Fixture::new(5);
    let (mut cache, attn, plan) = (f.cache(KvDtype::F32), f.attn(), f.plan());
    let k = vec![0.5f32; 5 * HK * D];
    let q = vec![0.5f32; 5 * HQ * D];
    // int64 keys.
    let ints = vec![1i64; 5 * HK * D];
    let e = err(cache.write(
        0,
        &TensorRef::i64(&ints, &[5, HK, D]).unwrap(),
        &TensorRef::f32(&k, &[5, HK, D]).unwrap(),
        &f.slots,
    ));
    expect(e, Status::InvalidArgument, "not float32, float16 or bfloat16");
    // out dtype differs from query dtype.
    let mut out16 = vec![0u16; 5 * HQ * D];
    let e = err(attn.run(
        &plan,
        &cache,
        0,
        &TensorRef::f32(&q, &[5, HQ, D]).unwrap(),
        &mut TensorMut::bf16(&mut out16, &[5, HQ, D]).unwrap(),
        None,
    ));
    expect(e, Status::InvalidArgument, "differs from query dtype");
    // lse must be float32.
    let mut out = vec![0f32; 5 * HQ * D];
    let mut lse16 = vec![0u16; 5 * HQ];
    let e = err(attn.run(
        &plan,
        &cache,
        0,
        &TensorRef::f32(&q, &[5, HQ, D]).unwrap(),
        &mut TensorMut::f32(&mut out, &[5, HQ, D]).unwrap(),
        Some(&mut TensorMut::bf16(&mut lse16, &[5, HQ]).unwrap()),
    ));
    expect(e, Status::InvalidArgument, "lse: dtype must be float32");
    // A bf16 cache read by an f32-configured backend.
    let bf16_cache = f.cache(KvDtype::BF16);
    let e = err(attn.run(
        &plan,
        &bf16_cache,
        0,
        &TensorRef::f32(&q, &[5, HQ, D]).unwrap(),
        &mut TensorMut::f32(&mut out, &[5, HQ, D]).unwrap(),
        None,
    ));
    expect(e, Status::InvalidArgument, "does not match the backend");
    // A caller tensor of the wrong dtype for the cache.
    let o = KvCacheOptions::new(1, 4, 16, HK as i32, D as i32, KvDtype::BF16);
    let mut pages = vec![0f32; o.layer_shape().iter().product()];
    let e = err(KvCache::from_tensors(&f.ctx, &o, vec![TensorMut::f32(&mut pages, &o.layer_shape()).unwrap()]));
    expect(e, Status::InvalidArgument, "layer_tensors[0]");
}

#[test]
fn caller_tensors_must_match_the_options() {
    let ctx = Context::new().unwrap();
    let o = KvCacheOptions::new(2, 4, 16, HK as i32, D as i32, KvDtype::F32);
    let shape = o.layer_shape();
    let mut a = vec![0f32; shape.iter().product()];
    let e = err(KvCache::from_tensors(&ctx, &o, vec![TensorMut::f32(&mut a, &shape).unwrap()]));
    expect(e, Status::InvalidArgument, "num_layer_tensors=1");
    let mut b = vec![0f32; shape.iter().product()];
    let mut c = vec![0f32; shape.iter().product()];
    let wrong = [shape[0], shape[1], shape[2], shape[4], shape[3]];
    let e = err(KvCache::from_tensors(
        &ctx,
        &o,
        vec![TensorMut::f32(&mut b, &shape).unwrap(), TensorMut::f32(&mut c, &wrong).unwrap()],
    ));
    expect(e, Status::InvalidArgument, "layer_tensors[1]");
}

// ---------------------------------------------------------------- plans and call order

#[test]
fn plan_errors_empty_the_plan() {
    let f = Fixture::new(5);
    let (mut cache, attn) = (f.cache(KvDtype::F32), f.attn());
    let q = vec![0.5f32; 5 * HQ * D];
    let k = vec![0.5f32; 5 * HK * D];
    let mut out = vec![0f32; 5 * HQ * D];
    let mut plan = Plan::new(&f.ctx, &PlanOptions { max_num_seqs: 2, max_num_tokens: 32, max_num_blocks: 4 }).unwrap();
    let mut run = |plan: &Plan<'_>, cache: &KvCache<'_>| {
        attn.run(
            plan,
            cache,
            0,
            &TensorRef::f32(&q, &[5, HQ, D]).unwrap(),
            &mut TensorMut::f32(&mut out, &[5, HQ, D]).unwrap(),
            None,
        )
    };
    // Before any update.
    expect(err(run(&plan, &cache)), Status::FailedPrecondition, "kvp_plan_update");
    plan.update(&f.batch(&[0, 1])).unwrap();
    run(&plan, &cache).unwrap();
    // A length error found by the binding still empties the plan, as a failed C update does.
    let mut short = f.batch(&[0, 1]);
    short.query_start_loc = &[0];
    expect(err(plan.update(&short)), Status::InvalidArgument, "query_start_loc has 1 entries");
    expect(err(run(&plan, &cache)), Status::FailedPrecondition, "no batch");
    // Block table shorter than its stride claims.
    let mut bad_table = f.batch(&[0, 1]);
    bad_table.block_table = BlockTable::Dense { table: &[0], stride: 2 };
    expect(err(plan.update(&bad_table)), Status::InvalidArgument, "block_table has 1 entries");
    // CSR offsets past the index array.
    let mut bad_csr = f.batch(&[0, 1]);
    bad_csr.block_table = BlockTable::Csr { indptr: &[0, 3], indices: &[0, 1] };
    expect(err(plan.update(&bad_csr)), Status::InvalidArgument, "kv_indptr[1]=3");
    // Over the plan's capacity: the library's OutOfRange, and the plan is empty again.
    plan.update(&f.batch(&[0, 1])).unwrap();
    let mut big = f.batch(&[0, 1]);
    big.query_start_loc = &[0, 40];
    big.seq_lens = &[40];
    big.slot_mapping = None;
    expect(err(plan.update(&big)), Status::OutOfRange, "max_num_tokens=32");
    expect(err(run(&plan, &cache)), Status::FailedPrecondition, "no batch");
    // A batch referencing a block the cache lacks.
    plan.update(&f.batch(&[9, 1])).unwrap(); // 5 tokens: only the first entry is referenced
    expect(err(run(&plan, &cache)), Status::OutOfRange, "references block 9");
    // write_kv needs the plan's slot mapping.
    let mut no_slots = f.batch(&[0, 1]);
    no_slots.slot_mapping = None;
    plan.update(&no_slots).unwrap();
    let e = err(attn.write_kv(
        &plan,
        &mut cache,
        0,
        &TensorRef::f32(&k, &[5, HK, D]).unwrap(),
        &TensorRef::f32(&k, &[5, HK, D]).unwrap(),
    ));
    expect(e, Status::FailedPrecondition, "slot_mapping");
}

#[test]
fn layer_out_of_range() {
    let f = Fixture::new(5);
    let (mut cache, attn, plan) = (f.cache(KvDtype::F32), f.attn(), f.plan());
    let k = vec![0.5f32; 5 * HK * D];
    let e = err(attn.write_kv(
        &plan,
        &mut cache,
        2,
        &TensorRef::f32(&k, &[5, HK, D]).unwrap(),
        &TensorRef::f32(&k, &[5, HK, D]).unwrap(),
    ));
    expect(e, Status::OutOfRange, "layer=2");
    expect(err(cache.layer_view(-1, false)), Status::OutOfRange, "layer=-1");
    expect(err(cache.copy_blocks(&[BlockCopy { src: 0, dst: 4 }])), Status::OutOfRange, "4");
}

// ---------------------------------------------------------------- block manager

#[test]
fn exhausted_blocks_are_no_free_blocks_and_change_nothing() {
    let mut bm = BlockManager::new(&BlockManagerOptions::new(16, 4)).unwrap();
    bm.allocate_tokens(1, 48).unwrap(); // 3 of 4 blocks
    let before = bm.stats().unwrap();
    expect(err(bm.allocate_tokens(2, 32)), Status::NoFreeBlocks, "");
    assert_eq!(bm.stats().unwrap(), before, "a failed allocate changes nothing");
    expect(err(bm.num_tokens(2)), Status::NotFound, "2");
    // Appending past the pool: the sequence keeps its length.
    bm.append_tokens(1, 16).unwrap(); // fills the 4th block
    expect(err(bm.append_tokens(1, 1)), Status::NoFreeBlocks, "");
    assert_eq!(bm.num_tokens(1).unwrap(), 64);
    // No host pool: swapping out cannot be planned.
    expect(err(bm.swap_out(1)), Status::NoFreeBlocks, "");
    assert!(!bm.is_swapped(1).unwrap());
}

#[test]
fn unknown_sequences_are_not_found() {
    let mut bm = BlockManager::new(&BlockManagerOptions::new(16, 8)).unwrap();
    bm.allocate_tokens(1, 3).unwrap();
    expect(err(bm.free(42)), Status::NotFound, "42");
    expect(err(bm.num_tokens(42)), Status::NotFound, "42");
    expect(err(bm.block_table(42)), Status::NotFound, "42");
    expect(err(bm.append_tokens(42, 1)), Status::NotFound, "42");
    expect(err(bm.mark_computed(42, 1)), Status::NotFound, "42");
    expect(err(bm.slot_mapping(42, 0, 1)), Status::NotFound, "42");
    expect(err(bm.fork(42, 43)), Status::NotFound, "42");
    expect(err(bm.swap_in(42)), Status::NotFound, "42");
    expect(err(bm.block_tables(&[1, 42], 4)), Status::NotFound, "42");
    // Nothing above disturbed sequence 1.
    assert_eq!(bm.num_tokens(1).unwrap(), 3);
}

#[test]
fn sequence_state_errors() {
    let mut o = BlockManagerOptions::new(16, 8);
    o.num_host_blocks = 8;
    o.enable_prefix_caching = true;
    let mut bm = BlockManager::new(&o).unwrap();
    bm.allocate(1, &[1, 2, 3], 0).unwrap();
    expect(err(bm.allocate(1, &[4], 0)), Status::AlreadyExists, "1");
    expect(err(bm.fork(1, 1)), Status::AlreadyExists, "1");
    expect(err(bm.mark_computed(1, 4)), Status::OutOfRange, "");
    expect(err(bm.slot_mapping(1, 2, 2)), Status::OutOfRange, "");
    // Token ids are required with prefix caching.
    expect(err(bm.allocate_tokens(2, 3)), Status::InvalidArgument, "token_ids");
    expect(err(bm.allocate(3, &[], 0)), Status::InvalidArgument, "num_tokens=0");
    bm.swap_out(1).unwrap();
    expect(err(bm.swap_out(1)), Status::FailedPrecondition, "");
    expect(err(bm.mark_computed(1, 1)), Status::FailedPrecondition, "");
    // The binding's own check on caller-sized outputs.
    let mut small = [0i32; 1];
    expect(err(bm.block_tables_into(&[1], 4, &mut small, None)), Status::InvalidArgument, "out_table has 1 entries");
}

// ---------------------------------------------------------------- the Error type

#[test]
fn error_is_a_std_error_with_code_and_message() {
    fn fails() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let mut bm = BlockManager::new(&BlockManagerOptions::new(16, 8))?;
        bm.free(7)?;
        Ok(())
    }
    let e = fails().unwrap_err();
    let text = e.to_string();
    assert!(text.starts_with("KVP_ERR_NOT_FOUND: kvp_block_manager_free:"), "{text}");
    let e = e.downcast::<Error>().expect("boxed kvplug::Error");
    assert_eq!(e.code(), Status::NotFound);

    // The message is copied at the failure: later calls on this thread (which overwrite
    // kvp_last_error) do not change it.
    let mut bm = BlockManager::new(&BlockManagerOptions::new(16, 8)).unwrap();
    let first = err(bm.free(11));
    let second = err(bm.free(22));
    assert!(first.message.contains("11") && !first.message.contains("22"), "{first}");
    assert!(second.message.contains("22"), "{second}");
    assert_eq!(last_error(), second.message);
}
