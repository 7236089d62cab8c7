//! Batch plans: the host-side description of one batch step, built once per step and used by
//! every layer's attention run.
use std::marker::PhantomData;
use std::ptr::{self, NonNull};

use kvplug_sys as sys;

use crate::attention::Attention;
use crate::context::Context;
use crate::error::{check, to_i32, Error, Result};

/// `kvp_plan_options`: the plan's preallocated capacities.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanOptions {
    pub max_num_seqs: i32,
    /// Query tokens in one step.
    pub max_num_tokens: i32,
    /// Blocks referenced by one step, all sequences together.
    pub max_num_blocks: i32,
}

/// The block table of a batch, in either form.
#[derive(Clone, Copy, Debug)]
pub enum BlockTable<'a> {
    /// `[num_seqs, stride]` row-major (vLLM). `stride` >= blocks of the longest sequence.
    Dense { table: &'a [i32], stride: usize },
    /// `indptr` `[num_seqs + 1]` and `indices` (FlashInfer).
    Csr { indptr: &'a [i32], indices: &'a [i32] },
}

/// One step (`kvp_batch`). The number of sequences is `seq_lens.len()`.
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    pub block_size: i32,
    /// `[num_seqs + 1]`, non-decreasing, from 0.
    pub query_start_loc: &'a [i32],
    /// `[num_seqs]`: K/V length including this step's tokens.
    pub seq_lens: &'a [i32],
    pub block_table: BlockTable<'a>,
    /// `[num_tokens]` (num_tokens = the last query_start_loc): where `Attention::write_kv` writes.
    pub slot_mapping: Option<&'a [i64]>,
    /// `[num_seqs]`: for backends with state.
    pub state_slots: Option<&'a [i32]>,
    /// Since ABI 0.4. `[num_seqs]`, >= 0: global positions below `context_lens[b]` of sequence b
    /// are its context, the rest its query and generated tokens (Star Attention encodes the
    /// context in phase 1 and the rest in phase 2; other backends ignore it). `None`: no context.
    pub context_lens: Option<&'a [i32]>,
    /// Since ABI 0.4. `[num_seqs]`, >= 0: the global position of each sequence's first token of
    /// this step. `None`: `seq_lens[b] - q_len_b`. Given, `seq_lens` may be shorter than the step
    /// (a Star shard that holds only context keys).
    pub query_pos_starts: Option<&'a [i32]>,
}

impl<'a> Batch<'a> {
    /// A batch without slot mapping, state slots, context lengths or query positions.
    pub fn new(block_size: i32, query_start_loc: &'a [i32], seq_lens: &'a [i32], block_table: BlockTable<'a>) -> Self {
        Batch {
            block_size,
            query_start_loc,
            seq_lens,
            block_table,
            slot_mapping: None,
            state_slots: None,
            context_lens: None,
            query_pos_starts: None,
        }
    }

    pub fn with_slot_mapping(mut self, slot_mapping: &'a [i64]) -> Self {
        self.slot_mapping = Some(slot_mapping);
        self
    }

    pub fn with_state_slots(mut self, state_slots: &'a [i32]) -> Self {
        self.state_slots = Some(state_slots);
        self
    }

    /// Since ABI 0.4: each sequence's context length (Star Attention's phase boundary).
    pub fn with_context_lens(mut self, context_lens: &'a [i32]) -> Self {
        self.context_lens = Some(context_lens);
        self
    }

    /// Since ABI 0.4: each sequence's first global position of this step.
    pub fn with_query_pos_starts(mut self, query_pos_starts: &'a [i32]) -> Self {
        self.query_pos_starts = Some(query_pos_starts);
        self
    }
}

/// A plan (`kvp_plan`), destroyed on drop; cannot outlive its context.
///
/// `update` takes `&mut self`; attention runs read it through `&self`.
#[derive(Debug)]
pub struct Plan<'ctx> {
    raw: NonNull<sys::kvp_plan>,
    _context: PhantomData<&'ctx Context>,
}

// SAFETY (Send): host buffers only, no thread affinity; the context it was made with is Sync.
unsafe impl Send for Plan<'_> {}
// SAFETY (Sync): the header says "not thread-safe for kvp_plan_update; concurrent runs reading one
// plan are safe". update takes `&mut self`; runs take `&Plan`.
unsafe impl Sync for Plan<'_> {}

fn bad(message: String) -> Error {
    Error::invalid(format!("Plan::update: {message}"))
}

