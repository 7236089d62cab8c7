//! Communicators (since ABI 0.4): merge partial attention states held by several shards (Star
//! Attention's phase 2) exactly, as [`merge_states`](crate::merge_states) does, so that every rank
//! ends with the attention over all keys.
//!
//! An in-process communicator keeps the tensors of every rank that contributed to the round in
//! progress until the last rank's call merges them all in place. A safe wrapper therefore lets the
//! caller hand over a whole round at once ([`Comm::merge_all`]); per-rank contributions from several
//! threads go through [`Comm::contribute`], which is `unsafe` (the caller keeps the tensors alive
//! and untouched until the round completes).
use std::marker::PhantomData;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use kvplug_sys as sys;

use crate::context::Context;
use crate::error::{check, Error, Result, Status};
use crate::kv_cache::KvDtype;
use crate::tensor::{DType, TensorMut};

/// The bytes of an NCCL unique id.
pub const NCCL_UNIQUE_ID_BYTES: usize = sys::KVP_NCCL_UNIQUE_ID_BYTES;

/// `kvp_comm_kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CommKind {
    /// One handle for all ranks of one process (one context, one device); thread-safe.
    InProcess,
    /// One handle per rank (one process or thread per GPU); NCCL is loaded on first use
    /// (`Status::NotSupported` without libnccl.so.2). Not thread-safe.
    Nccl,
}

impl CommKind {
    fn to_raw(self) -> sys::kvp_comm_kind {
        match self {
            CommKind::InProcess => sys::KVP_COMM_IN_PROCESS,
            CommKind::Nccl => sys::KVP_COMM_NCCL,
        }
    }
}

/// `kvp_comm_options`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommOptions {
    pub kind: CommKind,
    /// In [1, 1024].
    pub num_ranks: i32,
    /// NCCL: this handle's rank in [0, num_ranks); in-process: 0.
    pub rank: i32,
    /// NCCL: the id from [`nccl_unique_id`] on the creating rank, shared by every rank.
    pub nccl_unique_id: Option<[u8; NCCL_UNIQUE_ID_BYTES]>,
    /// > 0: rows of one merge.
    pub max_num_tokens: i32,
    /// > 0: query heads.
    pub num_heads: i32,
    /// > 0.
    pub head_size: i32,
    /// The dtype of the partial outputs: F32, F16 or BF16.
    pub out_dtype: KvDtype,
    /// NCCL: check at every call that all ranks pass equal shapes (costs a synchronization).
    pub validate_each_call: bool,
}

impl CommOptions {
    /// An in-process communicator of `num_ranks` ranks.
    pub fn in_process(num_ranks: i32, max_num_tokens: i32, num_heads: i32, head_size: i32, out_dtype: KvDtype) -> Self {
        CommOptions {
            kind: CommKind::InProcess,
            num_ranks,
            rank: 0,
            nccl_unique_id: None,
            max_num_tokens,
            num_heads,
            head_size,
            out_dtype,
            validate_each_call: false,
        }
    }

    /// Rank `rank` of an NCCL communicator of `num_ranks` ranks sharing `unique_id`.
    pub fn nccl(
        num_ranks: i32,
        rank: i32,
        unique_id: [u8; NCCL_UNIQUE_ID_BYTES],
        max_num_tokens: i32,
        num_heads: i32,
        head_size: i32,
        out_dtype: KvDtype,
    ) -> Self {
        CommOptions {
            kind: CommKind::Nccl,
            rank,
            nccl_unique_id: Some(unique_id),
            ..CommOptions::in_process(num_ranks, max_num_tokens, num_heads, head_size, out_dtype)
        }
    }
}

/// NCCL's unique id for a new communicator, on the rank that creates it; distribute it to every
/// rank. `Status::NotSupported` if NCCL cannot be loaded.
pub fn nccl_unique_id() -> Result<[u8; NCCL_UNIQUE_ID_BYTES]> {
    let mut id = [0u8; NCCL_UNIQUE_ID_BYTES];
    // SAFETY: `id` has the KVP_NCCL_UNIQUE_ID_BYTES bytes the call writes.
    check(unsafe { sys::kvp_comm_nccl_unique_id(id.as_mut_ptr()) })?;
    Ok(id)
}

