//! The store's semantics and its metering, against hand-computed integrals.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::metering::ManualClock;
use super::*;

const S: u64 = 1_000_000_000;

fn store(config: StateConfig) -> (StateStore, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(0));
    (StateStore::new(config, clock.clone(), Default::default()), clock)
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
    let listed: Vec<_> =
        store.enumerate(&t, Some("j"), "b", None, MAX_PAGE).objects.into_iter().map(|i| i.key).collect();
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
    // Held: the value, the address ("j", "b", "k2") and the overhead.
    assert_eq!(store.usage(&t).held, 4 + 4 + OBJECT_OVERHEAD);
    assert_eq!(store.used_bytes(), 4 + 4 + OBJECT_OVERHEAD);
    assert!(store.deregister(&t, "j").is_err());
    assert!(ObjectKey::new(None, "a/b", "k").is_err());
    assert!(ObjectKey::new(None, "b", "").is_err());
}

#[test]
fn buckets_list_in_pages_from_a_cursor() {
    let (store, _) = store(StateConfig::default());
    let t = acme();
    store.register(&t, "j").unwrap();
    for k in ["c", "a", "e", "b", "d"] {
        store.put(&t, key(None, "b", k), bytes(1), PutOptions::default()).unwrap();
    }
    // Neighbours in the order of addresses: another job, a longer bucket name, a shorter one.
    store.put(&t, key(Some("j"), "b", "a"), bytes(1), PutOptions::default()).unwrap();
    store.put(&t, key(None, "bb", "a"), bytes(1), PutOptions::default()).unwrap();
    store.put(&t, key(None, "a", "z"), bytes(1), PutOptions::default()).unwrap();
    let page = |after: Option<&str>, limit| {
        let listing = store.enumerate(&t, None, "b", after, limit);
        (listing.objects.into_iter().map(|o| o.key).collect::<Vec<_>>(), listing.next_after)
    };
    assert_eq!(page(None, 2), (vec!["a".into(), "b".into()], Some("b".into())));
    assert_eq!(page(Some("b"), 2), (vec!["c".into(), "d".into()], Some("d".into())));
    assert_eq!(page(Some("d"), 2), (vec!["e".into()], None));
    assert_eq!(page(Some("c"), 2), (vec!["d".into(), "e".into()], None), "no cursor when the page ends the bucket");
    // A cursor whose key is gone, or never was, goes on from where it would be.
    assert_eq!(page(Some("bz"), 1), (vec!["c".into()], Some("c".into())));
    assert_eq!(page(Some("e"), 5), (vec![], None));
    assert_eq!(page(None, 0).0.len(), 1, "a page holds at least one object");
    assert_eq!(page(None, usize::MAX).0.len(), 5);
    let only = |job, bucket| store.enumerate(&t, job, bucket, None, MAX_PAGE).objects.len();
    assert_eq!((only(Some("j"), "b"), only(None, "bb"), only(None, "a")), (1, 1, 1));
    // Removed objects leave every index.
    store.delete(&t, &key(None, "b", "c")).unwrap();
    assert_eq!(page(Some("b"), 1), (vec!["d".into()], Some("d".into())));
}

