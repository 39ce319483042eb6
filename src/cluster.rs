//! [`Cluster`]: the hosts, their pools, and the router built over them.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::args::ToArg;
use crate::client::{
    AsyncClient, AsyncOptions, FanoutClient, LocalClient, MappingClient, RoutingClient,
};
use crate::config::HostConfig;
use crate::config::HostInfo;
use crate::conn::{HostEntry, Pool, Resolve, SystemResolver};
use crate::driver::Driver;
use crate::error::{Error, HostId, Result};
use crate::event_loop::{HostMap, LoopOptions, Session};
use crate::health::{HealthPolicy, HostHealth, HostWatch};
use crate::router::{self, HashTag, HashTagRouter, Router, RouterKind, TwemproxyRing};
use crate::scan::{Scan, ScanCursor, ScanOptions};
use crate::scripts::ScriptMemory;
use crate::server_facts::ServerFacts;
use crate::stats::{ClusterStats, MigrationCounters, Observer};

/// Options of a map or fanout (rb's `map(timeout=, max_concurrency=, auto_batch=)`).
///
/// ```
/// use rb::MapOptions;
/// use std::time::Duration;
/// let opts = MapOptions::new().timeout(Duration::from_millis(50)).max_concurrency(16);
/// ```
#[derive(Clone, Debug)]
pub struct MapOptions {
    pub(crate) timeout: Option<Duration>,
    pub(crate) max_concurrency: usize,
    pub(crate) auto_batch: bool,
    pub(crate) max_batch_size: usize,
}

impl Default for MapOptions {
    fn default() -> MapOptions {
        MapOptions {
            timeout: None,
            max_concurrency: 64,
            auto_batch: true,
            max_batch_size: 256,
        }
    }
}

impl MapOptions {
    /// The defaults: no timeout, 64 hosts in flight, auto-batching on with
    /// at most 256 keys per MGET/MSET.
    pub fn new() -> MapOptions {
        MapOptions::default()
    }

    /// Budget for the whole map, from its start: when it passes, what is
    /// still outstanding is rejected with [`Error::Timeout`]. Default: none.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> MapOptions {
        self.timeout = Some(timeout);
        self
    }

    /// Hosts with requests in flight at once; a request for one more host
    /// first waits for one to finish. Default 64 (as rb). Zero is refused
    /// when the map starts ([`Error::Config`]).
    #[must_use]
    pub fn max_concurrency(mut self, hosts: usize) -> MapOptions {
        self.max_concurrency = hosts;
        self
    }

    /// Merge runs of plain GETs (SETs) to one host into MGET (MSET).
    /// Default true.
    #[must_use]
    pub fn auto_batch(mut self, on: bool) -> MapOptions {
        self.auto_batch = on;
        self
    }

    /// Most keys in one merged MGET/MSET. Default 256. Zero is refused
    /// when the map starts ([`Error::Config`]).
    #[must_use]
    pub fn max_batch_size(mut self, keys: usize) -> MapOptions {
        self.max_batch_size = keys;
        self
    }

    /// Refuses options that cannot work (zero concurrency or batch size).
    pub(crate) fn validate(&self) -> Result<()> {
        if self.max_concurrency == 0 {
            return Err(Error::config(
                "MapOptions::max_concurrency(0): at least one host must be allowed in flight",
            ));
        }
        if self.max_batch_size == 0 {
            return Err(Error::config(
                "MapOptions::max_batch_size(0): a batch holds at least one key",
            ));
        }
        Ok(())
    }

    fn to_loop(&self, start: Instant) -> LoopOptions {
        LoopOptions {
            // A timeout too far away to represent means no deadline.
            deadline: self.timeout.and_then(|t| start.checked_add(t)),
            budget: self.timeout,
            request_budget: None,
            auto_batch: self.auto_batch,
            max_batch: self.max_batch_size,
            max_concurrency: self.max_concurrency,
            keep_idle: false,
        }
    }
}

/// Which hosts a fanout reaches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hosts {
    /// Every host of the cluster.
    All,
    /// These hosts.
    Ids(Vec<HostId>),
}

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
    resolver: Option<Arc<dyn Resolve>>,
    health: HealthPolicy,
    observer: Option<Arc<dyn Observer>>,
    previous: Option<Cluster>,
    copy_forward: bool,
    hash_tag: Option<HashTag>,
}

#[derive(Clone, Default)]
enum RouterChoice {
    #[default]
    Partition,
    ConsistentHashing,
    Custom(Arc<dyn Router>),
    Twemproxy(TwemproxyRing),
}

impl ClusterBuilder {
    /// Settings every host inherits unless it sets its own (rb's `host_defaults`).
    #[must_use]
    pub fn host_defaults(mut self, defaults: HostConfig) -> ClusterBuilder {
        self.defaults = defaults;
        self
    }