/// One rank's partial attention state: `out` `[T, H, D]` of the comm's dtype and `lse` `[T, H]` f32
/// (natural log; -inf for rows that saw no key). Both receive the merge over all ranks.
#[derive(Debug)]
pub struct PartialState<'a> {
    pub out: TensorMut<'a>,
    pub lse: TensorMut<'a>,
}

impl<'a> PartialState<'a> {
    pub fn new(out: TensorMut<'a>, lse: TensorMut<'a>) -> Self {
        PartialState { out, lse }
    }
}

/// A communicator (`kvp_comm`), destroyed on drop; cannot outlive its context.
#[derive(Debug)]
pub struct Comm<'ctx> {
    raw: NonNull<sys::kvp_comm>,
    options: CommOptions,
    /// Set when a round was left open by a failed `merge_all`: the library still points at tensors
    /// that have been released, so no later call may complete that round.
    poisoned: AtomicBool,
    /// The DLTensors (with their shapes) of the ranks in the open round, at stable addresses: the
    /// library may keep the DLTensor pointers it was given until the round completes. Every
    /// contribution holds this lock across its C call.
    slots: Mutex<Box<[Slot]>>,
    _context: PhantomData<&'ctx Context>,
}

#[derive(Debug)]
struct Slot {
    in_round: bool,
    out: sys::DLTensor,
    lse: sys::DLTensor,
    out_shape: [i64; crate::tensor::MAX_NDIM],
    lse_shape: [i64; crate::tensor::MAX_NDIM],
}

// SAFETY (Send): no thread affinity on the CPU; an NCCL communicator belongs to its rank, not to
// a thread (the header: "one process or thread per GPU").
unsafe impl Send for Comm<'_> {}
// SAFETY (Sync): the header says in-process handles are thread-safe. Through `&self` only
// `pending` (a read) and the unsafe `contribute` are reachable; the calls that merge safely take
// `&mut self`. `contribute` on an NCCL handle from several threads at once is excluded by its
// safety contract.
unsafe impl Sync for Comm<'_> {}

fn dtype_of(d: KvDtype) -> Option<DType> {
    match d {
        KvDtype::F32 => Some(DType::F32),
        KvDtype::F16 => Some(DType::F16),
        KvDtype::BF16 => Some(DType::BF16),
        KvDtype::Fp8E4m3 => None,
    }
}

