//! The block manager: host-side bookkeeping of a paged KV cache (block tables, prefix caching,
//! copy-on-write, swap plans). Needs no context and no device.
use std::ptr::{self, NonNull};

use kvplug_sys as sys;

use crate::error::{check, to_i32, to_i64, Error, Result, Status};

/// One block copy (`kvp_block_copy`): the unit of copy-on-write and swap plans.
pub type BlockCopy = sys::kvp_block_copy;

/// `kvp_block_manager_options`.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockManagerOptions {
    /// Tokens per block, in [1, 65536].
    pub block_size: i32,
    /// > 0.
    pub num_device_blocks: i32,
    /// >= 0: swap space on the host.
    pub num_host_blocks: i32,
    pub enable_prefix_caching: bool,
    /// In [0, 1): fraction of device blocks that admitting a new sequence must leave free.
    pub watermark: f64,
    /// >= 0: if > 0 each sequence gets a state slot at allocate/fork.
    pub num_state_slots: i32,
    pub hash_seed: u64,
}

impl BlockManagerOptions {
    /// `num_device_blocks` blocks of `block_size` tokens; no host blocks, no prefix caching, no
    /// watermark, no state slots.
    pub fn new(block_size: i32, num_device_blocks: i32) -> Self {
        BlockManagerOptions {
            block_size,
            num_device_blocks,
            num_host_blocks: 0,
            enable_prefix_caching: false,
            watermark: 0.0,
            num_state_slots: 0,
            hash_seed: 0,
        }
    }
}

/// `kvp_alloc_verdict`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AllocVerdict {
    /// Can allocate now.
    Ok,
    /// Cannot now; can once other sequences free blocks.
    Later,
    /// Can never fit in this pool.
    Never,
}

/// `kvp_block_manager_stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockManagerStats {
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

/// Since ABI 0.4: where a sequence's Star Attention context lies (`kvp_star_layout`), for
/// [`BlockManager::allocate_star`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StarLayout {
    /// >= 0: tokens `[0, context_len)` are context.
    pub context_len: i64,
    /// > 0, a multiple of the manager's block size.
    pub context_block_size: i32,
    /// In `[1, context_block_size]`: the first `anchor_size` tokens.
    pub anchor_size: i32,
}

/// What [`BlockManager::allocate_star`] found in the prefix cache.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StarAllocation {
    /// One entry per block of the sequence: true if its K/V is already cached (hits need not be
    /// leading: recompute only the Star blocks with `false`, in increasing order).
    pub cached_blocks: Vec<bool>,
    /// The tokens in those blocks.
    pub num_cached_tokens: i64,
}

/// A block manager (`kvp_block_manager`). Destroyed on drop.
///
/// Mutating calls take `&mut self`; the read-only queries (the header's `const kvp_block_manager*`
/// functions: `can_allocate`, `can_append`, `num_tokens`, `block_table(s)`, `slot_mapping`,
/// `state_slot`, `is_swapped`, `stats`) take `&self`.
#[derive(Debug)]
pub struct BlockManager {
    raw: NonNull<sys::kvp_block_manager>,
    block_size: i32,
}

// SAFETY (Send): the manager is plain host bookkeeping with no thread affinity.
unsafe impl Send for BlockManager {}
// SAFETY (Sync): the header says the manager is not thread-safe, but "kvp_block_manager_stats and the
// read-only queries may run concurrently with each other but not with a mutating call". That is
// exactly `&self` vs `&mut self`: only the const-pointer queries are reachable through `&self`, and
// every mutating call needs `&mut self`, which excludes all other access. (The C++ behind the
// queries is const all the way down: no `mutable` caches or counters.)
unsafe impl Sync for BlockManager {}

fn verdict(v: sys::kvp_alloc_verdict) -> Result<AllocVerdict> {
    match v {
        sys::KVP_ALLOC_OK => Ok(AllocVerdict::Ok),
        sys::KVP_ALLOC_LATER => Ok(AllocVerdict::Later),
        sys::KVP_ALLOC_NEVER => Ok(AllocVerdict::Never),
        other => Err(Error::binding(Status::Internal, format!("unknown kvp_alloc_verdict {other}"))),
    }
}