    /// Adds a host with an explicit id.
    #[must_use]
    #[doc(alias = "add_host")]
    pub fn host(mut self, id: HostId, config: HostConfig) -> ClusterBuilder {
        self.hosts.push((id, config));
        self
    }

    /// Adds hosts numbered from the next free id, in order.
    #[must_use]
    pub fn hosts(mut self, configs: impl IntoIterator<Item = HostConfig>) -> ClusterBuilder {
        for config in configs {
            // Past id u32::MAX there is no next id: saturate, and `build`
            // reports the duplicate.
            let id = self
                .hosts
                .iter()
                .map(|(id, _)| id.saturating_add(1))
                .max()
                .unwrap_or(0);
            self.hosts.push((id, config));
        }
        self
    }

    /// Which built-in router to use. Default [`RouterKind::Partition`].
    #[must_use]
    #[doc(alias = "router_cls")]
    pub fn router(mut self, kind: RouterKind) -> ClusterBuilder {
        self.router = match kind {
            RouterKind::Partition => RouterChoice::Partition,
            RouterKind::ConsistentHashing => RouterChoice::ConsistentHashing,
            RouterKind::Twemproxy(ring) => RouterChoice::Twemproxy(ring),
        };
        self
    }

    /// Routes keys by their hash tag (off by default, as in rb): with
    /// `b"{}"`, a key routes by the bytes between its first `{` and the
    /// next `}` after it when there are any, as twemproxy and Redis Cluster
    /// do; any two bytes work (`b"::"`). Every router applies it, custom
    /// ones included (the cluster routes through a [`HashTagRouter`]), and
    /// a command whose keys all carry the same tag goes to that tag's host
    /// as one command (`RENAME`, `SUNIONSTORE`, `EVAL` over several keys,
    /// `MGET` unsplit, ...); keys with different or missing tags keep rb's
    /// rule (`MGET`, `MSET`, `DEL`, `UNLINK`, `EXISTS`, `TOUCH` split per
    /// host, anything else is [`Error::Unroutable`] saying why).
    #[must_use]
    pub fn hash_tag(mut self, tag: impl Into<HashTag>) -> ClusterBuilder {
        self.hash_tag = Some(tag.into());
        self
    }

    /// Routes with a router of your own.
    #[must_use]
    #[doc(alias = "router_cls")]
    pub fn custom_router(mut self, router: Arc<dyn Router>) -> ClusterBuilder {
        self.router = RouterChoice::Custom(router);
        self
    }

    /// How hosts are taken out of use while they fail, and tried again
    /// (see [`HealthPolicy`]; default [`HealthPolicy::new`]: Down after 3
    /// failures in a row, for 500 ms doubling up to 5 s).
    #[must_use]
    pub fn health(mut self, policy: HealthPolicy) -> ClusterBuilder {
        self.health = policy;
        self
    }

    /// Tells `observer` when hosts connect, fail, go Down and come back Up.
    /// It is called on the thread that saw the event (a map's, or the
    /// driver's): keep it short and never block in it.
    #[must_use]
    pub fn observer(mut self, observer: Arc<dyn Observer>) -> ClusterBuilder {
        self.observer = Some(observer);
        self
    }

    /// Builds a cluster that is taking over from `old` (a fleet being grown,
    /// shrunk or re-routed; see [`crate::migrate`]): writes go to each key's
    /// new owner, reads that miss there fall back to its old owner, deletes
    /// reach both, and a command that modifies a key the new owner lacks
    /// first moves the key there. Run [`crate::migrate::move_keys`]
    /// meanwhile; build a plain cluster once it is done.
    #[must_use]
    pub fn migrating_from(mut self, old: &Cluster) -> ClusterBuilder {
        self.previous = Some(old.clone());
        self
    }

    /// With [`ClusterBuilder::migrating_from`]: a read that finds its key
    /// only on the old owner also moves the key to its new owner, as the
    /// mover does (value and TTL, never over a value the new owner has
    /// gained meanwhile, the old copy deleted if unchanged), so the next
    /// read of it is a hit there. The read's answer is the old owner's; it
    /// comes once the move is done, and a move that fails does not fail it
    /// ([`MigrationStats::copy_forward_failures`](crate::MigrationStats)
    /// counts those). Default off: reads then only read.
    ///
    /// ```no_run
    /// use rb::Cluster;
    /// # let old = Cluster::from_urls(["redis://10.0.0.1:6379"])?;
    /// let new = Cluster::builder()
    ///     .hosts([rb::HostConfig::new().host("10.0.0.1"), rb::HostConfig::new().host("10.0.0.2")])
    ///     .migrating_from(&old)
    ///     .copy_forward(true)
    ///     .build()?;
    /// # Ok::<(), rb::Error>(())
    /// ```
    #[must_use]
    pub fn copy_forward(mut self, on: bool) -> ClusterBuilder {
        self.copy_forward = on;
        self
    }