#[test]
fn a_job_ends_with_its_own_objects_only() {
    let (store, _) = store(StateConfig::default());
    let t = acme();
    let persist = PutOptions { persist: true, ttl: None };
    store.register(&t, "j").unwrap();
    store.put(&t, key(Some("j"), "b", "kept"), bytes(5), persist).unwrap();
    store.put(&t, key(Some("j"), "b", "dropped"), bytes(5), PutOptions::default()).unwrap();
    store.deregister(&t, "j").unwrap();
    // A job of the same name again: the persisted object is the tenant's, until written anew.
    store.register(&t, "j").unwrap();
    store.put(&t, key(Some("j"), "b", "new"), bytes(3), PutOptions::default()).unwrap();
    assert_eq!(store.with_tenant(&t, |state, _| state.jobs["j"].objects.len()), 1);
    store.put(&t, key(Some("j"), "b", "kept"), bytes(7), PutOptions::default()).unwrap();
    store.delete(&t, &key(Some("j"), "b", "new")).unwrap();
    assert_eq!(store.with_tenant(&t, |state, _| state.jobs["j"].objects.len()), 1, "deleted objects leave it");
    store.deregister(&t, "j").unwrap();
    assert!(store.lookup(&t, &key(Some("j"), "b", "kept")).is_err(), "rewritten without persist: the job's own");
    assert_eq!((store.usage(&t).bytes, store.used_bytes()), (0, 0));
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
    assert_eq!(store.enumerate(&b, Some("j"), "b", None, MAX_PAGE), Listing { objects: vec![], next_after: None });
    assert!(!store.is_registered(&b, "j"));
    assert_eq!(store.deregister(&b, "j"), Err(StateError::JobNotRegistered("j".into())));
    // The same names in another tenant are another tenant's objects.
    store.register(&b, "j").unwrap();
    store.put(&b, key(Some("j"), "b", "secret"), bytes(1), PutOptions::default()).unwrap();
    assert_eq!(store.get(&a, &key(Some("j"), "b", "secret"), false).unwrap().len(), 5);
}

#[test]
fn quotas_and_budget_refuse_puts_and_never_evict() {
    let config = StateConfig {
        max_value_bytes: 800,
        total_budget_bytes: 1500,
        tenant_quota_bytes: 1000,
        ..StateConfig::default()
    };
    let (store, _) = store(config);
    let (a, b) = (acme(), TenantId::new("globex").unwrap());
    // What an object in bucket "b" under a one-letter key holds.
    let held = |value: u64| value + 2 + OBJECT_OVERHEAD;
    assert_eq!(
        store.put(&a, key(None, "b", "huge"), bytes(801), PutOptions::default()),
        Err(StateError::ValueTooLarge { size: 801, max: 800 })
    );
    store.put(&a, key(None, "b", "x"), bytes(600), PutOptions::default()).unwrap();
    let over = store.put(&a, key(None, "b", "y"), bytes(600), PutOptions::default()).unwrap_err();
    assert_eq!(
        over,
        StateError::QuotaExceeded { tenant: "acme".into(), used: held(600), quota: 1000, needed: held(600) }
    );
    assert!(over.to_string().contains("--state-tenant-quota-bytes"), "{over}");
    assert_eq!(store.check_room(&a, &key(None, "b", "y"), 600), Err(over));
    assert_eq!(store.get(&a, &key(None, "b", "x"), false).unwrap().len(), 600, "nothing was evicted");
    // Replacing counts only the difference.
    store.put(&a, key(None, "b", "x"), bytes(800), PutOptions::default()).unwrap();
    assert_eq!((store.usage(&a).bytes, store.usage(&a).held), (800, held(800)));
    // The shared budget: held(800) held by acme, held(440) more fit, held(441) do not.
    assert_eq!(held(800) + held(440), 1500);
    assert!(matches!(
        store.put(&b, key(None, "b", "z"), bytes(441), PutOptions::default()),
        Err(StateError::BudgetExceeded { used: 930, budget: 1500, needed: 571 })
    ));
    assert!(store.check_room(&b, &key(None, "b", "z"), 441).is_err());
    store.check_room(&b, &key(None, "b", "z"), 440).unwrap();
    store.put(&b, key(None, "b", "z"), bytes(440), PutOptions::default()).unwrap();
    assert_eq!(store.used_bytes(), 1500);
    store.delete(&a, &key(None, "b", "x")).unwrap();
    assert_eq!(store.used_bytes(), held(440));
}