impl BlockManager {
    pub fn new(options: &BlockManagerOptions) -> Result<BlockManager> {
        crate::check_version()?;
        let mut o: sys::kvp_block_manager_options = sys::Zeroed::zeroed();
        o.struct_size = std::mem::size_of::<sys::kvp_block_manager_options>();
        o.block_size = options.block_size;
        o.num_device_blocks = options.num_device_blocks;
        o.num_host_blocks = options.num_host_blocks;
        o.enable_prefix_caching = options.enable_prefix_caching as i32;
        o.watermark = options.watermark;
        o.num_state_slots = options.num_state_slots;
        o.hash_seed = options.hash_seed;
        let mut raw = ptr::null_mut();
        // SAFETY: complete options struct, valid out pointer.
        check(unsafe { sys::kvp_block_manager_create(&o, &mut raw) })?;
        Ok(BlockManager {
            raw: NonNull::new(raw).expect("kvp_block_manager_create returned OK and NULL"),
            block_size: options.block_size,
        })
    }

    pub fn block_size(&self) -> i32 {
        self.block_size
    }

    fn r(&self) -> *const sys::kvp_block_manager {
        self.raw.as_ptr()
    }

    fn m(&mut self) -> *mut sys::kvp_block_manager {
        self.raw.as_ptr()
    }

    /// Could a new sequence with prompt `token_ids` be allocated now? Cached prefix blocks count as
    /// free.
    pub fn can_allocate(&self, token_ids: &[i32], extra_key: u64) -> Result<AllocVerdict> {
        let n = to_i64(token_ids.len(), "token_ids.len()")?;
        let mut v = 0;
        // SAFETY: `token_ids` holds the `n` ids the call reads; `v` is a valid out pointer.
        check(unsafe { sys::kvp_block_manager_can_allocate(self.r(), token_ids.as_ptr(), n, extra_key, &mut v) })?;
        verdict(v)
    }

    /// As [`can_allocate`](Self::can_allocate) for `num_tokens` tokens without ids (no prefix-cache
    /// credit).
    pub fn can_allocate_tokens(&self, num_tokens: i64, extra_key: u64) -> Result<AllocVerdict> {
        let mut v = 0;
        // SAFETY: NULL token_ids is allowed; nothing is read through it.
        check(unsafe { sys::kvp_block_manager_can_allocate(self.r(), ptr::null(), num_tokens, extra_key, &mut v) })?;
        verdict(v)
    }

    /// Creates `seq_id` holding the prompt `token_ids` (non-empty), reusing cached prefix blocks.
    /// Returns how many leading tokens already have K/V in the cache.
    pub fn allocate(&mut self, seq_id: u64, token_ids: &[i32], extra_key: u64) -> Result<i64> {
        let n = to_i64(token_ids.len(), "token_ids.len()")?;
        let mut cached = 0i64;
        // SAFETY: `token_ids` holds `n` ids; `cached` is a valid out pointer.
        check(unsafe {
            sys::kvp_block_manager_allocate(self.m(), seq_id, token_ids.as_ptr(), n, extra_key, &mut cached)
        })?;
        Ok(cached)
    }

    /// Creates `seq_id` with `num_tokens` tokens and no ids (only without prefix caching).
    pub fn allocate_tokens(&mut self, seq_id: u64, num_tokens: i64) -> Result<()> {
        // SAFETY: NULL token_ids (rejected by the library when prefix caching is on); the optional
        // out pointer is NULL.
        check(unsafe { sys::kvp_block_manager_allocate(self.m(), seq_id, ptr::null(), num_tokens, 0, ptr::null_mut()) })
    }

    /// Since ABI 0.4: [`allocate`](Self::allocate) with Star keys for the context (`layout`): a
    /// context block is keyed by the anchor, its own tokens and its start position, so blocks after
    /// a changed middle block are still reused. The last token is never served from the cache; the
    /// sequence keeps Star keys when appended to. Call [`mark_computed`](Self::mark_computed) as usual.
    pub fn allocate_star(
        &mut self,
        seq_id: u64,
        token_ids: &[i32],
        extra_key: u64,
        layout: &StarLayout,
    ) -> Result<StarAllocation> {
        let n = to_i64(token_ids.len(), "token_ids.len()")?;
        self.allocate_star_raw(seq_id, token_ids.as_ptr(), n, extra_key, layout)
    }

    /// As [`allocate_star`](Self::allocate_star) for `num_tokens` tokens without ids (only without
    /// prefix caching: nothing is then found cached).
    pub fn allocate_star_tokens(
        &mut self,
        seq_id: u64,
        num_tokens: i64,
        layout: &StarLayout,
    ) -> Result<StarAllocation> {
        self.allocate_star_raw(seq_id, ptr::null(), num_tokens, 0, layout)
    }

