//! The node's connections to Redis, alike for one server and for a Redis Cluster: one for
//! commands (multiplexed, reconnecting on its own), one for pub/sub (RESP3, its pushes handed to
//! the reader). Scripts are called by their SHA and loaded where Redis has forgotten them.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo, SingleNodeRoutingInfo,
};
use redis::{
    Cmd, IntoConnectionInfo, Pipeline, ProtocolVersion, PushInfo, RedisError, RedisFuture,
    RedisResult, Value,
};
use tokio::sync::mpsc::UnboundedSender;

use super::keys::Channel;

/// Most SCAN pages (of 1000 keys examined) one listing reads from each server.
const SCAN_PAGES: usize = 1000;

/// A request's longest wait for Redis before it is answered `unavailable`.
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub(crate) enum Link {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Where to connect.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub urls: Vec<String>,
    pub cluster: bool,
}

impl Link {
    /// Connects for commands, or (`pushes` given) for pub/sub over RESP3.
    pub(crate) async fn connect(
        target: &Target,
        pushes: Option<UnboundedSender<PushInfo>>,
    ) -> RedisResult<Link> {
        if target.cluster {
            // A command is never sent twice: a publish that timed out may have run, and running
            // it again would publish the message again under a new seq. (The slot map is still
            // refreshed after a redirection; the request that met it answers `unavailable`.)
            // Subscriptions are idempotent: those may be retried.
            let retries = if pushes.is_some() { 2 } else { 0 };
            let mut builder = ClusterClientBuilder::new(target.urls.clone())
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(RESPONSE_TIMEOUT)
                .retries(retries)
                .min_retry_wait(50)
                .max_retry_wait(500);
            if let Some(pushes) = pushes {
                builder = builder
                    .use_protocol(ProtocolVersion::RESP3)
                    .push_sender(pushes);
            }
            let client = builder.build()?;
            return Ok(Link::Cluster(client.get_async_connection().await?));
        }
        let mut info = target.urls[0].as_str().into_connection_info()?;
        if pushes.is_some() {
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(ProtocolVersion::RESP3);
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info)?;
        let mut config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        if let Some(pushes) = pushes {
            config = config.set_push_sender(pushes);
        }
        Ok(Link::Single(
            client.get_connection_manager_with_config(config).await?,
        ))
    }

    pub(crate) async fn query<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> RedisResult<T> {
        let mut link = self.clone();
        cmd.query_async(&mut link).await
    }

    pub(crate) async fn pipeline(&self, pipeline: &Pipeline) -> RedisResult<Vec<Value>> {
        let mut link = self.clone();
        pipeline.query_async(&mut link).await
    }