#[test]
fn empty_objects_with_long_keys_are_not_free_to_hoard() {
    let config = StateConfig { tenant_quota_bytes: 64 << 10, ..StateConfig::default() };
    let (store, clock) = store(config);
    let t = acme();
    let long = |n: usize| format!("{n:0255}");
    // Each empty object holds its 255-byte key, its 1-byte bucket and the overhead.
    let each = 255 + 1 + OBJECT_OVERHEAD;
    let fit = (64 << 10) / each;
    for n in 0..fit {
        store.put(&t, key(None, "b", &long(n as usize)), Bytes::new(), PutOptions::default()).unwrap();
    }
    let refused = store.put(&t, key(None, "b", &long(fit as usize)), Bytes::new(), PutOptions::default());
    assert!(matches!(refused, Err(StateError::QuotaExceeded { .. })), "{refused:?}");
    assert_eq!(store.usage(&t).bytes, 0, "no value bytes");
    assert_eq!(store.usage(&t).held, fit * each);
    // What they hold is what is metered: 10 s of them cost as much as 10 s of values as large.
    clock.advance_secs(10);
    assert_eq!(store.usage(&t).total, bs(10 * fit * each));
}

#[test]
fn a_tenant_has_at_most_its_quota_of_jobs() {
    let (store, _) = store(StateConfig { max_jobs_per_tenant: 3, ..StateConfig::default() });
    let (a, b) = (acme(), TenantId::new("globex").unwrap());
    for job in ["j1", "j2", "j3"] {
        store.register(&a, job).unwrap();
    }
    let refused = store.register(&a, "j4").unwrap_err();
    assert_eq!(refused, StateError::TooManyJobs { tenant: "acme".into(), max: 3 });
    assert!(refused.to_string().contains("--state-tenant-max-jobs"));
    store.register(&b, "j4").unwrap();
    store.deregister(&a, "j1").unwrap();
    store.register(&a, "j4").unwrap();
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
    // Swept late, it is still counted only until its expiry: it held 230 B (100 of value, 2 of
    // address, 128 of overhead) × 3 s.
    clock.set(100 * S);
    assert_eq!(store.usage(&t).total, bs(690));
}

/// A hand-computed timeline (seconds; B = bytes). An object holds its value, its address
/// (job, bucket and key: 3 B for `j/b/a`, 7 B for `tables/t`) and 128 B, and that is metered:
///
/// | t  | event                                                        | held  |
/// |----|--------------------------------------------------------------|-------|
/// | 0  | register job j; put j/b/a 100 B; put j/b/p 10 B PERSIST       | 231, 141 |
/// | 2  | put (no job) tables/t 1000 B with TTL 3 s (expires at t=5)    | 1135  |
/// | 4  | replace j/b/a with 200 B                                      | 331   |
/// | 6  | deregister j (a dropped; p moves to standing storage)         |       |
/// | 10 | read the usage                                                |       |
///
/// job j: a = 231×4 + 331×2 = 1586, p = 141×6 = 846 → 2432
/// standing: tables/t = 1135×3 = 3405 (though swept only at t=6), p after j = 141×4 = 564
/// total = 2432 + 3405 + 564 = 6401
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
    assert_eq!(store.job_usage(&t, "j"), Some(bs(1488))); // 231×4 + 141×4
    store.put(&t, key(Some("j"), "b", "a"), bytes(200), PutOptions::default()).unwrap();
    clock.set(6 * S);
    assert_eq!(store.deregister(&t, "j").unwrap(), bs(2432));
    clock.set(10 * S);
    let usage = store.usage(&t);
    assert_eq!((usage.bytes, usage.held), (10, 141));
    assert_eq!(usage.ended_jobs, bs(2432));
    assert_eq!(usage.standing, bs(3969));
    assert_eq!(usage.total, bs(6401));
    assert!(usage.jobs.is_empty());
    assert_eq!(usage.total.to_decimal_string(), "6401.000000000");

    // Sub-second changes stay exact: p (141 B) and x/y (10 + 2 + 128 B) held for 1 ns more.
    store.put(&t, key(None, "x", "y"), bytes(10), PutOptions::default()).unwrap();
    clock.set(10 * S + 1);
    assert_eq!(store.usage(&t).total.byte_nanos(), 6401 * S as u128 + 281);
}

const I: u64 = 10 * S;

fn interval_store() -> (StateStore, Arc<ManualClock>) {
    store(StateConfig { usage_interval: Duration::from_secs(10), ..StateConfig::default() })
}