    fn allocate_star_raw(
        &mut self,
        seq_id: u64,
        ids: *const i32,
        n: i64,
        extra_key: u64,
        layout: &StarLayout,
    ) -> Result<StarAllocation> {
        let mut l: sys::kvp_star_layout = sys::Zeroed::zeroed();
        l.struct_size = std::mem::size_of::<sys::kvp_star_layout>();
        l.context_len = layout.context_len;
        l.context_block_size = layout.context_block_size;
        l.anchor_size = layout.anchor_size;
        // The library writes ceil(num_tokens / block_size) flags (header); a num_tokens it rejects
        // writes none, so an empty buffer is enough then.
        let num_blocks = if (1..=1i64 << 31).contains(&n) {
            ((n + self.block_size as i64 - 1) / self.block_size as i64) as usize
        } else {
            0
        };
        let mut flags = vec![0u8; num_blocks.max(1)];
        let mut cached = 0i64;
        // SAFETY: `ids` is NULL or holds `n` ids (callers above); `flags` has room for every block of
        // an accepted call; `l` is a complete struct; all outlive the call.
        check(unsafe {
            sys::kvp_block_manager_allocate_star(
                self.m(),
                seq_id,
                ids,
                n,
                extra_key,
                &l,
                flags.as_mut_ptr(),
                &mut cached,
            )
        })?;
        flags.truncate(num_blocks);
        Ok(StarAllocation { cached_blocks: flags.into_iter().map(|f| f != 0).collect(), num_cached_tokens: cached })
    }

    /// Could `num_tokens` more tokens be appended to `seq_id` now?
    pub fn can_append(&self, seq_id: u64, num_tokens: i64) -> Result<bool> {
        let mut can = 0;
        // SAFETY: valid out pointer.
        check(unsafe { sys::kvp_block_manager_can_append(self.r(), seq_id, num_tokens, &mut can) })?;
        Ok(can != 0)
    }

    /// Appends `token_ids` (non-empty) to `seq_id`. Returns the copy-on-write block copy the caller
    /// must perform (e.g. [`KvCache::copy_blocks`](crate::KvCache::copy_blocks)) before writing K/V,
    /// when the sequence's last block was shared and partially filled.
    pub fn append(&mut self, seq_id: u64, token_ids: &[i32]) -> Result<Option<BlockCopy>> {
        let n = to_i64(token_ids.len(), "token_ids.len()")?;
        self.append_raw(seq_id, token_ids.as_ptr(), n)
    }

    /// Appends `num_tokens` tokens without ids (only without prefix caching).
    pub fn append_tokens(&mut self, seq_id: u64, num_tokens: i64) -> Result<Option<BlockCopy>> {
        self.append_raw(seq_id, ptr::null(), num_tokens)
    }

    fn append_raw(&mut self, seq_id: u64, ids: *const i32, n: i64) -> Result<Option<BlockCopy>> {
        let mut copy = BlockCopy::default();
        let mut needed = 0;
        // SAFETY: `ids` is NULL or holds `n` ids (callers above); both out pointers are valid.
        check(unsafe { sys::kvp_block_manager_append(self.m(), seq_id, ids, n, &mut copy, &mut needed) })?;
        Ok((needed != 0).then_some(copy))
    }

    /// The K/V of the first `num_computed_tokens` tokens of `seq_id` is written: publish its full
    /// blocks to the prefix cache.
    pub fn mark_computed(&mut self, seq_id: u64, num_computed_tokens: i64) -> Result<()> {
        // SAFETY: plain values.
        check(unsafe { sys::kvp_block_manager_mark_computed(self.m(), seq_id, num_computed_tokens) })
    }

    /// Creates `child_id` sharing every block of `parent_id` (copy on write).
    pub fn fork(&mut self, parent_id: u64, child_id: u64) -> Result<()> {
        // SAFETY: plain values.
        check(unsafe { sys::kvp_block_manager_fork(self.m(), parent_id, child_id) })
    }

    /// Releases `seq_id`, its blocks and its state slot.
    pub fn free(&mut self, seq_id: u64) -> Result<()> {
        // SAFETY: plain values.
        check(unsafe { sys::kvp_block_manager_free(self.m(), seq_id) })
    }