impl<'ctx> Comm<'ctx> {
    /// Creates a communicator on `context`. NCCL: collective over all ranks (each must call it).
    pub fn new(context: &'ctx Context, options: &CommOptions) -> Result<Comm<'ctx>> {
        let mut o: sys::kvp_comm_options = sys::Zeroed::zeroed();
        o.struct_size = std::mem::size_of::<sys::kvp_comm_options>();
        o.kind = options.kind.to_raw() as i32;
        o.num_ranks = options.num_ranks;
        o.rank = options.rank;
        o.nccl_unique_id = options.nccl_unique_id.as_ref().map_or(ptr::null(), |id| id.as_ptr());
        o.max_num_tokens = options.max_num_tokens;
        o.num_heads = options.num_heads;
        o.head_size = options.head_size;
        o.out_dtype = options.out_dtype.to_raw() as i32;
        o.validate_each_call = options.validate_each_call as i32;
        let mut raw = ptr::null_mut();
        // SAFETY: live context; complete options whose unique id (if any) outlives the call; valid
        // out pointer.
        check(unsafe { sys::kvp_comm_create(context.as_raw(), &o, &mut raw) })?;
        Ok(Comm {
            raw: NonNull::new(raw).expect("kvp_comm_create returned OK and NULL"),
            options: options.clone(),
            poisoned: AtomicBool::new(false),
            slots: Mutex::new(
                (0..options.num_ranks.max(0))
                    .map(|_| Slot {
                        in_round: false,
                        out: sys::Zeroed::zeroed(),
                        lse: sys::Zeroed::zeroed(),
                        out_shape: [0; crate::tensor::MAX_NDIM],
                        lse_shape: [0; crate::tensor::MAX_NDIM],
                    })
                    .collect(),
            ),
            _context: PhantomData,
        })
    }

    pub fn options(&self) -> &CommOptions {
        &self.options
    }

    /// In-process: the ranks that contributed to the round in progress (0 when none is open).
    pub fn pending(&self) -> Result<i32> {
        let mut n = 0;
        // SAFETY: live handle; valid out pointer.
        check(unsafe { sys::kvp_comm_pending(self.raw.as_ptr(), &mut n) })?;
        Ok(n)
    }

    fn not_poisoned(&self, what: &str) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::binding(
                Status::FailedPrecondition,
                format!("Comm::{what}: an earlier merge_all failed part way and left its round open; drop this comm"),
            ));
        }
        Ok(())
    }

    /// The binding's own check of one partial against the comm (what the library checks too), so
    /// that a round handed over by `merge_all` does not fail part way.
    fn check_partial(&self, what: &str, rank: usize, p: &PartialState<'_>, rows: Option<i64>) -> Result<i64> {
        let o = &self.options;
        let bad = |m: String| Err(Error::invalid(format!("Comm::{what}: rank {rank}: {m}")));
        let want = dtype_of(o.out_dtype);
        if Some(p.out.dtype()) != want {
            return bad(format!("out has dtype {:?}, the comm's is {:?}", p.out.dtype(), o.out_dtype));
        }
        let s = p.out.shape();
        if s.len() != 3 || s[1] != o.num_heads as i64 || s[2] != o.head_size as i64 {
            return bad(format!("out has shape {s:?}, expected [T, {}, {}]", o.num_heads, o.head_size));
        }
        let t = s[0];
        if t > o.max_num_tokens as i64 {
            return bad(format!("out has {t} rows, more than max_num_tokens={}", o.max_num_tokens));
        }
        if let Some(r) = rows {
            if t != r {
                return bad(format!("out has {t} rows but rank 0's has {r}"));
            }
        }
        if p.lse.dtype() != DType::F32 || p.lse.shape() != [t, o.num_heads as i64] {
            return bad(format!(
                "lse is {:?} of shape {:?}, expected F32 [{t}, {}]",
                p.lse.dtype(),
                p.lse.shape(),
                o.num_heads
            ));
        }
        Ok(t)
    }

    /// In-process: merges one whole round, `partials[r]` being rank r's state (exactly `num_ranks`
    /// of them), and writes the merge into every rank's `out` and `lse`. Checks everything the
    /// library would before contributing; `Status::FailedPrecondition` if another round is open.
    pub fn merge_all(&mut self, partials: &mut [PartialState<'_>]) -> Result<()> {
        const WHAT: &str = "merge_all";
        self.not_poisoned(WHAT)?;
        if self.options.kind != CommKind::InProcess {
            return Err(Error::binding(
                Status::NotSupported,
                format!("Comm::{WHAT}: needs an in-process comm; an NCCL comm merges one rank per handle (merge)"),
            ));
        }
        if partials.len() != self.options.num_ranks as usize {
            return Err(Error::invalid(format!(
                "Comm::{WHAT}: {} partial states for a comm of num_ranks={}",
                partials.len(),
                self.options.num_ranks
            )));
        }
        let mut rows = None;
        for (r, p) in partials.iter().enumerate() {
            rows = Some(self.check_partial(WHAT, r, p, rows)?);
        }
        let open = self.pending()?;
        if open != 0 {
            return Err(Error::binding(
                Status::FailedPrecondition,
                format!("Comm::{WHAT}: a round with {open} contribution(s) is already open"),
            ));
        }
        for (r, p) in partials.iter_mut().enumerate() {
            // SAFETY: every tensor exactly covers its exclusively borrowed slice, and `partials`
            // (so every slice) stays borrowed until this loop ends: the last contribution completes
            // the round (all ranks, none open before, `&mut self` excludes other safe callers), so
            // the library keeps no pointer past this call. A failure part way is handled below.
            if let Err(e) = unsafe { self.contribute_locked(WHAT, r as i32, &mut p.out, &mut p.lse) } {
                if r > 0 {
                    // Ranks 0..r are held by an open round over slices released on return.
                    self.poisoned.store(true, Ordering::Release);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Contributes `rank`'s partial and receives the merge in place, where the call itself
    /// completes it: an NCCL comm (every rank calls with its own handle), or an in-process comm of
    /// one rank. An in-process comm of several ranks takes [`merge_all`](Self::merge_all).
    pub fn merge(&mut self, rank: i32, out: &mut TensorMut<'_>, lse: &mut TensorMut<'_>) -> Result<()> {
        self.not_poisoned("merge")?;
        if self.options.kind == CommKind::InProcess && self.options.num_ranks != 1 {
            return Err(Error::binding(
                Status::FailedPrecondition,
                format!(
                    "Comm::merge: an in-process comm of num_ranks={} completes a round only with every rank's \
                     partial: use merge_all",
                    self.options.num_ranks
                ),
            ));
        }
        // SAFETY: tensors exactly cover their exclusively borrowed slices; the call completes the
        // merge (one rank, or NCCL's per-rank call), so nothing is kept past it.
        unsafe { self.contribute_locked("merge", rank, out, lse) }
    }

    /// Contributes `rank`'s partial to the round in progress (any order, any thread). The call that
    /// completes the round writes the merge into every contributor's `out` and `lse`.
    /// `Status::FailedPrecondition` if `rank` already contributed to this round.
    ///
    /// # Safety
    /// If the call succeeds without completing the round, the library keeps pointers to `out` and
    /// `lse`: their memory must stay allocated and must be neither read nor written until the round
    /// completes (then synchronize with the completing thread before reading). On an NCCL comm, no
    /// two calls may run at once.
    pub unsafe fn contribute(&self, rank: i32, out: &mut TensorMut<'_>, lse: &mut TensorMut<'_>) -> Result<()> {
        self.not_poisoned("contribute")?;
        // SAFETY: forwarded contract.
        unsafe { self.contribute_locked("contribute", rank, out, lse) }
    }

    /// One contribution through the rank's slot, under the slots' lock.
    ///
    /// # Safety
    /// As [`contribute`](Self::contribute).
    unsafe fn contribute_locked(
        &self,
        what: &str,
        rank: i32,
        out: &mut TensorMut<'_>,
        lse: &mut TensorMut<'_>,
    ) -> Result<()> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if rank < 0 || rank as usize >= slots.len() {
            return Err(Error::binding(
                Status::InvalidArgument,
                format!("Comm::{what}: rank={rank} is outside [0, num_ranks={})", slots.len()),
            ));
        }
        let slot = &mut slots[rank as usize];
        if slot.in_round {
            // Its slot is in use by the open round: refuse as the library would, before touching it.
            return Err(Error::binding(
                Status::FailedPrecondition,
                format!("Comm::{what}: rank {rank} already contributed to the round in progress"),
            ));
        }
        let (o, l) = (out.dl_mut(), lse.dl_mut());
        let (on, ln) = (o.ndim.clamp(0, 5) as usize, l.ndim.clamp(0, 5) as usize);
        // SAFETY: dl_mut's shape pointers hold ndim entries (at most MAX_NDIM).
        unsafe {
            ptr::copy_nonoverlapping(o.shape, slot.out_shape.as_mut_ptr(), on);
            ptr::copy_nonoverlapping(l.shape, slot.lse_shape.as_mut_ptr(), ln);
        }
        slot.out = o;
        slot.lse = l;
        slot.out.shape = slot.out_shape.as_mut_ptr();
        slot.lse.shape = slot.lse_shape.as_mut_ptr();
        let (op, lp): (*mut sys::DLTensor, *mut sys::DLTensor) = (&mut slot.out, &mut slot.lse);
        // SAFETY: the slot's DLTensors and shapes live in the comm (a boxed slice: stable addresses)
        // and are not rewritten while their rank is in the round; the data they point at is the
        // caller's (see the contract). The lock serializes contributions.
        let s = unsafe { sys::kvp_comm_merge_attention(self.raw.as_ptr(), rank, op, lp) };
        check(s)?;
        if self.options.kind == CommKind::Nccl {
            return Ok(()); // each NCCL call is a whole round of this handle's rank
        }
        slots[rank as usize].in_round = true;
        // The call that completes the round leaves none open: every slot is free again.
        let mut open = 0;
        // SAFETY: live handle; valid out pointer.
        if unsafe { sys::kvp_comm_pending(self.raw.as_ptr(), &mut open) } == sys::KVP_OK && open == 0 {
            slots.iter_mut().for_each(|s| s.in_round = false);
        }
        Ok(())
    }

    /// The raw handle, for interop with C code. It stays owned by `self`.
    pub fn as_raw(&self) -> *const sys::kvp_comm {
        self.raw.as_ptr()
    }
}

impl Drop for Comm<'_> {
    fn drop(&mut self) {
        // SAFETY: created by kvp_comm_create, destroyed once; destroying reads no contributed tensor.
        unsafe { sys::kvp_comm_destroy(self.raw.as_ptr()) }
    }
}
