//! [`Cluster`]: the hosts, their pools, and the router built over them.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::config::HostConfig;
use crate::config::HostInfo;
use crate::error::{Error, HostId, Result};
use crate::router::{self, Router, RouterKind};

/// Builds a [`Cluster`].
///
/// ```
/// use rb::{Cluster, HostConfig};
/// let cluster = Cluster::builder()
///     .host_defaults(HostConfig::new().host("127.0.0.1"))
///     .host(0, HostConfig::new().port(6379))
///     .host(1, HostConfig::new().port(6380))
///     .build()?;
/// assert_eq!(cluster.router()?.host_for_key(b"foo")?, 1); // crc32("foo") mod 2, as Python rb
/// # Ok::<(), rb::Error>(())
/// ```
#[derive(Default)]
pub struct ClusterBuilder {
    defaults: HostConfig,
    hosts: Vec<(HostId, HostConfig)>,
    router: RouterChoice,
}

#[derive(Clone, Default)]
enum RouterChoice {
    #[default]
    Partition,
    ConsistentHashing,
    Custom(Arc<dyn Router>),
}

impl ClusterBuilder {
    /// Settings every host inherits unless it sets its own (rb's `host_defaults`).
    pub fn host_defaults(mut self, defaults: HostConfig) -> ClusterBuilder {
        self.defaults = defaults;
        self
    }

    /// Adds a host with an explicit id.
    pub fn host(mut self, id: HostId, config: HostConfig) -> ClusterBuilder {
        self.hosts.push((id, config));
        self
    }

    /// Adds hosts numbered from the next free id, in order.
    pub fn hosts(mut self, configs: impl IntoIterator<Item = HostConfig>) -> ClusterBuilder {
        for config in configs {
            let id = self.hosts.iter().map(|(id, _)| id + 1).max().unwrap_or(0);
            self.hosts.push((id, config));
        }
        self
    }

    /// Which built-in router to use. Default [`RouterKind::Partition`].
    pub fn router(mut self, kind: RouterKind) -> ClusterBuilder {
        self.router = match kind {
            RouterKind::Partition => RouterChoice::Partition,
            RouterKind::ConsistentHashing => RouterChoice::ConsistentHashing,
        };
        self
    }

    /// Routes with a router of your own.
    pub fn custom_router(mut self, router: Arc<dyn Router>) -> ClusterBuilder {
        self.router = RouterChoice::Custom(router);
        self
    }

    /// Checks the hosts (no duplicate ids, the router accepts them) and builds
    /// the cluster. Nothing connects until a command is sent.
    pub fn build(self) -> Result<Cluster> {
        let mut hosts = BTreeMap::new();
        for (id, config) in self.hosts {
            let info = Arc::new(config.or(&self.defaults).resolve(id));
            if hosts.insert(id, info).is_some() {
                return Err(Error::BadHostSetup {
                    reason: format!("host id {id} was added twice").into(),
                });
            }
        }
        let cluster = Cluster {
            inner: Arc::new(ClusterInner {
                state: RwLock::new(ClusterState {
                    defaults: self.defaults,
                    hosts,
                    router_choice: self.router,
                    router: None,
                }),
            }),
        };
        cluster.router()?;
        Ok(cluster)
    }
}

/// Many independent Redis nodes, used as one.
///
/// Cheap to clone (one `Arc`); clones share hosts, pools and the router.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<ClusterInner>,
}

struct ClusterInner {
    state: RwLock<ClusterState>,
}

struct ClusterState {
    defaults: HostConfig,
    hosts: BTreeMap<HostId, Arc<HostInfo>>,
    router_choice: RouterChoice,
    /// Built on first use and dropped whenever the hosts change.
    router: Option<Arc<dyn Router>>,
}

impl Cluster {
    /// Starts building a cluster.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// A cluster with one host per URL, ids `0..n` in order (see
    /// [`HostConfig::from_url`] for the forms).
    pub fn from_urls<I>(urls: I) -> Result<Cluster>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let mut builder = Cluster::builder();
        for url in urls {
            builder = builder.hosts([HostConfig::from_url(url.as_ref())?]);
        }
        builder.build()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, ClusterState> {
        self.inner
            .state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, ClusterState> {
        self.inner
            .state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The current router (rb's `get_router`): built over the current hosts,
    /// cached until they change.
    pub fn router(&self) -> Result<Arc<dyn Router>> {
        if let Some(router) = &self.read().router {
            return Ok(router.clone());
        }
        let mut state = self.write();
        if let Some(router) = &state.router {
            return Ok(router.clone());
        }
        let hosts: Vec<Arc<HostInfo>> = state.hosts.values().cloned().collect();
        let router = match &state.router_choice {
            RouterChoice::Partition => router::build(RouterKind::Partition, &hosts)?,
            RouterChoice::ConsistentHashing => {
                router::build(RouterKind::ConsistentHashing, &hosts)?
            }
            RouterChoice::Custom(r) => r.clone(),
        };
        state.router = Some(router.clone());
        Ok(router)
    }

    /// Every host, by id.
    pub fn hosts(&self) -> Vec<Arc<HostInfo>> {
        self.read().hosts.values().cloned().collect()
    }

    /// One host.
    pub fn host(&self, id: HostId) -> Result<Arc<HostInfo>> {
        self.read()
            .hosts
            .get(&id)
            .cloned()
            .ok_or(Error::NoSuchHost { id })
    }

    /// Adds a host (rb's `add_host`); `None` picks the next free id. Returns
    /// the id. The router is rebuilt on next use.
    pub fn add_host(&self, id: Option<HostId>, config: HostConfig) -> Result<HostId> {
        let mut state = self.write();
        let id = id.unwrap_or_else(|| state.hosts.keys().next_back().map_or(0, |last| last + 1));
        if state.hosts.contains_key(&id) {
            return Err(Error::BadHostSetup {
                reason: format!("host id {id} already exists").into(),
            });
        }
        let info = Arc::new(config.or(&state.defaults).resolve(id));
        state.hosts.insert(id, info);
        state.router = None;
        Ok(id)
    }

    /// Removes a host (rb's `remove_host`); true if it was there.
    pub fn remove_host(&self, id: HostId) -> bool {
        let mut state = self.write();
        let removed = state.hosts.remove(&id).is_some();
        if removed {
            state.router = None;
        }
        removed
    }
}
