//! The Postgres job queue: exclusive claims, retries with backoff, leases, dedupe,
//! and NOTIFY wake-up.
mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kiln::config::JobsConfig;
use kiln::db::jobs::{self, FailOutcome, NewJob};
use kiln::db::notify::{Event, listen};
use kiln::jobs::JobRunner;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use common::{TestDb, wait_for};

fn jobs_config(poll_seconds: u64) -> JobsConfig {
    JobsConfig {
        workers: 3,
        poll_interval_seconds: poll_seconds,
        lease_seconds: 30,
        backoff_base_seconds: 1,
        backoff_max_seconds: 1,
        max_attempts: 3,
    }
}

#[tokio::test]
async fn concurrent_claimers_never_get_the_same_job() {
    let db = TestDb::new().await;
    for i in 0..200 {
        jobs::enqueue(&db.pool, NewJob::new("noop", json!({ "i": i })))
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for w in 0..8 {
        let pool = db.pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let claimed = jobs::claim(
                    &pool,
                    "default",
                    &format!("w{w}"),
                    Duration::from_secs(30),
                    5,
                )
                .await
                .unwrap();
                if claimed.is_empty() {
                    break mine;
                }
                mine.extend(claimed.into_iter().map(|j| j.id));
            }
        }));
    }
    let mut seen = HashSet::new();
    let mut total = 0;
    for t in tasks {
        for id in t.await.unwrap() {
            total += 1;
            assert!(seen.insert(id), "job {id} claimed twice");
        }
    }
    assert_eq!(total, 200);
}

#[tokio::test]
async fn dedupe_keys_allow_one_live_job() {
    let db = TestDb::new().await;
    let first = jobs::enqueue(
        &db.pool,
        NewJob::new("reset", json!({})).dedupe("project-1"),
    )
    .await
    .unwrap();
    let second = jobs::enqueue(
        &db.pool,
        NewJob::new("reset", json!({})).dedupe("project-1"),
    )
    .await
    .unwrap();
    assert!(first.is_some());
    assert!(second.is_none(), "duplicate accepted");
    let other = jobs::enqueue(
        &db.pool,
        NewJob::new("reset", json!({})).dedupe("project-2"),
    )
    .await
    .unwrap();
    assert!(other.is_some());
}

