//! Trimming the job and event streams: only what every consumer group is done with goes.

use redis::AsyncCommands;
use tally::store::streams::{delete_idle_consumers, trim_consumed};

use crate::helpers::spawn_app;

const STREAM: &str = "tally:test:trim";

async fn ids(conn: &mut impl tally::store::Conn) -> Vec<String> {
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(STREAM).await.unwrap();
    reply.ids.into_iter().map(|entry| entry.id).collect()
}

async fn read(conn: &mut impl tally::store::Conn, group: &str, count: usize) -> Vec<String> {
    read_as(conn, group, "reader", count).await
}

async fn read_as(
    conn: &mut impl tally::store::Conn,
    group: &str,
    consumer: &str,
    count: usize,
) -> Vec<String> {
    let options = redis::streams::StreamReadOptions::default()
        .group(group, consumer)
        .count(count);
    let reply: redis::streams::StreamReadReply = conn
        .xread_options(&[STREAM], &[">"], &options)
        .await
        .unwrap();
    reply
        .keys
        .into_iter()
        .flat_map(|key| key.ids.into_iter().map(|entry| entry.id))
        .collect()
}

#[tokio::test]
async fn trimming_keeps_every_entry_a_group_has_not_acknowledged() {
    let app = spawn_app().await;
    let mut conn = app.redis().await;
    let far_future_ms = u64::MAX / 2;

    // No stream, then a stream with no group: nothing is consumed, nothing goes.
    assert_eq!(
        trim_consumed(&mut conn, STREAM, far_future_ms)
            .await
            .unwrap(),
        0
    );
    for n in 1..=10 {
        let _: String = conn
            .xadd(STREAM, format!("{n}-0"), &[("n", n)])
            .await
            .unwrap();
    }
    assert_eq!(
        trim_consumed(&mut conn, STREAM, far_future_ms)
            .await
            .unwrap(),
        0
    );

    // Two groups. "fast" read 6 and acknowledged all but its 4th; "slow" read 3
    // and acknowledged them all.
    for group in ["fast", "slow"] {
        let _: () = conn.xgroup_create(STREAM, group, "0").await.unwrap();
    }
    let fast = read(&mut conn, "fast", 6).await;
    let acked: Vec<&String> = fast.iter().filter(|id| *id != "4-0").collect();
    let _: u64 = conn.xack(STREAM, "fast", &acked).await.unwrap();
    let slow = read(&mut conn, "slow", 3).await;
    let _: u64 = conn.xack(STREAM, "slow", &slow).await.unwrap();

    // "slow" has delivered up to 3-0, "fast" still holds 4-0: 1-0 and 2-0 go.
    assert_eq!(
        trim_consumed(&mut conn, STREAM, far_future_ms)
            .await
            .unwrap(),
        2
    );
    assert_eq!(ids(&mut conn).await[0], "3-0");

    // "slow" catches up; "fast" still holds 4-0, so 3-0 is the only one to go.
    let slow = read(&mut conn, "slow", 10).await;
    let _: u64 = conn.xack(STREAM, "slow", &slow).await.unwrap();
    assert_eq!(
        trim_consumed(&mut conn, STREAM, far_future_ms)
            .await
            .unwrap(),
        1
    );
    assert_eq!(ids(&mut conn).await[0], "4-0");

    // "fast" acknowledges 4-0: everything up to its last delivered entry (6-0)
    // may go but 6-0 itself, and 7-0 to 10-0, which "fast" never read, stay.
    let _: u64 = conn.xack(STREAM, "fast", &["4-0"]).await.unwrap();
    assert_eq!(
        trim_consumed(&mut conn, STREAM, far_future_ms)
            .await
            .unwrap(),
        2
    );
    assert_eq!(ids(&mut conn).await, ["6-0", "7-0", "8-0", "9-0", "10-0"]);

    // The retention keeps consumed entries younger than the cut.
    let fast = read(&mut conn, "fast", 10).await;
    let _: u64 = conn.xack(STREAM, "fast", &fast).await.unwrap();
    assert_eq!(trim_consumed(&mut conn, STREAM, 8).await.unwrap(), 2);
    assert_eq!(ids(&mut conn).await, ["8-0", "9-0", "10-0"]);
}

#[tokio::test]
async fn only_idle_consumers_that_hold_no_job_are_forgotten() {
    let app = spawn_app().await;
    let mut conn = app.redis().await;
    assert_eq!(
        delete_idle_consumers(&mut conn, STREAM, 0).await.unwrap(),
        0
    );
    for n in 1..=3 {
        let _: String = conn
            .xadd(STREAM, format!("{n}-0"), &[("n", n)])
            .await
            .unwrap();
    }
    let _: () = conn.xgroup_create(STREAM, "workers", "0").await.unwrap();
    let gone = read_as(&mut conn, "workers", "gone-host-1", 1).await;
    let _: u64 = conn.xack(STREAM, "workers", &gone).await.unwrap();
    let held = read_as(&mut conn, "workers", "busy-host-2", 1).await;

    // Neither has been idle an hour: nothing is forgotten.
    assert_eq!(
        delete_idle_consumers(&mut conn, STREAM, 3_600_000)
            .await
            .unwrap(),
        0
    );
    // Past the idle bound, only the one that holds no job goes.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert_eq!(
        delete_idle_consumers(&mut conn, STREAM, 10).await.unwrap(),
        1
    );
    let consumers: redis::streams::StreamInfoConsumersReply =
        conn.xinfo_consumers(STREAM, "workers").await.unwrap();
    let names: Vec<&str> = consumers
        .consumers
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["busy-host-2"]);
    // Its job is still pending and can be taken over.
    let claimed: redis::streams::StreamClaimReply = conn
        .xclaim(STREAM, "workers", "survivor", 0, &held)
        .await
        .unwrap();
    assert_eq!(claimed.ids.len(), 1);
}