fn ttl(seconds: u64, persist: bool) -> PutOptions {
    PutOptions { persist, ttl: Some(Duration::from_secs(seconds)) }
}

fn job_record(start: u64, end: u64, job: &str, byte_seconds: u64) -> UsageInterval {
    UsageInterval {
        start_ns: start * S,
        end_ns: end * S,
        owner: Owner::Job(job.into()),
        byte_seconds: bs(byte_seconds),
    }
}

fn standing_record(start: u64, end: u64, byte_seconds: u64) -> UsageInterval {
    UsageInterval { start_ns: start * S, end_ns: end * S, owner: Owner::Standing, byte_seconds: bs(byte_seconds) }
}

/// What one run of the partition timeline produced.
struct Timeline {
    records: Vec<UsageInterval>,
    /// `usage().total` read exactly at each boundary (probing runs only).
    totals: std::collections::BTreeMap<u64, ByteSeconds>,
    /// (job, registered at, deregistered at, what `deregister` returned).
    jobs: Vec<(String, u64, u64, ByteSeconds)>,
    /// `usage().total` at the end (95 s), and the records of the final report there.
    end_total: ByteSeconds,
    final_records: Vec<UsageInterval>,
}

/// The timeline of `usage_is_partitioned_exactly_by_interval` (I = 10 s; seconds; B = bytes of
/// value). What each object holds, and is metered, is its value, its address (3 B in a job, 2 B
/// without: every name here is one letter) and 128 B: x 231, p 141, t 1130, s 180, y 151, w 133,
/// z 136, q 138, v 132.
/// With `probe`, the usage is also read at every boundary (which closes it right there);
/// without, boundaries are closed lazily by the next operation, several at once at the end.
///
/// | t  | event                                                                           |
/// |----|---------------------------------------------------------------------------------|
/// | 3  | first use; register a; put a/x 100 B; put a/p 10 B PERSIST; put t 1000 B TTL 14 s |
/// | 12 | put s 50 B; register b; put b/y 20 B PERSIST                                      |
/// | 17 | (t expires)                                                                       |
/// | 25 | delete s                                                                          |
/// | 27 | final report (as at a shutdown): every account reports [last, 27)                 |
/// | 33 | deregister a (x dropped, p moves to standing); put w 3 B TTL 7 s (expires at 40)  |
/// | 41 | put b/z 5 B PERSIST TTL 4 s (expires at 45, still in b)                           |
/// | 47 | register a again; put a/q 7 B                                                     |
/// | 52 | deregister a                                                                      |
/// | 58 | deregister b (y moves to standing)                                                |
/// | 60 | put v 2 B                                                                         |
/// | 95 | drain (closes 70, 80 and 90), then a final report                                 |
fn partition_timeline(probe: bool) -> Timeline {
    let (store, clock) = interval_store();
    let t = acme();
    let mut out = Timeline {
        records: Vec::new(),
        totals: std::collections::BTreeMap::from([(0, ByteSeconds::ZERO)]),
        jobs: Vec::new(),
        end_total: ByteSeconds::ZERO,
        final_records: Vec::new(),
    };
    let goto = |seconds: u64, out: &mut Timeline| {
        let target = seconds * S;
        let mut boundary = (clock.now_ns() / I + 1) * I;
        while probe && boundary <= target {
            clock.set(boundary);
            out.totals.insert(boundary, store.usage(&t).total);
            boundary += I;
        }
        clock.set(target);
    };
    let drain = |store: &StateStore, out: &mut Timeline| {
        out.records.extend(store.take_usage().into_iter().map(|(tenant, record)| {
            assert_eq!(tenant, acme());
            record
        }));
    };

    goto(3, &mut out);
    store.register(&t, "a").unwrap();
    store.put(&t, key(Some("a"), "b", "x"), bytes(100), PutOptions::default()).unwrap();
    store.put(&t, key(Some("a"), "b", "p"), bytes(10), PutOptions { persist: true, ttl: None }).unwrap();
    store.put(&t, key(None, "b", "t"), bytes(1000), ttl(14, false)).unwrap();
    goto(12, &mut out);
    store.put(&t, key(None, "b", "s"), bytes(50), PutOptions::default()).unwrap();
    store.register(&t, "b").unwrap();
    store.put(&t, key(Some("b"), "o", "y"), bytes(20), PutOptions { persist: true, ttl: None }).unwrap();
    goto(25, &mut out);
    store.delete(&t, &key(None, "b", "s")).unwrap();
    goto(27, &mut out);
    out.records.extend(store.take_usage_final().into_iter().map(|(_, record)| record));
    goto(33, &mut out);
    out.jobs.push(("a".into(), 3, 33, store.deregister(&t, "a").unwrap()));
    store.put(&t, key(None, "b", "w"), bytes(3), ttl(7, false)).unwrap();
    drain(&store, &mut out);
    goto(41, &mut out);
    store.put(&t, key(Some("b"), "o", "z"), bytes(5), ttl(4, true)).unwrap();
    goto(47, &mut out);
    store.register(&t, "a").unwrap();
    store.put(&t, key(Some("a"), "b", "q"), bytes(7), PutOptions::default()).unwrap();
    goto(52, &mut out);
    out.jobs.push(("a".into(), 47, 52, store.deregister(&t, "a").unwrap()));
    goto(58, &mut out);
    out.jobs.push(("b".into(), 12, 58, store.deregister(&t, "b").unwrap()));
    goto(60, &mut out);
    store.put(&t, key(None, "b", "v"), bytes(2), PutOptions::default()).unwrap();
    goto(95, &mut out);
    drain(&store, &mut out);
    out.end_total = store.usage(&t).total;
    out.final_records = store.take_usage_final().into_iter().map(|(_, record)| record).collect();
    assert!(store.take_usage().is_empty(), "nothing is reported twice");
    out
}

