//! Raw FFI declarations of the kvplug C ABI, `abi/include/kvplug/kvplug.h` (ABI 0.5), and of the
//! three DLPack (v0.6) types it uses.
//!
//! Everything here mirrors the header one to one: C enums are integer type aliases with one `pub
//! const` per enumerator, structs are `#[repr(C)]`, every function is declared in one `extern "C"`
//! block. The documentation of each item is the header's; read it there. For a safe API use the
//! `kvplug` crate.
//!
//! Each declaration is written once, inside a macro that also records it in [`abi_description`]
//! (names, field types and offsets, enumerator values, function signatures). The header-drift test
//! (`tests/header_drift.rs`) compiles a C program against the real header that prints the C side of
//! the same facts, and compares: a header change the Rust side does not match fails the test.
#![no_std]
#![allow(non_camel_case_types, non_upper_case_globals)]

pub use core::ffi::{c_char, c_int, c_uint, c_void};

/// A machine-readable description of every declaration in this crate, built by the same macros
/// that declare them (so it cannot drift from the declarations). Used by the header-drift test.
#[doc(hidden)]
pub mod abi_description {
    /// A `#[repr(C)]` struct: its size and alignment, and each field's Rust type (as written in the
    /// declaration), offset and size.
    #[derive(Debug)]
    pub struct StructDesc {
        pub name: &'static str,
        pub size: usize,
        pub align: usize,
        pub fields: &'static [FieldDesc],
    }

    #[derive(Debug)]
    pub struct FieldDesc {
        pub name: &'static str,
        pub ty: &'static str,
        pub offset: usize,
        pub size: usize,
    }

    /// A C enum: the Rust alias's size and signedness, and each enumerator's value.
    #[derive(Debug)]
    pub struct EnumDesc {
        pub name: &'static str,
        pub size: usize,
        pub signed: bool,
        pub values: &'static [(&'static str, i64)],
    }

    /// A function: return type ("void" for none) and (name, type) of each parameter, as written.
    #[derive(Debug)]
    pub struct FnDesc {
        pub name: &'static str,
        pub ret: &'static str,
        pub args: &'static [(&'static str, &'static str)],
    }

    /// Opaque handle types (declared but never defined in the header).
    pub const OPAQUE: &[&str] =
        &["kvp_context", "kvp_block_manager", "kvp_kv_cache", "kvp_plan", "kvp_attention", "kvp_comm"];

    pub use super::{ENUMS, FUNCTIONS, MACROS, STRUCTS};
}

use abi_description::{EnumDesc, FieldDesc, FnDesc, StructDesc};

// ---------------------------------------------------------------------------------------------
// Declaration macros: each declares items and records them in a `pub const` table.
// ---------------------------------------------------------------------------------------------

