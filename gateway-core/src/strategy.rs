//! Model selection strategies: CEL expressions over a request's candidate models and their live
//! metrics, tried in order; the first that returns models decides which are tried, and in which
//! order.
//!
//! Each strategy sees `ai.models`, one map per candidate:
//!
//! ```text
//! { id: "openai:gpt-4o", provider_id: "openai", model_id: "gpt-4o",
//!   known: true,    // in the built-in catalog; false for pass-through models
//!   managed: true,  // the platform offers managed keys for the provider
//!   metrics: { local:  { latency: { upstream_ms_avg, upstream_ms_p50, upstream_ms_p95 },
//!                        error_rate, tokens_per_second, requests },
//!              global: { ...the same } } }
//! ```
//!
//! A model nobody has measured yet has every metric 0 (`requests == 0`), so a latency filter lets
//! it through; `m.metrics.local.requests > 0 && ...` asks for data. Besides the CEL standard
//! library, strategies get the lists extension (`sortBy`, `reverse`, `slice`, `distinct`, ...)
//! and `list.random()`, the list shuffled.
//!
//! Build the models list once per metrics snapshot ([`Strategies::prepare`], or
//! [`PreparedCache`]) and select against it per request ([`Strategies::select_prepared`]):
//! building converts every candidate into CEL values, which costs more than evaluating.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwapOption;
use cel::common::traits::{Container, Indexer, Iterable, Sizer, Zeroer};
use cel::common::types::{
    CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelString, Kind, LIST_TYPE, MAP_TYPE,
    Type,
};
use cel::common::value::{CowVal, StaticVal, Val};
use cel::{Context, DeclarationError, Env, ExecutionError, Program, Value};
use rand::seq::SliceRandom as _;

use crate::catalog::{self, ApiShape};
use crate::config::GatewayConfig;
use crate::metrics::{MetricsSnapshot, MetricsView};

/// The model name that asks the gateway to choose among every allowed catalog model.
pub const AUTO_MODEL: &str = "tally/auto";

/// A model a request could be sent to, as strategies see it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CandidateInfo {
    pub provider: String,
    pub model: String,
    /// In the built-in catalog.
    pub known: bool,
    /// The platform offers managed keys for the provider.
    pub managed: bool,
}

impl CandidateInfo {
    /// `known` and `managed` as the built-in catalog says.
    pub fn from_catalog(provider: &str, model: &str) -> CandidateInfo {
        let info = catalog::provider(provider);
        CandidateInfo {
            provider: provider.to_string(),
            model: model.to_string(),
            known: info.is_some_and(|p| p.models.contains(&model)),
            managed: info.is_some_and(|p| p.managed),
        }
    }

    /// `provider:model`, the form clients send and strategies compare.
    pub fn id(&self) -> String {
        format!("{}:{}", self.provider, self.model)
    }
}

