//! The compiling counterparts of the `compile_fail` examples in src/lib.rs: the same programs,
//! minus the line that breaks a borrow, build and run. (A compile_fail doctest passes on any
//! compile error; these show the examples fail only because of the line they point at.)
use kvplug::*;

#[test]
fn cache_dropped_before_its_context() {
    let ctx = Context::new().unwrap();
    let cache = KvCache::new(&ctx, &KvCacheOptions::new(1, 4, 16, 1, 64, KvDtype::F32)).unwrap();
    assert_eq!(cache.options().num_blocks, 4);
    drop(cache);
    drop(ctx);
}

#[test]
fn caller_pages_readable_after_the_cache_is_dropped() {
    let ctx = Context::new().unwrap();
    let o = KvCacheOptions::new(1, 4, 16, 1, 64, KvDtype::F32);
    let mut pages = vec![0f32; 2 * 4 * 16 * 64];
    let mut cache =
        KvCache::from_tensors(&ctx, &o, vec![TensorMut::f32(&mut pages, &o.layer_shape()).unwrap()]).unwrap();
    let k = vec![2.5f32; 64];
    cache.write(0, &TensorRef::f32(&k, &[1, 1, 64]).unwrap(), &TensorRef::f32(&k, &[1, 1, 64]).unwrap(), &[0]).unwrap();
    drop(cache);
    // The write landed in the caller's pages (key of slot 0 is their first 64 floats).
    let first = pages[0];
    assert_eq!(first, 2.5);
    assert!(pages[..64].iter().all(|&x| x == 2.5));
}