#[tokio::test]
async fn failures_back_off_then_give_up() {
    let db = TestDb::new().await;
    jobs::enqueue(&db.pool, NewJob::new("flaky", json!({})).max_attempts(2))
        .await
        .unwrap();
    let claimed = jobs::claim(&db.pool, "default", "w", Duration::from_secs(30), 1)
        .await
        .unwrap();
    assert_eq!(claimed[0].attempts, 1);
    let outcome = jobs::fail(
        &db.pool,
        claimed[0].id,
        "w",
        "boom",
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    assert_eq!(outcome, FailOutcome::WillRetry);
    // Not due yet: the backoff holds it back.
    assert!(
        jobs::claim(&db.pool, "default", "w", Duration::from_secs(30), 1)
            .await
            .unwrap()
            .is_empty()
    );
    sqlx::query("UPDATE jobs SET run_at = now()")
        .execute(&db.pool)
        .await
        .unwrap();
    let again = jobs::claim(&db.pool, "default", "w", Duration::from_secs(30), 1)
        .await
        .unwrap();
    assert_eq!(again[0].attempts, 2);
    let outcome = jobs::fail(&db.pool, again[0].id, "w", "boom again", Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(outcome, FailOutcome::GaveUp);
    let failed = jobs::list(&db.pool, Some("failed")).await.unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].last_error.as_deref(), Some("boom again"));
    assert!(
        jobs::claim(&db.pool, "default", "w", Duration::from_secs(30), 1)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn a_lapsed_lease_is_claimed_again_and_the_old_worker_loses_it() {
    let db = TestDb::new().await;
    jobs::enqueue(&db.pool, NewJob::new("slow", json!({})))
        .await
        .unwrap();
    let first = jobs::claim(
        &db.pool,
        "default",
        "dead-worker",
        Duration::from_secs(30),
        1,
    )
    .await
    .unwrap();
    // Simulate the worker dying: its lease runs out.
    sqlx::query("UPDATE jobs SET locked_until = now() - interval '1 second'")
        .execute(&db.pool)
        .await
        .unwrap();
    let second = jobs::claim(
        &db.pool,
        "default",
        "live-worker",
        Duration::from_secs(30),
        1,
    )
    .await
    .unwrap();
    assert_eq!(second[0].id, first[0].id);
    assert!(
        !jobs::complete(&db.pool, first[0].id, "dead-worker")
            .await
            .unwrap(),
        "stale worker completed a job it lost"
    );
    assert!(
        jobs::complete(&db.pool, second[0].id, "live-worker")
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn the_runner_retries_until_success_and_wakes_on_notify() {
    let db = TestDb::new().await;
    let calls = Arc::new(AtomicUsize::new(0));
    // Poll only every 5 minutes: prompt pickup proves LISTEN/NOTIFY woke the worker.
    let mut runner = JobRunner::new(db.pool.clone(), jobs_config(300));
    {
        let calls = calls.clone();
        runner.register("flaky", move |_job| {
            let calls = calls.clone();
            async move {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    anyhow::bail!("first attempt fails");
                }
                Ok(())
            }
        });
    }
    let waker = runner.waker();
    let cancel = CancellationToken::new();
    let (connected_tx, mut connected_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(listen(
        db.pool.clone(),
        vec![jobs::NOTIFY_CHANNEL],
        cancel.clone(),
        move |event| {
            if matches!(event, Event::Connected) {
                let _ = connected_tx.send(());
            }
            waker.notify_waiters();
        },
    ));
    tokio::time::timeout(Duration::from_secs(10), connected_rx.recv())
        .await
        .unwrap();
    let idle = runner.idle_workers();
    let workers = jobs_config(300).workers;
    let run = tokio::spawn(runner.run(cancel.clone()));
    // Every worker has looked for work, found none and waits (poll: 5 minutes), so only
    // the notification of the enqueue can get this job picked up in time.
    wait_for(
        "every worker to wait for work",
        Duration::from_secs(10),
        || {
            let idle = idle.clone();
            async move { idle.load(Ordering::SeqCst) == workers }
        },
    )
    .await;
    jobs::enqueue(&db.pool, NewJob::new("flaky", json!({})))
        .await
        .unwrap();

    wait_for("the first attempt", Duration::from_secs(10), || {
        let calls = calls.clone();
        async move { calls.load(Ordering::SeqCst) >= 1 }
    })
    .await;
    // The retry is due ~1 s later; only the worker's poll (5 min) or a notify would
    // find it, so nudge the way a new enqueue would.
    let pool = db.pool.clone();
    wait_for(
        "the retry to succeed and the job to be deleted",
        Duration::from_secs(15),
        || {
            let pool = pool.clone();
            async move {
                let _ = sqlx::query("SELECT pg_notify('kiln_jobs', 'default')")
                    .execute(&pool)
                    .await;
                let left: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                left == 0
            }
        },
    )
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn unknown_kinds_are_retried_not_dropped() {
    let db = TestDb::new().await;
    let runner = JobRunner::new(db.pool.clone(), jobs_config(1));
    jobs::enqueue(&db.pool, NewJob::new("from.the.future", json!({})))
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let run = tokio::spawn(runner.run(cancel.clone()));
    let pool = db.pool.clone();
    wait_for(
        "the failed attempt to be recorded",
        Duration::from_secs(10),
        || {
            let pool = pool.clone();
            async move {
                let err: Option<String> = sqlx::query_scalar("SELECT last_error FROM jobs")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                err.is_some_and(|e| e.contains("no handler"))
            }
        },
    )
    .await;
    cancel.cancel();
    run.await.unwrap();
}

#[tokio::test]
async fn periodic_jobs_are_enqueued_once_per_period_across_replicas() {
    let db = TestDb::new().await;
    let mut winners = 0;
    for _ in 0..5 {
        if jobs::claim_schedule(&db.pool, "tick", Duration::from_secs(3600))
            .await
            .unwrap()
        {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
}

#[tokio::test]
async fn a_last_attempt_that_hangs_past_its_lease_still_gets_its_give_up_hook() {
    let db = TestDb::new().await;
    let mut config = jobs_config(1);
    config.lease_seconds = 5;
    let mut runner = JobRunner::new(db.pool.clone(), config);
    let gave_up = Arc::new(std::sync::Mutex::new(
        Vec::<(serde_json::Value, String)>::new(),
    ));
    runner
        .register("hangs", |_job| async {
            std::future::pending::<()>().await;
            Ok(())
        })
        .on_give_up("hangs", gave_up.clone(), |seen, job, error| async move {
            seen.lock().unwrap().push((job.payload, error));
            Ok(())
        });
    jobs::enqueue(
        &db.pool,
        NewJob::new("hangs", json!({"machine_id": "m1"})).max_attempts(1),
    )
    .await
    .unwrap();
    let cancel = CancellationToken::new();
    let run = tokio::spawn(runner.run(cancel.clone()));
    wait_for("the give-up hook", Duration::from_secs(20), || {
        let gave_up = gave_up.clone();
        async move { !gave_up.lock().unwrap().is_empty() }
    })
    .await;
    let (payload, error) = gave_up.lock().unwrap()[0].clone();
    assert_eq!(payload, json!({"machine_id": "m1"}));
    assert!(error.contains("timed out"), "{error}");
    let pool = db.pool.clone();
    wait_for(
        "the job to be marked failed",
        Duration::from_secs(10),
        || {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, String>("SELECT state FROM jobs")
                    .fetch_one(&pool)
                    .await
                    .is_ok_and(|s| s == "failed")
            }
        },
    )
    .await;
    assert_eq!(gave_up.lock().unwrap().len(), 1, "the hook runs once");
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), run).await;
}

#[tokio::test]
async fn housekeeping_purges_what_unauthenticated_callers_leave_behind() {
    let db = TestDb::new().await;
    // Closed login requests (expired two days ago) and one still open.
    for (age, open) in [("2 days", false), ("2 days", false), ("0 days", true)] {
        let expires = if open {
            "now() + interval '10 minutes'".to_string()
        } else {
            format!("now() - interval '{age}'")
        };
        sqlx::query(&format!(
            "INSERT INTO login_requests (id, claim_hash, user_code, expires_at)
             VALUES ($1, $2, $3, {expires})"
        ))
        .bind(kiln::db::ids::new_id())
        .bind((0..32).map(|_| rand_byte()).collect::<Vec<u8>>())
        .bind(format!("BCDF-{}", random_code()))
        .execute(&db.pool)
        .await
        .unwrap();
    }
    // Refusal audits: two old, one recent; and an old audit of another kind, kept.
    for (action, age) in [
        ("machine.registration_refused", "40 days"),
        ("machine.malformed_request", "40 days"),
        ("machine.registration_refused", "1 day"),
        ("project.update", "400 days"),
    ] {
        sqlx::query(&format!(
            "INSERT INTO audit_events (actor_kind, action, occurred_at)
             VALUES ('agent', $1, now() - interval '{age}')"
        ))
        .bind(action)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let config = common::config(&db.url, &[]);
    let mut runner = JobRunner::new(db.pool.clone(), jobs_config(1));
    kiln::jobs::register_foundation_jobs(&mut runner, db.pool.clone(), config.retention);
    jobs::enqueue(
        &db.pool,
        NewJob::new(kiln::jobs::MAINTENANCE_JOB, json!({})),
    )
    .await
    .unwrap();
    let cancel = CancellationToken::new();
    let run = tokio::spawn(runner.run(cancel.clone()));
    let pool = db.pool.clone();
    wait_for("the purge to run", Duration::from_secs(10), || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs")
                .fetch_one(&pool)
                .await
                .unwrap()
                == 0
        }
    })
    .await;
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), run).await;
    let logins: i64 = sqlx::query_scalar("SELECT count(*) FROM login_requests")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(logins, 1, "only the open request is left");
    let audits: Vec<String> =
        sqlx::query_scalar("SELECT action FROM audit_events ORDER BY occurred_at")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        audits,
        vec!["project.update", "machine.registration_refused"],
        "old refusals are gone, the rest is kept"
    );
}

