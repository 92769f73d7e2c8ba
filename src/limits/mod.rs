//! Spend limits on upstream calls (per tenant, global, daily budget).

pub mod spend;
