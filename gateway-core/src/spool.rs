//! A durable, bounded FIFO of byte records on local disk: where the gateway keeps its events
//! until the broker has acknowledged them.
//!
//! Records live in a [`redb`] table keyed by an increasing sequence number, so their order is
//! the key order and a process that opens the same directory after a crash or a restart finds
//! exactly what the previous one had not acknowledged. Every call is blocking (disk IO and
//! fsync); async callers run it under `spawn_blocking`.
//!
//! The bound counts the bytes of the stored records, not the size of the file: redb reuses
//! freed pages, so the file settles near the high-water mark of the records plus its own
//! overhead.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

/// Records by sequence number.
const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
/// Bookkeeping that must survive the records themselves (see [`NEXT_SEQ`]).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The sequence number the next appended record gets. Kept apart from the records so numbers
/// keep increasing after the spool has been emptied and reopened.
const NEXT_SEQ: &str = "next_seq";
/// The database file inside the spool directory.
pub const SPOOL_FILE: &str = "spool.redb";

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error(
        "the spool is full: {needed} more bytes would exceed its bound of {max_bytes} bytes ({used} in use)"
    )]
    Full {
        needed: u64,
        used: u64,
        max_bytes: u64,
    },
    #[error("the spool's bound must be positive")]
    ZeroBound,
    #[error("spool directory {dir}: {source}")]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("spool storage: {0}")]
    Storage(#[from] redb::Error),
    /// A previous call failed while holding the spool's state; the spool must be reopened.
    #[error("the spool's state was poisoned by an earlier failure")]
    Poisoned,
}

// redb reports each operation's failure with its own type; all of them fold into `redb::Error`.
macro_rules! storage_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for SpoolError {
            fn from(e: $t) -> SpoolError {
                SpoolError::Storage(redb::Error::from(e))
            }
        }
    )*};
}
storage_error_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

