//! The promise table: promises live in blocks of [`BLOCK`] entries, so a
//! map that hands out a million promises makes one allocation per block
//! instead of one per promise, and its promises sit next to each other.
//!
//! Each thread keeps one block with free entries per promise type (the
//! type's latest block); a block leaves the table when its last entry is
//! handed out. Each entry counts its own handles (promises and waiting
//! replies): when the last one goes, the entry's value is dropped at once,
//! as it would be with one allocation per promise; the block's memory goes
//! when it has left the table and the last handle to any of its entries is
//! gone. A long-lived promise can so keep at most one block (about 1 KiB for
//! a GET's promise) alive, never the values of its neighbours. Promises of
//! large types (see [`LARGE_STATE`]) get a block of their own.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

use super::State;

/// Entries per block.
pub(super) const BLOCK: usize = 32;

/// Promise states larger than this many bytes are not pooled: a block of
/// them would hold 32 times a large value's room for one live promise.
const LARGE_STATE: usize = 256;

/// One promise's place in a block.
pub(super) struct Entry<T> {
    pub(super) state: RefCell<State<T>>,
    /// Promises and waiters pointing here.
    handles: Cell<usize>,
}

/// A run of entries of one type, handed out in order and never reused.
pub(super) struct Block<T> {
    /// Never empty; built on the heap, one entry at a time.
    entries: Box<[Entry<T>]>,
    /// Entries handed out so far.
    used: Cell<usize>,
}

thread_local! {
    /// The blocks with entries still free, one per promise type made on
    /// this thread (each an `Rc<Block<T>>`), the type used last first.
    static OPEN: RefCell<Vec<Box<dyn Any>>> = const { RefCell::new(Vec::new()) };
}

/// Whether promises of `T` are made in shared blocks (small states).
fn pooled<T>() -> bool {
    std::mem::size_of::<State<T>>() <= LARGE_STATE
}

impl<T> Block<T> {
    fn new(entries: usize) -> Block<T> {
        Block {
            entries: (0..entries.max(1))
                .map(|_| Entry {
                    state: RefCell::new(State::Taken),
                    handles: Cell::new(0),
                })
                .collect(),
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
        self.used.get() >= self.entries.len()
    }

    /// The entry at `index`, which this block handed out (so in range).
    pub(super) fn entry(&self, index: u32) -> &Entry<T> {
        &self.entries[index as usize]
    }

    /// One more handle to entry `index`.
    pub(super) fn retain(&self, index: u32) {
        let entry = self.entry(index);
        entry.handles.set(entry.handles.get().saturating_add(1));
    }

    /// Whether entry `index` has a handle besides one waiter's, or a
    /// subscriber (a callback, a taker).
    pub(super) fn is_watched(&self, index: u32) -> bool {
        let entry = self.entry(index);
        entry.handles.get() > 1
            || match entry.state.try_borrow() {
                Ok(state) => matches!(&*state, State::Pending(Some(_))),
                Err(_) => true,
            }
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
    if !pooled::<T>() {
        return alone(state);
    }
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

/// This thread's block for `T` with entries free, made when missing; moved
/// to the front, so a map making promises of a few types finds each at once.
fn open_block<T: 'static>() -> Option<Rc<Block<T>>> {
    let mut replaced = None;
    let block = OPEN
        .try_with(|open| {
            let mut open = open.try_borrow_mut().ok()?;
            // The usual case: the same type as last time, with room.
            if let Some(block) = open.first().and_then(|b| b.downcast_ref::<Rc<Block<T>>>()) {
                if !block.is_full() {
                    return Some(block.clone());
                }
            }
            let found = open
                .iter()
                .position(|b| b.downcast_ref::<Rc<Block<T>>>().is_some());
            match found {
                Some(pos) => {
                    open.swap(0, pos);
                    let block = open[0].downcast_ref::<Rc<Block<T>>>()?.clone();
                    if !block.is_full() {
                        return Some(block);
                    }
                    // Full but still here (its closing found the table
                    // busy): replaced by a fresh one below.
                    let fresh = Rc::new(Block::<T>::new(BLOCK));
                    replaced = Some(std::mem::replace(&mut open[0], Box::new(fresh.clone())));
                    Some(fresh)
                }
                None => {
                    let fresh = Rc::new(Block::<T>::new(BLOCK));
                    open.insert(0, Box::new(fresh.clone()));
                    Some(fresh)
                }
            }
        })
        .ok()
        .flatten();
    // Dropped outside the borrow: a block's drop runs its values' drops.
    drop(replaced);
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
            Some(open.swap_remove(pos))
        })
        .ok()
        .flatten();
    drop(closed);
}

/// A block of its own, for when the thread's table cannot be used (the
/// thread is exiting, or a value's drop makes promises while it is busy).
fn alone<T>(state: State<T>) -> (Rc<Block<T>>, u32) {
    let block = Rc::new(Block::new(1));
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

    /// A distinct promise type per `N`.
    struct Kind<const N: usize>;

    /// Many promise types made in turn (a map doing GET, TTL, HGETALL, ...
    /// per key) still fill shared blocks, however many types there are.
    #[test]
    fn many_types_in_turn_still_share_blocks() {
        fn one<const N: usize>(keep: &mut Vec<Box<dyn Any>>) {
            keep.push(Box::new(place::<Kind<N>>(State::Taken)));
        }
        let mut keep: Vec<Box<dyn Any>> = Vec::new();
        let (mut blocks, mut last) = (0, None::<Rc<Block<Kind<0>>>>);
        for _ in 0..1000 {
            let (b0, _) = place::<Kind<0>>(State::Taken);
            one::<1>(&mut keep);
            one::<2>(&mut keep);
            one::<3>(&mut keep);
            one::<4>(&mut keep);
            one::<5>(&mut keep);
            one::<6>(&mut keep);
            one::<7>(&mut keep);
            one::<8>(&mut keep);
            one::<9>(&mut keep);
            one::<10>(&mut keep);
            one::<11>(&mut keep);
            one::<12>(&mut keep);
            if !last.as_ref().is_some_and(|l| Rc::ptr_eq(l, &b0)) {
                blocks += 1;
            }
            last = Some(b0.clone());
            keep.push(Box::new(b0));
        }
        assert!(
            blocks <= 1000 / BLOCK + 2,
            "1000 promises of one type took {blocks} blocks"
        );
    }

    /// A promise of a large type gets a block of one entry, built on the
    /// heap (not 32 of them on the stack).
    #[test]
    fn large_types_are_not_pooled() {
        let run = || {
            let (block, i) = place::<[u8; 100_000]>(State::Taken);
            assert_eq!((block.entries.len(), i), (1, 0));
        };
        // A small stack, where 32 such entries would overflow.
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(run)
            .unwrap()
            .join()
            .unwrap();
    }
}
