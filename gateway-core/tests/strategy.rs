#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tally_gateway_core::catalog::ApiShape;
use tally_gateway_core::config::GatewayConfig;
use tally_gateway_core::metrics::{
    GlobalMetrics, LatencyView, MetricsSnapshot, MetricsView, ModelMetrics,
};
use tally_gateway_core::strategy::{
    AUTO_MODEL, CandidateInfo, PreparedCache, Strategies, StrategyError, auto_candidates,
};

fn candidates() -> Vec<CandidateInfo> {
    vec![
        CandidateInfo::from_catalog("openai", "gpt-4o"),
        CandidateInfo::from_catalog("anthropic", "claude-sonnet-4-5"),
        CandidateInfo::from_catalog("openai", "gpt-5-preview"),
        CandidateInfo::from_catalog("groq", "llama-3.1-8b-instant"),
    ]
}

fn compile(exprs: &[&str]) -> Strategies {
    let exprs: Vec<String> = exprs.iter().map(|s| s.to_string()).collect();
    Strategies::compile(&exprs).unwrap()
}

fn none() -> MetricsSnapshot {
    MetricsSnapshot::new()
}

fn with_latency(entries: &[(&str, &str, f64)]) -> MetricsSnapshot {
    entries
        .iter()
        .map(|&(p, m, avg)| {
            (
                (p.to_string(), m.to_string()),
                MetricsView {
                    latency: LatencyView {
                        upstream_ms_avg: avg,
                        upstream_ms_p50: avg,
                        upstream_ms_p95: avg * 2.0,
                    },
                    requests: 100,
                    ..MetricsView::default()
                },
            )
        })
        .collect()
}

fn select(exprs: &[&str], local: &MetricsSnapshot, global: &MetricsSnapshot) -> Option<Vec<usize>> {
    compile(exprs).select(&candidates(), local, global)
}

#[test]
fn candidate_fields_come_from_the_catalog() {
    let c = candidates();
    assert_eq!(c[0].id(), "openai:gpt-4o");
    assert!(c[0].known && c[0].managed);
    assert!(!c[2].known && c[2].managed);
    assert!(c[3].known && !c[3].managed);
    let custom = CandidateInfo::from_catalog("ollama", "llama3");
    assert!(!custom.known && !custom.managed);
}

