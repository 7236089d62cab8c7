// rustc-link-arg in kvplug-sys's build script applies to that crate's own binaries only, so this
// crate's tests, doctests and examples get the same rpath here, from the directory kvplug-sys linked
// (its `links = "kvplug"` metadata, DEP_KVPLUG_LIB_DIR): they run without LD_LIBRARY_PATH.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_KVPLUG_LIB_DIR");
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(dir) = std::env::var("DEP_KVPLUG_LIB_DIR") {
        // Applies to every binary this package links: tests, examples, benches.
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
