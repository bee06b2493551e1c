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
use std::sync::{Mutex, RwLock};
use std::time::Duration;

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
/// How long a call waits before reopening a database whose storage failed: a disk that just
/// reported ENOSPC or EIO gets a moment before it is asked again.
const REOPEN_BACKOFF: Duration = Duration::from_millis(20);

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
    /// Reopening the database after a storage failure failed too; the next call tries again.
    #[error("the spool's storage failed and could not be reopened yet")]
    Closed,
}

impl SpoolError {
    /// Whether the storage underneath failed. redb latches such a failure: every later operation
    /// on the same `Database` reports `PreviousIo` until it is reopened.
    fn is_storage_failure(&self) -> bool {
        matches!(
            self,
            SpoolError::Closed
                | SpoolError::Storage(
                    redb::Error::Io(_)
                        | redb::Error::PreviousIo
                        | redb::Error::Backend(_)
                        | redb::Error::DatabaseClosed
                )
        )
    }
}

// redb reports each operation's failure with its own type; all of them fold into `redb::Error`
// (whose `Io`, `PreviousIo`, ... carry what `is_storage_failure` looks for, whatever the wrapper).
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

/// The open database, swapped for a fresh one after its storage failed.
#[derive(Debug)]
struct Handle {
    /// `None` while a reopen has failed.
    db: Option<Database>,
    /// Counts reopens, so that calls which failed on the same database reopen it only once.
    generation: u64,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    max_bytes: u64,
    /// Mirrors what is on disk; writers hold it across their transaction so the bound check and
    /// the sequence numbers cannot race. Taken before `db` by whoever needs both.
    state: Mutex<Depth>,
    /// Every operation reads through this lock; a reopen takes it exclusively, so the writer and
    /// the shipper both move to the new database and no transaction outlives the old one.
    db: RwLock<Handle>,
    /// Appends still to fail, for the tests of what a failed write does.
    #[cfg(test)]
    fail_appends: std::sync::atomic::AtomicU32,
    /// Storage faults to inject, for the tests of recovering from them.
    #[cfg(test)]
    faults: Option<std::sync::Arc<faulty::Faults>>,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, recovering every record a previous process left.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        Self::build(
            dir,
            max_bytes,
            #[cfg(test)]
            None,
        )
    }

    /// Opens the spool on a backend that fails when `faults` says so.
    #[cfg(test)]
    pub(crate) fn open_faulty(
        dir: &Path,
        max_bytes: u64,
        faults: std::sync::Arc<faulty::Faults>,
    ) -> Result<Spool, SpoolError> {
        Self::build(dir, max_bytes, Some(faults))
    }

    fn build(
        dir: &Path,
        max_bytes: u64,
        #[cfg(test)] faults: Option<std::sync::Arc<faulty::Faults>>,
    ) -> Result<Spool, SpoolError> {
        if max_bytes == 0 {
            return Err(SpoolError::ZeroBound);
        }
        std::fs::create_dir_all(dir).map_err(|source| SpoolError::Dir {
            dir: dir.to_path_buf(),
            source,
        })?;
        let mut spool = Spool {
            path: dir.join(SPOOL_FILE),
            max_bytes,
            state: Mutex::new(Depth::default()),
            db: RwLock::new(Handle {
                db: None,
                generation: 0,
            }),
            #[cfg(test)]
            fail_appends: std::sync::atomic::AtomicU32::new(0),
            #[cfg(test)]
            faults,
        };
        let (db, depth) = spool.connect()?;
        *spool.state.get_mut().map_err(|_| SpoolError::Poisoned)? = depth;
        spool.db.get_mut().map_err(|_| SpoolError::Poisoned)?.db = Some(db);
        Ok(spool)
    }

    /// Opens the database file and reads its depth, creating both tables up front so readers
    /// never meet a missing table.
    fn connect(&self) -> Result<(Database, Depth), SpoolError> {
        let db = self.open_db()?;
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
        Ok((db, depth))
    }

    fn open_db(&self) -> Result<Database, SpoolError> {
        #[cfg(test)]
        if let Some(faults) = &self.faults {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&self.path)
                .map_err(redb::Error::Io)?;
            let backend = faulty::FaultyBackend {
                inner: redb::backends::FileBackend::new(file)?,
                faults: std::sync::Arc::clone(faults),
            };
            return Ok(redb::Builder::new().create_with_backend(backend)?);
        }
        Ok(Database::create(&self.path)?)
    }

    /// Replaces the database whose storage failed with a freshly opened one and rereads the
    /// depth from it, unless another call already did so since `generation`.
    fn reopen(&self, state: &mut Depth, generation: u64) -> Result<(), SpoolError> {
        let mut handle = self.db.write().map_err(|_| SpoolError::Poisoned)?;
        if handle.db.is_some() && handle.generation != generation {
            return Ok(());
        }
        // Closed first: it holds the file's lock, which the new one must take.
        handle.db = None;
        handle.generation += 1;
        let (db, depth) = self.connect()?;
        // What the failed transactions left is whatever redb recovered; the numbers never go
        // back, so the shipper's position stays valid.
        *state = Depth {
            next_seq: depth.next_seq.max(state.next_seq),
            ..depth
        };
        handle.db = Some(db);
        tracing::info!(
            events = depth.events,
            bytes = depth.bytes,
            "event spool reopened after a storage failure"
        );
        Ok(())
    }

    /// Runs `op` on the database; when the storage fails, reopens the database and runs `op`
    /// once more. `held` is the state when the caller holds its lock; `op` gets it (or a scratch
    /// copy when the caller does not need it).
    fn run<T>(
        &self,
        mut held: Option<&mut Depth>,
        mut op: impl FnMut(&Database, &mut Depth) -> Result<T, SpoolError>,
    ) -> Result<T, SpoolError> {
        let mut scratch = Depth::default();
        let mut retried = false;
        loop {
            let (result, generation) = {
                let handle = self.db.read().map_err(|_| SpoolError::Poisoned)?;
                let state = match held.as_deref_mut() {
                    Some(s) => s,
                    None => &mut scratch,
                };
                let result = match &handle.db {
                    Some(db) => op(db, state),
                    None => Err(SpoolError::Closed),
                };
                (result, handle.generation)
            };
            match result {
                Err(e) if !retried && e.is_storage_failure() => {
                    retried = true;
                    tracing::warn!(error = %e, "event spool storage failed; reopening it");
                    std::thread::sleep(REOPEN_BACKOFF);
                    match held.as_deref_mut() {
                        Some(state) => self.reopen(state, generation)?,
                        None => {
                            let mut state = self.state.lock().map_err(|_| SpoolError::Poisoned)?;
                            self.reopen(&mut state, generation)?;
                        }
                    }
                }
                other => return other,
            }
        }
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Appends `records` in order, all or none. They are on disk when this returns.
    ///
    /// After a storage failure the append is retried on the reopened database, unless the
    /// failed commit turns out to have reached the file anyway.
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
        let needed: u64 = records.iter().map(|r| r.len() as u64).sum();
        let mut state = self.state.lock().map_err(|_| SpoolError::Poisoned)?;
        // The next number a failed attempt would have left.
        let mut attempted: Option<u64> = None;
        self.run(Some(&mut state), |db, state| {
            // A commit whose fsync failed can still be in the file the reopen reads: then the
            // reread depth already counts the batch, and writing it again would duplicate it.
            // Nothing else appends meanwhile, as the state stays locked.
            if attempted.is_some_and(|end| state.next_seq >= end) {
                return Ok(());
            }
            if state.bytes.saturating_add(needed) > self.max_bytes {
                return Err(SpoolError::Full {
                    needed,
                    used: state.bytes,
                    max_bytes: self.max_bytes,
                });
            }
            let mut seq = state.next_seq;
            attempted = Some(seq + records.len() as u64);
            let txn = db.begin_write()?;
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
        })
    }

    /// Up to `max` records, oldest first.
    pub fn peek(&self, max: usize) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        self.peek_from(0, max)
    }

    /// Up to `max` records whose sequence number is at least `from`, oldest first.
    pub fn peek_from(&self, from: u64, max: usize) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        self.run(None, |db, _| {
            let txn = db.begin_read()?;
            let table = txn.open_table(RECORDS)?;
            let mut out = Vec::with_capacity(max.min(1024));
            for entry in table.range(from..)?.take(max) {
                let (k, v) = entry?;
                out.push((k.value(), v.value().to_vec()));
            }
            Ok(out)
        })
    }

    /// Removes every record up to and including sequence number `upto_inclusive`.
    pub fn ack(&self, upto_inclusive: u64) -> Result<(), SpoolError> {
        let mut state = self.state.lock().map_err(|_| SpoolError::Poisoned)?;
        self.run(Some(&mut state), |db, state| {
            let mut freed_events = 0u64;
            let mut freed_bytes = 0u64;
            let txn = db.begin_write()?;
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
        })
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

/// A file backend whose writes and syncs fail on demand, as a full or failing disk's would.
#[cfg(test)]
pub(crate) mod faulty {
    use std::ops::Bound;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use redb::backends::FileBackend;
    use redb::{BackendError, StorageBackend};

    /// Counts of the coming operations to fail.
    #[derive(Debug, Default)]
    pub(crate) struct Faults {
        writes: AtomicU32,
        syncs: AtomicU32,
    }

    impl Faults {
        /// Fails the next `n` writes and `set_len`s.
        pub(crate) fn fail_writes(&self, n: u32) {
            self.writes.store(n, Ordering::SeqCst);
        }

        /// Fails the next `n` syncs.
        pub(crate) fn fail_syncs(&self, n: u32) {
            self.syncs.store(n, Ordering::SeqCst);
        }

        fn check(counter: &AtomicU32) -> std::io::Result<()> {
            match counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)) {
                Ok(_) => Err(std::io::Error::from_raw_os_error(28)), // ENOSPC
                Err(_) => Ok(()),
            }
        }
    }

    #[derive(Debug)]
    pub(crate) struct FaultyBackend {
        pub(crate) inner: FileBackend,
        pub(crate) faults: Arc<Faults>,
    }

    impl StorageBackend for FaultyBackend {
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            Faults::check(&self.faults.writes)?;
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            Faults::check(&self.faults.syncs)?;
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            Faults::check(&self.faults.writes)?;
            self.inner.write(offset, data)
        }
        fn close(&self) -> std::io::Result<()> {
            self.inner.close()
        }
        fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
            self.inner.try_lock_range(start, end)
        }
        fn try_lock_shared_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<bool, BackendError> {
            self.inner.try_lock_shared_range(start, end)
        }
        fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
            self.inner.lock_range(start, end)
        }
        fn lock_shared_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<(), BackendError> {
            self.inner.lock_shared_range(start, end)
        }
        fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
            self.inner.unlock_range(start, end)
        }
        fn query_lock_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<bool, BackendError> {
            self.inner.query_lock_range(start, end)
        }
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

    fn reopens(spool: &Spool) -> u64 {
        spool.db.read().unwrap().generation
    }

    fn contents(spool: &Spool) -> Vec<Vec<u8>> {
        spool
            .peek(1000)
            .unwrap()
            .into_iter()
            .map(|(_, r)| r)
            .collect()
    }

    #[test]
    fn a_transient_storage_failure_is_recovered_within_the_call() {
        let dir = tempfile::tempdir().unwrap();
        let faults = std::sync::Arc::new(faulty::Faults::default());
        let spool = Spool::open_faulty(dir.path(), 1 << 20, faults.clone()).unwrap();
        spool.append(&[rec(0), rec(1), rec(2)]).unwrap();
        let first = spool.peek(1).unwrap()[0].0;
        spool.ack(first).unwrap();

        // The commit's fsync fails: redb latches that, and only a reopen clears it.
        faults.fail_syncs(1);
        spool.append(&[rec(3)]).unwrap();
        assert_eq!(
            reopens(&spool),
            1,
            "the failure must have reopened the database"
        );
        assert_eq!(contents(&spool), vec![rec(1), rec(2), rec(3)]);
        assert_eq!(spool.depth(), (3, 33));

        // An acknowledgement whose commit fails is retried the same way.
        faults.fail_syncs(1);
        let all = spool.peek(10).unwrap();
        spool.ack(all[0].0).unwrap();
        assert_eq!(reopens(&spool), 2);
        assert_eq!(contents(&spool), vec![rec(2), rec(3)]);
        assert_eq!(spool.depth(), (2, 22));
    }

    #[test]
    fn a_spool_whose_disk_keeps_failing_recovers_once_the_disk_does() {
        let dir = tempfile::tempdir().unwrap();
        let faults = std::sync::Arc::new(faulty::Faults::default());
        let spool = Spool::open_faulty(dir.path(), 1 << 20, faults.clone()).unwrap();
        spool.append(&(0..5).map(rec).collect::<Vec<_>>()).unwrap();
        let before = spool.peek(10).unwrap();
        spool.ack(before[1].0).unwrap();

        // The disk is full: every write and sync fails, the retry and its reopen included.
        faults.fail_writes(u32::MAX);
        faults.fail_syncs(u32::MAX);
        let err = spool.append(&[rec(5)]).unwrap_err();
        assert!(err.is_storage_failure(), "{err:?}");
        let err = spool.ack(before[2].0).unwrap_err();
        assert!(err.is_storage_failure(), "{err:?}");
        assert!(reopens(&spool) >= 1);

        // Space again: the same spool works without a restart, for the shipper's reads first.
        faults.fail_writes(0);
        faults.fail_syncs(0);
        let left = spool.peek(10).unwrap();
        assert_eq!(left, before[2..].to_vec(), "acknowledged records stay gone");
        assert_eq!(spool.depth(), (3, 33));
        spool.append(&[rec(6)]).unwrap();
        let after = spool.peek(10).unwrap();
        assert_eq!(
            after.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
            vec![rec(2), rec(3), rec(4), rec(6)]
        );
        assert!(after[3].0 > before[4].0, "numbers never go back");
        spool.ack(after[1].0).unwrap();
        assert_eq!(spool.depth(), (2, 22));

        // And what it holds is what a restart finds.
        drop(spool);
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(contents(&spool), vec![rec(4), rec(6)]);
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
