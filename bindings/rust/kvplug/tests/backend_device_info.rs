//! `backend_device_info`: per-device capabilities (ABI 0.3).
use kvplug::*;

#[test]
fn dense_on_the_cpu() {
    let info = backend_device_info("dense", DeviceType::Cpu).unwrap();
    assert_eq!(info.device, DeviceType::Cpu);
    assert!(info.available);
    assert!(info.supports_head_size(128) && info.supports_head_size(64), "{:?}", info.head_sizes);
    assert!(!info.supports_head_size(48), "{:?}", info.head_sizes);
    assert!(info.supports_dtype(KvDtype::F32) && info.supports_dtype(KvDtype::BF16));
    assert!(!info.supports_dtype(KvDtype::Fp8E4m3), "fp8 caches are CUDA only (header)");
    assert!(info.supports_lse && info.supports_entropy);
    assert!(!info.experimental, "dense is stable");
    // backend_info lists the CPU's head sizes (header): the two queries agree.
    assert_eq!(info.head_sizes, backend_info("dense").unwrap().head_sizes);
}

#[test]
fn every_backend_runs_on_the_cpu() {
    for name in backend_names().unwrap() {
        let info = backend_device_info(name, DeviceType::Cpu).unwrap();
        assert!(info.available && !info.head_sizes.is_empty(), "{name}: {info:?}");
    }
}

#[test]
fn cuda_is_unavailable_in_a_cpu_build() {
    let info = backend_device_info("dense", DeviceType::Cuda).unwrap();
    assert_eq!(info.device, DeviceType::Cuda);
    if version_string().contains("(cpu)") {
        assert!(!info.available, "{info:?}");
        assert!(info.head_sizes.is_empty() && info.dtype_mask == 0, "{info:?}");
    } else {
        assert!(info.available && info.supports_head_size(128), "{info:?}");
    }
}

#[test]
fn unknown_or_malformed_names() {
    let e = backend_device_info("no_such_backend", DeviceType::Cpu).unwrap_err();
    assert_eq!(e.code, Status::NotFound, "{e}");
    assert!(e.message.contains("no_such_backend"), "{}", e.message);
    let e = backend_device_info("dense\0x", DeviceType::Cpu).unwrap_err();
    assert_eq!(e.code, Status::InvalidArgument, "{e}");
    assert!(e.message.contains("NUL"), "{}", e.message);
}