/// Records sum, per period of whole intervals, to the store's exact integral over the period.
///
/// Hand-computed (in held bytes, see [`partition_timeline`]), the interval [10 s, 20 s):
/// standing t 1130 B × 7 s (to its expiry at 17) + s 180 B × 8 s (from 12) = 9350; job a:
/// (231 + 141) B × 10 s = 3720; job b: y 151 B × 8 s (from its registration at 12) = 1208;
/// together 14278 = total(20) − total(10).
/// Job a's first run: (231 + 141) B × 30 s = 11160, in records [3,10) 2604, [10,20) 3720,
/// [20,27) 2604, [27,30) 1116 (split by the final report at 27) and [30,33) 1116.
#[test]
fn usage_is_partitioned_exactly_by_interval() {
    let probed = partition_timeline(true);
    let lazy = partition_timeline(false);
    let sorted = |records: &[UsageInterval]| {
        let mut records = records.to_vec();
        records.sort_by(|a, b| (a.start_ns, &a.owner).cmp(&(b.start_ns, &b.owner)));
        records
    };
    // Closing a boundary late (several at once) gives the same records as closing it on time.
    assert_eq!(sorted(&probed.records), sorted(&lazy.records));
    assert_eq!(sorted(&probed.final_records), sorted(&lazy.final_records));
    let records = &probed.records;

    // Hand-computed records.
    for expected in [
        standing_record(3, 10, 7910),
        standing_record(10, 20, 9350),
        standing_record(20, 27, 900),
        standing_record(30, 40, 1918), // p 141 B × 7 s (from 33) + w 133 B × 7 s (expires at 40)
        standing_record(60, 70, 4240), // p + y + v = 424 B
        job_record(3, 10, "a", 2604),
        job_record(10, 20, "a", 3720),
        job_record(20, 27, "a", 2604),
        job_record(27, 30, "a", 1116),
        job_record(30, 33, "a", 1116),
        job_record(12, 20, "b", 1208),
        job_record(40, 50, "b", 2054), // y 151 B × 10 s + z 136 B × 4 s (expired at 45)
        job_record(50, 58, "b", 1208),
        job_record(47, 50, "a", 414),
        job_record(50, 52, "a", 276),
    ] {
        assert!(records.contains(&expected), "missing {expected:?} in {records:#?}");
    }
    assert!(!records.iter().any(|r| r.start_ns == 27 * S && r.owner == Owner::Standing), "nothing held then");
    let total_of = |from: u64, to: u64| -> u128 {
        records.iter().filter(|r| r.start_ns >= from && r.end_ns <= to).map(|r| r.byte_seconds.byte_nanos()).sum()
    };
    assert_eq!(total_of(10 * S, 20 * S), bs(14278).byte_nanos());

    // No record straddles a boundary; each ends at a boundary, its job's end, or a final report.
    let ends: Vec<u64> = probed.jobs.iter().map(|(_, _, end, _)| end * S).chain([27 * S]).collect();
    for record in records {
        assert!(record.start_ns < record.end_ns, "{record:?}");
        assert_eq!(record.start_ns / I, (record.end_ns - 1) / I, "within one interval: {record:?}");
        assert!(record.end_ns % I == 0 || ends.contains(&record.end_ns), "{record:?}");
        assert!(record.byte_seconds > ByteSeconds::ZERO);
    }
    let mut ids: Vec<String> = records.iter().map(UsageInterval::usage_id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), records.len(), "usage ids are unique, the reused job name included");

    // Every period of whole intervals gets exactly the store's integral over it.
    let boundaries: Vec<u64> = probed.totals.keys().copied().collect();
    assert_eq!(boundaries.len(), 10, "0 to 90 s");
    for (i, &p0) in boundaries.iter().enumerate() {
        for &p1 in &boundaries[i + 1..] {
            let expected = probed.totals[&p1].byte_nanos() - probed.totals[&p0].byte_nanos();
            assert_eq!(total_of(p0, p1), expected, "period [{p0}, {p1})");
        }
    }
    assert_eq!(
        ByteSeconds::from_byte_nanos(total_of(0, u64::MAX)),
        probed.totals[&(90 * S)],
        "every byte-second up to the last boundary"
    );

    // Each job's records sum to what its deregistration returned, once.
    // b: y 151 B × 46 s + z 136 B × 4 s.
    assert_eq!(probed.jobs.iter().map(|j| j.3).collect::<Vec<_>>(), [bs(11160), bs(690), bs(7490)]);
    for (job, registered, deregistered, returned) in &probed.jobs {
        let sum: ByteSeconds = records
            .iter()
            .filter(|r| r.owner == Owner::Job(job.clone()))
            .filter(|r| r.start_ns >= registered * S && r.end_ns <= deregistered * S)
            .map(|r| r.byte_seconds)
            .sum();
        assert_eq!(sum, *returned, "job {job} from {registered} s");
    }
    assert!(records.iter().all(|r| r.owner != Owner::Job("b".into()) || r.end_ns <= 58 * S));

    // The final report covers [90, 95): p 141 + y 151 + v 132 = 424 B × 5 s, to the exact total.
    assert_eq!(probed.final_records, [standing_record(90, 95, 2120)]);
    assert_eq!(probed.end_total, probed.totals[&(90 * S)] + bs(2120));
}

