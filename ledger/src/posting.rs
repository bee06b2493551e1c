//! Double-entry postings. Each event produces a set of postings that sums to zero; debits are
//! positive, credits negative, so a liability such as customer credits has a negative balance.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::money::Money;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LedgerAccount {
    /// Money received for purchases (asset; clearing with the payment processor).
    PaymentsReceived,
    /// Promotional credits given away (expense).
    PromotionalGrants,
    /// Prepaid credits owed to the customer (liability), per lot.
    CustomerCredits,
    /// Usage charged beyond the credits (receivable), paid by the next purchase.
    CustomerDebt,
    /// Managed usage: the upstream provider cost recovered from the customer (revenue).
    RevenueUpstreamCost,
    /// Managed usage: the platform's processing fee (revenue).
    RevenueProcessingFee,
    /// Expired credit remainders (revenue).
    Breakage,
    /// Remainders of voided lots (refunds or write-offs).
    VoidedCredits,
    /// Memo: upstream cost the customer paid to its provider directly (BYOK, attached keys).
    ByokAttributedCost,
    /// Memo contra account that balances [`LedgerAccount::ByokAttributedCost`].
    ByokAttributedCostContra,
}

impl LedgerAccount {
    pub const ALL: [LedgerAccount; 10] = [
        LedgerAccount::PaymentsReceived,
        LedgerAccount::PromotionalGrants,
        LedgerAccount::CustomerCredits,
        LedgerAccount::CustomerDebt,
        LedgerAccount::RevenueUpstreamCost,
        LedgerAccount::RevenueProcessingFee,
        LedgerAccount::Breakage,
        LedgerAccount::VoidedCredits,
        LedgerAccount::ByokAttributedCost,
        LedgerAccount::ByokAttributedCostContra,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LedgerAccount::PaymentsReceived => "payments_received",
            LedgerAccount::PromotionalGrants => "promotional_grants",
            LedgerAccount::CustomerCredits => "customer_credits",
            LedgerAccount::CustomerDebt => "customer_debt",
            LedgerAccount::RevenueUpstreamCost => "revenue_upstream_cost",
            LedgerAccount::RevenueProcessingFee => "revenue_processing_fee",
            LedgerAccount::Breakage => "breakage",
            LedgerAccount::VoidedCredits => "voided_credits",
            LedgerAccount::ByokAttributedCost => "byok_attributed_cost",
            LedgerAccount::ByokAttributedCostContra => "byok_attributed_cost_contra",
        }
    }

    pub fn parse(s: &str) -> Option<LedgerAccount> {
        LedgerAccount::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// One line of a balanced transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posting {
    pub ledger_account: LedgerAccount,
    /// Debit positive, credit negative.
    pub amount: Money,
    /// The credit lot this line moves, when it moves one.
    pub lot_id: Option<Uuid>,
}

impl Posting {
    pub fn new(ledger_account: LedgerAccount, amount: Money) -> Posting {
        Posting {
            ledger_account,
            amount,
            lot_id: None,
        }
    }

    pub fn on_lot(ledger_account: LedgerAccount, amount: Money, lot_id: Uuid) -> Posting {
        Posting {
            ledger_account,
            amount,
            lot_id: Some(lot_id),
        }
    }
}