    /// Resolves host names with a resolver of your own (see [`Resolve`]).
    /// Default: [`SystemResolver`].
    #[must_use]
    pub fn resolver(mut self, resolver: Arc<dyn Resolve>) -> ClusterBuilder {
        self.resolver = Some(resolver);
        self
    }

    /// Checks the hosts (no duplicate ids, the router accepts them) and builds
    /// the cluster. Nothing connects until a command is sent.
    ///
    /// # Errors
    ///
    /// [`Error::BadHostSetup`] for a duplicate id or hosts the router cannot use (a gap in the ids), [`Error::Config`] for a host with a user name but no password, or hosts a twemproxy ring cannot use (a zero weight, two hosts with one name).
    pub fn build(self) -> Result<Cluster> {
        self.health.validate()?;
        let resolver = self.resolver.unwrap_or_else(|| Arc::new(SystemResolver));
        let mut hosts = BTreeMap::new();
        for (id, config) in self.hosts {
            let info = Arc::new(config.or(&self.defaults).resolve_checked(id)?);
            let pool = Arc::new(Pool::new(info.pool_size, resolver.clone()));
            let watch = Arc::new(HostWatch::new(
                info.name().clone(),
                self.health,
                self.observer.clone(),
            ));
            if hosts.insert(id, HostEntry { info, pool, watch }).is_some() {
                return Err(Error::BadHostSetup {
                    reason: format!("host id {id} was added twice").into(),
                });
            }
        }
        let cluster = Cluster {
            inner: Arc::new(ClusterInner {
                state: RwLock::new(ClusterState {
                    defaults: self.defaults,
                    table: Arc::new(hosts),
                    router_choice: self.router,
                    router: None,
                    hash_tag: self.hash_tag,
                }),
                scripts: Arc::default(),
                resolver,
                driver: Mutex::new(Weak::new()),
                id: NEXT_CLUSTER_ID.fetch_add(1, Ordering::Relaxed),
                generation: AtomicU64::new(0),
                health: self.health,
                observer: self.observer,
                previous: self.previous,
                copy_forward: self.copy_forward,
                migration: Arc::default(),
                server_facts: Arc::default(),
            }),
        };
        cluster.router()?;
        Ok(cluster)
    }
}

/// Ids of clusters, so per-thread caches tell them apart.
static NEXT_CLUSTER_ID: AtomicU64 = AtomicU64::new(0);

/// A thread's copy of a cluster's routing: what an async request needs.
pub(crate) struct Routes {
    pub(crate) router: Arc<dyn Router>,
    pub(crate) read_timeouts: BTreeMap<HostId, Option<Duration>>,
}

thread_local! {
    /// (cluster id, generation, routes) for the clusters this thread used.
    static ROUTES: RefCell<Vec<(u64, u64, Rc<Routes>)>> = const { RefCell::new(Vec::new()) };
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
    scripts: Arc<ScriptMemory>,
    resolver: Arc<dyn Resolve>,
    /// The background driver of the async clients, while one runs.
    driver: Mutex<Weak<Driver>>,
    /// This cluster among all in the process (for per-thread caches).
    id: u64,
    /// Bumped whenever the hosts change.
    generation: AtomicU64,
    health: HealthPolicy,
    observer: Option<Arc<dyn Observer>>,
    /// The cluster this one takes over from, while migrating.
    previous: Option<Cluster>,
    /// Whether a read found on the old owner moves its key
    /// ([`ClusterBuilder::copy_forward`]).
    copy_forward: bool,
    migration: Arc<MigrationCounters>,
    /// What moving keys taught about the servers.
    server_facts: Arc<ServerFacts>,
}

impl ClusterInner {
    fn watch_for(&self, info: &HostInfo) -> Arc<HostWatch> {
        Arc::new(HostWatch::new(
            info.name().clone(),
            self.health,
            self.observer.clone(),
        ))
    }
}

struct ClusterState {
    defaults: HostConfig,
    /// Replaced whole when hosts change; running maps keep the old one.
    table: Arc<HostMap>,
    router_choice: RouterChoice,
    /// Built on first use and dropped whenever the hosts change.
    router: Option<Arc<dyn Router>>,
    hash_tag: Option<HashTag>,
}

