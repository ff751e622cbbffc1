//! Billing: usage extraction from metered telemetry, rate cards, exact decimal rating,
//! invoices per period, and exports. It reads the collector's telemetry store.
//!
//! Not built yet (issue 5).
