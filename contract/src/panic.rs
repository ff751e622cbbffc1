//! A request handler's panic, as every server of the platform answers it: a 500 instead of a
//! dropped connection, the panic's message in the server's log (a panic is a bug), and the
//! process and every other request going on. Each server says the 500 in its own format.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use futures_util::FutureExt;

/// Runs `next`; if it panics, logs the message and answers `answer()`. A server wraps it in
/// its own middleware function: `from_fn(|r, n| catch_panic(r, n, its_500))`.
pub async fn catch_panic(request: Request, next: Next, answer: fn() -> Response) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    match std::panic::AssertUnwindSafe(next.run(request)).catch_unwind().await {
        Ok(response) => response,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|text| text.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(%method, %path, %message, "a request handler panicked (a bug); answered 500");
            answer()
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::response::IntoResponse;
    use axum::routing::get;

    fn answer() -> axum::response::Response {
        (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
    }

    #[tokio::test]
    async fn a_panicking_handler_is_a_500_and_the_next_request_is_served() {
        let router = axum::Router::new()
            .route("/boom", get(|| async { "a bug".parse::<u8>().expect("a handler that panics").to_string() }))
            .route("/ok", get(|| async { "fine".to_string() }))
            .layer(axum::middleware::from_fn(|r, n| super::catch_panic(r, n, answer)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let response = http.get(format!("{url}/boom")).send().await.unwrap();
        assert_eq!(response.status(), 500);
        assert_eq!(response.text().await.unwrap(), "internal error");
        let response = http.get(format!("{url}/ok")).send().await.unwrap();
        assert_eq!(response.text().await.unwrap(), "fine");
    }
}
