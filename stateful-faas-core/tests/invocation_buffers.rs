//! Invocations' buffers (requests' bodies and functions' responses) share one room, half of it
//! one tenant's: a tenant whose responses are not being read (a client that never reads them,
//! or thousands of calls at once) fills its own share, and its further calls are refused (429)
//! while other tenants' calls go on.

mod common;

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
