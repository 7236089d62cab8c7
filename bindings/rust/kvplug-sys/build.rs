// Links libkvplug.so from KVPLUG_LIB_DIR (default: the repository's build/abi, i.e.
// ../../../build/abi relative to this manifest) and bakes that directory in as an rpath, so this
// crate's own tests run without LD_LIBRARY_PATH. Dependents get the directory as
// DEP_KVPLUG_LIB_DIR (the `links = "kvplug"` metadata) and add the same rpath to their own test and
// example binaries (rustc-link-arg does not propagate to dependents).
use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=KVPLUG_LIB_DIR");
    println!("cargo:rerun-if-changed=build.rs");

    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let dir = match env::var_os("KVPLUG_LIB_DIR") {
        // A relative KVPLUG_LIB_DIR is taken relative to this crate's manifest directory (cargo runs
        // build scripts there), not to wherever cargo was invoked from.
        Some(d) if !d.is_empty() => manifest_dir.join(PathBuf::from(d)),
        _ => manifest_dir.join("../../../build/abi"),
    };
    // An absolute, normalized path for the rpath; a missing directory is reported, not fatal here
    // (the linker's "cannot find -lkvplug" then says the rest).
    let dir = match dir.canonicalize() {
        Ok(d) => d,
        Err(e) => {
            println!(
                "cargo:warning=KVPLUG_LIB_DIR {} is not usable ({e}); build libkvplug first \
                 (cmake --build build --target kvplug) or point KVPLUG_LIB_DIR at its directory",
                dir.display()
            );
            dir
        }
    };
    let dir = dir.to_str().expect("KVPLUG_LIB_DIR must be valid UTF-8").to_owned();

    println!("cargo:rustc-link-search=native={dir}");
    println!("cargo:rustc-link-lib=dylib=kvplug");
    // For this crate's own test binaries.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    // Exposed to dependents' build scripts as DEP_KVPLUG_LIB_DIR.
    println!("cargo:lib_dir={dir}");
}
