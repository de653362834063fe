//! Redis Cluster, the ground the sharded layout stands on (issue 17, first
//! step): a real 3-master, 3-replica cluster on loopback agrees with
//! `store::slots` on every slot, and spreads the 16 shards' tags evenly over
//! its masters.

use std::collections::BTreeMap;

use tally::redis_server::RedisCluster;
use tally::store::slots::{ShardLayout, hash_slot};

/// Each master's slot ranges, by its port, from `CLUSTER SLOTS`.
async fn slot_owners(
    conn: &mut redis::aio::MultiplexedConnection,
) -> BTreeMap<u16, Vec<(u16, u16)>> {
    let slots: Vec<redis::Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(conn)
        .await
        .unwrap();
    let mut owners: BTreeMap<u16, Vec<(u16, u16)>> = BTreeMap::new();
    for range in slots {
        let redis::Value::Array(range) = range else {
            panic!("a slot range is an array: {range:?}")
        };
        let low: u16 = redis::from_redis_value(range[0].clone()).unwrap();
        let high: u16 = redis::from_redis_value(range[1].clone()).unwrap();
        let redis::Value::Array(master) = &range[2] else {
            panic!("a master is an array")
        };
        let port: u16 = redis::from_redis_value(master[1].clone()).unwrap();
        owners.entry(port).or_default().push((low, high));
    }
    owners
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_cluster_agrees_on_every_slot_and_holds_the_shards_evenly() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = RedisCluster::start(3, 1, dir.path()).await.unwrap();
    let first = &cluster.masters()[0];
    let mut conn = redis::Client::open(first.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();

    // Our slots are Redis's: for tagged, untagged and odd keys alike.
    let layout = ShardLayout::new(16);
    let mut keys: Vec<String> = layout
        .shards()
        .map(|shard| format!("tally:{{{}}}:account:x", layout.tag(shard)))
        .collect();
    keys.extend(
        (0..200).map(|n| format!("tally:order:{}", uuid::Uuid::now_v7()) + &"x".repeat(n % 7)),
    );
    keys.extend(["", "{}", "{}{a}", "a{", "}{b}", "{{c}}", "é{ß}"].map(String::from));
    for key in &keys {
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(slot, hash_slot(key.as_bytes()), "{key:?}");
    }

    // Three masters made by `--cluster create` hold 5, 5 and 6 of the 16
    // shards: no slot placed by hand.
    let owners = slot_owners(&mut conn).await;
    assert_eq!(owners.len(), 3, "{owners:?}");
    let mut held: Vec<usize> = owners
        .values()
        .map(|ranges| {
            layout
                .shards()
                .filter(|&shard| {
                    let slot = hash_slot(format!("{{{}}}", layout.tag(shard)).as_bytes());
                    ranges
                        .iter()
                        .any(|&(low, high)| (low..=high).contains(&slot))
                })
                .count()
        })
        .collect();
    held.sort();
    assert_eq!(held, vec![5, 5, 6], "{owners:?}");

    // And a script over two shards is refused, as every script that crosses
    // shards is today: what the sagas of the next steps are for.
    let crossing: Result<redis::Value, _> = redis::cmd("EVAL")
        .arg("return 1")
        .arg(2)
        .arg(format!(
            "{{{}}}:a",
            layout.tag(layout.shards().next().unwrap())
        ))
        .arg(format!(
            "{{{}}}:b",
            layout.tag(layout.shards().nth(1).unwrap())
        ))
        .query_async(&mut conn)
        .await;
    let err = crossing.expect_err("two slots in one script");
    assert!(
        err.to_string().to_uppercase().contains("CROSSSLOT"),
        "{err}"
    );
}