    pub fn num_tokens(&self, seq_id: u64) -> Result<i64> {
        let mut n = 0;
        // SAFETY: valid out pointer.
        check(unsafe { sys::kvp_block_manager_num_tokens(self.r(), seq_id, &mut n) })?;
        Ok(n)
    }

    /// The block table of `seq_id`.
    pub fn block_table(&self, seq_id: u64) -> Result<Vec<i32>> {
        let mut table = vec![0; self.blocks_guess(seq_id)];
        loop {
            let capacity = to_i32(table.len(), "capacity")?;
            let mut n = 0;
            // SAFETY: `table` has `capacity` writable entries (or is empty with capacity 0, which the
            // library accepts with any pointer); `n` is a valid out pointer.
            let s =
                unsafe { sys::kvp_block_manager_block_table(self.r(), seq_id, table.as_mut_ptr(), capacity, &mut n) };
            // Too small: the library reports the needed length in `n` (header); grow and retry.
            if s == sys::KVP_ERR_OUT_OF_RANGE && n > capacity {
                table.resize(n as usize, 0);
                continue;
            }
            check(s)?;
            table.truncate(n as usize);
            return Ok(table);
        }
    }

    /// Block tables of `seq_ids` for one step: row i of `out_table` (`seq_ids.len()` rows of
    /// `max_blocks_per_seq`, row-major) receives the table of `seq_ids[i]` padded with -1, and
    /// `out_seq_lens` (if given) their token counts.
    pub fn block_tables_into(
        &self,
        seq_ids: &[u64],
        max_blocks_per_seq: usize,
        out_table: &mut [i32],
        out_seq_lens: Option<&mut [i32]>,
    ) -> Result<()> {
        let num = to_i32(seq_ids.len(), "seq_ids.len()")?;
        let stride = to_i32(max_blocks_per_seq, "max_blocks_per_seq")?;
        // The library writes num * stride table entries and num lengths: the slices must hold them.
        let need =
            seq_ids.len().checked_mul(max_blocks_per_seq).ok_or_else(|| Error::invalid("table size overflows"))?;
        if out_table.len() < need {
            return Err(Error::invalid(format!(
                "block_tables: out_table has {} entries, {} sequences x {max_blocks_per_seq} blocks need {need}",
                out_table.len(),
                seq_ids.len()
            )));
        }
        let lens_ptr = match out_seq_lens {
            Some(l) if l.len() < seq_ids.len() => {
                return Err(Error::invalid(format!(
                    "block_tables: out_seq_lens has {} entries for {} sequences",
                    l.len(),
                    seq_ids.len()
                )))
            }
            Some(l) => l.as_mut_ptr(),
            None => ptr::null_mut(),
        };
        // SAFETY: sizes checked above; `lens_ptr` is NULL (optional) or holds `num` entries.
        check(unsafe {
            sys::kvp_block_manager_block_tables(
                self.r(),
                seq_ids.as_ptr(),
                num,
                out_table.as_mut_ptr(),
                stride,
                lens_ptr,
            )
        })
    }

    /// [`block_tables_into`](Self::block_tables_into) returning `(table, seq_lens)`.
    pub fn block_tables(&self, seq_ids: &[u64], max_blocks_per_seq: usize) -> Result<(Vec<i32>, Vec<i32>)> {
        let mut table = vec![0; seq_ids.len() * max_blocks_per_seq];
        let mut lens = vec![0; seq_ids.len()];
        self.block_tables_into(seq_ids, max_blocks_per_seq, &mut table, Some(&mut lens))?;
        Ok((table, lens))
    }

    /// Cache slots of positions `[start, start + out_slots.len())` of `seq_id`, into `out_slots`.
    pub fn slot_mapping_into(&self, seq_id: u64, start: i64, out_slots: &mut [i64]) -> Result<()> {
        let count = to_i64(out_slots.len(), "count")?;
        // SAFETY: the library writes `count` slots, exactly the slice's length.
        check(unsafe { sys::kvp_block_manager_slot_mapping(self.r(), seq_id, start, count, out_slots.as_mut_ptr()) })
    }

    pub fn slot_mapping(&self, seq_id: u64, start: i64, count: usize) -> Result<Vec<i64>> {
        let mut slots = vec![0; count];
        self.slot_mapping_into(seq_id, start, &mut slots)?;
        Ok(slots)
    }

