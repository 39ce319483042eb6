//! The promise table: promises live in blocks of [`BLOCK`] entries, so a
//! map that hands out a million promises makes one allocation per block
//! instead of one per promise, and its promises sit next to each other.
//!
//! Each entry counts its own handles (promises and waiting replies): when
//! the last one goes, the entry's value is dropped at once, as it would be
//! with one allocation per promise; the block's memory goes when the last
//! handle to any of its entries does. A long-lived promise can so keep at
//! most one block (about 1 KiB) alive, never the values of its neighbours.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

use super::State;

/// Entries per block.
pub(super) const BLOCK: usize = 32;

/// Block types kept open per thread: a map usually makes promises of a few
/// types, each filling its own block.
const OPEN_TYPES: usize = 8;

/// One promise's place in a block.
pub(super) struct Entry<T> {
    pub(super) state: RefCell<State<T>>,
    /// Promises and waiters pointing here.
    handles: Cell<usize>,
}

/// A run of entries of one type, handed out in order and never reused.
pub(super) struct Block<T> {
    entries: [Entry<T>; BLOCK],
    /// Entries handed out so far.
    used: Cell<usize>,
}

thread_local! {
    /// Blocks with entries still free, one per promise type recently made
    /// on this thread (each an `Rc<Block<T>>`), the latest first.
    static OPEN: RefCell<Vec<Box<dyn Any>>> = const { RefCell::new(Vec::new()) };
}

impl<T> Block<T> {
    fn new() -> Block<T> {
        Block {
            entries: std::array::from_fn(|_| Entry {
                state: RefCell::new(State::Taken),
                handles: Cell::new(0),
            }),
            used: Cell::new(0),
        }
    }

    /// Takes the next free entry, starting it at `state` with one handle.
    fn claim(&self, state: State<T>) -> Result<usize, State<T>> {
        let index = self.used.get();
        let Some(entry) = self.entries.get(index) else {
            return Err(state);
        };
        // A fresh entry is never borrowed.
        let Ok(mut slot) = entry.state.try_borrow_mut() else {
            return Err(state);
        };
        // What a fresh entry holds is `Taken`, which owns nothing: no drop.
        std::mem::forget(std::mem::replace(&mut *slot, state));
        self.used.set(index + 1);
        entry.handles.set(1);
        Ok(index)
    }

    fn is_full(&self) -> bool {
        self.used.get() >= BLOCK
    }

    /// The entry at `index`, which this block handed out (so below
    /// [`BLOCK`]; the modulo only spares a bounds check).
    pub(super) fn entry(&self, index: u32) -> &Entry<T> {
        &self.entries[index as usize % BLOCK]
    }

    /// One more handle to entry `index`.
    pub(super) fn retain(&self, index: u32) {
        let entry = self.entry(index);
        entry.handles.set(entry.handles.get().saturating_add(1));
    }

    /// One handle to entry `index` fewer; the last one drops its value.
    pub(super) fn release(&self, index: u32) {
        let entry = self.entry(index);
        let left = entry.handles.get().saturating_sub(1);
        entry.handles.set(left);
        if left > 0 {
            return;
        }
        // Taken out first, dropped after the borrow ends: the value's drop
        // (callbacks holding other promises) may reach this block again.
        let old = match entry.state.try_borrow_mut() {
            Ok(mut state) => std::mem::replace(&mut *state, State::Taken),
            Err(_) => return,
        };
        drop(old);
    }
}

/// Places a new promise in this thread's open block for `T`, opening a
/// block when there is none or it is full. Returns the block and index.
pub(super) fn place<T: 'static>(state: State<T>) -> (Rc<Block<T>>, u32) {
    let Some(block) = open_block::<T>() else {
        return alone(state);
    };
    let index = match block.claim(state) {
        Ok(index) => index,
        Err(state) => return alone(state),
    };
    if block.is_full() {
        // Whoever holds its promises keeps it alive from here.
        close_block(&block);
    }
    (block, index as u32)
}

/// This thread's block for `T` with entries free, made when missing.
fn open_block<T: 'static>() -> Option<Rc<Block<T>>> {
    let mut evicted = None;
    let block = OPEN
        .try_with(|open| {
            let mut open = open.try_borrow_mut().ok()?;
            if let Some(block) = open.iter().find_map(|b| b.downcast_ref::<Rc<Block<T>>>()) {
                return Some(block.clone());
            }
            if open.len() >= OPEN_TYPES {
                evicted = open.pop();
            }
            let fresh = Rc::new(Block::<T>::new());
            open.insert(0, Box::new(fresh.clone()));
            Some(fresh)
        })
        .ok()
        .flatten();
    // Dropped outside the borrow: a block's drop runs its values' drops.
    drop(evicted);
    block
}

/// Takes a full block out of this thread's open blocks.
fn close_block<T: 'static>(block: &Rc<Block<T>>) {
    let closed = OPEN
        .try_with(|open| {
            let mut open = open.try_borrow_mut().ok()?;
            let pos = open.iter().position(|b| {
                b.downcast_ref::<Rc<Block<T>>>()
                    .is_some_and(|b| Rc::ptr_eq(b, block))
            })?;
            Some(open.remove(pos))
        })
        .ok()
        .flatten();
    drop(closed);
}

/// A block of its own, for when the thread's table cannot be used (the
/// thread is exiting, or a value's drop makes promises while it is busy).
fn alone<T>(state: State<T>) -> (Rc<Block<T>>, u32) {
    let block = Rc::new(Block::new());
    let index = block.claim(state).unwrap_or(0);
    (block, index as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promises_of_one_type_share_blocks_in_order() {
        let (a, i) = place::<u64>(State::Taken);
        let (b, j) = place::<u64>(State::Taken);
        assert!(
            Rc::ptr_eq(&a, &b) || j == 0,
            "same block unless a new one began"
        );
        if Rc::ptr_eq(&a, &b) {
            assert_eq!(j, i + 1);
        }
        // Other types take other blocks.
        let (_c, _) = place::<String>(State::Taken);
        let (d, k) = place::<u64>(State::Taken);
        assert!(Rc::ptr_eq(&b, &d) || k == 0);
    }

    #[test]
    fn a_full_block_is_left_to_its_promises() {
        let first: Vec<_> = (0..BLOCK * 3).map(|_| place::<i8>(State::Taken)).collect();
        let blocks = first
            .windows(2)
            .filter(|w| !Rc::ptr_eq(&w[0].0, &w[1].0))
            .count();
        assert!((2..=3).contains(&blocks), "{blocks} block changes");
        assert!(first.iter().all(|(_, i)| (*i as usize) < BLOCK));
    }

    #[test]
    fn the_last_handle_drops_the_value() {
        let value = Rc::new(());
        let (block, i) = place::<Rc<()>>(State::Settled(Ok(value.clone())));
        block.retain(i);
        assert_eq!(Rc::strong_count(&value), 2);
        block.release(i);
        assert_eq!(Rc::strong_count(&value), 2, "one handle left");
        block.release(i);
        assert_eq!(
            Rc::strong_count(&value),
            1,
            "value dropped with the last handle"
        );
    }
}