/// C enums: `name: repr { CONST = value, ... }` declares `pub type name = repr;` and one
/// `pub const CONST: name = value;` each.
macro_rules! c_enums {
    ($( $(#[$m:meta])* $name:ident : $repr:ty { $( $(#[$cm:meta])* $c:ident = $v:expr ),* $(,)? } )*) => {
        $(
            $(#[$m])*
            pub type $name = $repr;
            $( $(#[$cm])* pub const $c: $name = $v; )*
        )*
        #[doc(hidden)]
        pub const ENUMS: &[EnumDesc] = &[
            $( EnumDesc {
                name: stringify!($name),
                size: core::mem::size_of::<$name>(),
                signed: <$repr>::MIN != 0,
                values: &[ $( (stringify!($c), $c as i64) ),* ],
            } ),*
        ];
    };
}

/// `#[repr(C)]` structs with `Clone, Copy, Debug` (plus whatever attributes are written on them).
macro_rules! c_structs {
    ($( $(#[$m:meta])* pub struct $name:ident { $( $(#[$fm:meta])* pub $f:ident : $t:ty ),* $(,)? } )*) => {
        $(
            $(#[$m])*
            #[repr(C)]
            #[derive(Clone, Copy, Debug)]
            pub struct $name { $( $(#[$fm])* pub $f: $t ),* }
        )*
        #[doc(hidden)]
        pub const STRUCTS: &[StructDesc] = &[
            $( StructDesc {
                name: stringify!($name),
                size: core::mem::size_of::<$name>(),
                align: core::mem::align_of::<$name>(),
                fields: &[ $( FieldDesc {
                    name: strip_raw(stringify!($f)),
                    ty: stringify!($t),
                    offset: core::mem::offset_of!($name, $f),
                    size: core::mem::size_of::<$t>(),
                } ),* ],
            } ),*
        ];
    };
}

/// A field's C name: `r#in` (a Rust keyword) is `in` in C.
#[doc(hidden)]
pub const fn strip_raw(name: &'static str) -> &'static str {
    let b = name.as_bytes();
    if b.len() > 2 && b[0] == b'r' && b[1] == b'#' {
        if let Ok(rest) = core::str::from_utf8(b.split_at(2).1) {
            return rest;
        }
    }
    name
}

macro_rules! ret_str {
    () => {
        "void"
    };
    ($r:ty) => {
        stringify!($r)
    };
}

/// The `extern "C"` block, and `FUNCTIONS`: the list of names the header-drift test compares to the
/// header's `KVP_API` declarations (and whose signatures it checks with the C compiler).
macro_rules! c_functions {
    ($( $(#[$m:meta])* pub fn $name:ident ( $( $a:ident : $t:ty ),* $(,)? ) $( -> $r:ty )? ; )*) => {
        extern "C" {
            $( $(#[$m])* pub fn $name( $( $a: $t ),* ) $( -> $r )?; )*
        }
        #[doc(hidden)]
        pub const FUNCTIONS: &[FnDesc] = &[
            $( FnDesc {
                name: stringify!($name),
                ret: ret_str!($($r)?),
                args: &[ $( (stringify!($a), stringify!($t)) ),* ],
            } ),*
        ];
    };
}

// ---------------------------------------------------------------------------------------------
// Versions
// ---------------------------------------------------------------------------------------------

pub const KVP_ABI_VERSION_MAJOR: u32 = 0;
pub const KVP_ABI_VERSION_MINOR: u32 = 5;
pub const KVP_ABI_VERSION_PATCH: u32 = 0;
/// major * 10000 + minor * 100 + patch.
pub const KVP_ABI_VERSION_NUMBER: u32 =
    KVP_ABI_VERSION_MAJOR * 10000 + KVP_ABI_VERSION_MINOR * 100 + KVP_ABI_VERSION_PATCH;

/// Since ABI 0.4: the bytes of an NCCL unique id (`kvp_comm_nccl_unique_id`).
pub const KVP_NCCL_UNIQUE_ID_BYTES: usize = 128;

/// Every `KVP_*` value macro of the header (all but `KVP_API`), for the header-drift test.
#[doc(hidden)]
pub const MACROS: &[(&str, i64)] = &[
    ("KVP_ABI_VERSION_MAJOR", KVP_ABI_VERSION_MAJOR as i64),
    ("KVP_ABI_VERSION_MINOR", KVP_ABI_VERSION_MINOR as i64),
    ("KVP_ABI_VERSION_PATCH", KVP_ABI_VERSION_PATCH as i64),
    ("KVP_ABI_VERSION_NUMBER", KVP_ABI_VERSION_NUMBER as i64),
    ("KVP_NCCL_UNIQUE_ID_BYTES", KVP_NCCL_UNIQUE_ID_BYTES as i64),
];

// ---------------------------------------------------------------------------------------------
// Enums. GCC and Clang give an enum without negative enumerators the type `unsigned int`; the
// drift test checks size and signedness against the compiler.
// ---------------------------------------------------------------------------------------------

c_enums! {
    kvp_status: c_uint {
        KVP_OK = 0,
        KVP_ERR_INVALID_ARGUMENT = 1,
        KVP_ERR_OUT_OF_MEMORY = 2,
        KVP_ERR_NOT_SUPPORTED = 3,
        KVP_ERR_OUT_OF_RANGE = 4,
        KVP_ERR_INTERNAL = 5,
        KVP_ERR_INVALID_CONFIG = 6,
        KVP_ERR_NOT_FOUND = 7,
        KVP_ERR_ALREADY_EXISTS = 8,
        KVP_ERR_NO_FREE_BLOCKS = 9,
        KVP_ERR_FAILED_PRECONDITION = 10,
        KVP_ERR_DEVICE = 11,
    }
    kvp_dtype: c_uint {
        KVP_DTYPE_FLOAT32 = 0,
        KVP_DTYPE_FLOAT16 = 1,
        KVP_DTYPE_BFLOAT16 = 2,
        KVP_DTYPE_FP8_E4M3 = 3,
    }
    kvp_alloc_verdict: c_uint {
        KVP_ALLOC_OK = 0,
        KVP_ALLOC_LATER = 1,
        KVP_ALLOC_NEVER = 2,
    }
    kvp_kv_layout: c_uint {
        KVP_LAYOUT_KV_FIRST = 0,
        KVP_LAYOUT_BLOCK_FIRST = 1,
    }
    kvp_config_format: c_uint {
        KVP_CONFIG_NONE = 0,
        KVP_CONFIG_BINARY = 1,
        KVP_CONFIG_JSON = 2,
    }
    /// Since ABI 0.4.
    kvp_comm_kind: c_uint {
        KVP_COMM_IN_PROCESS = 1,
        KVP_COMM_NCCL = 2,
    }
    /// DLPack v0.6 device types (those kvplug names; the rest of the enum is not needed here).
    DLDeviceType: c_uint {
        kDLCPU = 1,
        kDLCUDA = 2,
        kDLCUDAHost = 3,
        kDLCUDAManaged = 13,
    }
    /// DLPack v0.6 type codes. `DLDataType::code` is a `u8`: cast with `as u8`.
    DLDataTypeCode: c_uint {
        kDLInt = 0,
        kDLUInt = 1,
        kDLFloat = 2,
        kDLOpaqueHandle = 3,
        kDLBfloat = 4,
        kDLComplex = 5,
    }
}

// ---------------------------------------------------------------------------------------------
// Opaque handles (the Rustonomicon's pattern: unconstructible, !Send, !Sync, !Unpin).
// ---------------------------------------------------------------------------------------------

macro_rules! opaque {
    ($($name:ident),*) => {$(
        #[repr(C)]
        pub struct $name {
            _data: [u8; 0],
            _marker: core::marker::PhantomData<(*mut u8, core::marker::PhantomPinned)>,
        }
    )*};
}
opaque!(kvp_context, kvp_block_manager, kvp_kv_cache, kvp_plan, kvp_attention, kvp_comm);

// ---------------------------------------------------------------------------------------------
// Structs. Every options/stats/info struct starts with `struct_size`: set it to
// `size_of::<Struct>()`. All-zero bytes are a valid value of each (see `zeroed`).
// ---------------------------------------------------------------------------------------------

c_structs! {
    pub struct DLDevice {
        pub device_type: DLDeviceType,
        pub device_id: c_int,
    }
    #[derive(PartialEq, Eq)]
    pub struct DLDataType {
        pub code: u8,
        pub bits: u8,
        pub lanes: u16,
    }
    pub struct DLTensor {
        pub data: *mut c_void,
        pub device: DLDevice,
        pub ndim: c_int,
        pub dtype: DLDataType,
        pub shape: *mut i64,
        pub strides: *mut i64,
        pub byte_offset: u64,
    }

    pub struct kvp_backend_info {
        pub struct_size: usize,
        pub name: *const c_char,
        pub dtype_mask: u32,
        pub device_mask: u32,
        pub head_sizes: *const i32,
        pub num_head_sizes: i32,
        pub supports_lse: i32,
        pub needs_state_slots: i32,
    }
    // Since ABI 0.3: capabilities per device type.
    pub struct kvp_backend_device_info {
        pub struct_size: usize,
        pub device_type: i32,
        pub available: i32,
        pub dtype_mask: u32,
        pub head_sizes: *const i32,
        pub num_head_sizes: i32,
        pub supports_lse: i32,
        pub supports_entropy: i32,
        pub needs_state_slots: i32,
        pub experimental: i32,
    }
    pub struct kvp_context_options {
        pub struct_size: usize,
        pub device_type: i32,
        pub device_id: i32,
        pub num_threads: i32,
        pub stream: *mut c_void,
    }
    pub struct kvp_block_manager_options {
        pub struct_size: usize,
        pub block_size: i32,
        pub num_device_blocks: i32,
        pub num_host_blocks: i32,
        pub enable_prefix_caching: i32,
        pub watermark: f64,
        pub num_state_slots: i32,
        pub hash_seed: u64,
    }
    #[derive(Default, PartialEq, Eq, Hash)]
    pub struct kvp_block_copy {
        pub src: i32,
        pub dst: i32,
    }
    #[derive(PartialEq, Eq)]
    pub struct kvp_block_manager_stats {
        pub struct_size: usize,
        pub num_device_blocks: i32,
        pub num_free_blocks: i32,
        pub num_cached_free_blocks: i32,
        pub num_used_blocks: i32,
        pub num_host_blocks: i32,
        pub num_free_host_blocks: i32,
        pub num_sequences: i32,
        pub num_swapped_sequences: i32,
        pub prefix_queried_blocks: i64,
        pub prefix_hit_blocks: i64,
        pub num_evictions: i64,
    }
    pub struct kvp_kv_cache_options {
        pub struct_size: usize,
        pub num_layers: i32,
        pub num_blocks: i32,
        pub block_size: i32,
        pub num_kv_heads: i32,
        pub head_size: i32,
        pub dtype: i32,
        pub layout: i32,
        pub num_host_blocks: i32,
        pub num_state_slots: i32,
        pub state_bytes_per_layer: i64,
        // Since ABI 0.2: per-layer fp8 scales (host arrays of num_layers, or null for 1.0).
        pub k_scales: *const f32,
        pub v_scales: *const f32,
    }
    pub struct kvp_plan_options {
        pub struct_size: usize,
        pub max_num_seqs: i32,
        pub max_num_tokens: i32,
        pub max_num_blocks: i32,
    }
    pub struct kvp_batch {
        pub struct_size: usize,
        pub num_seqs: i32,
        pub block_size: i32,
        pub query_start_loc: *const i32,
        pub seq_lens: *const i32,
        pub block_table: *const i32,
        pub block_table_stride: i32,
        pub kv_indptr: *const i32,
        pub kv_indices: *const i32,
        pub slot_mapping: *const i64,
        pub state_slots: *const i32,
        // Since ABI 0.4 (both optional).
        pub context_lens: *const i32,
        pub query_pos_starts: *const i32,
    }
    pub struct kvp_attention_options {
        pub struct_size: usize,
        pub backend: *const c_char,
        pub num_q_heads: i32,
        pub num_kv_heads: i32,
        pub head_size: i32,
        pub kv_dtype: i32,
        pub sm_scale: f32,
        pub config_format: i32,
        pub config: *const c_void,
        pub config_size: usize,
    }
    // Since ABI 0.3.
    pub struct kvp_attention_outputs {
        pub struct_size: usize,
        pub out: *mut DLTensor,
        pub lse: *mut DLTensor,
        pub entropy: *mut DLTensor,
        // Since ABI 0.4: [num_q_heads, 6] f32, contiguous (per-head entropy telemetry).
        pub entropy_summary: *mut DLTensor,
    }
    pub struct kvp_merge_states_args {
        pub struct_size: usize,
        pub partial_out: *const DLTensor,
        pub partial_lse: *const DLTensor,
        pub partial_entropy: *const DLTensor,
        pub out: *mut DLTensor,
        pub lse: *mut DLTensor,
        pub entropy: *mut DLTensor,
    }
    // Since ABI 0.4.
    pub struct kvp_comm_options {
        pub struct_size: usize,
        pub kind: i32,
        pub num_ranks: i32,
        pub rank: i32,
        pub nccl_unique_id: *const u8,
        pub max_num_tokens: i32,
        pub num_heads: i32,
        pub head_size: i32,
        pub out_dtype: i32,
        pub validate_each_call: i32,
    }
    pub struct kvp_star_layout {
        pub struct_size: usize,
        pub context_len: i64,
        pub context_block_size: i32,
        pub anchor_size: i32,
    }
    // Since ABI 0.5.
    pub struct kvp_cache_layout {
        pub struct_size: usize,
        pub seq_len: i32,
        pub num_pages: i32,
        pub compressed_rows: i32,
        pub compressed_pages: i32,
        pub stable_rows: i32,
        pub window_first_page: i32,
        pub window_pages: i32,
    }
    pub struct kvp_ssm_args {
        pub struct_size: usize,
        pub which: i32,
        pub r#in: *const DLTensor,
        pub conv_weight: *const DLTensor,
        pub conv_bias: *const DLTensor,
        pub dt_bias: *const DLTensor,
        pub a_log: *const DLTensor,
        pub d_skip: *const DLTensor,
        pub norm_weight: *const DLTensor,
        pub out: *mut DLTensor,
    }
}

/// A struct of this crate with every byte zero, and `struct_size` (where it has one) to be set by the
/// caller. Sound for every struct declared here: they hold only integers, floats and raw pointers,
/// for which all-zero bytes are valid (null pointers).
pub trait Zeroed: Sized + Copy {
    fn zeroed() -> Self {
        // SAFETY: implemented only for the plain-data #[repr(C)] structs above (see the trait doc).
        unsafe { core::mem::zeroed() }
    }
}
impl Zeroed for DLDevice {}
impl Zeroed for DLDataType {}
impl Zeroed for DLTensor {}
impl Zeroed for kvp_backend_info {}
impl Zeroed for kvp_context_options {}
impl Zeroed for kvp_block_manager_options {}
impl Zeroed for kvp_block_copy {}
impl Zeroed for kvp_block_manager_stats {}
impl Zeroed for kvp_kv_cache_options {}
impl Zeroed for kvp_plan_options {}
impl Zeroed for kvp_batch {}
impl Zeroed for kvp_attention_options {}
impl Zeroed for kvp_backend_device_info {}
impl Zeroed for kvp_attention_outputs {}
impl Zeroed for kvp_merge_states_args {}
impl Zeroed for kvp_comm_options {}
impl Zeroed for kvp_star_layout {}
impl Zeroed for kvp_cache_layout {}
impl Zeroed for kvp_ssm_args {}

// ---------------------------------------------------------------------------------------------
// Functions, in header order.
// ---------------------------------------------------------------------------------------------

c_functions! {
    pub fn kvp_abi_version() -> u32;
    pub fn kvp_version_string() -> *const c_char;
    pub fn kvp_status_string(status: kvp_status) -> *const c_char;
    pub fn kvp_last_error() -> *const c_char;

    pub fn kvp_backend_count(out_count: *mut i32) -> kvp_status;
    pub fn kvp_backend_name(index: i32, out_name: *mut *const c_char) -> kvp_status;
    pub fn kvp_backend_info_get(name: *const c_char, out_info: *mut kvp_backend_info) -> kvp_status;
    pub fn kvp_backend_device_info_get(
        name: *const c_char,
        device_type: i32,
        out_info: *mut kvp_backend_device_info,
    ) -> kvp_status;

    pub fn kvp_context_create(
        options: *const kvp_context_options,
        out_context: *mut *mut kvp_context,
    ) -> kvp_status;
    pub fn kvp_context_destroy(context: *mut kvp_context);
    pub fn kvp_context_set_stream(context: *mut kvp_context, stream: *mut c_void) -> kvp_status;

    pub fn kvp_block_manager_create(
        options: *const kvp_block_manager_options,
        out_manager: *mut *mut kvp_block_manager,
    ) -> kvp_status;
    pub fn kvp_block_manager_destroy(manager: *mut kvp_block_manager);
    pub fn kvp_block_manager_can_allocate(
        manager: *const kvp_block_manager,
        token_ids: *const i32,
        num_tokens: i64,
        extra_key: u64,
        out_verdict: *mut kvp_alloc_verdict,
    ) -> kvp_status;
    pub fn kvp_block_manager_allocate(
        manager: *mut kvp_block_manager,
        seq_id: u64,
        token_ids: *const i32,
        num_tokens: i64,
        extra_key: u64,
        out_num_cached_tokens: *mut i64,
    ) -> kvp_status;
    pub fn kvp_block_manager_can_append(
        manager: *const kvp_block_manager,
        seq_id: u64,
        num_tokens: i64,
        out_can_append: *mut i32,
    ) -> kvp_status;
    pub fn kvp_block_manager_append(
        manager: *mut kvp_block_manager,
        seq_id: u64,
        token_ids: *const i32,
        num_tokens: i64,
        out_copy: *mut kvp_block_copy,
        out_copy_needed: *mut i32,
    ) -> kvp_status;
    pub fn kvp_block_manager_mark_computed(
        manager: *mut kvp_block_manager,
        seq_id: u64,
        num_computed_tokens: i64,
    ) -> kvp_status;
    pub fn kvp_block_manager_fork(
        manager: *mut kvp_block_manager,
        parent_id: u64,
        child_id: u64,
    ) -> kvp_status;
    pub fn kvp_block_manager_free(manager: *mut kvp_block_manager, seq_id: u64) -> kvp_status;
    pub fn kvp_block_manager_num_tokens(
        manager: *const kvp_block_manager,
        seq_id: u64,
        out_num_tokens: *mut i64,
    ) -> kvp_status;
    pub fn kvp_block_manager_block_table(
        manager: *const kvp_block_manager,
        seq_id: u64,
        out_blocks: *mut i32,
        capacity: i32,
        out_num_blocks: *mut i32,
    ) -> kvp_status;
    pub fn kvp_block_manager_block_tables(
        manager: *const kvp_block_manager,
        seq_ids: *const u64,
        num_seqs: i32,
        out_table: *mut i32,
        max_blocks_per_seq: i32,
        out_seq_lens: *mut i32,
    ) -> kvp_status;
    pub fn kvp_block_manager_slot_mapping(
        manager: *const kvp_block_manager,
        seq_id: u64,
        start: i64,
        count: i64,
        out_slots: *mut i64,
    ) -> kvp_status;
    pub fn kvp_block_manager_state_slot(
        manager: *const kvp_block_manager,
        seq_id: u64,
        out_slot: *mut i32,
    ) -> kvp_status;
    pub fn kvp_block_manager_swap_out(
        manager: *mut kvp_block_manager,
        seq_id: u64,
        out_plan: *mut kvp_block_copy,
        capacity: i32,
        out_num_copies: *mut i32,
    ) -> kvp_status;
    pub fn kvp_block_manager_swap_in(
        manager: *mut kvp_block_manager,
        seq_id: u64,
        out_plan: *mut kvp_block_copy,
        capacity: i32,
        out_num_copies: *mut i32,
    ) -> kvp_status;
    pub fn kvp_block_manager_is_swapped(
        manager: *const kvp_block_manager,
        seq_id: u64,
        out_is_swapped: *mut i32,
    ) -> kvp_status;
    pub fn kvp_block_manager_stats_get(
        manager: *const kvp_block_manager,
        out_stats: *mut kvp_block_manager_stats,
    ) -> kvp_status;

    pub fn kvp_kv_cache_create(
        context: *const kvp_context,
        options: *const kvp_kv_cache_options,
        out_cache: *mut *mut kvp_kv_cache,
    ) -> kvp_status;
    pub fn kvp_kv_cache_create_from_tensors(
        context: *const kvp_context,
        options: *const kvp_kv_cache_options,
        layer_tensors: *const DLTensor,
        num_layer_tensors: i32,
        out_cache: *mut *mut kvp_kv_cache,
    ) -> kvp_status;
    pub fn kvp_kv_cache_destroy(cache: *mut kvp_kv_cache);
    pub fn kvp_kv_cache_layer_view(
        cache: *const kvp_kv_cache,
        layer: i32,
        host: i32,
        out_view: *mut DLTensor,
    ) -> kvp_status;
    pub fn kvp_kv_cache_write(
        cache: *mut kvp_kv_cache,
        layer: i32,
        key: *const DLTensor,
        value: *const DLTensor,
        slot_mapping: *const DLTensor,
    ) -> kvp_status;
    pub fn kvp_kv_cache_copy_blocks(
        cache: *mut kvp_kv_cache,
        copies: *const kvp_block_copy,
        num_copies: i32,
    ) -> kvp_status;
    pub fn kvp_kv_cache_swap_out(
        cache: *mut kvp_kv_cache,
        copies: *const kvp_block_copy,
        num_copies: i32,
    ) -> kvp_status;
    pub fn kvp_kv_cache_swap_in(
        cache: *mut kvp_kv_cache,
        copies: *const kvp_block_copy,
        num_copies: i32,
    ) -> kvp_status;
    pub fn kvp_kv_cache_state(
        cache: *mut kvp_kv_cache,
        layer: i32,
        slot: i32,
        out_data: *mut *mut c_void,
        out_num_bytes: *mut i64,
    ) -> kvp_status;
    pub fn kvp_kv_cache_copy_state(cache: *mut kvp_kv_cache, src_slot: i32, dst_slot: i32) -> kvp_status;

    pub fn kvp_plan_create(
        context: *const kvp_context,
        options: *const kvp_plan_options,
        out_plan: *mut *mut kvp_plan,
    ) -> kvp_status;
    pub fn kvp_plan_destroy(plan: *mut kvp_plan);
    pub fn kvp_plan_update(plan: *mut kvp_plan, batch: *const kvp_batch) -> kvp_status;
    pub fn kvp_plan_attach(plan: *mut kvp_plan, attention: *const kvp_attention) -> kvp_status;

    pub fn kvp_attention_create(
        context: *const kvp_context,
        options: *const kvp_attention_options,
        out_attention: *mut *mut kvp_attention,
    ) -> kvp_status;
    pub fn kvp_attention_destroy(attention: *mut kvp_attention);
    pub fn kvp_config_check(
        backend: *const c_char,
        config_format: i32,
        config: *const c_void,
        config_size: usize,
    ) -> kvp_status;
    pub fn kvp_attention_write_kv(
        attention: *const kvp_attention,
        plan: *const kvp_plan,
        cache: *mut kvp_kv_cache,
        layer: i32,
        key: *const DLTensor,
        value: *const DLTensor,
    ) -> kvp_status;
    pub fn kvp_attention_run(
        attention: *const kvp_attention,
        plan: *const kvp_plan,
        cache: *const kvp_kv_cache,
        layer: i32,
        query: *const DLTensor,
        out: *mut DLTensor,
        lse: *mut DLTensor,
    ) -> kvp_status;
    pub fn kvp_attention_run_v2(
        attention: *const kvp_attention,
        plan: *const kvp_plan,
        cache: *const kvp_kv_cache,
        layer: i32,
        query: *const DLTensor,
        outputs: *const kvp_attention_outputs,
    ) -> kvp_status;
    pub fn kvp_attention_merge_states(context: *const kvp_context, args: *const kvp_merge_states_args) -> kvp_status;
    pub fn kvp_attention_state_bytes(attention: *const kvp_attention, out_bytes_per_layer: *mut i64) -> kvp_status;

    // Since ABI 0.5.
    pub fn kvp_attention_cache_layout(
        attention: *const kvp_attention,
        block_size: i32,
        num_tokens: i32,
        query_pos_start: i32,
        out_layout: *mut kvp_cache_layout,
    ) -> kvp_status;
    pub fn kvp_attention_ssm(
        attention: *const kvp_attention,
        plan: *const kvp_plan,
        cache: *mut kvp_kv_cache,
        layer: i32,
        args: *const kvp_ssm_args,
    ) -> kvp_status;

    // Since ABI 0.4: communicators.
    pub fn kvp_comm_nccl_unique_id(out_id: *mut u8) -> kvp_status;
    pub fn kvp_comm_create(
        context: *const kvp_context,
        options: *const kvp_comm_options,
        out_comm: *mut *mut kvp_comm,
    ) -> kvp_status;
    pub fn kvp_comm_destroy(comm: *mut kvp_comm);
    pub fn kvp_comm_merge_attention(comm: *mut kvp_comm, rank: i32, out: *mut DLTensor, lse: *mut DLTensor) -> kvp_status;
    pub fn kvp_comm_pending(comm: *const kvp_comm, out_num_contributed: *mut i32) -> kvp_status;

    // Since ABI 0.4: Star Attention's context blocks in the prefix cache.
    pub fn kvp_block_manager_allocate_star(
        manager: *mut kvp_block_manager,
        seq_id: u64,
        token_ids: *const i32,
        num_tokens: i64,
        extra_key: u64,
        layout: *const kvp_star_layout,
        out_cached_blocks: *mut u8,
        out_num_cached_tokens: *mut i64,
    ) -> kvp_status;
}
