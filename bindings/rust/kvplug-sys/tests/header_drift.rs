//! Header-drift test: fails when `kvplug.h` changes in a way the Rust declarations do not match.
//!
//! Two independent views of the header are compared with `kvplug_sys::abi_description` (which the
//! declaring macros build, so it always describes exactly what Rust declares):
//!  1. The header text: the names of every `KVP_API` function, every struct and its fields in order,
//!     every opaque handle, every enum and its enumerators, every `KVP_*` value macro
//!     (`KVP_ABI_VERSION_*`, `KVP_NCCL_UNIQUE_ID_BYTES`). Catches
//!     additions and removals on either side (an added trailing field, a new function).
//!  2. The C compiler: a generated C program includes the header and prints sizeof/alignof of every
//!     struct, offsetof/sizeof of every field, whether each field's C type is compatible with the
//!     Rust type (`__builtin_types_compatible_p`), each enum's size, signedness and enumerator
//!     values, each value macro, and whether each function's type is compatible with the Rust
//!     signature. Catches changed types, values and layouts even where sizes happen to agree.
//!
//! Environment: KVPLUG_HEADER_DIR (default ../../../abi/include from this crate) holds
//! kvplug/kvplug.h; DLPACK_INCLUDE_DIR (default /usr/include) holds dlpack/dlpack.h; CC (default cc).
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use kvplug_sys::abi_description::{ENUMS, FUNCTIONS, MACROS, OPAQUE, STRUCTS};

fn header_dir() -> PathBuf {
    match std::env::var_os("KVPLUG_HEADER_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../abi/include"),
    }
}

fn dlpack_dir() -> PathBuf {
    std::env::var_os("DLPACK_INCLUDE_DIR").map(PathBuf::from).unwrap_or_else(|| "/usr/include".into())
}

// ------------------------------------------------------------------------------------------------
// 1. What the header text declares.
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct HeaderDecls {
    functions: Vec<String>,
    structs: BTreeMap<String, Vec<String>>, // name -> field names in order
    opaque: BTreeSet<String>,
    enums: BTreeMap<String, Vec<String>>, // name -> enumerator names in order
    macros: BTreeSet<String>,             // every `#define KVP_*` but KVP_API
}