impl Cluster {
    /// Starts building a cluster.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// A cluster with one host per URL, ids `0..n` in order (see
    /// [`HostConfig::from_url`] for the forms).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a bad URL (naming the bad part, never the password); as [`ClusterBuilder::build`].
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
    ///
    /// # Errors
    ///
    /// [`Error::BadHostSetup`] when the hosts do not fit the router (e.g. a missing id).
    #[doc(alias = "get_router")]
    pub fn router(&self) -> Result<Arc<dyn Router>> {
        if let Some(router) = &self.read().router {
            return Ok(router.clone());
        }
        let mut state = self.write();
        if let Some(router) = &state.router {
            return Ok(router.clone());
        }
        let hosts: Vec<Arc<HostInfo>> = state.table.values().map(|h| h.info.clone()).collect();
        let router = match &state.router_choice {
            RouterChoice::Partition => router::build(RouterKind::Partition, &hosts)?,
            RouterChoice::ConsistentHashing => {
                router::build(RouterKind::ConsistentHashing, &hosts)?
            }
            RouterChoice::Custom(r) => r.clone(),
            RouterChoice::Twemproxy(ring) => router::build(RouterKind::Twemproxy(*ring), &hosts)?,
        };
        let router = match state.hash_tag {
            Some(tag) => Arc::new(HashTagRouter::new(router, tag)),
            None => router,
        };
        state.router = Some(router.clone());
        Ok(router)
    }

    /// Every host, by id.
    pub fn hosts(&self) -> Vec<Arc<HostInfo>> {
        self.read().table.values().map(|h| h.info.clone()).collect()
    }

    /// Every host id, ascending.
    pub fn host_ids(&self) -> Vec<HostId> {
        self.read().table.keys().copied().collect()
    }

    /// One host.
    ///
    /// # Errors
    ///
    /// [`Error::NoSuchHost`] for an unknown id.
    pub fn host(&self, id: HostId) -> Result<Arc<HostInfo>> {
        self.read()
            .table
            .get(&id)
            .map(|h| h.info.clone())
            .ok_or(Error::NoSuchHost { id })
    }

    /// Adds a host (rb's `add_host`); `None` picks the next free id. Returns
    /// the id. The router is rebuilt on next use.
    ///
    /// # Errors
    ///
    /// [`Error::BadHostSetup`] for an id that exists (or none left), [`Error::Config`] for a bad host config.
    pub fn add_host(&self, id: Option<HostId>, config: HostConfig) -> Result<HostId> {
        let mut state = self.write();
        let id = match id {
            Some(id) => id,
            None => match state.table.keys().next_back() {
                None => 0,
                Some(last) => last.checked_add(1).ok_or_else(|| Error::BadHostSetup {
                    reason: "no host id is left after u32::MAX".into(),
                })?,
            },
        };
        if state.table.contains_key(&id) {
            return Err(Error::BadHostSetup {
                reason: format!("host id {id} already exists").into(),
            });
        }
        let info = Arc::new(config.or(&state.defaults).resolve_checked(id)?);
        let pool = Arc::new(Pool::new(info.pool_size, self.inner.resolver.clone()));
        let watch = self.inner.watch_for(&info);
        let mut hosts = BTreeMap::new();
        for (hid, entry) in state.table.iter() {
            hosts.insert(*hid, entry.clone());
        }
        hosts.insert(id, HostEntry { info, pool, watch });
        state.table = Arc::new(hosts);
        state.router = None;
        drop(state);
        self.hosts_changed();
        Ok(id)
    }

    /// Removes a host (rb's `remove_host`); true if it was there. Its idle
    /// connections are closed; the router is rebuilt on next use.
    pub fn remove_host(&self, id: HostId) -> bool {
        let mut state = self.write();
        let Some(removed) = state.table.get(&id) else {
            return false;
        };
        removed.pool.clear();
        self.inner.scripts.forget_host(id);
        let mut hosts = BTreeMap::new();
        for (hid, entry) in state.table.iter() {
            if *hid != id {
                hosts.insert(*hid, entry.clone());
            }
        }
        state.table = Arc::new(hosts);
        state.router = None;
        drop(state);
        self.hosts_changed();
        true
    }

    /// Tells a running driver about a new host table (called with no
    /// lock held: [`Cluster::driver`] takes the driver's lock, then the
    /// state's).
    fn hosts_changed(&self) {
        self.inner.generation.fetch_add(1, Ordering::Release);
        let guard = self.lock_driver();
        if let Some(driver) = guard.upgrade() {
            // Read under the driver's lock: of two changes racing here, the
            // driver gets the table as it is after both.
            driver.set_hosts(self.read().table.clone());
        }
    }

    fn lock_driver(&self) -> std::sync::MutexGuard<'_, Weak<Driver>> {
        self.inner
            .driver
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The running driver, started if none runs.
    pub(crate) fn driver(&self) -> Result<Arc<Driver>> {
        let mut slot = self.lock_driver();
        // One whose thread ended while handles lived (a panic on it, which
        // failed what it held) is left to them: new clients get a new one.
        if let Some(driver) = slot.upgrade().filter(|d| !d.has_ended()) {
            return Ok(driver);
        }
        let table = self.read().table.clone();
        let driver = Arc::new(Driver::start(table, self.inner.scripts.clone())?);
        *slot = Arc::downgrade(&driver);
        Ok(driver)
    }

