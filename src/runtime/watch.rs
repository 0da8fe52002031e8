//! One watch→state adapter: a state that implements [`Index`] for a kind is fed by [`Relist::handle`], which
//! owns the relist semantics (`Init` … `InitApply`* … `InitDone` replaces everything at once; `Apply`/`Delete`
//! change one object) so that no watch loop writes them out by hand.

use futures::{Stream, StreamExt};
use kube::runtime::watcher::{self, Event};

/// The events of a watch, its errors logged (the watcher retries after each, with backoff).
pub fn logged<K>(
    events: impl Stream<Item = Result<Event<K>, watcher::Error>>,
    what: &'static str,
) -> impl Stream<Item = Event<K>> {
    events.filter_map(move |event| {
        std::future::ready(match event {
            Ok(event) => Some(event),
            Err(e) => {
                tracing::warn!(error = %e, "{what} watch failed; retrying");
                None
            }
        })
    })
}

/// A state kept from a watch of `K`.
pub trait Index<K> {
    /// What the state keeps of one object (converted as it arrives, so a relist never buffers whole objects).
    type Entry;

    /// The entry for an object; `None` leaves the object out.
    fn entry(&mut self, object: K) -> Option<Self::Entry>;
    /// An object was added or changed.
    fn apply(&mut self, entry: Self::Entry);
    /// An object was deleted.
    fn delete(&mut self, object: K);
    /// A (re)list completed: these are all the objects there are.
    fn reset(&mut self, entries: Vec<Self::Entry>);
}

/// What an event did to the state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing yet (a relist in progress) or nothing kept.
    None,
    /// One object added or changed.
    Applied,
    /// One object removed.
    Deleted,
    /// The whole state replaced by a completed relist.
    Reset,
}

/// The relist in progress of one watch, and whether a first list completed.
#[derive(Debug)]
pub struct Relist<E> {
    pending: Vec<E>,
    synced: bool,
}

impl<E> Default for Relist<E> {
    fn default() -> Self {
        Relist {
            pending: Vec::new(),
            synced: false,
        }
    }
}

impl<E> Relist<E> {
    /// Applies one watch event to `index`.
    pub fn handle<K, I: Index<K, Entry = E>>(&mut self, index: &mut I, event: Event<K>) -> Change {
        match event {
            Event::Init => {
                self.pending.clear();
                Change::None
            }
            Event::InitApply(object) => {
                self.pending.extend(index.entry(object));
                Change::None
            }
            Event::InitDone => {
                index.reset(std::mem::take(&mut self.pending));
                self.synced = true;
                Change::Reset
            }
            Event::Apply(object) => match index.entry(object) {
                Some(entry) => {
                    index.apply(entry);
                    Change::Applied
                }
                None => Change::None,
            },
            Event::Delete(object) => {
                index.delete(object);
                Change::Deleted
            }
        }
    }

    /// A first list has completed.
    pub fn synced(&self) -> bool {
        self.synced
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// name → value; objects with an empty value are left out.
    #[derive(Default)]
    struct Map(BTreeMap<&'static str, &'static str>);

    impl Index<(&'static str, &'static str)> for Map {
        type Entry = (&'static str, &'static str);
        fn entry(&mut self, object: (&'static str, &'static str)) -> Option<Self::Entry> {
            (!object.1.is_empty()).then_some(object)
        }
        fn apply(&mut self, (k, v): Self::Entry) {
            self.0.insert(k, v);
        }
        fn delete(&mut self, (k, _): (&'static str, &'static str)) {
            self.0.remove(k);
        }
        fn reset(&mut self, entries: Vec<Self::Entry>) {
            self.0 = entries.into_iter().collect();
        }
    }

    fn contents(m: &Map) -> Vec<(&str, &str)> {
        m.0.iter().map(|(k, v)| (*k, *v)).collect()
    }

    #[test]
    fn relist_replaces_everything_only_when_done() {
        let (mut map, mut relist) = (Map::default(), Relist::default());
        assert!(!relist.synced());
        assert_eq!(relist.handle(&mut map, Event::Init), Change::None);
        assert_eq!(relist.handle(&mut map, Event::InitApply(("a", "1"))), Change::None);
        assert_eq!(relist.handle(&mut map, Event::InitApply(("skipped", ""))), Change::None);
        assert!(contents(&map).is_empty(), "nothing is visible before InitDone");
        assert_eq!(relist.handle(&mut map, Event::InitDone), Change::Reset);
        assert!(relist.synced());
        assert_eq!(contents(&map), [("a", "1")]);

        // A later relist drops what it does not list, keeps the state until it completes.
        relist.handle(&mut map, Event::Apply(("b", "2")));
        relist.handle(&mut map, Event::Init);
        relist.handle(&mut map, Event::InitApply(("b", "3")));
        assert_eq!(contents(&map), [("a", "1"), ("b", "2")]);
        relist.handle(&mut map, Event::InitDone);
        assert_eq!(contents(&map), [("b", "3")]);
    }

    #[test]
    fn interrupted_relist_starts_over() {
        let (mut map, mut relist) = (Map::default(), Relist::default());
        relist.handle(&mut map, Event::Init);
        relist.handle(&mut map, Event::InitApply(("gone", "1")));
        // The list failed and restarted: what the first attempt buffered must not survive.
        relist.handle(&mut map, Event::Init);
        relist.handle(&mut map, Event::InitApply(("kept", "2")));
        relist.handle(&mut map, Event::InitDone);
        assert_eq!(contents(&map), [("kept", "2")]);
    }

    #[test]
    fn apply_and_delete_change_one_object() {
        let (mut map, mut relist) = (Map::default(), Relist::default());
        relist.handle(&mut map, Event::Init);
        relist.handle(&mut map, Event::InitDone);
        assert_eq!(relist.handle(&mut map, Event::Apply(("a", "1"))), Change::Applied);
        assert_eq!(
            relist.handle(&mut map, Event::Apply(("a", ""))),
            Change::None,
            "left out"
        );
        assert_eq!(relist.handle(&mut map, Event::Apply(("b", "2"))), Change::Applied);
        assert_eq!(relist.handle(&mut map, Event::Delete(("a", ""))), Change::Deleted);
        assert_eq!(contents(&map), [("b", "2")]);
    }
}
