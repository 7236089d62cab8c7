//! The block manager through the safe API: prefix caching, fork and copy-on-write, admission
//! verdicts, block tables and slot mappings, swapping, state slots.
use kvplug::*;

fn manager(block_size: i32, blocks: i32, caching: bool) -> BlockManager {
    let mut o = BlockManagerOptions::new(block_size, blocks);
    o.enable_prefix_caching = caching;
    BlockManager::new(&o).unwrap()
}

fn prompt(system: usize, user: usize, salt: i32) -> Vec<i32> {
    (0..system as i32).map(|i| 1000 + i).chain((0..user as i32).map(|i| 5000 + 100 * salt + i)).collect()
}

#[test]
fn prefix_blocks_are_served_only_after_mark_computed() {
    let mut bm = manager(16, 64, true);
    let a = prompt(48, 13, 0);
    assert_eq!(bm.allocate(1, &a, 0).unwrap(), 0, "empty cache");
    // Seq 1's blocks are allocated but their K/V is not written yet: no hits.
    assert_eq!(bm.allocate(2, &prompt(48, 5, 1), 0).unwrap(), 0);
    bm.mark_computed(1, a.len() as i64).unwrap();
    // Now the three full system-prompt blocks are published.
    assert_eq!(bm.allocate(3, &prompt(48, 7, 2), 0).unwrap(), 48);
    let (t1, t3) = (bm.block_table(1).unwrap(), bm.block_table(3).unwrap());
    assert_eq!(t1[..3], t3[..3], "the cached prefix blocks are shared");
    assert_ne!(t1[3], t3[3], "the user parts are private");
    let s = bm.stats().unwrap();
    assert!(s.prefix_hit_blocks >= 3, "{s:?}");
    assert!(s.prefix_queried_blocks >= s.prefix_hit_blocks, "{s:?}");
    // A different extra key (tenant salt) sees none of them.
    assert_eq!(bm.allocate(4, &prompt(48, 7, 2), 99).unwrap(), 0);
}

#[test]
fn fully_cached_prompt_still_computes_one_token() {
    let mut bm = manager(16, 16, true);
    let p = prompt(32, 0, 0);
    bm.allocate(1, &p, 0).unwrap();
    bm.mark_computed(1, 32).unwrap();
    // Both blocks hit, but the header promises cached < num_tokens: the last block is recomputed.
    assert_eq!(bm.allocate(2, &p, 0).unwrap(), 16);
}

#[test]
fn fork_then_append_copies_the_shared_partial_block() {
    let mut bm = manager(16, 16, false);
    bm.allocate_tokens(1, 20).unwrap(); // two blocks, the second partially filled
    bm.fork(1, 2).unwrap();
    let parent = bm.block_table(1).unwrap();
    assert_eq!(bm.block_table(2).unwrap(), parent, "a fork shares every block");
    let copy = bm.append_tokens(2, 1).unwrap().expect("the shared partial block must be copied");
    assert_eq!(copy.src, parent[1]);
    assert!(!parent.contains(&copy.dst), "copied into a fresh block");
    let child = bm.block_table(2).unwrap();
    assert_eq!(child, vec![parent[0], copy.dst]);
    // The parent is now the only owner of its last block: no copy.
    assert_eq!(bm.append_tokens(1, 1).unwrap(), None);
    assert_eq!(bm.stats().unwrap().num_used_blocks, 3);
    assert_eq!((bm.num_tokens(1).unwrap(), bm.num_tokens(2).unwrap()), (21, 21));
}

#[test]
fn admission_verdicts() {
    let mut bm = manager(16, 4, false);
    assert_eq!(bm.can_allocate_tokens(100, 0).unwrap(), AllocVerdict::Never, "7 blocks > a pool of 4");
    assert_eq!(bm.can_allocate_tokens(64, 0).unwrap(), AllocVerdict::Ok);
    bm.allocate_tokens(1, 48).unwrap();
    assert_eq!(bm.can_allocate_tokens(32, 0).unwrap(), AllocVerdict::Later, "1 block free, 2 needed");
    assert!(bm.can_append(1, 16).unwrap());
    assert!(!bm.can_append(1, 17).unwrap(), "would need a fifth block");
    bm.free(1).unwrap();
    assert_eq!(bm.can_allocate_tokens(32, 0).unwrap(), AllocVerdict::Ok);
}

