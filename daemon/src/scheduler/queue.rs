//! The waiting line: bounded, interactive before background, and round robin
//! across clients within a priority, so one client with many requests waits
//! its turn behind a client with one. Pure data structure, no model.

use std::collections::{HashMap, VecDeque};

/// How urgently a request wants a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Priority {
    /// A person is waiting for the answer.
    #[default]
    Interactive,
    /// Batch work: admitted only when no interactive request waits.
    Background,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Interactive => "interactive",
            Priority::Background => "background",
        }
    }
}

/// One priority class: clients in turn order, each with its own FIFO.
#[derive(Debug)]
struct Class<T> {
    turn: VecDeque<String>,
    waiting: HashMap<String, VecDeque<T>>,
}

impl<T> Default for Class<T> {
    fn default() -> Self {
        Class {
            turn: VecDeque::new(),
            waiting: HashMap::new(),
        }
    }
}

impl<T> Class<T> {
    fn push(&mut self, client: &str, item: T) {
        match self.waiting.get_mut(client) {
            Some(q) => q.push_back(item),
            None => {
                self.waiting
                    .insert(client.to_owned(), VecDeque::from([item]));
                self.turn.push_back(client.to_owned());
            }
        }
    }

    /// The first request of the client whose turn it is; that client goes to
    /// the back of the line if it has more.
    fn pop(&mut self) -> Option<T> {
        let client = self.turn.pop_front()?;
        let q = self
            .waiting
            .get_mut(&client)
            .expect("every client in turn has a queue");
        let item = q.pop_front().expect("queues in turn are non-empty");
        if q.is_empty() {
            self.waiting.remove(&client);
        } else {
            self.turn.push_back(client);
        }
        Some(item)
    }

    /// Keeps the items `keep` says to, in order; returns the others.
    fn retain(&mut self, keep: &mut impl FnMut(&T) -> bool) -> Vec<T> {
        let mut removed = Vec::new();
        for q in self.waiting.values_mut() {
            let mut kept = VecDeque::with_capacity(q.len());
            for item in q.drain(..) {
                if keep(&item) {
                    kept.push_back(item);
                } else {
                    removed.push(item);
                }
            }
            *q = kept;
        }
        self.waiting.retain(|_, q| !q.is_empty());
        let waiting = &self.waiting;
        self.turn.retain(|c| waiting.contains_key(c));
        removed
    }

    fn len(&self) -> usize {
        self.waiting.values().map(VecDeque::len).sum()
    }
}

/// Requests waiting for a slot, at most `capacity` of them.
#[derive(Debug)]
pub struct FairQueue<T> {
    interactive: Class<T>,
    background: Class<T>,
    len: usize,
    capacity: usize,
}

impl<T> FairQueue<T> {
    pub fn new(capacity: usize) -> Self {
        FairQueue {
            interactive: Class::default(),
            background: Class::default(),
            len: 0,
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// A new capacity (a reload); requests already waiting beyond it keep
    /// their places.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
    }

    /// Adds a request at the back of its client's line; a full queue hands
    /// it back. `headroom` are slots free right now: requests about to be
    /// admitted do not count against the capacity.
    pub fn push(
        &mut self,
        client: &str,
        priority: Priority,
        item: T,
        headroom: usize,
    ) -> Result<(), T> {
        if self.len >= self.capacity + headroom {
            return Err(item);
        }
        match priority {
            Priority::Interactive => self.interactive.push(client, item),
            Priority::Background => self.background.push(client, item),
        }
        self.len += 1;
        Ok(())
    }

    /// The next request to admit: interactive first, clients in turn.
    pub fn pop(&mut self) -> Option<T> {
        let item = self.interactive.pop().or_else(|| self.background.pop())?;
        self.len -= 1;
        Some(item)
    }

    /// Removes the requests `keep` rejects (cancelled while waiting) and
    /// returns them; the others keep their places.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut removed = self.interactive.retain(&mut keep);
        removed.extend(self.background.retain(&mut keep));
        self.len -= removed.len();
        debug_assert_eq!(self.len, self.interactive.len() + self.background.len());
        removed
    }

    /// Empties the queue (shutdown), in admission order.
    pub fn drain(&mut self) -> Vec<T> {
        std::iter::from_fn(|| self.pop()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(q: &mut FairQueue<&'static str>) -> Vec<&'static str> {
        q.drain()
    }

    #[test]
    fn clients_take_turns_in_arrival_order() {
        let mut q = FairQueue::new(16);
        for item in ["a1", "a2", "a3"] {
            q.push("a", Priority::Interactive, item, 0).unwrap();
        }
        q.push("b", Priority::Interactive, "b1", 0).unwrap();
        q.push("c", Priority::Interactive, "c1", 0).unwrap();
        q.push("b", Priority::Interactive, "b2", 0).unwrap();
        assert_eq!(order(&mut q), ["a1", "b1", "c1", "a2", "b2", "a3"]);
        assert!(q.is_empty());
    }

    #[test]
    fn interactive_goes_before_background() {
        let mut q = FairQueue::new(16);
        q.push("a", Priority::Background, "a-bg1", 0).unwrap();
        q.push("a", Priority::Background, "a-bg2", 0).unwrap();
        q.push("b", Priority::Interactive, "b1", 0).unwrap();
        q.push("c", Priority::Background, "c-bg", 0).unwrap();
        q.push("a", Priority::Interactive, "a1", 0).unwrap();
        assert_eq!(q.pop(), Some("b1"));
        // A newcomer with interactive work still goes before waiting background work.
        q.push("d", Priority::Interactive, "d1", 0).unwrap();
        assert_eq!(order(&mut q), ["a1", "d1", "a-bg1", "c-bg", "a-bg2"]);
    }

    #[test]
    fn a_full_queue_hands_the_request_back() {
        let mut q = FairQueue::new(2);
        q.push("a", Priority::Interactive, 1, 0).unwrap();
        q.push("b", Priority::Background, 2, 0).unwrap();
        assert_eq!(q.push("c", Priority::Interactive, 3, 0), Err(3));
        assert_eq!(q.len(), 2);
        // With a slot free right now, one more may wait for it.
        q.push("c", Priority::Interactive, 4, 1).unwrap();
        assert_eq!(q.push("c", Priority::Interactive, 5, 1), Err(5));
        assert_eq!(q.retain(|&i| i != 4), [4]);
        assert_eq!(q.pop(), Some(1));
        q.push("c", Priority::Interactive, 3, 0).unwrap();
        assert_eq!(q.drain(), [3, 2]);
    }

    #[test]
    fn retain_removes_cancelled_and_keeps_turns() {
        let mut q = FairQueue::new(16);
        for (c, i) in [("a", 1), ("b", 2), ("a", 3), ("c", 4), ("b", 5)] {
            q.push(c, Priority::Interactive, i, 0).unwrap();
        }
        q.push("a", Priority::Background, 6, 0).unwrap();
        let mut removed = q.retain(|&i| i % 2 == 1 || i == 4);
        removed.sort();
        assert_eq!(removed, [2, 6]);
        assert_eq!(q.len(), 4);
        // b has nothing left but 5; its turn is kept after a's.
        assert_eq!(q.drain(), [1, 5, 4, 3]);
    }
}
