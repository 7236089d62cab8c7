// Finds libkvplug.so, in this order:
//   1. KVPLUG_LIB_DIR, the directory holding it (a relative one is taken from this manifest's
//      directory), e.g. a CMake build's abi/ folder;
//   2. pkg-config: `pkg-config --libs --cflags kvplug` (an installed kvplug: `cmake --install`
//      writes <prefix>/lib/pkgconfig/kvplug.pc; point PKG_CONFIG_PATH there for a private prefix).
//      PKG_CONFIG names another pkg-config program. Run as a process: no crate is needed;
//   3. the repository's build/abi (../../../build/abi from this manifest), as before pkg-config,
//      with a warning.
// The library's directory is baked in as an rpath, so this crate's own tests run without
// LD_LIBRARY_PATH. Dependents get it as DEP_KVPLUG_LIB_DIR (the `links = "kvplug"` metadata) and add
// the same rpath to their own test and example binaries (rustc-link-arg does not propagate to
// dependents).
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What to link: directories to search and libraries to link, with the directory for the rpath.
struct Found {
    search_dirs: Vec<String>,
    libs: Vec<String>,
    rpath_dir: String,
}

fn main() {
    println!("cargo:rerun-if-env-changed=KVPLUG_LIB_DIR");
    for var in ["PKG_CONFIG", "PKG_CONFIG_PATH", "PKG_CONFIG_LIBDIR", "PKG_CONFIG_SYSROOT_DIR"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=build.rs");

    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let found = match env::var_os("KVPLUG_LIB_DIR") {
        // A relative KVPLUG_LIB_DIR is taken relative to this crate's manifest directory (cargo runs
        // build scripts there), not to wherever cargo was invoked from.
        Some(d) if !d.is_empty() => from_dir(&manifest_dir.join(PathBuf::from(d)), "KVPLUG_LIB_DIR"),
        _ => match pkg_config() {
            Ok(found) => found,
            Err(why) => {
                let repo_build = manifest_dir.join("../../../build/abi");
                if !repo_build.join("libkvplug.so").exists() {
                    panic!(
                        "kvplug-sys: libkvplug not found. Set KVPLUG_LIB_DIR to the directory holding \
                         libkvplug.so (a CMake build's abi/), or install kvplug (cmake --install BUILD \
                         --prefix PREFIX) and let pkg-config find it (PKG_CONFIG_PATH=PREFIX/lib/pkgconfig). \
                         pkg-config: {why}"
                    );
                }
                println!(
                    "cargo:warning=pkg-config did not find kvplug ({why}); linking the repository's \
                     build/abi instead (set KVPLUG_LIB_DIR or PKG_CONFIG_PATH to choose)"
                );
                from_dir(&repo_build, "the repository's build/abi")
            }
        },
    };

    for dir in &found.search_dirs {
        println!("cargo:rustc-link-search=native={dir}");
    }
    for lib in &found.libs {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
    // For this crate's own test binaries.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", found.rpath_dir);
    // Exposed to dependents' build scripts as DEP_KVPLUG_LIB_DIR.
    println!("cargo:lib_dir={}", found.rpath_dir);
}

/// A directory given explicitly: `-L dir -lkvplug`, with `dir` as the rpath.
fn from_dir(dir: &Path, what: &str) -> Found {
    // An absolute, normalized path for the rpath; a missing directory is reported, not fatal here
    // (the linker's "cannot find -lkvplug" then says the rest).
    let dir = match dir.canonicalize() {
        Ok(d) => d,
        Err(e) => {
            println!(
                "cargo:warning={what} {} is not usable ({e}); build libkvplug first \
                 (cmake --build build --target kvplug) or point KVPLUG_LIB_DIR at its directory",
                dir.display()
            );
            dir.to_path_buf()
        }
    };
    let dir = dir.to_str().expect("KVPLUG_LIB_DIR must be valid UTF-8").to_owned();
    Found { search_dirs: vec![dir.clone()], libs: vec!["kvplug".into()], rpath_dir: dir }
}

/// `pkg-config --libs --cflags kvplug`: its -L directories and -l libraries (the -I flags do not
/// concern Rust), and `--variable=libdir` for the rpath.
fn pkg_config() -> Result<Found, String> {
    let program = env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".into());
    let run = |args: &[&str]| -> Result<String, String> {
        let out = Command::new(&program).args(args).output().map_err(|e| format!("cannot run `{program}`: {e}"))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(format!("`{program} {}` failed: {}", args.join(" "), err.trim()));
        }
        String::from_utf8(out.stdout).map_err(|_| format!("`{program}` printed non-UTF-8"))
    };
    let flags = run(&["--libs", "--cflags", "kvplug"])?;
    let libdir = run(&["--variable=libdir", "kvplug"])?.trim().to_owned();
    let mut found = Found { search_dirs: Vec::new(), libs: Vec::new(), rpath_dir: libdir };
    for flag in flags.split_whitespace() {
        if let Some(dir) = flag.strip_prefix("-L") {
            found.search_dirs.push(dir.to_owned());
        } else if let Some(lib) = flag.strip_prefix("-l") {
            found.libs.push(lib.to_owned());
        }
    }
    if !found.libs.iter().any(|l| l == "kvplug") {
        return Err(format!("`{program} --libs kvplug` names no -lkvplug: {}", flags.trim()));
    }
    if found.rpath_dir.is_empty() {
        found.rpath_dir = found.search_dirs.first().cloned().unwrap_or_default();
    }
    if found.rpath_dir.is_empty() {
        return Err("kvplug.pc gives neither libdir nor -L".into());
    }
    // kvplug.pc is relocatable (prefix = ${pcfiledir}/../..): normalize for a readable rpath.
    if let Ok(dir) = Path::new(&found.rpath_dir).canonicalize() {
        if let Some(dir) = dir.to_str() {
            found.rpath_dir = dir.to_owned();
        }
    }
    Ok(found)
}