#[test]
fn slot_mapping_follows_the_block_table() {
    let mut bm = manager(8, 32, false);
    bm.allocate_tokens(1, 5).unwrap();
    bm.allocate_tokens(2, 30).unwrap();
    let table = bm.block_table(2).unwrap();
    assert_eq!(table.len(), 4);
    let slots = bm.slot_mapping(2, 3, 25).unwrap();
    for (i, &s) in slots.iter().enumerate() {
        let p = 3 + i;
        assert_eq!(s, table[p / 8] as i64 * 8 + (p % 8) as i64, "position {p}");
    }
}

#[test]
fn batch_block_tables_are_padded_with_minus_one() {
    let mut bm = manager(16, 32, false);
    bm.allocate_tokens(7, 10).unwrap();
    bm.allocate_tokens(8, 40).unwrap();
    let (table, lens) = bm.block_tables(&[8, 7], 4).unwrap();
    assert_eq!(lens, vec![40, 10]);
    assert_eq!(&table[0..3], &bm.block_table(8).unwrap()[..]);
    assert_eq!(table[3], -1);
    assert_eq!(table[4], bm.block_table(7).unwrap()[0]);
    assert_eq!(&table[5..8], &[-1, -1, -1]);
}

#[test]
fn swap_out_and_in() {
    let mut o = BlockManagerOptions::new(16, 8);
    o.num_host_blocks = 4;
    let mut bm = BlockManager::new(&o).unwrap();
    bm.allocate_tokens(1, 40).unwrap();
    let device = bm.block_table(1).unwrap();
    let out = bm.swap_out(1).unwrap();
    assert_eq!(out.len(), 3, "one copy per block");
    assert_eq!(out.iter().map(|c| c.src).collect::<Vec<_>>(), device);
    assert!(bm.is_swapped(1).unwrap());
    let s = bm.stats().unwrap();
    assert_eq!((s.num_swapped_sequences, s.num_free_host_blocks, s.num_used_blocks), (1, 1, 0));
    let back = bm.swap_in(1).unwrap();
    assert_eq!(back.len(), 3);
    // Swap-in reads the host blocks swap-out wrote.
    assert_eq!(back.iter().map(|c| c.src).collect::<Vec<_>>(), out.iter().map(|c| c.dst).collect::<Vec<_>>());
    assert!(!bm.is_swapped(1).unwrap());
    assert_eq!(bm.num_tokens(1).unwrap(), 40);
    assert_eq!(bm.stats().unwrap().num_free_host_blocks, 4);
}

#[test]
fn state_slots_are_per_sequence() {
    let mut o = BlockManagerOptions::new(16, 8);
    o.num_state_slots = 2;
    let mut bm = BlockManager::new(&o).unwrap();
    bm.allocate_tokens(1, 3).unwrap();
    bm.fork(1, 2).unwrap();
    let (a, b) = (bm.state_slot(1).unwrap().unwrap(), bm.state_slot(2).unwrap().unwrap());
    assert_ne!(a, b, "a fork gets its own state slot");
    assert!((0..2).contains(&a) && (0..2).contains(&b));
    // No state slots configured: None.
    let mut plain = manager(16, 8, false);
    plain.allocate_tokens(1, 3).unwrap();
    assert_eq!(plain.state_slot(1).unwrap(), None);
}

#[test]
fn freeing_every_sequence_returns_every_block() {
    let mut bm = manager(16, 32, true);
    for id in 1..=4u64 {
        bm.allocate(id, &prompt(48, 10 + id as usize, id as i32), 0).unwrap();
        bm.mark_computed(id, 1).unwrap();
    }
    assert!(bm.stats().unwrap().num_used_blocks > 0);
    for id in 1..=4u64 {
        bm.free(id).unwrap();
    }
    let s = bm.stats().unwrap();
    assert_eq!((s.num_used_blocks, s.num_sequences), (0, 0));
    assert_eq!(s.num_free_blocks + s.num_cached_free_blocks, 32);
}
