//! The LISTEN connection: it reconnects after being cut, with backoff when it keeps
//! being cut, and says so.
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kiln::db::notify::{Event, listen};
use tokio_util::sync::CancellationToken;

use common::{TestDb, wait_for};

async fn terminate_listeners(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database() AND query LIKE 'LISTEN%' AND pid <> pg_backend_pid()",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_connection_cut_again_and_again_reconnects_with_backoff() {
    let db = TestDb::new().await;
    let connects = Arc::new(AtomicUsize::new(0));
    let notified = Arc::new(AtomicUsize::new(0));
    let cancel = CancellationToken::new();
    {
        let connects = connects.clone();
        let notified = notified.clone();
        tokio::spawn(listen(
            db.pool.clone(),
            vec!["kiln_test"],
            cancel.clone(),
            move |event| match event {
                Event::Connected => {
                    connects.fetch_add(1, Ordering::SeqCst);
                }
                Event::Notification { .. } => {
                    notified.fetch_add(1, Ordering::SeqCst);
                }
            },
        ));
    }
    wait_for("the first LISTEN", Duration::from_secs(10), || {
        let connects = connects.clone();
        async move { connects.load(Ordering::SeqCst) == 1 }
    })
    .await;
    // Cut every LISTEN connection as soon as it appears, for three seconds.
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        terminate_listeners(&db.pool).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reconnects = connects.load(Ordering::SeqCst) - 1;
    // 250 ms, 500 ms, 1 s, 2 s: a handful, where an immediate retry would make hundreds.
    assert!(
        (1..=6).contains(&reconnects),
        "{reconnects} reconnects in 3 s"
    );
    // Left alone, it comes back and delivers notifications again.
    wait_for("the listener to come back", Duration::from_secs(15), || {
        let pool = db.pool.clone();
        let notified = notified.clone();
        async move {
            let _ = sqlx::query("SELECT pg_notify('kiln_test', 'x')")
                .execute(&pool)
                .await;
            notified.load(Ordering::SeqCst) > 0
        }
    })
    .await;
    cancel.cancel();
}
