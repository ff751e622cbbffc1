//! The store's semantics and its metering, against hand-computed integrals.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::metering::ManualClock;
use super::*;

const S: u64 = 1_000_000_000;

fn store(config: StateConfig) -> (StateStore, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(0));
    (StateStore::new(config, clock.clone()), clock)
}

fn acme() -> TenantId {
    TenantId::new("acme").unwrap()
}

fn key(job: Option<&str>, bucket: &str, key: &str) -> ObjectKey {
    ObjectKey::new(job, bucket, key).unwrap()
}

fn bytes(n: usize) -> Bytes {
    Bytes::from(vec![7u8; n])
}

fn bs(seconds: u64) -> ByteSeconds {
    ByteSeconds::from_byte_nanos(seconds as u128 * S as u128)
}

#[test]
fn objects_follow_pocket_semantics() {
    let (store, _) = store(StateConfig::default());
    let t = acme();
    assert_eq!(
        store.put(&t, key(Some("j"), "b", "k"), bytes(3), PutOptions::default()),
        Err(StateError::JobNotRegistered("j".into()))
    );
    store.register(&t, "j").unwrap();
    assert_eq!(store.register(&t, "j"), Err(StateError::JobExists("j".into())));
    store.put(&t, key(Some("j"), "b", "k1"), Bytes::from_static(b"one"), PutOptions::default()).unwrap();
    store
        .put(&t, key(Some("j"), "b", "k2"), Bytes::from_static(b"two!"), PutOptions { persist: true, ttl: None })
        .unwrap();
    store.put(&t, key(Some("j"), "other", "k3"), bytes(1), PutOptions::default()).unwrap();
    assert_eq!(store.get(&t, &key(Some("j"), "b", "k1"), false).unwrap(), Bytes::from_static(b"one"));
    let info = store.lookup(&t, &key(Some("j"), "b", "k2")).unwrap();
    assert_eq!((info.size, info.persist), (4, true));
    let listed: Vec<_> = store.enumerate(&t, Some("j"), "b").into_iter().map(|i| i.key).collect();
    assert_eq!(listed, vec!["k1", "k2"]);

    // delete_after_read hands the value over and removes it in one step.
    assert_eq!(store.get(&t, &key(Some("j"), "b", "k1"), true).unwrap(), Bytes::from_static(b"one"));
    assert!(matches!(store.get(&t, &key(Some("j"), "b", "k1"), false), Err(StateError::NotFound { .. })));
    store.delete(&t, &key(Some("j"), "other", "k3")).unwrap();
    assert!(store.delete(&t, &key(Some("j"), "other", "k3")).is_err());

    // Deregistering drops what is not persistent; the persistent object stays addressable.
    store.put(&t, key(Some("j"), "b", "tmp"), bytes(10), PutOptions::default()).unwrap();
    store.deregister(&t, "j").unwrap();
    assert!(store.get(&t, &key(Some("j"), "b", "tmp"), false).is_err());
    assert_eq!(store.get(&t, &key(Some("j"), "b", "k2"), false).unwrap(), Bytes::from_static(b"two!"));
    assert_eq!(store.usage(&t).bytes, 4);
    assert_eq!(store.used_bytes(), 4);
    assert!(store.deregister(&t, "j").is_err());
    assert!(ObjectKey::new(None, "a/b", "k").is_err());
    assert!(ObjectKey::new(None, "b", "").is_err());
}

#[test]
fn tenants_are_isolated() {
    let (store, _) = store(StateConfig::default());
    let (a, b) = (acme(), TenantId::new("globex").unwrap());
    store.register(&a, "j").unwrap();
    store.put(&a, key(Some("j"), "b", "secret"), bytes(5), PutOptions::default()).unwrap();
    store.put(&a, key(None, "tables", "t"), bytes(5), PutOptions::default()).unwrap();
    assert!(matches!(store.get(&b, &key(Some("j"), "b", "secret"), false), Err(StateError::NotFound { .. })));
    assert!(store.lookup(&b, &key(None, "tables", "t")).is_err());
    assert!(store.delete(&b, &key(None, "tables", "t")).is_err());
    assert!(store.enumerate(&b, Some("j"), "b").is_empty());
    assert!(!store.is_registered(&b, "j"));
    assert_eq!(store.deregister(&b, "j"), Err(StateError::JobNotRegistered("j".into())));
    // The same names in another tenant are another tenant's objects.
    store.register(&b, "j").unwrap();
    store.put(&b, key(Some("j"), "b", "secret"), bytes(1), PutOptions::default()).unwrap();
    assert_eq!(store.get(&a, &key(Some("j"), "b", "secret"), false).unwrap().len(), 5);
}