#[derive(Debug, Clone, Copy, Default)]
struct Depth {
    events: u64,
    bytes: u64,
    next_seq: u64,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Spool {
    db: Database,
    max_bytes: u64,
    /// Mirrors what is on disk; writers hold it across their transaction so the bound check and
    /// the sequence numbers cannot race.
    state: Mutex<Depth>,
    /// Appends still to fail, for the tests of what a failed write does.
    #[cfg(test)]
    fail_appends: std::sync::atomic::AtomicU32,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, recovering every record a previous process left.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        if max_bytes == 0 {
            return Err(SpoolError::ZeroBound);
        }
        std::fs::create_dir_all(dir).map_err(|source| SpoolError::Dir {
            dir: dir.to_path_buf(),
            source,
        })?;
        let db = Database::create(dir.join(SPOOL_FILE))?;
        // Create both tables up front so readers never meet a missing table.
        let txn = db.begin_write()?;
        let mut depth = Depth::default();
        {
            let records = txn.open_table(RECORDS)?;
            let meta = txn.open_table(META)?;
            for entry in records.iter()? {
                let (_, value) = entry?;
                depth.events += 1;
                depth.bytes += value.value().len() as u64;
            }
            let after_last = match records.last()? {
                Some((k, _)) => k.value().saturating_add(1),
                None => 0,
            };
            let stored = meta.get(NEXT_SEQ)?.map(|v| v.value()).unwrap_or(0);
            depth.next_seq = stored.max(after_last);
        }
        txn.commit()?;
        Ok(Spool {
            db,
            max_bytes,
            state: Mutex::new(depth),
            #[cfg(test)]
            fail_appends: std::sync::atomic::AtomicU32::new(0),
        })
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Appends `records` in order, all or none. They are on disk when this returns.
    pub fn append(&self, records: &[Vec<u8>]) -> Result<(), SpoolError> {
        if records.is_empty() {
            return Ok(());
        }
        #[cfg(test)]
        if self
            .fail_appends
            .fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |n| n.checked_sub(1),
            )
            .is_ok()
        {
            return Err(SpoolError::Storage(redb::Error::Io(std::io::Error::other(
                "injected write failure",
            ))));
        }
        let mut state = self.state.lock().map_err(|_| SpoolError::Poisoned)?;
        let needed: u64 = records.iter().map(|r| r.len() as u64).sum();
        if state.bytes.saturating_add(needed) > self.max_bytes {
            return Err(SpoolError::Full {
                needed,
                used: state.bytes,
                max_bytes: self.max_bytes,
            });
        }
        let mut seq = state.next_seq;
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(RECORDS)?;
            for r in records {
                table.insert(seq, r.as_slice())?;
                seq += 1;
            }
            let mut meta = txn.open_table(META)?;
            meta.insert(NEXT_SEQ, seq)?;
        }
        txn.commit()?;
        state.events += records.len() as u64;
        state.bytes += needed;
        state.next_seq = seq;
        Ok(())
    }

    /// Up to `max` records, oldest first.
    pub fn peek(&self, max: usize) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        self.peek_from(0, max)
    }

    /// Up to `max` records whose sequence number is at least `from`, oldest first.
    pub fn peek_from(&self, from: u64, max: usize) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RECORDS)?;
        let mut out = Vec::with_capacity(max.min(1024));
        for entry in table.range(from..)?.take(max) {
            let (k, v) = entry?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Removes every record up to and including sequence number `upto_inclusive`.
    pub fn ack(&self, upto_inclusive: u64) -> Result<(), SpoolError> {
        let mut state = self.state.lock().map_err(|_| SpoolError::Poisoned)?;
        let mut freed_events = 0u64;
        let mut freed_bytes = 0u64;
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(RECORDS)?;
            table.retain_in(..=upto_inclusive, |_, v| {
                freed_events += 1;
                freed_bytes += v.len() as u64;
                false
            })?;
        }
        if freed_events == 0 {
            txn.abort()?;
            return Ok(());
        }
        txn.commit()?;
        state.events = state.events.saturating_sub(freed_events);
        state.bytes = state.bytes.saturating_sub(freed_bytes);
        Ok(())
    }

    /// Makes the next `n` appends fail as a storage error would, storing nothing.
    #[cfg(test)]
    pub(crate) fn fail_next_appends(&self, n: u32) {
        self.fail_appends
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Records and bytes waiting.
    pub fn depth(&self) -> (u64, u64) {
        let state = match self.state.lock() {
            Ok(s) => *s,
            Err(p) => *p.into_inner(),
        };
        (state.events, state.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u32) -> Vec<u8> {
        format!("record-{i:04}").into_bytes()
    }

    #[test]
    fn appends_peeks_in_order_and_acks() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.append(&[rec(0), rec(1)]).unwrap();
        spool.append(&[rec(2)]).unwrap();
        assert_eq!(spool.depth(), (3, 33));
        let got = spool.peek(10).unwrap();
        assert_eq!(
            got.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
            vec![rec(0), rec(1), rec(2)]
        );
        assert!(got.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(spool.peek(2).unwrap().len(), 2);
        assert_eq!(spool.peek_from(got[1].0, 10).unwrap(), got[1..].to_vec());

        spool.ack(got[1].0).unwrap();
        assert_eq!(spool.depth(), (1, 11));
        assert_eq!(spool.peek(10).unwrap(), vec![got[2].clone()]);
        // Acknowledging again, or below what is left, changes nothing.
        spool.ack(got[1].0).unwrap();
        assert_eq!(spool.depth(), (1, 11));
        spool.ack(got[2].0).unwrap();
        assert_eq!(spool.depth(), (0, 0));
        assert!(spool.peek(10).unwrap().is_empty());
    }

    #[test]
    fn reopening_keeps_order_content_and_increasing_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let first_seqs = {
            let spool = Spool::open(dir.path(), 1 << 20).unwrap();
            spool
                .append(&(0..100).map(rec).collect::<Vec<_>>())
                .unwrap();
            let all = spool.peek(1000).unwrap();
            spool.ack(all[9].0).unwrap();
            all
        };
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.depth(), (90, 90 * 11));
        let got = spool.peek(1000).unwrap();
        assert_eq!(got, first_seqs[10..].to_vec());
        spool.append(&[rec(100)]).unwrap();
        let last = spool.peek(1000).unwrap().pop().unwrap();
        assert_eq!(last.1, rec(100));
        assert!(last.0 > first_seqs[99].0);

        // Empty it entirely: numbers still never go back after a reopen.
        spool.ack(last.0).unwrap();
        drop(spool);
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.depth(), (0, 0));
        spool.append(&[rec(101)]).unwrap();
        assert!(spool.peek(1).unwrap()[0].0 > last.0);
    }

    #[test]
    fn full_is_all_or_nothing_and_ack_frees_space() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 50).unwrap();
        spool.append(&[rec(0), rec(1), rec(2), rec(3)]).unwrap(); // 44 bytes
        let err = spool.append(&[vec![b'x'; 3], vec![b'y'; 4]]).unwrap_err();
        assert!(
            matches!(
                err,
                SpoolError::Full {
                    needed: 7,
                    used: 44,
                    max_bytes: 50
                }
            ),
            "{err:?}"
        );
        // Nothing of the refused batch went in.
        assert_eq!(spool.depth(), (4, 44));
        assert_eq!(spool.peek(10).unwrap().len(), 4);
        // What fits exactly is taken.
        spool.append(&[vec![b'z'; 6]]).unwrap();
        assert_eq!(spool.depth(), (5, 50));
        assert!(matches!(spool.append(&[vec![]; 1]), Ok(())));
        assert!(matches!(
            spool.append(&[vec![1]]),
            Err(SpoolError::Full { .. })
        ));

        let first = spool.peek(1).unwrap()[0].0;
        spool.ack(first + 1).unwrap();
        assert_eq!(spool.depth(), (4, 28));
        spool.append(&[vec![b'x'; 3], vec![b'y'; 4]]).unwrap();
        let all: Vec<Vec<u8>> = spool
            .peek(10)
            .unwrap()
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        assert_eq!(
            all,
            vec![
                rec(2),
                rec(3),
                vec![b'z'; 6],
                vec![],
                vec![b'x'; 3],
                vec![b'y'; 4]
            ]
        );
        // The bound holds across a reopen too.
        drop(spool);
        let spool = Spool::open(dir.path(), 50).unwrap();
        assert_eq!(spool.depth(), (6, 35));
        assert!(matches!(
            spool.append(&[vec![0; 16]]),
            Err(SpoolError::Full { .. })
        ));
    }

    #[test]
    fn a_zero_bound_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Spool::open(dir.path(), 0),
            Err(SpoolError::ZeroBound)
        ));
    }

    #[test]
    fn a_second_open_of_the_same_directory_is_refused_while_the_first_lives() {
        let dir = tempfile::tempdir().unwrap();
        let _spool = Spool::open(dir.path(), 100).unwrap();
        assert!(matches!(
            Spool::open(dir.path(), 100),
            Err(SpoolError::Storage(_))
        ));
    }
}