    /// Whether host `id` is Up, or Down (since when, tried again when, why).
    ///
    /// ```no_run
    /// # let cluster = rb::Cluster::from_urls(["redis://127.0.0.1:6379"])?;
    /// match cluster.health(0)? {
    ///     rb::HostHealth::Up => {}
    ///     down => eprintln!("host 0: {down:?}"),
    /// }
    /// # Ok::<(), rb::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::NoSuchHost`] for an unknown id.
    pub fn health(&self, id: HostId) -> Result<HostHealth> {
        let state = self.read();
        let entry = state.table.get(&id).ok_or(Error::NoSuchHost { id })?;
        Ok(entry.watch.health.status())
    }

    /// Every host's counters (commands, replies, server errors, timeouts,
    /// connection failures, reconnects, bytes, in flight), latency
    /// histogram and health, counted since the host was added.
    ///
    /// ```no_run
    /// # let cluster = rb::Cluster::from_urls(["redis://127.0.0.1:6379"])?;
    /// for (id, host) in &cluster.stats().hosts {
    ///     println!("{id}: {} commands, p99 {:?}", host.commands, host.latency.p99);
    /// }
    /// # Ok::<(), rb::Error>(())
    /// ```
    pub fn stats(&self) -> ClusterStats {
        let table = self.read().table.clone();
        let mut stats: ClusterStats = table
            .values()
            .map(|e| {
                e.watch
                    .counters
                    .snapshot(e.info.name().clone(), e.watch.health.status())
            })
            .collect();
        if self.inner.previous.is_some() {
            stats.migration = Some(self.inner.migration.snapshot());
        }
        stats
    }

    /// The host table as it is now.
    pub(crate) fn host_map(&self) -> Arc<HostMap> {
        self.read().table.clone()
    }

    /// A migrating cluster's counters of fallback reads and moves.
    pub(crate) fn migration_counters(&self) -> &Arc<MigrationCounters> {
        &self.inner.migration
    }

    /// What moving keys taught about the servers (see [`ServerFacts`]).
    pub(crate) fn server_facts(&self) -> &Arc<ServerFacts> {
        &self.inner.server_facts
    }

    /// Whether a read found on the old owner moves its key there and then
    /// ([`ClusterBuilder::copy_forward`]).
    pub(crate) fn copies_forward(&self) -> bool {
        self.inner.previous.is_some() && self.inner.copy_forward
    }

    /// Runs `f` with the current router and host timeouts, from a copy
    /// this thread keeps until the hosts change: a request of the async
    /// client takes no lock and touches no shared reference count.
    ///
    /// # Errors
    ///
    /// The router's error when it cannot be built.
    pub(crate) fn with_routes<R>(&self, f: impl FnOnce(&Routes) -> R) -> Result<R> {
        let generation = self.inner.generation.load(Ordering::Acquire);
        let cached = ROUTES.with(|cache| {
            let cache = cache.borrow();
            cache
                .iter()
                .find(|(id, g, _)| *id == self.inner.id && *g == generation)
                .map(|(_, _, routes)| routes.clone())
        });
        let routes = match cached {
            Some(routes) => routes,
            None => {
                let routes = Rc::new(Routes {
                    router: self.router()?,
                    read_timeouts: self
                        .read()
                        .table
                        .iter()
                        .map(|(id, e)| (*id, e.info.read_timeout))
                        .collect(),
                });
                ROUTES.with(|cache| {
                    let mut cache = cache.borrow_mut();
                    cache.retain(|(id, _, _)| *id != self.inner.id);
                    // A thread that saw many clusters keeps the latest few.
                    if cache.len() >= 8 {
                        cache.remove(0);
                    }
                    cache.push((self.inner.id, generation, routes.clone()));
                });
                routes
            }
        };
        Ok(f(&routes))
    }

    /// Every key of every host, host by host in id order (`SCAN` on each):
    /// an iterator of keys, or of a failed host's error (the walk then goes
    /// on with the next host). Keys a server returns twice come once.
    ///
    /// ```no_run
    /// # let cluster = rb::Cluster::from_urls(["redis://127.0.0.1:6379"])?;
    /// let mut scan = cluster.scan(rb::ScanOptions::new().pattern("user:*").count(1000));
    /// for key in scan.by_ref().take(10_000) {
    ///     let key = key?;
    /// }
    /// if let Some(at) = scan.position() {
    ///     println!("resume with {at}"); // e.g. "2:3584"; cluster.scan_from(at.to_string().parse()?, ..)
    /// }
    /// # Ok::<(), rb::Error>(())
    /// ```
    pub fn scan(&self, opts: ScanOptions) -> Scan {
        Scan::new(self.clone(), ScanCursor::start(), opts)
    }