#[test]
fn quotas_and_budget_refuse_puts_and_never_evict() {
    let config = StateConfig { max_value_bytes: 800, total_budget_bytes: 1500, tenant_quota_bytes: 1000 };
    let (store, _) = store(config);
    let (a, b) = (acme(), TenantId::new("globex").unwrap());
    assert_eq!(
        store.put(&a, key(None, "b", "huge"), bytes(801), PutOptions::default()),
        Err(StateError::ValueTooLarge { size: 801, max: 800 })
    );
    store.put(&a, key(None, "b", "x"), bytes(600), PutOptions::default()).unwrap();
    let over = store.put(&a, key(None, "b", "y"), bytes(600), PutOptions::default()).unwrap_err();
    assert_eq!(over, StateError::QuotaExceeded { tenant: "acme".into(), used: 600, quota: 1000, needed: 600 });
    assert_eq!(store.get(&a, &key(None, "b", "x"), false).unwrap().len(), 600, "nothing was evicted");
    // Replacing counts only the difference.
    store.put(&a, key(None, "b", "x"), bytes(800), PutOptions::default()).unwrap();
    assert_eq!(store.usage(&a).bytes, 800);
    // The shared budget: 800 held by acme, 700 more fit, 701 do not.
    assert!(matches!(
        store.put(&b, key(None, "b", "z"), bytes(701), PutOptions::default()),
        Err(StateError::BudgetExceeded { used: 800, budget: 1500, needed: 701 })
    ));
    store.put(&b, key(None, "b", "z"), bytes(700), PutOptions::default()).unwrap();
    assert_eq!(store.used_bytes(), 1500);
    store.delete(&a, &key(None, "b", "x")).unwrap();
    assert_eq!(store.used_bytes(), 700);
}

#[test]
fn ttl_expires_objects_at_their_instant() {
    let (store, clock) = store(StateConfig::default());
    let t = acme();
    store
        .put(&t, key(None, "b", "k"), bytes(100), PutOptions { persist: false, ttl: Some(Duration::from_secs(3)) })
        .unwrap();
    clock.set(3 * S - 1);
    assert!(store.get(&t, &key(None, "b", "k"), false).is_ok());
    clock.set(3 * S);
    assert!(store.get(&t, &key(None, "b", "k"), false).is_err());
    assert!(store.lookup(&t, &key(None, "b", "k")).is_err());
    assert_eq!(store.usage(&t).bytes, 0);
    // Swept late, it is still counted only until its expiry: 100 B × 3 s.
    clock.set(100 * S);
    assert_eq!(store.usage(&t).total, bs(300));
}

/// A hand-computed timeline (seconds; B = bytes):
///
/// | t  | event                                                        |
/// |----|--------------------------------------------------------------|
/// | 0  | register job j; put j/b/a 100 B; put j/b/p 10 B PERSIST       |
/// | 2  | put (no job) tables/t 1000 B with TTL 3 s (expires at t=5)    |
/// | 4  | replace j/b/a with 200 B                                      |
/// | 6  | deregister j (a dropped; p moves to standing storage)         |
/// | 10 | read the usage                                                |
///
/// job j: a = 100×4 + 200×2 = 800, p = 10×6 = 60 → 860
/// standing: tables/t = 1000×3 = 3000 (though swept only at t=6), p after j = 10×4 = 40
/// total = 860 + 3000 + 40 = 3900
#[test]
fn byte_seconds_match_a_hand_computed_integral() {
    let (store, clock) = store(StateConfig::default());
    let t = acme();
    store.register(&t, "j").unwrap();
    store.put(&t, key(Some("j"), "b", "a"), bytes(100), PutOptions::default()).unwrap();
    store.put(&t, key(Some("j"), "b", "p"), bytes(10), PutOptions { persist: true, ttl: None }).unwrap();
    clock.set(2 * S);
    store
        .put(
            &t,
            key(None, "tables", "t"),
            bytes(1000),
            PutOptions { persist: false, ttl: Some(Duration::from_secs(3)) },
        )
        .unwrap();
    clock.set(4 * S);
    assert_eq!(store.job_usage(&t, "j"), Some(bs(440))); // 100×4 + 10×4
    store.put(&t, key(Some("j"), "b", "a"), bytes(200), PutOptions::default()).unwrap();
    clock.set(6 * S);
    assert_eq!(store.deregister(&t, "j").unwrap(), bs(860));
    clock.set(10 * S);
    let usage = store.usage(&t);
    assert_eq!(usage.bytes, 10);
    assert_eq!(usage.ended_jobs, bs(860));
    assert_eq!(usage.standing, bs(3040));
    assert_eq!(usage.total, bs(3900));
    assert!(usage.jobs.is_empty());
    assert_eq!(usage.total.to_decimal_string(), "3900.000000000");

    // Sub-second changes stay exact: p (10 B) and x/y (10 B) held for 1 ns more.
    store.put(&t, key(None, "x", "y"), bytes(10), PutOptions::default()).unwrap();
    clock.set(10 * S + 1);
    assert_eq!(store.usage(&t).total.byte_nanos(), 3900 * S as u128 + 20);
}
