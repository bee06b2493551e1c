use tally_ledger::DomainError;
use uuid::Uuid;

/// Errors of the event store. The HTTP layer maps each to a status and a stable code.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// An all-or-nothing batch held an event the ledger refused; nothing was applied.
    #[error("event {index} ({event_id}) was refused: {error}")]
    Rejected {
        index: usize,
        event_id: Uuid,
        error: DomainError,
    },
    #[error("the idempotency key was already used with a different request")]
    IdempotencyMismatch,
    #[error("{0} not found")]
    NotFound(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Stored data that the domain cannot read back, or a log that no longer replays.
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Errors that one event brings on itself, applied alone: the ledger refused it, or the
    /// database found its data invalid (SQLSTATE classes 22 data exception and 23 integrity).
    /// Anything else (an outage, a full disk, a read-only standby after a failover) says
    /// nothing about the event, and setting the event aside for it would lose it.
    pub fn is_event_fault(&self) -> bool {
        match self {
            StoreError::Domain(_) | StoreError::Rejected { .. } => true,
            StoreError::Database(sqlx::Error::Database(d)) => d
                .code()
                .is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
            _ => false,
        }
    }

    /// Errors worth waiting out and retrying the same batch: the connection or the pool, or a
    /// transaction the database asks to retry. Ingest is idempotent, so a retry never counts
    /// twice.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Database(db) => match db {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Tls(_) => true,
                sqlx::Error::Database(d) => d.code().is_some_and(|c| {
                    c.starts_with("08")
                        || c.starts_with("57P")
                        || c == "40001"
                        || c == "40P01"
                        || c == "53300"
                }),
                _ => false,
            },
            _ => false,
        }
    }
}