    /// Loads a script on every server that may run it (every primary of a cluster).
    pub(crate) async fn load(&self, script: &str) -> RedisResult<()> {
        let mut load = redis::cmd("SCRIPT");
        load.arg("LOAD").arg(script);
        match self {
            Link::Single(_) => self.query::<Value>(&load).await.map(drop),
            Link::Cluster(cluster) => {
                let routing = RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    Some(ResponsePolicy::AllSucceeded),
                ));
                cluster.clone().route_command(load, routing).await.map(drop)
            }
        }
    }

    /// Checks that the server (every primary of a cluster) answers on this connection.
    pub(crate) async fn ping(&self) -> RedisResult<()> {
        let ping = redis::cmd("PING");
        match self {
            Link::Single(_) => self.query::<Value>(&ping).await.map(drop),
            Link::Cluster(cluster) => {
                let routing = RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    Some(ResponsePolicy::AllSucceeded),
                ));
                cluster.clone().route_command(ping, routing).await.map(drop)
            }
        }
    }

    /// Keys matching `glob`, at most `limit` and from at most [`SCAN_PAGES`] pages of SCAN on
    /// each primary: listing topics walks the keyspace, which must stay cheap for Redis even
    /// when it holds much else.
    pub(crate) async fn keys(&self, glob: &str, limit: usize) -> RedisResult<Vec<String>> {
        match self {
            Link::Single(_) => self.scan(glob, limit, None).await,
            Link::Cluster(cluster) => {
                let mut nodes = redis::cmd("CLUSTER");
                nodes.arg("NODES");
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
                let nodes: String =
                    redis::from_redis_value(cluster.clone().route_command(nodes, routing).await?)?;
                let mut keys = Vec::new();
                for (host, port) in primaries(&nodes) {
                    let left = limit.saturating_sub(keys.len());
                    keys.extend(self.scan(glob, left, Some((host, port))).await?);
                }
                Ok(keys)
            }
        }
    }

    /// SCANs one server (`at`, for a cluster's node).
    async fn scan(
        &self,
        glob: &str,
        limit: usize,
        at: Option<(String, u16)>,
    ) -> RedisResult<Vec<String>> {
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        for _ in 0..SCAN_PAGES {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(glob)
                .arg("COUNT")
                .arg(1000);
            let (next, batch): (u64, Vec<String>) = match (self, &at) {
                (Link::Cluster(cluster), Some((host, port))) => {
                    let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                        host: host.clone(),
                        port: *port,
                    });
                    redis::from_redis_value(cluster.clone().route_command(scan, routing).await?)?
                }
                _ => self.query(&scan).await?,
            };
            keys.extend(batch);
            if next == 0 || keys.len() >= limit {
                break;
            }
            cursor = next;
        }
        keys.truncate(limit);
        Ok(keys)
    }

    pub(crate) async fn subscribe(&self, channel: &Channel) -> RedisResult<()> {
        match (self.clone(), channel) {
            (Link::Single(mut link), Channel::Plain(name)) => link.subscribe(name).await,
            (Link::Single(mut link), Channel::Glob(glob)) => link.psubscribe(glob).await,
            (Link::Cluster(mut link), Channel::Plain(name)) => link.subscribe(name).await,
            (Link::Cluster(mut link), Channel::Shard(name)) => link.ssubscribe(name).await,
            (Link::Cluster(mut link), Channel::Glob(glob)) => link.psubscribe(glob).await,
            (Link::Single(_), Channel::Shard(_)) => Err(no_shards()),
        }
    }

    pub(crate) async fn unsubscribe(&self, channel: &Channel) -> RedisResult<()> {
        match (self.clone(), channel) {
            (Link::Single(mut link), Channel::Plain(name)) => link.unsubscribe(name).await,
            (Link::Single(mut link), Channel::Glob(glob)) => link.punsubscribe(glob).await,
            (Link::Cluster(mut link), Channel::Plain(name)) => link.unsubscribe(name).await,
            (Link::Cluster(mut link), Channel::Shard(name)) => link.sunsubscribe(name).await,
            (Link::Cluster(mut link), Channel::Glob(glob)) => link.punsubscribe(glob).await,
            (Link::Single(_), Channel::Shard(_)) => Err(no_shards()),
        }
    }
}

/// The primaries' addresses in a `CLUSTER NODES` answer (`<id> <host:port@bus> <flags> ...`).
fn primaries(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let address = fields.nth(1)?;
            let flags = fields.next()?;
            let unusable = ["fail", "noaddr", "handshake"];
            if !flags.split(',').any(|f| f == "master")
                || unusable.iter().any(|u| flags.contains(u))
            {
                return None;
            }
            let (host, port) = address.split('@').next()?.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect()
}

fn no_shards() -> RedisError {
    RedisError::from((
        redis::ErrorKind::Client,
        "shard channels need --redis-cluster",
    ))
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Link::Single(link) => link.req_packed_command(cmd),
            Link::Cluster(link) => link.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Link::Single(link) => link.req_packed_commands(pipeline, offset, count),
            Link::Cluster(link) => link.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Single(link) => link.get_db(),
            Link::Cluster(link) => link.get_db(),
        }
    }
}

/// Whether an error says the connection (not the request) failed: the subscriptions on it may
/// be gone.
pub(crate) fn is_connection_failure(error: &RedisError) -> bool {
    matches!(error_kind(error), "connection" | "timeout")
}

/// What kind of failure an error is, as metrics label it.
pub(crate) fn error_kind(error: &RedisError) -> &'static str {
    if error.is_timeout() {
        "timeout"
    } else if error.is_io_error() || error.is_connection_dropped() || error.is_connection_refusal()
    {
        "connection"
    } else {
        "server"
    }
}

/// Whether Redis has forgotten a script (restarted, or flushed its script cache).
pub(crate) fn is_noscript(error: &RedisError) -> bool {
    error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primaries_are_read_from_cluster_nodes() {
        let nodes = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7001@17001 master - 0 1 2 connected 5461-10922
c3 127.0.0.1:7002@17002 slave b2 0 1 2 connected
d4 127.0.0.1:7003@17003 master,fail - 0 1 3 disconnected
e5 :0@0 master,noaddr - 0 0 0 disconnected
";
        assert_eq!(
            primaries(nodes),
            [
                ("127.0.0.1".to_owned(), 7000),
                ("127.0.0.1".to_owned(), 7001)
            ]
        );
    }
}