fn rand_byte() -> u8 {
    kiln::db::ids::random_alphanumeric(1).as_bytes()[0]
}

fn random_code() -> String {
    const ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";
    kiln::db::ids::random_alphanumeric(4)
        .bytes()
        .map(|b| ALPHABET[b as usize % ALPHABET.len()] as char)
        .collect()
}

#[tokio::test]
async fn a_long_running_job_keeps_its_lease_and_runs_once_across_replicas() {
    let db = TestDb::new().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let cancel = CancellationToken::new();
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let mut config = jobs_config(1);
        config.lease_seconds = 3;
        let mut runner = JobRunner::new(db.pool.clone(), config);
        // Twice the lease: without renewal another replica would claim it meanwhile.
        runner
            .long_running("slow", Duration::from_secs(30))
            .register_with("slow", runs.clone(), |runs, _job| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(6)).await;
                Ok(())
            });
        replicas.push(tokio::spawn(runner.run(cancel.clone())));
    }
    jobs::enqueue(&db.pool, NewJob::new("slow", json!({})))
        .await
        .unwrap();
    let pool = db.pool.clone();
    // A finished job is deleted.
    wait_for("the job to finish", Duration::from_secs(30), || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs")
                .fetch_one(&pool)
                .await
                .is_ok_and(|n| n == 0)
        }
    })
    .await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "claimed by one replica only"
    );
    cancel.cancel();
    for replica in replicas {
        let _ = tokio::time::timeout(Duration::from_secs(10), replica).await;
    }
}
