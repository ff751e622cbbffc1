//! Invocations' buffers (requests' bodies and functions' responses) share one room, half of it
//! one tenant's: a tenant whose responses are not being read (a client that never reads them,
//! or thousands of calls at once) fills its own share, and its further calls are refused (429)
//! while other tenants' calls go on.

use crate::common;

use common::start;
use serde_json::json;

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_nobody_reads_fill_their_tenants_share_only() {
    // 160 MiB of room, 80 MiB of it a tenant's (the largest buffer, 1 MiB of request and 64 of
    // response, fits either).
    let core = start(|config| {
        config.max_body_bytes = MIB as usize;
        config.buffer_bytes = 160 * MIB;
    })
    .await;
    let (acme, globex) = (core.tenant("acme").await, core.tenant("globex").await);
    for tenant in [&acme, &globex] {
        core.deploy(tenant, json!({"service": "blob", "builtin": "blob-make"})).await;
    }
    let blob = |token: &str| {
        let request = core.http.post(format!("{}/function/blob", core.url)).bearer_auth(token);
        request.body((30 * MIB).to_string()).send()
    };
    // Two 30 MiB answers left unread hold 60 MiB of acme's 80; a third does not fit.
    let first = blob(&acme.ingest).await.unwrap();
    let second = blob(&acme.ingest).await.unwrap();
    assert_eq!((first.status().as_u16(), second.status().as_u16()), (200, 200));
    let third = blob(&acme.ingest).await.unwrap();
    assert_eq!(third.status(), 429);
    let message = third.text().await.unwrap();
    assert!(message.contains("cannot be held") && message.contains("--buffer-bytes"), "{message}");

    // Another tenant's calls have the rest of the room.
    let other = blob(&globex.ingest).await.unwrap();
    assert_eq!(other.status(), 200);
    assert_eq!(other.bytes().await.unwrap().len() as u64, 30 * MIB);

    // Once acme's answers are read (or their clients go away), its room is back.
    assert_eq!(first.bytes().await.unwrap().len() as u64, 30 * MIB);
    drop(second);
    let mut again = None;
    for _ in 0..50 {
        let response = blob(&acme.ingest).await.unwrap();
        if response.status() == 200 {
            again = Some(response.bytes().await.unwrap().len() as u64);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(again, Some(30 * MIB), "acme's room came back");
}

/// A body trickled to keep its room held (a slowloris: a byte now and then, never silent long
/// enough to be a stall) is cut off once it is slower than the minimum rate: 408, and its room
/// is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickled_to_hold_room_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let core = start(|config| config.body_stall = std::time::Duration::from_secs(1)).await;
    let acme = core.tenant("acme").await;
    core.deploy(&acme, json!({"service": "echo", "builtin": "echo"})).await;
    // 64 KiB at 64 KiB/s after a grace of 1 s: it must be in within 2 s.
    let address = core.url.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = format!(
        "POST /function/echo HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\nContent-Length: 65536\r\n\r\n",
        acme.ingest
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut sent = 0;
    loop {
        let mut chunk = [0u8; 4096];
        tokio::select! {
            read = stream.read(&mut chunk) => {
                let n = read.unwrap();
                answer.extend_from_slice(&chunk[..n]);
                if n == 0 || answer.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            _ = tokio::time::sleep(std::time::Duration::from_millis(300)) => {
                assert!(sent < 100, "the trickle was never cut off");
                stream.write_all(b"x").await.unwrap();
                sent += 1;
            }
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // The same body sent at once is answered.
    let echoed =
        core.http.post(format!("{}/function/echo", core.url)).bearer_auth(&acme.ingest).body(vec![b'x'; 65536]);
    assert_eq!(echoed.send().await.unwrap().bytes().await.unwrap().len(), 65536);
}