/// The candidates of [`AUTO_MODEL`]: every catalog model that the configuration allows and that
/// speaks the client's API shape (the others would be refused when resolved).
pub fn auto_candidates(config: &GatewayConfig, shape: ApiShape) -> Vec<CandidateInfo> {
    catalog::PROVIDERS
        .iter()
        .filter(|p| p.shape == shape)
        .filter(|p| {
            !config.only_allow_configured_providers
                || config.configured_providers.contains_key(p.id)
        })
        .flat_map(|p| {
            p.models
                .iter()
                .filter(move |m| {
                    !config.only_allow_configured_models
                        || config
                            .configured_providers
                            .get(p.id)
                            .is_some_and(|models| models.contains(**m))
                })
                .map(move |m| CandidateInfo::from_catalog(p.id, m))
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StrategyError {
    /// A strategy that does not parse; `index` counts from 0 in the configured list, `line` and
    /// `column` from 1 in that strategy.
    #[error("model selection strategy {index} at {line}:{column}: {message}")]
    Parse {
        index: usize,
        line: usize,
        column: usize,
        message: String,
    },
    /// The CEL environment itself could not be built: a bug, not a configuration error.
    #[error("model selection environment: {0}")]
    Environment(String),
}

struct Strategy {
    source: String,
    program: Program,
}

/// Compiled model selection strategies, in their configured order.
pub struct Strategies {
    env: Arc<Env>,
    strategies: Vec<Strategy>,
    /// No strategy calls `random()`, so a result depends only on the prepared models and can be
    /// memoised with them.
    deterministic: bool,
    /// Tells memoised results of different strategy lists apart after a configuration reload.
    generation: u64,
}

impl fmt::Debug for Strategies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Strategies")
            .field(
                "strategies",
                &self
                    .strategies
                    .iter()
                    .map(|s| s.source.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("deterministic", &self.deterministic)
            .finish()
    }
}

static GENERATION: AtomicU64 = AtomicU64::new(0);

fn environment() -> Result<Env, DeclarationError> {
    let mut env = Env::stdlib();
    env.add_extension(cel::extensions::lists)?;
    env.add_member_overload("random", "list.random()", LIST_TYPE, vec![], random)?;
    Ok(env)
}

/// `list.random()`: every element, shuffled, so that failover still has the others to try.
fn random<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let [list]: [CowVal<'b, 'v>; 1] = args
        .try_into()
        .map_err(|args: Vec<_>| ExecutionError::invalid_argument_count(1, args.len()))?;
    let iterable = list
        .as_ref()
        .as_iterable()
        .ok_or_else(|| ExecutionError::UnexpectedType {
            got: list.as_ref().get_type().name().to_owned(),
            want: "list".to_owned(),
        })?;
    let mut items = iterable.iter();
    let mut elements = Vec::new();
    while let Some(item) = items.next() {
        elements.push(item.clone_as_boxed());
    }
    elements.shuffle(&mut rand::rng());
    Ok(CowVal::owned(CelList::from(elements)))
}

impl Strategies {
    /// Compiles every strategy once; the first that does not parse is reported with its index
    /// and the parser's position and message.
    pub fn compile(exprs: &[String]) -> Result<Strategies, StrategyError> {
        let env = environment().map_err(|e| StrategyError::Environment(e.to_string()))?;
        let mut strategies = Vec::with_capacity(exprs.len());
        for (index, source) in exprs.iter().enumerate() {
            let program = env.compile(source).map_err(|errors| {
                let first = errors.errors.first();
                let (line, column) = first.map_or((0, 0), |e| e.pos);
                StrategyError::Parse {
                    index,
                    line: usize::try_from(line).unwrap_or(0),
                    column: usize::try_from(column).unwrap_or(0),
                    message: first.map_or_else(|| errors.to_string(), |e| e.msg.clone()),
                }
            })?;
            strategies.push(Strategy {
                source: source.clone(),
                program,
            });
        }
        let deterministic = strategies
            .iter()
            .all(|s| !s.program.references().has_function("random"));
        Ok(Strategies {
            env: Arc::new(env),
            strategies,
            deterministic,
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
        })
    }

    pub fn len(&self) -> usize {
        self.strategies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.strategies.is_empty()
    }

    /// The strategies as configured.
    pub fn sources(&self) -> impl Iterator<Item = &str> {
        self.strategies.iter().map(|s| s.source.as_str())
    }

    /// `ai.models` for `candidates` with these metrics, to select against many times.
    pub fn prepare(
        &self,
        candidates: &[CandidateInfo],
        local: &MetricsSnapshot,
        global: &MetricsSnapshot,
    ) -> PreparedModels {
        let mut by_id = HashMap::with_capacity(candidates.len());
        let mut models: Vec<Box<dyn Val>> = Vec::with_capacity(candidates.len());
        for (index, c) in candidates.iter().enumerate() {
            let id = c.id();
            let key = (c.provider.clone(), c.model.clone());
            models.push(Box::new(ModelVal {
                index,
                map: Arc::new(model_map(c, &id, local.get(&key), global.get(&key))),
            }));
            by_id.entry(id).or_insert(index);
        }
        let ai = cel_map([("models", Box::new(CelList::from(models)) as Box<dyn Val>)]);
        let mut context = Context::with_env(Arc::clone(&self.env));
        context.add_variable_as_val("ai", Box::new(ai));
        PreparedModels {
            context,
            candidates: candidates.to_vec(),
            by_id,
            memo: OnceLock::new(),
        }
    }

    /// Indices into `candidates`, in the order of the first strategy that returned any of them;
    /// `None` when none did. Without strategies every candidate, in order.
    pub fn select(
        &self,
        candidates: &[CandidateInfo],
        local: &MetricsSnapshot,
        global: &MetricsSnapshot,
    ) -> Option<Vec<usize>> {
        self.select_prepared(&self.prepare(candidates, local, global))
    }

    /// [`select`](Self::select) against models prepared earlier. Indices are into the
    /// candidates the models were prepared from ([`PreparedModels::candidates`]).
    pub fn select_prepared(&self, prepared: &PreparedModels) -> Option<Vec<usize>> {
        if self.deterministic
            && let Some((generation, result)) = prepared.memo.get()
            && *generation == self.generation
        {
            return result.clone();
        }
        let result = self.evaluate(prepared);
        if self.deterministic {
            // Another thread may have stored the same result first; either is right.
            let _ = prepared.memo.set((self.generation, result.clone()));
        }
        result
    }

    fn evaluate(&self, prepared: &PreparedModels) -> Option<Vec<usize>> {
        if self.strategies.is_empty() {
            let all: Vec<usize> = (0..prepared.candidates.len()).collect();
            return (!all.is_empty()).then_some(all);
        }
        for (index, strategy) in self.strategies.iter().enumerate() {
            // Read the result where it lies: converting it to a `Value` would copy every model
            // map it holds.
            let value = match Value::resolve_val(strategy.program.expression(), &prepared.context) {
                Ok(value) => value,
                Err(error) => {
                    tracing::warn!(
                        strategy = index,
                        expression = %strategy.source,
                        %error,
                        "model selection strategy failed; trying the next"
                    );
                    continue;
                }
            };
            match picked(value.as_ref(), &prepared.by_id) {
                Some(chosen) if !chosen.is_empty() => return Some(chosen),
                Some(_) => {}
                None => tracing::warn!(
                    strategy = index,
                    expression = %strategy.source,
                    returned = value.as_ref().get_type().name(),
                    "model selection strategy returned no list of models; trying the next"
                ),
            }
        }
        None
    }
}

/// The candidates a result names, in its order, each once. A result may be a list of models
/// (what `filter` and `sortBy` return), of maps with an `id`, of ids, or a single one of those;
/// anything that is not one of the candidates is ignored, because strategies choose among
/// candidates and never add any. `None` when the result is not model-shaped at all.
fn picked(value: &dyn Val, by_id: &HashMap<String, usize>) -> Option<Vec<usize>> {
    let mut chosen = Vec::new();
    let mut add = |item: &dyn Val| match candidate_of(item, by_id) {
        Some(i) if !chosen.contains(&i) => chosen.push(i),
        Some(_) => {}
        None => tracing::debug!(?item, "model selection result names no candidate"),
    };
    match value.get_type().kind() {
        Kind::List => {
            let mut items = value.as_iterable()?.iter();
            while let Some(item) = items.next() {
                add(item);
            }
        }
        Kind::Map | Kind::String => add(value),
        _ => return None,
    }
    Some(chosen)
}

fn candidate_of(item: &dyn Val, by_id: &HashMap<String, usize>) -> Option<usize> {
    if let Some(model) = item.downcast_ref::<ModelVal>() {
        return Some(model.index);
    }
    if let Some(id) = item.downcast_ref::<CelString>() {
        return by_id.get(id.inner()).copied();
    }
    let id = item.as_indexer()?.get(&CelString::from("id")).ok()?;
    let id = id.as_ref().downcast_ref::<CelString>()?;
    by_id.get(id.inner()).copied()
}

/// One candidate in `ai.models`: a CEL map whose copies share it. Comprehensions copy every
/// element they bind and every element they keep; a plain map would be copied whole, nested
/// metrics included, several times per model per evaluation.
#[derive(Debug, Clone)]
struct ModelVal {
    /// Into the candidates the models were prepared from.
    index: usize,
    map: Arc<CelMap<'static>>,
}

impl Val for ModelVal {
    fn get_type(&self) -> &Type {
        &MAP_TYPE
    }

    fn cel_type() -> &'static Type {
        &MAP_TYPE
    }

    fn as_container(&self) -> Option<&dyn Container> {
        Some(&*self.map)
    }

    fn as_indexer<'b, 'v>(&'b self) -> Option<&'b (dyn Indexer + 'v)>
    where
        Self: 'v,
    {
        Some(&*self.map)
    }

    fn as_iterable<'b, 'v>(&'b self) -> Option<&'b (dyn Iterable + 'v)>
    where
        Self: 'v,
    {
        Some(&*self.map)
    }

    fn as_sizer(&self) -> Option<&dyn Sizer> {
        Some(&*self.map)
    }

    fn as_zeroer(&self) -> Option<&dyn Zeroer> {
        Some(&*self.map)
    }

    fn equals(&self, other: &dyn Val) -> bool {
        match other.downcast_ref::<ModelVal>() {
            Some(other) => Arc::ptr_eq(&self.map, &other.map) || self.map.equals(&*other.map),
            None => self.map.equals(other),
        }
    }

    fn clone_as_boxed<'v>(&self) -> Box<dyn Val + 'v>
    where
        Self: 'v,
    {
        Box::new(self.clone())
    }

    fn as_any(&self) -> Option<&dyn Any> {
        Some(self)
    }
}

impl StaticVal for ModelVal {}

fn cel_map<const N: usize>(entries: [(&str, Box<dyn Val>); N]) -> CelMap<'static> {
    CelMap::from(
        entries
            .into_iter()
            .map(|(k, v)| (CelMapKey::from(k.to_string()), v))
            .collect::<HashMap<_, _>>(),
    )
}

fn model_map(
    c: &CandidateInfo,
    id: &str,
    local: Option<&MetricsView>,
    global: Option<&MetricsView>,
) -> CelMap<'static> {
    let metrics = cel_map([
        ("local", Box::new(metrics_map(local)) as Box<dyn Val>),
        ("global", Box::new(metrics_map(global))),
    ]);
    cel_map([
        (
            "id",
            Box::new(CelString::from(id.to_string())) as Box<dyn Val>,
        ),
        ("provider_id", Box::new(CelString::from(c.provider.clone()))),
        ("model_id", Box::new(CelString::from(c.model.clone()))),
        ("known", Box::new(CelBool::from(c.known))),
        ("managed", Box::new(CelBool::from(c.managed))),
        ("metrics", Box::new(metrics)),
    ])
}

fn metrics_map(view: Option<&MetricsView>) -> CelMap<'static> {
    let v = view.copied().unwrap_or_default();
    let latency = cel_map([
        (
            "upstream_ms_avg",
            Box::new(CelDouble::from(v.latency.upstream_ms_avg)) as Box<dyn Val>,
        ),
        (
            "upstream_ms_p50",
            Box::new(CelDouble::from(v.latency.upstream_ms_p50)),
        ),
        (
            "upstream_ms_p95",
            Box::new(CelDouble::from(v.latency.upstream_ms_p95)),
        ),
    ]);
    cel_map([
        ("latency", Box::new(latency) as Box<dyn Val>),
        ("error_rate", Box::new(CelDouble::from(v.error_rate))),
        (
            "tokens_per_second",
            Box::new(CelDouble::from(v.tokens_per_second)),
        ),
        // CEL ints are signed; no window holds anywhere near i64::MAX attempts.
        (
            "requests",
            Box::new(CelInt::from(i64::try_from(v.requests).unwrap_or(i64::MAX))),
        ),
    ])
}

/// `ai.models` for one candidate list and one pair of metrics snapshots, ready to select
/// against from any thread.
pub struct PreparedModels {
    context: Context<'static, 'static>,
    candidates: Vec<CandidateInfo>,
    by_id: HashMap<String, usize>,
    memo: OnceLock<(u64, Option<Vec<usize>>)>,
}

impl PreparedModels {
    /// The candidates the selected indices refer to.
    pub fn candidates(&self) -> &[CandidateInfo] {
        &self.candidates
    }
}

impl fmt::Debug for PreparedModels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreparedModels")
            .field("candidates", &self.candidates)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct CacheEntry {
    local: Arc<MetricsSnapshot>,
    global: Arc<MetricsSnapshot>,
    prepared: Arc<PreparedModels>,
}

/// The prepared models of one candidate list (e.g. [`auto_candidates`] of one API shape), rebuilt
/// only when a metrics snapshot is replaced (compared by `Arc` identity, see
/// [`ModelMetrics::snapshot_cached`](crate::metrics::ModelMetrics::snapshot_cached) and
/// [`GlobalMetrics::load`](crate::metrics::GlobalMetrics::load)) or the candidates change.
/// Deterministic strategies also reuse their result until then.
#[derive(Debug, Default)]
pub struct PreparedCache {
    slot: ArcSwapOption<CacheEntry>,
}

impl PreparedCache {
    pub fn new() -> PreparedCache {
        PreparedCache::default()
    }

    pub fn get(
        &self,
        strategies: &Strategies,
        candidates: &[CandidateInfo],
        local: &Arc<MetricsSnapshot>,
        global: &Arc<MetricsSnapshot>,
    ) -> Arc<PreparedModels> {
        if let Some(entry) = self.slot.load().as_ref()
            && Arc::ptr_eq(&entry.local, local)
            && Arc::ptr_eq(&entry.global, global)
            && entry.prepared.candidates == candidates
        {
            return Arc::clone(&entry.prepared);
        }
        // Racing callers may each build one; they are identical, the last stored stays.
        let prepared = Arc::new(strategies.prepare(candidates, local, global));
        self.slot.store(Some(Arc::new(CacheEntry {
            local: Arc::clone(local),
            global: Arc::clone(global),
            prepared: Arc::clone(&prepared),
        })));
        prepared
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn shared_across_request_tasks() {
        assert_send_sync::<Strategies>();
        assert_send_sync::<PreparedModels>();
        assert_send_sync::<PreparedCache>();
    }
}