/// Removes /* */ and // comments (the header has no string literals containing them).
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"/*") {
            let end = text[i + 2..].find("*/").map(|e| i + 2 + e + 2).unwrap_or(b.len());
            out.push(' ');
            // Keep line structure so preprocessor lines stay recognizable.
            out.extend(text[i..end].chars().filter(|&c| c == '\n'));
            i = end;
        } else if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else {
            let c = text[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The last identifier in `s` (a field or function name in a declaration).
fn last_ident(s: &str) -> String {
    let s = s.trim_end_matches(|c: char| !is_ident_char(c));
    let start = s.rfind(|c: char| !is_ident_char(c)).map(|p| p + 1).unwrap_or(0);
    s[start..].to_string()
}

fn parse_header(text: &str) -> HeaderDecls {
    let text = strip_comments(text);
    let mut d = HeaderDecls::default();
    // Preprocessor lines (with continuations) are set aside: only value macros matter there, and
    // `#define KVP_API ...` must not be mistaken for a declaration.
    let mut code = String::new();
    let mut in_directive = false;
    for line in text.lines() {
        let t = line.trim_start();
        if in_directive || t.starts_with('#') {
            if let Some(rest) = t.strip_prefix("#define") {
                let name: String = rest.trim_start().chars().take_while(|&c| is_ident_char(c)).collect();
                if name.starts_with("KVP_") && name != "KVP_API" {
                    d.macros.insert(name);
                }
            }
            in_directive = t.ends_with('\\');
            continue;
        }
        code.push_str(line);
        code.push('\n');
    }
    let flat: String = code.split_whitespace().collect::<Vec<_>>().join(" ");

    // Functions: `KVP_API <return type> name(`.
    for (pos, _) in flat.match_indices("KVP_API ") {
        let rest = &flat[pos..];
        let paren = rest.find('(').expect("KVP_API declaration without '('");
        d.functions.push(last_ident(&rest[..paren]));
    }
    // Structs and opaque handles: `typedef struct NAME { ... } NAME;` or `typedef struct NAME NAME;`.
    for (pos, _) in flat.match_indices("typedef struct ") {
        let rest = &flat[pos + "typedef struct ".len()..];
        let name: String = rest.chars().take_while(|&c| is_ident_char(c)).collect();
        let after = rest[name.len()..].trim_start();
        if after.starts_with('{') {
            let body = &after[1..after.find('}').expect("unterminated struct")];
            let fields = body.split(';').map(str::trim).filter(|f| !f.is_empty()).map(last_ident).collect();
            d.structs.insert(name, fields);
        } else {
            d.opaque.insert(name);
        }
    }
    // Enums: `typedef enum NAME { A = 0, B = 1 } NAME;`.
    for (pos, _) in flat.match_indices("typedef enum ") {
        let rest = &flat[pos + "typedef enum ".len()..];
        let name: String = rest.chars().take_while(|&c| is_ident_char(c)).collect();
        let after = rest[name.len()..].trim_start();
        let body = &after[1..after.find('}').expect("unterminated enum")];
        let values = body
            .split(',')
            .map(|e| e.split('=').next().unwrap().trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        d.enums.insert(name, values);
    }
    d
}

fn compare_lists(what: &str, header: &[String], rust: &[String], failures: &mut Vec<String>) {
    let h: BTreeSet<&String> = header.iter().collect();
    let r: BTreeSet<&String> = rust.iter().collect();
    for missing in h.difference(&r) {
        failures.push(format!("{what}: `{missing}` is in the header but not declared in Rust"));
    }
    for extra in r.difference(&h) {
        failures.push(format!("{what}: `{extra}` is declared in Rust but not in the header"));
    }
    if h == r && header != rust {
        failures.push(format!("{what}: order differs: header {header:?}, Rust {rust:?}"));
    }
}

// ------------------------------------------------------------------------------------------------
// 2. What the C compiler says.
// ------------------------------------------------------------------------------------------------

/// The C spelling of a Rust type as written in the declarations (`*mut *const c_char` ->
/// `const char**`). Type aliases (kvp_status, DLDeviceType, ...) keep their names: C has them too.
fn c_type(rust: &str) -> String {
    let t = rust.trim();
    if let Some(rest) = t.strip_prefix('*') {
        let rest = rest.trim_start();
        let (is_const, inner) = if let Some(r) = rest.strip_prefix("const") {
            (true, r.trim_start())
        } else {
            (false, rest.strip_prefix("mut").expect("raw pointer without const/mut").trim_start())
        };
        return match (is_const, inner.starts_with('*')) {
            (true, true) => format!("{} const*", c_type(inner)),
            (true, false) => format!("const {}*", c_type(inner)),
            (false, _) => format!("{}*", c_type(inner)),
        };
    }
    match t {
        "i8" => "int8_t",
        "u8" => "uint8_t",
        "i16" => "int16_t",
        "u16" => "uint16_t",
        "i32" => "int32_t",
        "u32" => "uint32_t",
        "i64" => "int64_t",
        "u64" => "uint64_t",
        "usize" => "size_t",
        "isize" => "ptrdiff_t",
        "f32" => "float",
        "f64" => "double",
        "c_char" => "char",
        "c_int" => "int",
        "c_uint" => "unsigned int",
        "c_void" => "void",
        other => other,
    }
    .to_string()
}

#[test]
fn c_type_spelling() {
    // The mapping itself: a wrong spelling would make every signature check meaningless.
    assert_eq!(c_type("*mut *const c_char"), "const char**");
    assert_eq!(c_type("* const DLTensor"), "const DLTensor*");
    assert_eq!(c_type("*mut *mut kvp_context"), "kvp_context**");
    assert_eq!(c_type("*const *const c_char"), "const char* const*");
    assert_eq!(c_type("usize"), "size_t");
}

fn generate_c(h: &HeaderDecls) -> String {
    let mut c = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include <stdint.h>\n#include <kvplug/kvplug.h>\n\
         #define COMPAT(a, b) __builtin_types_compatible_p(a, b)\nint main(void) {\n",
    );
    for s in STRUCTS {
        // DLPack structs are not parsed from text (a pinned system header); check all their fields.
        let header_fields = if s.name.starts_with("DL") {
            None
        } else {
            match h.structs.get(s.name) {
                Some(f) => Some(f),
                None => continue, // reported by the name comparison; would not compile
            }
        };
        c += &format!("  printf(\"S {n} %zu %zu\\n\", sizeof({n}), (size_t)_Alignof({n}));\n", n = s.name);
        for f in s.fields {
            if header_fields.is_some_and(|hf| !hf.iter().any(|x| x == f.name)) {
                continue;
            }
            c += &format!(
                "  printf(\"F {s}.{f} %zu %zu %d\\n\", offsetof({s}, {f}), sizeof((({s}*)0)->{f}), \
                 COMPAT(__typeof__((({s}*)0)->{f}), {t}));\n",
                s = s.name,
                f = f.name,
                t = c_type(f.ty)
            );
        }
    }
    for e in ENUMS {
        let header_values = if e.name.starts_with("DL") {
            None
        } else {
            match h.enums.get(e.name) {
                Some(v) => Some(v),
                None => continue,
            }
        };
        c += &format!("  printf(\"E {n} %zu %d\\n\", sizeof({n}), (int)(({n})-1 < 0));\n", n = e.name);
        for (name, _) in e.values {
            if header_values.is_some_and(|hv| !hv.iter().any(|x| x == name)) {
                continue;
            }
            c += &format!("  printf(\"C {name} %lld\\n\", (long long){name});\n");
        }
    }
    for (name, _) in MACROS {
        if h.macros.contains(*name) {
            c += &format!("  printf(\"V {name} %lld\\n\", (long long)({name}));\n");
        }
    }
    for f in FUNCTIONS {
        if !h.functions.iter().any(|x| x == f.name) {
            continue;
        }
        let args: Vec<String> = f.args.iter().map(|(_, t)| c_type(t)).collect();
        let args = if args.is_empty() { "void".to_string() } else { args.join(", ") };
        c += &format!(
            "  printf(\"P {n} %d\\n\", COMPAT(__typeof__(&{n}), {r} (*)({args})));\n",
            n = f.name,
            r = c_type(f.ret)
        );
    }
    c += "  return 0;\n}\n";
    c
}

/// A fresh scratch directory: tests run on parallel threads of one process.
fn scratch_dir(what: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{what}_{}_{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run_c(source: &str, include_dir: &Path) -> String {
    let dir = scratch_dir("header_drift");
    let src = dir.join("layout.c");
    let exe = dir.join("layout");
    std::fs::write(&src, source).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .arg("-std=gnu11")
        .arg("-Wall")
        .arg("-I")
        .arg(include_dir)
        .arg("-I")
        .arg(dlpack_dir())
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e}"));
    assert!(
        out.status.success(),
        "compiling the layout probe against {} failed:\n{}\n--- source ---\n{source}",
        include_dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().expect("run the layout probe");
    assert!(run.status.success(), "layout probe failed: {:?}", run.status);
    let _ = std::fs::remove_dir_all(&dir);
    String::from_utf8(run.stdout).unwrap()
}

/// Every mismatch between the Rust declarations and `include_dir/kvplug/kvplug.h`.
fn drift(include_dir: &Path) -> Vec<String> {
    let path = include_dir.join("kvplug/kvplug.h");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let h = parse_header(&text);
    // Guard the parser itself: an empty parse would make every comparison vacuous.
    assert!(h.functions.len() >= 40 && h.structs.len() >= 9 && h.enums.len() >= 5, "parse looks wrong: {h:?}");

    let mut failures = Vec::new();

    // --- 1. names, from the text ---
    let rust_fns: Vec<String> = FUNCTIONS.iter().map(|f| f.name.to_string()).collect();
    compare_lists("function", &h.functions, &rust_fns, &mut failures);

    let rust_structs: Vec<String> =
        STRUCTS.iter().filter(|s| !s.name.starts_with("DL")).map(|s| s.name.to_string()).collect();
    let header_structs: Vec<String> = h.structs.keys().cloned().collect();
    let mut sorted_rust_structs = rust_structs.clone();
    sorted_rust_structs.sort();
    compare_lists("struct", &header_structs, &sorted_rust_structs, &mut failures);
    for s in STRUCTS.iter().filter(|s| !s.name.starts_with("DL")) {
        if let Some(hf) = h.structs.get(s.name) {
            let rf: Vec<String> = s.fields.iter().map(|f| f.name.to_string()).collect();
            compare_lists(&format!("field of {}", s.name), hf, &rf, &mut failures);
        }
    }

    let header_opaque: Vec<String> = h.opaque.iter().cloned().collect();
    let mut rust_opaque: Vec<String> = OPAQUE.iter().map(|s| s.to_string()).collect();
    rust_opaque.sort();
    compare_lists("opaque handle", &header_opaque, &rust_opaque, &mut failures);

    let header_enums: Vec<String> = h.enums.keys().cloned().collect();
    let mut rust_enums: Vec<String> =
        ENUMS.iter().filter(|e| !e.name.starts_with("DL")).map(|e| e.name.to_string()).collect();
    rust_enums.sort();
    compare_lists("enum", &header_enums, &rust_enums, &mut failures);
    for e in ENUMS.iter().filter(|e| !e.name.starts_with("DL")) {
        if let Some(hv) = h.enums.get(e.name) {
            let rv: Vec<String> = e.values.iter().map(|(n, _)| n.to_string()).collect();
            compare_lists(&format!("enumerator of {}", e.name), hv, &rv, &mut failures);
        }
    }

    let header_macros: Vec<String> = h.macros.iter().cloned().collect();
    let mut rust_macros: Vec<String> = MACROS.iter().map(|(n, _)| n.to_string()).collect();
    rust_macros.sort();
    compare_lists("value macro", &header_macros, &rust_macros, &mut failures);

    // --- 2. layouts, types and values, from the C compiler ---
    let output = run_c(&generate_c(&h), include_dir);
    let mut seen = 0usize;
    for line in output.lines() {
        let p: Vec<&str> = line.split_whitespace().collect();
        seen += 1;
        match p[0] {
            "S" => {
                let s = STRUCTS.iter().find(|s| s.name == p[1]).unwrap();
                let (size, align): (usize, usize) = (p[2].parse().unwrap(), p[3].parse().unwrap());
                if (size, align) != (s.size, s.align) {
                    failures.push(format!(
                        "struct {}: C sizeof={size} alignof={align}, Rust size_of={} align_of={}",
                        s.name, s.size, s.align
                    ));
                }
            }
            "F" => {
                let (sname, fname) = p[1].split_once('.').unwrap();
                let s = STRUCTS.iter().find(|s| s.name == sname).unwrap();
                let f = s.fields.iter().find(|f| f.name == fname).unwrap();
                let (off, size, compat): (usize, usize, i32) =
                    (p[2].parse().unwrap(), p[3].parse().unwrap(), p[4].parse().unwrap());
                if off != f.offset || size != f.size {
                    failures.push(format!(
                        "field {sname}.{fname}: C offsetof={off} sizeof={size}, Rust offset_of={} size_of={}",
                        f.offset, f.size
                    ));
                }
                if compat != 1 {
                    failures.push(format!(
                        "field {sname}.{fname}: its C type is not compatible with Rust `{}` (C `{}`)",
                        f.ty,
                        c_type(f.ty)
                    ));
                }
            }
            "E" => {
                let e = ENUMS.iter().find(|e| e.name == p[1]).unwrap();
                let (size, signed): (usize, bool) = (p[2].parse().unwrap(), p[3] == "1");
                if size != e.size || signed != e.signed {
                    failures.push(format!(
                        "enum {}: C sizeof={size} signed={signed}, Rust size_of={} signed={}",
                        e.name, e.size, e.signed
                    ));
                }
            }
            "C" => {
                let value: i64 = p[2].parse().unwrap();
                let rust = ENUMS.iter().flat_map(|e| e.values.iter()).find(|(n, _)| *n == p[1]).unwrap().1;
                if value != rust {
                    failures.push(format!("constant {}: C {value}, Rust {rust}", p[1]));
                }
            }
            "V" => {
                let value: i64 = p[2].parse().unwrap();
                let rust = MACROS.iter().find(|(n, _)| *n == p[1]).unwrap().1;
                if value != rust {
                    failures.push(format!("macro {}: C {value}, Rust {rust}", p[1]));
                }
            }
            "P" => {
                if p[2] != "1" {
                    let f = FUNCTIONS.iter().find(|f| f.name == p[1]).unwrap();
                    let args: Vec<String> = f.args.iter().map(|(n, t)| format!("{n}: {t}")).collect();
                    failures.push(format!(
                        "function {}: the header's type differs from Rust `fn({}) -> {}`",
                        f.name,
                        args.join(", "),
                        f.ret
                    ));
                }
            }
            other => panic!("unexpected probe line kind {other}"),
        }
    }
    // Every declaration produced at least one line (sanity: the probe really ran over them).
    let fields: usize = STRUCTS.iter().map(|s| 1 + s.fields.len()).sum();
    let consts: usize = ENUMS.iter().map(|e| 1 + e.values.len()).sum();
    let expected = fields + consts + MACROS.len() + FUNCTIONS.len();
    if failures.is_empty() && seen != expected {
        failures.push(format!("the probe printed {seen} lines, expected {expected}:\n{output}"));
    }
    failures
}

#[test]
fn rust_declarations_match_the_header() {
    let failures = drift(&header_dir());
    assert!(
        failures.is_empty(),
        "kvplug-sys does not match {} ({} mismatches):\n  {}",
        header_dir().join("kvplug/kvplug.h").display(),
        failures.len(),
        failures.join("\n  ")
    );
}

// ------------------------------------------------------------------------------------------------
// The check itself: edited copies of the real header must each be caught, so a silent gap in the
// parser or the probe (e.g. for the ABI 0.3 additions) fails here rather than passing vacuously.
// ------------------------------------------------------------------------------------------------

/// `text` with `from` (which must occur exactly once, so an edit never silently stops applying)
/// replaced by `to`.
fn edit(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "the header no longer holds exactly one {from:?}");
    text.replacen(from, to, 1)
}

/// Writes `text` as kvplug/kvplug.h of a scratch include directory and returns its mismatches.
fn drift_of(text: &str) -> Vec<String> {
    let dir = scratch_dir("mutated_header");
    std::fs::create_dir_all(dir.join("kvplug")).unwrap();
    std::fs::write(dir.join("kvplug/kvplug.h"), text).unwrap();
    let failures = drift(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    failures
}

#[test]
fn abi_0_3_additions_are_declared() {
    let text = std::fs::read_to_string(header_dir().join("kvplug/kvplug.h")).unwrap();
    let h = parse_header(&text);
    for f in [
        "kvp_backend_device_info_get",
        "kvp_plan_attach",
        "kvp_attention_run_v2",
        "kvp_attention_merge_states",
        "kvp_attention_state_bytes",
    ] {
        assert!(h.functions.iter().any(|x| x == f), "the header parse lacks {f}");
        assert!(FUNCTIONS.iter().any(|x| x.name == f), "kvplug-sys lacks {f}");
    }
    for s in ["kvp_backend_device_info", "kvp_attention_outputs", "kvp_merge_states_args"] {
        assert!(h.structs.contains_key(s), "the header parse lacks struct {s}");
        let rust = STRUCTS.iter().find(|x| x.name == s).unwrap_or_else(|| panic!("kvplug-sys lacks struct {s}"));
        assert_eq!(rust.fields.first().map(|f| f.name), Some("struct_size"), "{s}");
    }
    assert!(kvplug_sys::KVP_ABI_VERSION_MINOR >= 3);
}

#[test]
fn abi_0_4_additions_are_declared() {
    let text = std::fs::read_to_string(header_dir().join("kvplug/kvplug.h")).unwrap();
    let h = parse_header(&text);
    for f in [
        "kvp_comm_nccl_unique_id",
        "kvp_comm_create",
        "kvp_comm_destroy",
        "kvp_comm_merge_attention",
        "kvp_comm_pending",
        "kvp_block_manager_allocate_star",
    ] {
        assert!(h.functions.iter().any(|x| x == f), "the header parse lacks {f}");
        assert!(FUNCTIONS.iter().any(|x| x.name == f), "kvplug-sys lacks {f}");
    }
    for s in ["kvp_comm_options", "kvp_star_layout"] {
        assert!(h.structs.contains_key(s), "the header parse lacks struct {s}");
        let rust = STRUCTS.iter().find(|x| x.name == s).unwrap_or_else(|| panic!("kvplug-sys lacks struct {s}"));
        assert_eq!(rust.fields.first().map(|f| f.name), Some("struct_size"), "{s}");
    }
    // kvp_batch's two trailing fields, last and in order.
    let batch: Vec<&str> =
        STRUCTS.iter().find(|x| x.name == "kvp_batch").unwrap().fields.iter().map(|f| f.name).collect();
    assert_eq!(batch[batch.len() - 2..], ["context_lens", "query_pos_starts"]);
    assert_eq!(h.structs["kvp_batch"][h.structs["kvp_batch"].len() - 2..], ["context_lens", "query_pos_starts"]);
    // kvp_attention_outputs' trailing entropy_summary, last on both sides.
    let outputs: Vec<&str> =
        STRUCTS.iter().find(|x| x.name == "kvp_attention_outputs").unwrap().fields.iter().map(|f| f.name).collect();
    assert_eq!(outputs, ["struct_size", "out", "lse", "entropy", "entropy_summary"]);
    assert_eq!(h.structs["kvp_attention_outputs"], outputs);
    assert!(h.opaque.contains("kvp_comm") && OPAQUE.contains(&"kvp_comm"));
    assert!(h.enums.contains_key("kvp_comm_kind"));
    assert!(h.macros.contains("KVP_NCCL_UNIQUE_ID_BYTES"));
    assert_eq!(kvplug_sys::KVP_NCCL_UNIQUE_ID_BYTES, 128);
    assert!(kvplug_sys::KVP_ABI_VERSION_MINOR >= 4);
}

#[test]
fn abi_0_5_additions_are_declared() {
    let text = std::fs::read_to_string(header_dir().join("kvplug/kvplug.h")).unwrap();
    let h = parse_header(&text);
    // In header order, right after kvp_attention_state_bytes.
    let at = |names: &[String]| names.iter().position(|x| x == "kvp_attention_state_bytes").unwrap();
    let rust: Vec<String> = FUNCTIONS.iter().map(|f| f.name.to_string()).collect();
    for names in [&h.functions, &rust] {
        let i = at(names);
        assert_eq!(names[i + 1..i + 3], ["kvp_attention_cache_layout", "kvp_attention_ssm"]);
    }
    let fields = |s: &str| -> Vec<&str> {
        STRUCTS
            .iter()
            .find(|x| x.name == s)
            .unwrap_or_else(|| panic!("kvplug-sys lacks {s}"))
            .fields
            .iter()
            .map(|f| f.name)
            .collect()
    };
    let layout = fields("kvp_cache_layout");
    assert_eq!(
        layout,
        [
            "struct_size",
            "seq_len",
            "num_pages",
            "compressed_rows",
            "compressed_pages",
            "stable_rows",
            "window_first_page",
            "window_pages"
        ]
    );
    assert_eq!(h.structs["kvp_cache_layout"], layout);
    // `in` is a Rust keyword: declared as r#in, recorded (and compared) under its C name.
    let ssm = fields("kvp_ssm_args");
    assert_eq!(
        ssm,
        ["struct_size", "which", "in", "conv_weight", "conv_bias", "dt_bias", "a_log", "d_skip", "norm_weight", "out"]
    );
    assert_eq!(h.structs["kvp_ssm_args"], ssm);
    assert_eq!(kvplug_sys::strip_raw("r#in"), "in");
    assert_eq!(kvplug_sys::strip_raw("which"), "which");
    assert_eq!(std::mem::size_of::<kvplug_sys::kvp_cache_layout>(), 8 + 7 * 4 + 4);
    assert_eq!(std::mem::size_of::<kvplug_sys::kvp_ssm_args>(), 8 + 8 + 8 * 8);
    assert_eq!(std::mem::offset_of!(kvplug_sys::kvp_ssm_args, r#in), 16);
    assert_eq!(kvplug_sys::KVP_ABI_VERSION_MINOR, 5);
}

#[test]
fn drift_in_the_abi_0_3_additions_is_caught() {
    let text = std::fs::read_to_string(header_dir().join("kvplug/kvplug.h")).unwrap();
    // The unedited copy passes, so each failure below comes from its edit alone.
    assert_eq!(drift_of(&text), Vec::<String>::new());
    let attach = "KVP_API kvp_status kvp_plan_attach(kvp_plan* plan, const kvp_attention* attention);\n";
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "a field's type",
            edit(&text, "int32_t supports_entropy;", "uint32_t supports_entropy;"),
            "field kvp_backend_device_info.supports_entropy: its C type is not compatible",
        ),
        (
            "a field's constness",
            edit(&text, "const DLTensor* partial_out;", "DLTensor* partial_out;"),
            "field kvp_merge_states_args.partial_out: its C type is not compatible",
        ),
        (
            "a renamed field",
            edit(&text, "DLTensor* entropy;  /* optional [num_tokens", "DLTensor* entropies;  /* optional [num_tokens"),
            "field of kvp_attention_outputs: `entropies` is in the header but not declared in Rust",
        ),
        (
            "an added trailing field (its name)",
            edit(
                &text,
                "  DLTensor* entropy;                /* optional [T, H] float32 */\n",
                "  DLTensor* entropy;\n  int32_t flags;\n",
            ),
            "field of kvp_merge_states_args: `flags` is in the header but not declared in Rust",
        ),
        (
            "an added trailing field (the size)",
            edit(
                &text,
                "  DLTensor* entropy;                /* optional [T, H] float32 */\n",
                "  DLTensor* entropy;\n  int32_t flags;\n",
            ),
            "struct kvp_merge_states_args: C sizeof=64",
        ),
        (
            "a parameter type",
            edit(&text, "int64_t* out_bytes_per_layer);", "int32_t* out_bytes_per_layer);"),
            "function kvp_attention_state_bytes: the header's type differs",
        ),
        (
            "a parameter's constness",
            edit(&text, "const kvp_attention_outputs* outputs);", "kvp_attention_outputs* outputs);"),
            "function kvp_attention_run_v2: the header's type differs",
        ),
        ("a removed function", edit(&text, attach, ""), "`kvp_plan_attach` is declared in Rust but not in the header"),
        (
            "a moved function",
            edit(
                &edit(&text, attach, ""),
                "#ifdef __cplusplus\n} /* extern \"C\" */",
                &format!("{attach}#ifdef __cplusplus\n}} /* extern \"C\" */"),
            ),
            "function: order differs",
        ),
        (
            "the minor version",
            edit(&text, "#define KVP_ABI_VERSION_MINOR 5", "#define KVP_ABI_VERSION_MINOR 6"),
            "macro KVP_ABI_VERSION_MINOR: C 6, Rust 5",
        ),
    ];
    for (what, mutated, fragment) in cases {
        let failures = drift_of(&mutated);
        assert!(
            failures.iter().any(|f| f.contains(fragment)),
            "{what}: no failure contains {fragment:?}; got {failures:#?}"
        );
    }
}

#[test]
fn drift_in_the_abi_0_4_additions_is_caught() {
    let text = std::fs::read_to_string(header_dir().join("kvplug/kvplug.h")).unwrap();
    assert_eq!(drift_of(&text), Vec::<String>::new());
    let pending = "KVP_API kvp_status kvp_comm_pending(const kvp_comm* comm, int32_t* out_num_contributed);\n";
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "a field added after kvp_batch's query_pos_starts",
            edit(
                &text,
                "  const int32_t* query_pos_starts; /* [num_seqs], >= 0",
                "  const int32_t* query_pos_starts; int32_t flags; /* [num_seqs], >= 0",
            ),
            "field of kvp_batch: `flags` is in the header but not declared in Rust",
        ),
        (
            "kvp_batch's new fields swapped",
            edit(
                &edit(&text, "  const int32_t* context_lens;     /*", "  const int32_t* TMP_FIELD;     /*"),
                "  const int32_t* query_pos_starts; /*",
                "  const int32_t* context_lens; /*",
            )
            .replacen("TMP_FIELD", "query_pos_starts", 1),
            "field of kvp_batch: order differs",
        ),
        (
            "a comm option's type",
            edit(&text, "int32_t validate_each_call;", "int64_t validate_each_call;"),
            "field kvp_comm_options.validate_each_call: C offsetof=48 sizeof=8",
        ),
        (
            "the unique id's constness",
            edit(&text, "const uint8_t* nccl_unique_id;", "uint8_t* nccl_unique_id;"),
            "field kvp_comm_options.nccl_unique_id: its C type is not compatible",
        ),
        (
            "a star layout field's width",
            edit(&text, "int64_t context_len;        /* >= 0", "int32_t context_len;        /* >= 0"),
            "field kvp_star_layout.context_len: C offsetof=8 sizeof=4",
        ),
        (
            "a parameter of allocate_star",
            edit(&text, "uint8_t* out_cached_blocks,", "int32_t* out_cached_blocks,"),
            "function kvp_block_manager_allocate_star: the header's type differs",
        ),
        (
            "merge_attention's lse made const",
            edit(
                &text,
                "int32_t rank, DLTensor* out, DLTensor* lse);",
                "int32_t rank, DLTensor* out, const DLTensor* lse);",
            ),
            "function kvp_comm_merge_attention: the header's type differs",
        ),
        (
            "a removed comm function",
            edit(&text, pending, ""),
            "`kvp_comm_pending` is declared in Rust but not in the header",
        ),
        (
            "a renumbered comm kind",
            edit(&text, "KVP_COMM_NCCL = 2", "KVP_COMM_NCCL = 3"),
            "constant KVP_COMM_NCCL: C 3, Rust 2",
        ),
        (
            "the unique id size",
            edit(&text, "#define KVP_NCCL_UNIQUE_ID_BYTES 128", "#define KVP_NCCL_UNIQUE_ID_BYTES 64"),
            "macro KVP_NCCL_UNIQUE_ID_BYTES: C 64, Rust 128",
        ),
        (
            "the entropy summary made const",
            edit(&text, "DLTensor* entropy_summary;", "const DLTensor* entropy_summary;"),
            "field kvp_attention_outputs.entropy_summary: its C type is not compatible",
        ),
        (
            "the entropy summary removed (its name)",
            edit(&text, "DLTensor* entropy_summary;", ""),
            "field of kvp_attention_outputs: `entropy_summary` is declared in Rust but not in the header",
        ),
        (
            "the entropy summary removed (the size)",
            edit(&text, "DLTensor* entropy_summary;", ""),
            "struct kvp_attention_outputs: C sizeof=32 alignof=8, Rust size_of=40",
        ),
        (
            "a field after the entropy summary",
            edit(&text, "DLTensor* entropy_summary;", "DLTensor* entropy_summary; DLTensor* attention_sink;"),
            "field of kvp_attention_outputs: `attention_sink` is in the header but not declared in Rust",
        ),
        (
            "the entropy summary moved before the entropy",
            edit(
                &edit(&text, "DLTensor* entropy_summary;", ""),
                "  DLTensor* entropy;  /* optional [num_tokens",
                "  DLTensor* entropy_summary; DLTensor* entropy;  /* optional [num_tokens",
            ),
            "field of kvp_attention_outputs: order differs",
        ),
        (
            "a new macro",
            edit(
                &text,
                "#define KVP_NCCL_UNIQUE_ID_BYTES 128",
                "#define KVP_NCCL_UNIQUE_ID_BYTES 128\n#define KVP_MAX_RANKS 1024",
            ),
            "value macro: `KVP_MAX_RANKS` is in the header but not declared in Rust",
        ),
    ];
    for (what, mutated, fragment) in cases {
        let failures = drift_of(&mutated);
        assert!(
            failures.iter().any(|f| f.contains(fragment)),
            "{what}: no failure contains {fragment:?}; got {failures:#?}"
        );
    }
}

#[test]
fn drift_in_the_abi_0_5_additions_is_caught() {
    let text = std::fs::read_to_string(header_dir().join("kvplug/kvplug.h")).unwrap();
    assert_eq!(drift_of(&text), Vec::<String>::new());
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "a layout field's width",
            edit(&text, "  int32_t window_pages;\n", "  int64_t window_pages;\n"),
            "field kvp_cache_layout.window_pages: C offsetof=32 sizeof=8",
        ),
        (
            "a field added to the layout",
            edit(&text, "  int32_t window_pages;\n", "  int32_t window_pages;\n  int32_t flags;\n"),
            "field of kvp_cache_layout: `flags` is in the header but not declared in Rust",
        ),
        (
            "the SSM input renamed",
            edit(&text, "  const DLTensor* in;\n", "  const DLTensor* input;\n"),
            "field of kvp_ssm_args: `input` is in the header but not declared in Rust",
        ),
        (
            "the SSM input made mutable",
            edit(&text, "  const DLTensor* in;\n", "  DLTensor* in;\n"),
            "field kvp_ssm_args.in: its C type is not compatible",
        ),
        (
            "the SSM selector widened",
            edit(&text, "  int32_t which;  /* attamba", "  int64_t which;  /* attamba"),
            "field kvp_ssm_args.which: C offsetof=8 sizeof=8",
        ),
        (
            "a parameter of cache_layout",
            edit(
                &text,
                "int32_t query_pos_start, kvp_cache_layout* out_layout);",
                "int64_t query_pos_start, kvp_cache_layout* out_layout);",
            ),
            "function kvp_attention_cache_layout: the header's type differs",
        ),
        (
            "the SSM args made mutable",
            edit(&text, "int32_t layer, const kvp_ssm_args* args);", "int32_t layer, kvp_ssm_args* args);"),
            "function kvp_attention_ssm: the header's type differs",
        ),
    ];
    for (what, mutated, fragment) in cases {
        let failures = drift_of(&mutated);
        assert!(
            failures.iter().any(|f| f.contains(fragment)),
            "{what}: no failure contains {fragment:?}; got {failures:#?}"
        );
    }
}
