//! The server-rendered web UI (issue 6).

use axum::Router;

use crate::DashboardState;

pub fn router(_state: DashboardState) -> Router {
    Router::new()
}
