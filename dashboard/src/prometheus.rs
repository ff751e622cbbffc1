//! The Prometheus HTTP API under `/prometheus` for Grafana's Prometheus datasource (issue 6).

use axum::Router;

use crate::DashboardState;

pub fn router(_state: DashboardState) -> Router {
    Router::new()
}
