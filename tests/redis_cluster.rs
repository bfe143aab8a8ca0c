//! Crier over a Redis Cluster (issue 12): each test starts three masters of its own on free
//! ports (`redis-server --cluster-enabled yes`, `redis-cli --cluster create`).

mod common;
#[path = "redis/mod.rs"]
mod redis_support;

use redis_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_a_cluster_deliver_every_message_once_in_order() {
    let cluster = OwnCluster::start();
    fanout_exact(&Target::cluster(&cluster)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_a_cluster_deliver_to_patterns_once_in_order() {
    let cluster = OwnCluster::start();
    fanout_patterns(&Target::cluster(&cluster)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_moves_over_a_cluster_recovers_without_gap_or_duplicate() {
    let cluster = OwnCluster::start();
    subscriber_moves(&Target::cluster(&cluster)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_cluster_a_node_listens_only_for_what_its_clients_subscribe_to() {
    let cluster = OwnCluster::start();
    interest(&Target::cluster(&cluster)).await;
}

/// Topics spread over the three shards: each master holds its own topics' keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_spread_across_the_shards() {
    let cluster = OwnCluster::start();
    topics_spread(&cluster).await;
}

/// A shard's master restarts, without its data, while traffic flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_master_restarting_is_survived_like_an_outage() {
    let mut cluster = OwnCluster::start();
    master_restart(&mut cluster).await;
}

/// The harness itself: three masters serving all slots, keys placed by slot, and a master that
/// restarts on its port rejoining with its slots and without its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_cluster_has_three_masters_and_a_master_restarts_with_its_slots() {
    let mut cluster = OwnCluster::start();
    let owners: std::collections::BTreeSet<usize> = [0u16, 8000, 16383]
        .into_iter()
        .map(|slot| cluster.slot_owner(slot))
        .collect();
    assert_eq!(owners.len(), 3, "three masters share the slots");
    let key = "harness:{x}:m";
    let owner = cluster.key_owner(key);
    redis_cli(cluster.ports[owner], &["hset", key, "seq", "1"]);
    assert!(cluster.scan(owner, "harness:*").contains(key));
    cluster.restart_master(owner);
    assert_eq!(
        cluster.key_owner(key),
        owner,
        "the restarted master keeps its slots"
    );
    assert!(
        cluster.scan(owner, "harness:*").is_empty(),
        "and lost its data"
    );
}
