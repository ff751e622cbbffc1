//! Reading a request's body into room held for it (see [`crate::room`]): the state API's values
//! and invocations' requests are buffered whole, so each is read only as far as there is room.

use std::time::Duration;

use axum::http::HeaderMap;
use bytes::Bytes;
use http_body_util::BodyExt;

use super::error::ApiError;
use crate::room::{Held, Room, RoomError};
use crate::tenant::TenantId;

/// Room a body of unknown length holds first; it doubles as the body grows.
const FIRST_ROOM: u64 = 64 << 10;

/// Slowest a body may arrive on average once its grace has passed, in bytes a second: a body
/// trickled to keep its room held (a slowloris) is cut off, one on a slow link is not (16 MiB
/// at 64 KiB/s takes 256 s).
pub const MIN_RATE: u64 = 64 << 10;

/// The `Content-Length` a request declares, if any.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
}

/// A body to read, and its bounds.
pub struct Incoming<'a> {
    /// What it is, for errors ("the value").
    pub what: &'a str,
    pub declared: Option<u64>,
    /// Largest accepted (413 beyond).
    pub max: u64,
    /// How long it may send nothing, and its grace before [`MIN_RATE`] applies (nginx's
    /// `client_body_timeout`).
    pub stall: Duration,
}

/// Reads a body into room held for it: a declared length holds all of it before the first byte
/// is read (waiting for room: backpressure); a body of unknown length holds room as its buffer
/// doubles, refused when there is no more (429) or it passes the largest accepted (413). It
/// must keep sending (400 after `stall` of silence) and arrive within `stall` plus its size at
/// [`MIN_RATE`] (408). `check` sees each size the buffer grows to, and may refuse it (the state
/// store's quota). The room is held until the returned [`Held`] is dropped.
pub async fn receive(
    room: &Room,
    tenant: &TenantId,
    incoming: Incoming<'_>,
    mut body: axum::body::Body,
    check: impl Fn(u64) -> Result<(), ApiError>,
) -> Result<(Bytes, Held), ApiError> {
    let Incoming { what, declared, max, stall } = incoming;
    if let Some(size) = declared.filter(|size| *size > max) {
        return Err(ApiError::PayloadTooLarge(format!("{what} of {size} bytes is over the largest, {max} bytes")));
    }
    let first = declared.unwrap_or(FIRST_ROOM.min(max));
    let mut held = room.hold(tenant, first).await?;
    let started = tokio::time::Instant::now();
    let mut buffer: Vec<u8> = Vec::with_capacity(first as usize);
    loop {
        let size = declared.unwrap_or(0).max(buffer.len() as u64);
        let allowed = stall + Duration::from_secs(size / MIN_RATE);
        let left = allowed.saturating_sub(started.elapsed()).min(stall);
        let frame = match tokio::time::timeout(left, body.frame()).await {
            Err(_) if started.elapsed() >= allowed => {
                return Err(ApiError::RequestTimeout(format!(
                    "{what} took over {}s ({} of {size} bytes received): a body must arrive within {}s plus its size at {MIN_RATE} bytes a second",
                    allowed.as_secs(),
                    buffer.len(),
                    stall.as_secs()
                )));
            }
            Err(_) => {
                return Err(ApiError::BadRequest(format!(
                    "the body sent nothing for {}s after {} bytes",
                    stall.as_secs(),
                    buffer.len()
                )));
            }
            Ok(None) => break,
            Ok(Some(frame)) => {
                frame.map_err(|error| ApiError::BadRequest(format!("the body is unreadable: {error}")))?
            }
        };
        let Ok(data) = frame.into_data() else { continue };
        let needed = (buffer.len() + data.len()) as u64;
        if needed > max {
            return Err(ApiError::PayloadTooLarge(format!("{what} is over the largest, {max} bytes")));
        }
        if needed > buffer.capacity() as u64 {
            let grown = needed.max(2 * buffer.capacity() as u64).min(max);
            check(needed)?;
            room.grow(&mut held, grown)?;
            buffer.reserve_exact(grown as usize - buffer.len());
        }
        buffer.extend_from_slice(&data);
    }
    // A stored value keeps its allocation: no room beyond its bytes.
    buffer.shrink_to_fit();
    Ok((Bytes::from(buffer), held))
}

impl From<RoomError> for ApiError {
    fn from(error: RoomError) -> Self {
        ApiError::TooManyRequests(error.to_string())
    }
}