    /// The state slot of `seq_id`; `None` when the manager has no state slots.
    pub fn state_slot(&self, seq_id: u64) -> Result<Option<i32>> {
        let mut slot = 0;
        // SAFETY: valid out pointer.
        check(unsafe { sys::kvp_block_manager_state_slot(self.r(), seq_id, &mut slot) })?;
        Ok((slot >= 0).then_some(slot))
    }

    /// Swaps `seq_id` out to host blocks; returns the (device -> host) copies to perform with
    /// [`KvCache::swap_out`](crate::KvCache::swap_out) before the device blocks are reused.
    pub fn swap_out(&mut self, seq_id: u64) -> Result<Vec<BlockCopy>> {
        self.swap(seq_id, sys::kvp_block_manager_swap_out)
    }

    /// Swaps `seq_id` back in; returns the (host -> device) copies for
    /// [`KvCache::swap_in`](crate::KvCache::swap_in).
    pub fn swap_in(&mut self, seq_id: u64) -> Result<Vec<BlockCopy>> {
        self.swap(seq_id, sys::kvp_block_manager_swap_in)
    }

    fn swap(
        &mut self,
        seq_id: u64,
        f: unsafe extern "C" fn(*mut sys::kvp_block_manager, u64, *mut BlockCopy, i32, *mut i32) -> sys::kvp_status,
    ) -> Result<Vec<BlockCopy>> {
        let mut plan = vec![BlockCopy::default(); self.blocks_guess(seq_id)];
        loop {
            let capacity = to_i32(plan.len(), "capacity")?;
            let mut n = 0;
            // SAFETY: `plan` has `capacity` writable entries; `n` is a valid out pointer.
            let s = unsafe { f(self.m(), seq_id, plan.as_mut_ptr(), capacity, &mut n) };
            if s == sys::KVP_ERR_OUT_OF_RANGE && n > capacity {
                plan.resize(n as usize, BlockCopy::default());
                continue;
            }
            check(s)?;
            plan.truncate(n as usize);
            return Ok(plan);
        }
    }

    /// The block count implied by the sequence's length: the starting capacity of the calls that
    /// fill a caller-sized array. They report the needed length and change nothing when the
    /// capacity is too small, and the callers then grow and retry.
    fn blocks_guess(&self, seq_id: u64) -> usize {
        match self.num_tokens(seq_id) {
            Ok(n) if n > 0 => ((n + self.block_size as i64 - 1) / self.block_size as i64) as usize,
            _ => 0, // unknown sequence: the real call reports it
        }
    }

    pub fn is_swapped(&self, seq_id: u64) -> Result<bool> {
        let mut v = 0;
        // SAFETY: valid out pointer.
        check(unsafe { sys::kvp_block_manager_is_swapped(self.r(), seq_id, &mut v) })?;
        Ok(v != 0)
    }

    pub fn stats(&self) -> Result<BlockManagerStats> {
        let mut s: sys::kvp_block_manager_stats = sys::Zeroed::zeroed();
        // An output struct: struct_size tells the library how much it may write.
        s.struct_size = std::mem::size_of::<sys::kvp_block_manager_stats>();
        // SAFETY: valid out pointer of the declared size.
        check(unsafe { sys::kvp_block_manager_stats_get(self.r(), &mut s) })?;
        Ok(BlockManagerStats {
            num_device_blocks: s.num_device_blocks,
            num_free_blocks: s.num_free_blocks,
            num_cached_free_blocks: s.num_cached_free_blocks,
            num_used_blocks: s.num_used_blocks,
            num_host_blocks: s.num_host_blocks,
            num_free_host_blocks: s.num_free_host_blocks,
            num_sequences: s.num_sequences,
            num_swapped_sequences: s.num_swapped_sequences,
            prefix_queried_blocks: s.prefix_queried_blocks,
            prefix_hit_blocks: s.prefix_hit_blocks,
            num_evictions: s.num_evictions,
        })
    }

    /// The raw handle, for interop with C code. It stays owned by `self`.
    pub fn as_raw(&self) -> *const sys::kvp_block_manager {
        self.raw.as_ptr()
    }
}

impl Drop for BlockManager {
    fn drop(&mut self) {
        // SAFETY: created by kvp_block_manager_create, destroyed once.
        unsafe { sys::kvp_block_manager_destroy(self.raw.as_ptr()) }
    }
}
