//! Links against the built libkvplug and checks the loaded library agrees with these declarations at
//! run time (the header-drift test checks the header; this checks the binary the rpath finds).
use std::ffi::CStr;

use kvplug_sys::abi_description::ENUMS;
use kvplug_sys::*;

#[test]
fn loaded_library_has_this_abi_major_version() {
    // SAFETY: kvp_abi_version takes nothing and never fails.
    let v = unsafe { kvp_abi_version() };
    assert_eq!(v / 10000, KVP_ABI_VERSION_MAJOR, "library ABI {v}");
    assert!(v >= KVP_ABI_VERSION_NUMBER, "library ABI {v} is older than the header's {KVP_ABI_VERSION_NUMBER}");
}

#[test]
fn status_strings_name_the_rust_constants() {
    // kvp_status_string(value) must spell the same enumerator name Rust binds to that value.
    let status = ENUMS.iter().find(|e| e.name == "kvp_status").unwrap();
    for (name, value) in status.values {
        // SAFETY: static storage, never NULL (header).
        let s = unsafe { CStr::from_ptr(kvp_status_string(*value as kvp_status)) };
        assert_eq!(s.to_str().unwrap(), *name);
    }
    // SAFETY: as above; an unknown value is documented to give KVP_UNKNOWN_STATUS.
    let unknown = unsafe { CStr::from_ptr(kvp_status_string(12345)) };
    assert_eq!(unknown.to_str().unwrap(), "KVP_UNKNOWN_STATUS");
}

#[test]
fn raw_call_reports_errors_through_last_error() {
    // The raw path end to end: a NULL out pointer is rejected with a message naming it.
    // SAFETY: NULL is allowed as input (the function checks it); nothing is written.
    let s = unsafe { kvp_backend_count(core::ptr::null_mut()) };
    assert_eq!(s, KVP_ERR_INVALID_ARGUMENT);
    // SAFETY: never NULL, valid until the next kvplug call on this thread.
    let msg = unsafe { CStr::from_ptr(kvp_last_error()) }.to_str().unwrap().to_owned();
    assert!(msg.contains("out_count"), "{msg}");
}