#[test]
fn idle_tenants_skip_empty_intervals_and_report_nothing() {
    let (store, clock) = interval_store();
    let t = acme();
    clock.set(5 * S);
    store.put(&t, key(None, "b", "k"), bytes(4), PutOptions::default()).unwrap();
    clock.set(12 * S);
    store.delete(&t, &key(None, "b", "k")).unwrap();
    // A year later: one record per interval that held something, none for the empty ones. The
    // object holds 4 + 2 + 128 B, then 1 + 2 + 128 B.
    clock.set(365 * 86_400 * S + 3 * S);
    store.put(&t, key(None, "b", "k"), bytes(1), PutOptions::default()).unwrap();
    clock.set(365 * 86_400 * S + 10 * S);
    let records: Vec<_> = store.take_usage().into_iter().map(|(_, r)| r).collect();
    assert_eq!(
        records,
        [
            standing_record(5, 10, 670),
            standing_record(10, 20, 268),
            standing_record(365 * 86_400, 365 * 86_400 + 10, 917)
        ]
    );
    assert_eq!(store.usage(&t).total, bs(1855));
}

#[test]
fn the_usage_interval_must_divide_a_day() {
    let with = |interval: Duration| StateConfig { usage_interval: interval, ..StateConfig::default() }.validate();
    assert!(with(Duration::from_secs(60)).is_ok());
    assert!(with(Duration::from_millis(500)).is_ok());
    assert!(with(Duration::from_secs(86_400)).is_ok());
    assert_eq!(with(Duration::ZERO), Err(InvalidUsageInterval(Duration::ZERO)));
    assert!(with(Duration::from_secs(7)).is_err());
    assert!(with(Duration::from_secs(2 * 86_400)).is_err());
}