/// Checks that every array the library will read is as long as the batch says (it reads raw
/// pointers by the counts in the batch). Values (monotonicity, block ids, capacities) are left to
/// the library, except where a value decides how far it reads.
fn check_lengths(b: &Batch<'_>) -> Result<()> {
    let n = b.seq_lens.len();
    if b.query_start_loc.len() != n + 1 {
        return Err(bad(format!(
            "query_start_loc has {} entries; {n} sequences (seq_lens) need {}",
            b.query_start_loc.len(),
            n + 1
        )));
    }
    match b.block_table {
        BlockTable::Dense { table, stride } => {
            // Row b is read at [b * stride, b * stride + blocks needed <= stride).
            let need = n.checked_mul(stride).ok_or_else(|| bad("block table size overflows".into()))?;
            if table.len() < need {
                return Err(bad(format!(
                    "block_table has {} entries; {n} rows of stride {stride} need {need}",
                    table.len()
                )));
            }
            to_i32(stride, "block_table_stride")?;
        }
        BlockTable::Csr { indptr, indices } => {
            if indptr.len() != n + 1 {
                return Err(bad(format!("kv_indptr has {} entries; {n} sequences need {}", indptr.len(), n + 1)));
            }
            // Sequence b reads indices[indptr[b] .. indptr[b+1]]: every offset must lie in the array.
            if let Some((i, &v)) = indptr.iter().enumerate().find(|(_, &v)| v < 0 || v as usize > indices.len()) {
                return Err(bad(format!("kv_indptr[{i}]={v} is outside kv_indices (length {})", indices.len())));
            }
        }
    }
    // The library reads slot_mapping[0 .. query_start_loc[n]].
    let num_tokens = *b.query_start_loc.last().unwrap();
    if let Some(s) = b.slot_mapping {
        if num_tokens < 0 || s.len() != num_tokens as usize {
            return Err(bad(format!("slot_mapping has {} entries; query_start_loc[{n}]={num_tokens}", s.len())));
        }
    }
    if let Some(s) = b.state_slots {
        if s.len() != n {
            return Err(bad(format!("state_slots has {} entries for {n} sequences", s.len())));
        }
    }
    for (name, arr) in [("context_lens", b.context_lens), ("query_pos_starts", b.query_pos_starts)] {
        if let Some(s) = arr {
            if s.len() != n {
                return Err(bad(format!("{name} has {} entries for {n} sequences", s.len())));
            }
        }
    }
    Ok(())
}

impl<'ctx> Plan<'ctx> {
    pub fn new(context: &'ctx Context, options: &PlanOptions) -> Result<Plan<'ctx>> {
        let mut o: sys::kvp_plan_options = sys::Zeroed::zeroed();
        o.struct_size = std::mem::size_of::<sys::kvp_plan_options>();
        o.max_num_seqs = options.max_num_seqs;
        o.max_num_tokens = options.max_num_tokens;
        o.max_num_blocks = options.max_num_blocks;
        let mut raw = ptr::null_mut();
        // SAFETY: live context, complete options, valid out pointer.
        check(unsafe { sys::kvp_plan_create(context.as_raw(), &o, &mut raw) })?;
        Ok(Plan { raw: NonNull::new(raw).expect("kvp_plan_create returned OK and NULL"), _context: PhantomData })
    }

    /// Checks `batch` and converts it into the plan's buffers. On failure the plan is emptied (as
    /// the C call does), so a stale batch can never be run by mistake; this holds for the length
    /// checks made here too.
    pub fn update(&mut self, batch: &Batch<'_>) -> Result<()> {
        let mut b: sys::kvp_batch = sys::Zeroed::zeroed();
        b.struct_size = std::mem::size_of::<sys::kvp_batch>();
        if let Err(e) = check_lengths(batch) {
            // A batch of zero sequences fails in the library and empties the plan.
            // SAFETY: a complete struct with no arrays; the library reads none for num_seqs = 0.
            let _ = unsafe { sys::kvp_plan_update(self.raw.as_ptr(), &b) };
            return Err(e);
        }
        b.num_seqs = to_i32(batch.seq_lens.len(), "num_seqs")?;
        b.block_size = batch.block_size;
        b.query_start_loc = batch.query_start_loc.as_ptr();
        b.seq_lens = batch.seq_lens.as_ptr();
        match batch.block_table {
            BlockTable::Dense { table, stride } => {
                b.block_table = table.as_ptr();
                b.block_table_stride = stride as i32; // checked to fit in check_lengths
            }
            BlockTable::Csr { indptr, indices } => {
                b.kv_indptr = indptr.as_ptr();
                b.kv_indices = indices.as_ptr();
            }
        }
        b.slot_mapping = batch.slot_mapping.map_or(ptr::null(), |s| s.as_ptr());
        b.state_slots = batch.state_slots.map_or(ptr::null(), |s| s.as_ptr());
        b.context_lens = batch.context_lens.map_or(ptr::null(), |s| s.as_ptr());
        b.query_pos_starts = batch.query_pos_starts.map_or(ptr::null(), |s| s.as_ptr());
        // SAFETY: every array holds what the library reads for this batch (check_lengths); all are
        // host memory borrowed for the call only (header: "read during the call only").
        check(unsafe { sys::kvp_plan_update(self.raw.as_ptr(), &b) })
    }

    /// Attaches `attention` (of the same context) so that this and every later `update` also
    /// builds its step work (key sets, split-KV partitions) once per step, instead of the first run
    /// of each step doing it on the host. Attach before capturing runs in a CUDA graph. The plan
    /// keeps what it needs: `attention` may be dropped first.
    pub fn attach(&mut self, attention: &Attention<'_>) -> Result<()> {
        // SAFETY: both handles are live; exclusive access to the plan (it is modified); the
        // library checks that they share a context.
        check(unsafe { sys::kvp_plan_attach(self.raw.as_ptr(), attention.as_raw()) })
    }

    pub(crate) fn raw_const(&self) -> *const sys::kvp_plan {
        self.raw.as_ptr()
    }

    /// The raw handle, for interop with C code. It stays owned by `self`.
    pub fn as_raw(&self) -> *const sys::kvp_plan {
        self.raw.as_ptr()
    }
}

impl Drop for Plan<'_> {
    fn drop(&mut self) {
        // SAFETY: created by kvp_plan_create, destroyed once.
        unsafe { sys::kvp_plan_destroy(self.raw.as_ptr()) }
    }
}
