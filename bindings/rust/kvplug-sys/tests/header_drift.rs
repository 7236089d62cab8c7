//! Header-drift test: fails when `kvplug.h` changes in a way the Rust declarations do not match.
//!
//! Two independent views of the header are compared with `kvplug_sys::abi_description` (which the
//! declaring macros build, so it always describes exactly what Rust declares):
//!  1. The header text: the names of every `KVP_API` function, every struct and its fields in order,
//!     every opaque handle, every enum and its enumerators, every `KVP_ABI_VERSION_*` macro. Catches
//!     additions and removals on either side (an added trailing field, a new function).
//!  2. The C compiler: a generated C program includes the header and prints sizeof/alignof of every
//!     struct, offsetof/sizeof of every field, whether each field's C type is compatible with the
//!     Rust type (`__builtin_types_compatible_p`), each enum's size, signedness and enumerator
//!     values, each version macro, and whether each function's type is compatible with the Rust
//!     signature. Catches changed types, values and layouts even where sizes happen to agree.
//!
//! Environment: KVPLUG_HEADER_DIR (default ../../../abi/include from this crate) holds
//! kvplug/kvplug.h; DLPACK_INCLUDE_DIR (default /usr/include) holds dlpack/dlpack.h; CC (default cc).
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use kvplug_sys::abi_description::{ENUMS, FUNCTIONS, OPAQUE, STRUCTS, VERSION_MACROS};

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
    version_macros: BTreeSet<String>,
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
    // Preprocessor lines (with continuations) are set aside: only version macros matter there, and
    // `#define KVP_API ...` must not be mistaken for a declaration.
    let mut code = String::new();
    let mut in_directive = false;
    for line in text.lines() {
        let t = line.trim_start();
        if in_directive || t.starts_with('#') {
            if let Some(rest) = t.strip_prefix("#define") {
                let name: String = rest.trim_start().chars().take_while(|&c| is_ident_char(c)).collect();
                if name.starts_with("KVP_ABI_VERSION_") {
                    d.version_macros.insert(name);
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
    for (name, _) in VERSION_MACROS {
        if h.version_macros.contains(*name) {
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

fn run_c(source: &str) -> String {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("header_drift_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("layout.c");
    let exe = dir.join("layout");
    std::fs::write(&src, source).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .arg("-std=gnu11")
        .arg("-Wall")
        .arg("-I")
        .arg(header_dir())
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
        header_dir().display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().expect("run the layout probe");
    assert!(run.status.success(), "layout probe failed: {:?}", run.status);
    let _ = std::fs::remove_dir_all(&dir);
    String::from_utf8(run.stdout).unwrap()
}

#[test]
fn rust_declarations_match_the_header() {
    let path = header_dir().join("kvplug/kvplug.h");
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

    let header_macros: Vec<String> = h.version_macros.iter().cloned().collect();
    let mut rust_macros: Vec<String> = VERSION_MACROS.iter().map(|(n, _)| n.to_string()).collect();
    rust_macros.sort();
    compare_lists("version macro", &header_macros, &rust_macros, &mut failures);

    // --- 2. layouts, types and values, from the C compiler ---
    let output = run_c(&generate_c(&h));
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
                let rust = VERSION_MACROS.iter().find(|(n, _)| *n == p[1]).unwrap().1;
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
    if failures.is_empty() {
        assert_eq!(seen, fields + consts + VERSION_MACROS.len() + FUNCTIONS.len(), "probe output:\n{output}");
    }

    assert!(
        failures.is_empty(),
        "kvplug-sys does not match {} ({} mismatches):\n  {}",
        path.display(),
        failures.len(),
        failures.join("\n  ")
    );
}