#[test]
fn a_bad_strategy_is_reported_with_its_index_and_position() {
    let err = Strategies::compile(&["ai.models".to_string(), "ai.models.filter(m, ".to_string()])
        .unwrap_err();
    match &err {
        StrategyError::Parse {
            index,
            line,
            column,
            message,
        } => {
            assert_eq!((*index, *line, *column), (1, 1, 21));
            assert!(message.contains("Syntax error"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        err.to_string()
            .starts_with("model selection strategy 1 at 1:21: "),
        "{err}"
    );

    let err =
        Strategies::compile(&["ai.models\n  .filter(m, m.known &&)".to_string()]).unwrap_err();
    assert!(
        matches!(
            err,
            StrategyError::Parse {
                index: 0,
                line: 2,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn filter_by_provider() {
    assert_eq!(
        select(
            &["ai.models.filter(m, m.provider_id == 'openai')"],
            &none(),
            &none()
        ),
        Some(vec![0, 2])
    );
}

#[test]
fn filter_by_global_latency() {
    let global = with_latency(&[
        ("openai", "gpt-4o", 1500.0),
        ("anthropic", "claude-sonnet-4-5", 700.0),
        ("openai", "gpt-5-preview", 999.0),
        ("groq", "llama-3.1-8b-instant", 1000.0),
    ]);
    assert_eq!(
        select(
            &["ai.models.filter(m, m.metrics.global.latency.upstream_ms_avg < 1000)"],
            &none(),
            &global
        ),
        Some(vec![1, 2])
    );
}

#[test]
fn unmeasured_models_read_as_zero() {
    let global = with_latency(&[("openai", "gpt-4o", 1500.0)]);
    assert_eq!(
        select(
            &["ai.models.filter(m, m.metrics.global.latency.upstream_ms_avg < 1000)"],
            &none(),
            &global
        ),
        Some(vec![1, 2, 3])
    );
    assert_eq!(
        select(
            &["ai.models.filter(m, m.metrics.global.requests > 0)"],
            &none(),
            &global
        ),
        Some(vec![0])
    );
}

#[test]
fn filter_known() {
    assert_eq!(
        select(&["ai.models.filter(m, m.known)"], &none(), &none()),
        Some(vec![0, 1, 3])
    );
    assert_eq!(
        select(&["ai.models.filter(m, m.managed)"], &none(), &none()),
        Some(vec![0, 1, 2])
    );
}

#[test]
fn sort_by_local_latency() {
    let local = with_latency(&[
        ("openai", "gpt-4o", 900.0),
        ("anthropic", "claude-sonnet-4-5", 300.0),
        ("openai", "gpt-5-preview", 1200.0),
        ("groq", "llama-3.1-8b-instant", 80.0),
    ]);
    assert_eq!(
        select(
            &["ai.models.sortBy(m, m.metrics.local.latency.upstream_ms_avg)"],
            &local,
            &none()
        ),
        Some(vec![3, 1, 0, 2])
    );
    // Fastest first among the known models, slowest last.
    assert_eq!(
        select(
            &["ai.models.filter(m, m.known).sortBy(m, -m.metrics.local.latency.upstream_ms_p95)"],
            &local,
            &none()
        ),
        Some(vec![0, 1, 3])
    );
}

#[test]
fn random_keeps_every_model() {
    let s = compile(&["ai.models.random()"]);
    let mut seen = BTreeSet::new();
    for _ in 0..50 {
        let mut picked = s.select(&candidates(), &none(), &none()).unwrap();
        seen.insert(picked.clone());
        picked.sort_unstable();
        assert_eq!(picked, vec![0, 1, 2, 3]);
    }
    // Fifty shuffles of four that all come out the same would mean no shuffle at all.
    assert!(seen.len() > 1);
}

#[test]
fn the_first_strategy_that_returns_models_wins() {
    let strategies = [
        "ai.models.filter(m, m.provider_id == 'mistral')",
        "ai.models.filter(m, m.provider_id == 'anthropic')",
        "ai.models",
    ];
    assert_eq!(select(&strategies, &none(), &none()), Some(vec![1]));
    assert_eq!(
        select(&[strategies[0], strategies[2]], &none(), &none()),
        Some(vec![0, 1, 2, 3])
    );
    assert_eq!(select(&[strategies[0]], &none(), &none()), None);
}

#[test]
fn without_strategies_every_candidate_in_order() {
    assert_eq!(select(&[], &none(), &none()), Some(vec![0, 1, 2, 3]));
    assert_eq!(compile(&[]).select(&[], &none(), &none()), None);
}

#[test]
fn metrics_based_selection_follows_the_metrics() {
    let strategy = [
        "ai.models.filter(m, m.metrics.local.latency.upstream_ms_avg < 1000 && m.metrics.local.requests > 0)",
        "ai.models.filter(m, m.metrics.global.error_rate < 0.05 && m.metrics.global.requests > 0)",
    ];
    let s = compile(&strategy);
    let c = candidates();

    let local = ModelMetrics::new();
    local.record("openai", "gpt-4o", 400, true, 100);
    local.record("groq", "llama-3.1-8b-instant", 2500, true, 100);
    assert_eq!(s.select(&c, &local.snapshot(), &none()), Some(vec![0]));

    // gpt-4o slows down; groq speeds up.
    for _ in 0..10 {
        local.record("openai", "gpt-4o", 3000, true, 100);
        local.record("groq", "llama-3.1-8b-instant", 100, true, 100);
    }
    assert_eq!(s.select(&c, &local.snapshot(), &none()), Some(vec![3]));

    // Nothing is fast locally any more: the fleet's error rates decide.
    for _ in 0..100 {
        local.record("groq", "llama-3.1-8b-instant", 5000, true, 100);
    }
    let global = GlobalMetrics::new();
    assert_eq!(s.select(&c, &local.snapshot(), &global.load()), None);
    let view = |error_rate| MetricsView {
        error_rate,
        requests: 1000,
        ..MetricsView::default()
    };
    global.set(MetricsSnapshot::from([
        (("openai".into(), "gpt-4o".into()), view(0.20)),
        (("anthropic".into(), "claude-sonnet-4-5".into()), view(0.01)),
    ]));
    assert_eq!(
        s.select(&c, &local.snapshot(), &global.load()),
        Some(vec![1])
    );
    global.set(MetricsSnapshot::from([
        (("openai".into(), "gpt-4o".into()), view(0.01)),
        (("anthropic".into(), "claude-sonnet-4-5".into()), view(0.30)),
    ]));
    assert_eq!(
        s.select(&c, &local.snapshot(), &global.load()),
        Some(vec![0])
    );
}

#[test]
fn a_strategy_that_fails_is_skipped() {
    let strategies = [
        // No such field.
        "ai.models.filter(m, m.cost < 1)",
        // string + int.
        "ai.models.filter(m, m.provider_id + 1 == 2)",
        // Not a list of models.
        "size(ai.models) > 0",
        "ai.models.filter(m, !m.known)",
    ];
    assert_eq!(select(&strategies, &none(), &none()), Some(vec![2]));
    assert_eq!(select(&strategies[..3], &none(), &none()), None);
}

#[test]
fn strategies_choose_among_candidates_and_never_add_any() {
    assert_eq!(
        select(
            &["[{'id': 'evil:model'}] + ai.models.filter(m, m.provider_id == 'groq')"],
            &none(),
            &none()
        ),
        Some(vec![3])
    );
    assert_eq!(
        select(
            &["[{'id': 'evil:model'}]", "ai.models[1]"],
            &none(),
            &none()
        ),
        Some(vec![1])
    );
    // Each candidate once, at its first place.
    assert_eq!(
        select(
            &["ai.models.filter(m, m.provider_id == 'anthropic') + ai.models"],
            &none(),
            &none()
        ),
        Some(vec![1, 0, 2, 3])
    );
    // Ids work as well as models.
    assert_eq!(
        select(
            &["['groq:llama-3.1-8b-instant', 'openai:gpt-4o']"],
            &none(),
            &none()
        ),
        Some(vec![3, 0])
    );
}

#[test]
fn models_behave_as_ordinary_maps() {
    let cases: [(&str, Vec<usize>); 7] = [
        (
            "ai.models.filter(m, size(m) == 6 && has(m.metrics.local) && 'id' in m && type(m) == map)",
            vec![0, 1, 2, 3],
        ),
        ("ai.models.filter(m, m == ai.models[2])", vec![2]),
        (
            "ai.models.filter(m, m in ai.models.filter(x, !x.managed))",
            vec![3],
        ),
        (
            "ai.models.filter(m, m.id.startsWith('openai:'))",
            vec![0, 2],
        ),
        (
            "ai.models.filter(m, m.model_id.matches('^gpt-[0-9]'))",
            vec![0, 2],
        ),
        ("ai.models.reverse().distinct()", vec![3, 2, 1, 0]),
        ("[{'id': 'groq:llama-3.1-8b-instant'}]", vec![3]),
    ];
    for (strategy, expected) in cases {
        assert_eq!(
            select(&[strategy], &none(), &none()),
            Some(expected),
            "{strategy}"
        );
    }
}

#[test]
fn prepared_models_are_reused_until_a_snapshot_changes() {
    let s = compile(&["ai.models.filter(m, m.metrics.global.latency.upstream_ms_avg > 0)"]);
    let c = candidates();
    let local = ModelMetrics::new();
    let global = GlobalMetrics::new();
    let cache = PreparedCache::new();

    let local_snap = local.snapshot_cached(Duration::from_secs(1));
    let a = cache.get(&s, &c, &local_snap, &global.load());
    let b = cache.get(&s, &c, &local_snap, &global.load());
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(s.select_prepared(&a), None);
    assert_eq!(s.select_prepared(&a), None);

    global.set(with_latency(&[("anthropic", "claude-sonnet-4-5", 500.0)]));
    let d = cache.get(&s, &c, &local_snap, &global.load());
    assert!(!Arc::ptr_eq(&a, &d));
    assert_eq!(s.select_prepared(&d), Some(vec![1]));
    assert_eq!(d.candidates(), c.as_slice());

    // Another candidate list is another set of models.
    let e = cache.get(&s, &c[1..], &local_snap, &global.load());
    assert_eq!(s.select_prepared(&e), Some(vec![0]));
}

#[test]
fn auto_candidates_are_the_allowed_catalog_models_of_the_shape() {
    assert_eq!(AUTO_MODEL, "tally/auto");
    let config = GatewayConfig::default();
    let anthropic = auto_candidates(&config, ApiShape::Anthropic);
    let ids: Vec<String> = anthropic.iter().map(CandidateInfo::id).collect();
    assert_eq!(
        ids,
        [
            "anthropic:claude-sonnet-4-5",
            "anthropic:claude-haiku-4-5",
            "anthropic:claude-opus-4-1"
        ]
    );
    assert!(anthropic.iter().all(|c| c.known && c.managed));

    let openai_shaped = auto_candidates(&config, ApiShape::OpenAi);
    assert!(openai_shaped.iter().any(|c| c.provider == "groq"));
    assert!(openai_shaped.iter().all(|c| c.provider != "anthropic"));

    let config = GatewayConfig {
        only_allow_configured_providers: true,
        configured_providers: BTreeMap::from([(
            "openai".to_string(),
            BTreeSet::from(["gpt-4o-mini".to_string()]),
        )]),
        ..GatewayConfig::default()
    };
    let openai = auto_candidates(&config, ApiShape::OpenAi);
    assert!(openai.iter().all(|c| c.provider == "openai"));
    assert_eq!(openai.len(), 5);

    let config = GatewayConfig {
        only_allow_configured_models: true,
        ..config
    };
    let ids: Vec<String> = auto_candidates(&config, ApiShape::OpenAi)
        .iter()
        .map(CandidateInfo::id)
        .collect();
    assert_eq!(ids, ["openai:gpt-4o-mini"]);
}
