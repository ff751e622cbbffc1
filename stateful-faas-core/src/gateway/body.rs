//! Reading a request's body into room held for it (see [`crate::room`]): the state API's values
//! and invocations' requests are buffered whole, so each is read only as far as there is room.

use std::time::Duration;

use axum::http::HeaderMap;
use bytes::Bytes;
use http_body_util::BodyExt;

use super::error::ApiError;
use crate::room::{Held, Room, RoomError};
use crate::tenant::TenantId;

/// How long a body may send nothing before it is refused (nginx's `client_body_timeout`).
const STALL: Duration = Duration::from_secs(60);

/// Room a body of unknown length holds first; it doubles as the body grows.
const FIRST_ROOM: u64 = 64 << 10;

/// The `Content-Length` a request declares, if any.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
}

/// Reads a body of at most `max` bytes (`what` names it in errors) into room held for it: a
/// declared length holds all of it before the first byte is read (waiting for room:
/// backpressure); a body of unknown length holds room as its buffer doubles, refused when there
/// is no more (429) or it passes `max` (413). `check` sees each size the buffer grows to, and
/// may refuse it (the state store's quota). The room is held until the returned [`Held`] is
/// dropped.
pub async fn receive(
    room: &Room,
    tenant: &TenantId,
    declared: Option<u64>,
    max: u64,
    what: &str,
    mut body: axum::body::Body,
    check: impl Fn(u64) -> Result<(), ApiError>,
) -> Result<(Bytes, Held), ApiError> {
    if let Some(size) = declared.filter(|size| *size > max) {
        return Err(ApiError::PayloadTooLarge(format!("{what} of {size} bytes is over the largest, {max} bytes")));
    }
    let first = declared.unwrap_or(FIRST_ROOM.min(max));
    let mut held = room.hold(tenant, first).await?;
    let mut buffer: Vec<u8> = Vec::with_capacity(first as usize);
    loop {
        let frame = match tokio::time::timeout(STALL, body.frame()).await {
            Err(_) => {
                return Err(ApiError::BadRequest(format!(
                    "the body sent nothing for {}s after {} bytes",
                    STALL.as_secs(),
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