    /// [`Cluster::scan`] from a saved position (see [`Scan::position`]).
    pub fn scan_from(&self, from: ScanCursor, opts: ScanOptions) -> Scan {
        Scan::new(self.clone(), from, opts)
    }

    /// The cluster this one takes over from (see
    /// [`ClusterBuilder::migrating_from`]), if any.
    pub fn migrating_from(&self) -> Option<&Cluster> {
        self.inner.previous.as_ref()
    }

    pub(crate) fn script_memory(&self) -> Arc<ScriptMemory> {
        self.inner.scripts.clone()
    }

    /// A client whose commands answer with [`Reply`](crate::Reply) futures,
    /// for async code on any runtime and for threads sharing one client.
    ///
    /// The first one starts the cluster's driver thread; it stops when the
    /// last async client and the last outstanding reply are gone. A driver
    /// that cannot start makes every command fail with that error.
    ///
    /// ```no_run
    /// use rb::{Cluster, Commands};
    /// # async fn demo() -> rb::Result<()> {
    /// let cluster = Cluster::from_urls(["redis://127.0.0.1:6379"])?;
    /// let client = cluster.async_client();
    /// let v: Option<Vec<u8>> = client.get("key").await?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn async_client(&self) -> AsyncClient {
        self.async_client_with(AsyncOptions::default())
    }

    /// [`Cluster::async_client`] with options (a timeout per request,
    /// batching).
    #[must_use]
    pub fn async_client_with(&self, opts: AsyncOptions) -> AsyncClient {
        AsyncClient::new(self.clone(), self.driver(), opts)
    }

    /// Closes every idle pooled connection (rb's `disconnect_pools`).
    pub fn disconnect_pools(&self) {
        for entry in self.read().table.values() {
            entry.pool.clear();
        }
    }

    /// Idle pooled connections of a host (for tests and monitoring).
    pub fn idle_connections(&self, id: HostId) -> usize {
        self.read()
            .table
            .get(&id)
            .map_or(0, |h| h.pool.idle_count())
    }

    pub(crate) fn session(&self, opts: &MapOptions) -> Session {
        self.session_with(opts.to_loop(Instant::now()))
    }

    /// A session for immediate commands: no overall deadline, but each
    /// host's `budget` (its write and read timeouts) from the moment its
    /// connection is ready.
    pub(crate) fn immediate_session(&self, auto_batch: bool, budget: Option<Duration>) -> Session {
        let opts = MapOptions {
            auto_batch,
            max_concurrency: usize::MAX,
            ..MapOptions::default()
        };
        let mut lopts = opts.to_loop(Instant::now());
        lopts.request_budget = budget;
        self.session_with(lopts)
    }

    /// A session that holds its connections between round trips (a
    /// transaction's), with the hosts' immediate-command budget per trip.
    pub(crate) fn held_session(&self, budget: Option<Duration>) -> Session {
        let mut session = self.immediate_session(false, budget);
        session.keep_connections();
        session
    }

    fn session_with(&self, opts: LoopOptions) -> Session {
        let table = self.read().table.clone();
        Session::new(table, self.inner.scripts.clone(), opts)
    }

    /// A client that routes each command to its key's host and waits for
    /// the reply. Auto-batching applies to its `map()`.
    #[doc(alias = "get_routing_client")]
    pub fn routing_client(&self) -> RoutingClient {
        RoutingClient::new(self.clone(), true)
    }

    /// A client for one host (rb's `get_local_client`).
    ///
    /// # Errors
    ///
    /// [`Error::NoSuchHost`] for an unknown id.
    #[doc(alias = "get_local_client")]
    pub fn local_client(&self, id: HostId) -> Result<LocalClient> {
        self.host(id)?;
        Ok(LocalClient::new(self.clone(), id))
    }

    /// A client for the host that owns `key` (rb's `get_local_client_for_key`).
    ///
    /// # Errors
    ///
    /// The router's error ([`Error::BadHostSetup`]).
    #[doc(alias = "get_local_client_for_key")]
    pub fn local_client_for_key<K: ToArg>(&self, key: K) -> Result<LocalClient> {
        let id = self.router()?.host_for_key(&crate::args::to_bytes(&key))?;
        self.local_client(id)
    }

    /// A mapping client that you join or cancel yourself (rb's
    /// `get_mapping_client`); [`Cluster::map`] is the scoped form.
    ///
    /// The options' timeout, if any, counts from now; each
    /// [`MappingClient::join`] may set a shorter one. Invalid options or a
    /// router that cannot be built make every command (and the join) fail
    /// with that error.
    ///
    /// ```no_run
    /// use rb::{Cluster, Commands, MapOptions};
    /// let cluster = Cluster::from_urls(["redis://127.0.0.1:6379"])?;
    /// let m = cluster.mapping_client(MapOptions::new());
    /// let p = m.get("k");
    /// m.join(None)?;
    /// let v: Option<Vec<u8>> = p.value()?;
    /// # Ok::<(), rb::Error>(())
    /// ```
    #[doc(alias = "get_mapping_client")]
    pub fn mapping_client(&self, opts: MapOptions) -> MappingClient {
        let router = opts.validate().and_then(|()| self.router());
        match router {
            Ok(router) => MappingClient::new(self, self.session(&opts), router),
            Err(e) => MappingClient::broken(e),
        }
    }

    /// A fanout client to `hosts` that you join or cancel yourself (rb's
    /// `get_fanout_client`); [`Cluster::fanout`] is the scoped form.
    ///
    /// ```no_run
    /// use rb::{Cluster, Commands, Hosts};
    /// let cluster = Cluster::from_urls(["redis://127.0.0.1:6379", "redis://127.0.0.1:6380"])?;
    /// let f = cluster.fanout_client(Hosts::All);
    /// let sizes = f.dbsize();
    /// f.join(None)?;
    /// for (host, n) in sizes.value()? { println!("{host}: {n} keys"); }
    /// # Ok::<(), rb::Error>(())
    /// ```
    ///
    ///
    /// An unknown target ([`Error::NoSuchHost`]) or a router that cannot be
    /// built makes every command (and the join) fail with that error.
    #[doc(alias = "get_fanout_client")]
    pub fn fanout_client(&self, hosts: Hosts) -> FanoutClient {
        self.fanout_client_with(MapOptions::default(), hosts)
    }

    /// [`Cluster::fanout_client`] with options (invalid ones fail as an
    /// unknown target does).
    pub fn fanout_client_with(&self, opts: MapOptions, hosts: Hosts) -> FanoutClient {
        let parts = opts
            .validate()
            .and_then(|()| Ok((self.targets(hosts)?, self.router()?)));
        match parts {
            Ok((targets, router)) => FanoutClient::new(self.session(&opts), router, targets),
            Err(e) => FanoutClient::broken(e),
        }
    }

    fn targets(&self, hosts: Hosts) -> Result<Vec<HostId>> {
        match hosts {
            Hosts::All => Ok(self.host_ids()),
            Hosts::Ids(ids) => {
                for id in &ids {
                    self.host(*id)?;
                }
                Ok(ids)
            }
        }
    }

    /// Runs `f` with a [`MappingClient`], then waits for every reply.
    ///
    /// Commands are routed by key, queued per host, and sent to every host
    /// at once; after this returns, every promise is settled. The result is
    /// the first failure, if any (promises still hold every partial result).
    ///
    /// ```no_run
    /// use rb::{Cluster, Commands};
    /// let cluster = Cluster::from_urls(["redis://127.0.0.1:6379", "redis://127.0.0.1:6380"])?;
    /// let mut results = Vec::new();
    /// cluster.map(|c| {
    ///     for k in ["a", "b", "c"] {
    ///         results.push(c.get(k));
    ///     }
    /// })?;
    /// for p in &results {
    ///     let value: Option<Vec<u8>> = p.value()?;
    /// }
    /// # Ok::<(), rb::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// The first failure of any command (every promise is settled all the same), or the router's error before anything is sent.
    pub fn map<R>(&self, f: impl FnOnce(&MappingClient) -> R) -> Result<R> {
        self.map_with(MapOptions::default(), f)
    }

    /// [`Cluster::map`] with options (timeout, concurrency, batching).
    ///
    /// # Errors
    ///
    /// As [`Cluster::map`].
    pub fn map_with<R>(&self, opts: MapOptions, f: impl FnOnce(&MappingClient) -> R) -> Result<R> {
        opts.validate()?;
        let client = MappingClient::new(self, self.session(&opts), self.router()?);
        let out = f(&client);
        match client.finish() {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Runs `f` with a [`FanoutClient`] whose commands go to every host of
    /// `hosts`, then waits for every reply (rb's `fanout`).
    ///
    /// # Errors
    ///
    /// The first failure of any command, [`Error::NoSuchHost`] for an unknown target, or the router's error.
    pub fn fanout<R>(&self, hosts: Hosts, f: impl FnOnce(&FanoutClient) -> R) -> Result<R> {
        self.fanout_with(MapOptions::default(), hosts, f)
    }

    /// [`Cluster::fanout`] with options.
    ///
    /// # Errors
    ///
    /// As [`Cluster::fanout`].
    pub fn fanout_with<R>(
        &self,
        opts: MapOptions,
        hosts: Hosts,
        f: impl FnOnce(&FanoutClient) -> R,
    ) -> Result<R> {
        opts.validate()?;
        let targets = self.targets(hosts)?;
        let client = FanoutClient::new(self.session(&opts), self.router()?, targets);
        let out = f(&client);
        match client.finish() {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Runs lists of commands and script calls, each list on the host that
    /// owns its key, all hosts at once (rb's `execute_commands`).
    ///
    /// Each list runs in order, scripts included: a script call followed by
    /// more calls to its host gets a `SCRIPT LOAD` pipelined ahead of its
    /// `EVALSHA` (no extra round trip), so the calls after it see its
    /// effects even after a `SCRIPT FLUSH` or a server restart. A script
    /// that is its host's last call is loaded first only where the cluster
    /// does not know the host to hold it; a `NOSCRIPT` then (the script was
    /// flushed since it was last seen) reloads and retries it once, with
    /// nothing after it to reorder. Each command's outcome is in its
    /// promise. A key given twice runs both lists and keeps both lists'
    /// promises, in order.
    ///
    /// # Errors
    ///
    /// [`Error::Unroutable`] (or the router's error) when a key cannot be
    /// routed, or [`Error::BadHostSetup`] when the router cannot be built;
    /// nothing is sent then.
    ///
    /// ```no_run
    /// # let cluster = rb::Cluster::from_urls(["redis://127.0.0.1:6379"])?;
    /// let script = rb::Script::new("return {KEYS[1], ARGV[1]}");
    /// let out = cluster.execute_commands([
    ///     ("foo", vec![rb::cmd("SET").arg("foo").arg(1).into(), script.call(&["foo"], &["bar"]).into()]),
    /// ])?;
    /// let replies: Vec<rb::Value> = out["foo"].iter().map(|p| p.value()).collect::<Result<_, _>>()?;
    /// # Ok::<(), rb::Error>(())
    /// ```
    pub fn execute_commands<K, I>(
        &self,
        mapping: I,
    ) -> Result<std::collections::HashMap<K, Vec<crate::Promise<crate::Value>>>>
    where
        I: IntoIterator<Item = (K, Vec<crate::Call>)>,
        K: ToArg + Eq + std::hash::Hash,
    {
        self.execute_commands_with(MapOptions::default(), mapping)
    }

    /// [`Cluster::execute_commands`] with options: a timeout (what is still
    /// outstanding then is rejected with [`Error::Timeout`]), concurrency
    /// and batching as in a map.
    ///
    /// # Errors
    ///
    /// As [`Cluster::execute_commands`].
    ///
    /// ```no_run
    /// # let cluster = rb::Cluster::from_urls(["redis://127.0.0.1:6379"])?;
    /// use std::time::Duration;
    /// let opts = rb::MapOptions::new().timeout(Duration::from_millis(100));
    /// let out = cluster.execute_commands_with(opts, [("foo", vec![rb::cmd("GET").arg("foo").into()])])?;
    /// # Ok::<(), rb::Error>(())
    /// ```
    pub fn execute_commands_with<K, I>(
        &self,
        opts: MapOptions,
        mapping: I,
    ) -> Result<std::collections::HashMap<K, Vec<crate::Promise<crate::Value>>>>
    where
        I: IntoIterator<Item = (K, Vec<crate::Call>)>,
        K: ToArg + Eq + std::hash::Hash,
    {
        opts.validate()?;
        crate::client::execute_commands(self, opts, mapping)
    }

    /// A fanout to every host (rb's `all`).
    ///
    /// ```no_run
    /// # let cluster = rb::Cluster::from_urls(["redis://127.0.0.1:6379"])?;
    /// let infos = cluster.all(|c| c.cmd::<rb::Value>(rb::cmd("INFO")))?;
    /// for (host, info) in infos.value()? { println!("{host}: {info:?}"); }
    /// # use rb::Commands;
    /// # Ok::<(), rb::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`Cluster::fanout`].
    pub fn all<R>(&self, f: impl FnOnce(&FanoutClient) -> R) -> Result<R> {
        self.fanout(Hosts::All, f)
    }
}

impl std::fmt::Debug for ClusterBuilder {
    /// Hosts as their (redacted) configs; the router by kind.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let router = match &self.router {
            RouterChoice::Partition => "Partition",
            RouterChoice::ConsistentHashing => "ConsistentHashing",
            RouterChoice::Custom(_) => "Custom",
            RouterChoice::Twemproxy(_) => "Twemproxy",
        };
        f.debug_struct("ClusterBuilder")
            .field("defaults", &self.defaults)
            .field("hosts", &self.hosts)
            .field("router", &router)
            .field("hash_tag", &self.hash_tag)
            .field(
                "resolver",
                &self.resolver.as_ref().map_or("System", |_| "Custom"),
            )
            .finish()
    }
}

impl std::fmt::Debug for Cluster {
    /// The hosts (passwords redacted).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("hosts", &self.hosts())
            .finish_non_exhaustive()
    }
}
