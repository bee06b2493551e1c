use uuid::Uuid;

/// Why the ledger refused an event or an input. Each variant is a rule of the domain; the HTTP
/// layer maps each to a status and a stable code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("amount is too large")]
    AmountOverflow,
    #[error("amount has more than {max_places} decimal places")]
    AmountTooPrecise { max_places: u32 },
    #[error("amount must be greater than zero")]
    AmountNotPositive,
    #[error("a credit purchase must be at least $5.00")]
    PurchaseBelowMinimum,
    #[error("account '{0}' already exists")]
    AccountExists(String),
    #[error("account '{0}' does not exist")]
    UnknownAccount(String),
    #[error("lot {0} does not exist on this account")]
    UnknownLot(Uuid),
    #[error("lot {0} already exists")]
    DuplicateLot(Uuid),
    #[error("lot {0} is already closed (voided or expired)")]
    LotClosed(Uuid),
    #[error("lot {lot_id} expires at {expires_at}, not before")]
    ExpiryTooEarly { lot_id: Uuid, expires_at: String },
    #[error("expires_at must be after the grant time")]
    ExpiryNotAfterGrant,
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl DomainError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> DomainError {
        DomainError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}
