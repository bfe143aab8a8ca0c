//! The node's connections to Redis, alike for one server and for a Redis Cluster: one for
//! commands (multiplexed, reconnecting on its own), one for pub/sub (RESP3, its pushes handed to
//! the reader). Scripts are called by their SHA and loaded where Redis has forgotten them.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
use redis::{
    Cmd, IntoConnectionInfo, Pipeline, ProtocolVersion, PushInfo, RedisError, RedisFuture,
    RedisResult, Value,
};
use tokio::sync::mpsc::UnboundedSender;

use super::keys::Channel;

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
            let mut builder = ClusterClientBuilder::new(target.urls.clone())
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(RESPONSE_TIMEOUT)
                .retries(2)
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

    /// Every key matching `glob`, on every primary (with SCAN on one server, KEYS on each
    /// primary of a cluster: an operator's request, not a hot path).
    pub(crate) async fn keys(&self, glob: &str) -> RedisResult<Vec<String>> {
        match self {
            Link::Single(_) => {
                let mut keys = Vec::new();
                let mut cursor: u64 = 0;
                loop {
                    let mut scan = redis::cmd("SCAN");
                    scan.arg(cursor)
                        .arg("MATCH")
                        .arg(glob)
                        .arg("COUNT")
                        .arg(1000);
                    let (next, batch): (u64, Vec<String>) = self.query(&scan).await?;
                    keys.extend(batch);
                    if next == 0 {
                        return Ok(keys);
                    }
                    cursor = next;
                }
            }
            Link::Cluster(cluster) => {
                let mut find = redis::cmd("KEYS");
                find.arg(glob);
                let routing = RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    Some(ResponsePolicy::CombineArrays),
                ));
                let value = cluster.clone().route_command(find, routing).await?;
                Ok(redis::from_redis_value(value)?)
            }
        }
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