#[test]
fn appends_grow_a_value_in_place_within_the_quota_and_are_metered() {
    let (store, clock) = store(StateConfig { tenant_quota_bytes: 2 << 20, ..StateConfig::default() });
    let t = acme();
    let handle = store.handle(&t);
    let k = key(None, "b", "k");
    let append = |suffix: Bytes| store.modify(&handle, &k, |_, _| (Change::Append(suffix), ()));
    append(bytes(1 << 20)).unwrap();
    // A thousand small appends copy the megabyte once (into room for an eighth more), not a
    // thousand times; a reader's copy in between is the reader's own.
    let mut moves = 0;
    let mut at = store.get(&t, &k, false).unwrap().as_ptr();
    for _ in 0..1000 {
        append(Bytes::from_static(b"x")).unwrap();
        let now = store.get(&t, &k, false).unwrap().as_ptr();
        moves += usize::from(now != at);
        at = now;
    }
    assert!(moves <= 1, "the value moved {moves} times");
    let value = store.get(&t, &k, false).unwrap();
    assert_eq!((value.len(), &value[..2], &value[value.len() - 2..]), ((1 << 20) + 1000, &[7u8, 7][..], &b"xx"[..]));

    // Over the quota: refused, and the value is as it was.
    let refused = append(bytes(1 << 20));
    assert!(matches!(refused, Err(StateError::QuotaExceeded { .. })), "{refused:?}");
    assert_eq!(store.get(&t, &k, false).unwrap().len(), (1 << 20) + 1000);

    // Metered as if put whole: what it holds, from its last change.
    let held = (1 << 20) + 1000 + 2 + OBJECT_OVERHEAD;
    assert_eq!((store.usage(&t).bytes, store.usage(&t).held, store.used_bytes()), ((1 << 20) + 1000, held, held));
    clock.advance_secs(10);
    assert_eq!(store.usage(&t).total, bs(10 * held));
}

#[test]
fn a_tenant_registers_jobs_at_its_pace_and_not_while_its_usage_cannot_leave() {
    let (store, clock) = store(StateConfig { job_registrations_per_second: 10, ..StateConfig::default() });
    let (a, b) = (acme(), TenantId::new("globex").unwrap());
    let register =
        |tenant: &TenantId, n: usize| (0..n).filter(|i| store.register_paced(tenant, &format!("j{i}")).is_ok()).count();
    // A burst of ten seconds' worth, then one every 100 ms; another tenant has its own pace.
    assert_eq!(register(&a, 150), 100);
    assert!(matches!(store.register_paced(&a, "late"), Err(StateError::JobsTooFast { .. })));
    assert_eq!(register(&b, 100), 100);
    clock.advance_secs(1);
    assert_eq!((100..150).filter(|i| store.register_paced(&a, &format!("j{i}")).is_ok()).count(), 10);
    // Flow runs register unpaced: their nodes' calls are billed.
    store.register(&a, "run").unwrap();

    // While a tenant's usage records cannot leave, it may not make more.
    store.gate_usage(|tenant| tenant.as_str() == "globex");
    clock.advance_secs(60);
    assert!(matches!(store.register_paced(&b, "more"), Err(StateError::JobsTooFast { .. })));
    assert!(store.register_paced(&a, "more").is_ok());
}
