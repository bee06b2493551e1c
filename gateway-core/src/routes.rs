//! Routes: logical model names of an account that resolve to an ordered fallback chain
//! (priority 0, 1, ...) or to a weighted traffic split, for example between a BYOK-hosted and a
//! platform-managed model. A route is applied before credential selection; a target may pin
//! the credential kind, so "BYOK primary, platform secondary" is expressible even under the
//! strict BYOK failure policy.

use serde::{Deserialize, Serialize};

/// Targets per route at most.
pub const MAX_ROUTE_TARGETS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteMode {
    /// Targets tried in ascending priority.
    Fallback,
    /// One target chosen by weight; the others follow as fallbacks, heaviest first.
    Split,
}

impl RouteMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteMode::Fallback => "fallback",
            RouteMode::Split => "split",
        }
    }
    pub fn parse(s: &str) -> Option<RouteMode> {
        match s {
            "fallback" => Some(RouteMode::Fallback),
            "split" => Some(RouteMode::Split),
            _ => None,
        }
    }
}

/// Which credentials a target may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialChoice {
    /// The usual lookup: attached, then BYOK, then managed.
    #[default]
    Any,
    /// The customer's own keys only (attached or BYOK).
    Byok,
    /// The platform's keys only, paid from credits.
    Managed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTarget {
    /// `provider:model`.
    pub model: String,
    #[serde(default)]
    pub credential: CredentialChoice,
    #[serde(default)]
    pub priority: u32,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub mode: RouteMode,
    pub targets: Vec<RouteTarget>,
}

impl Route {
    /// Checks a route as an operator or customer wrote it; the error names the rule.
    pub fn validate(&self, name: &str) -> Result<(), String> {
        if name.is_empty() || name.len() > 128 || name.contains(':') || name.contains('/') {
            return Err("route names are 1 to 128 characters without ':' or '/'".into());
        }
        if self.targets.is_empty() || self.targets.len() > MAX_ROUTE_TARGETS {
            return Err(format!("a route has 1 to {MAX_ROUTE_TARGETS} targets"));
        }
        for t in &self.targets {
            match t.model.split_once(':') {
                Some((p, m)) if !p.is_empty() && !m.is_empty() => {}
                _ => return Err(format!("target '{}' is not provider:model", t.model)),
            }
        }
        match self.mode {
            RouteMode::Split if self.targets.iter().any(|t| t.weight == 0) => {
                Err("split weights must be positive".into())
            }
            RouteMode::Fallback => {
                let mut p: Vec<u32> = self.targets.iter().map(|t| t.priority).collect();
                p.sort_unstable();
                p.dedup();
                if p.len() != self.targets.len() {
                    return Err("fallback priorities must be distinct".into());
                }
                Ok(())
            }
            RouteMode::Split => Ok(()),
        }
    }

    /// The targets in the order to try. `roll` is uniform in `[0, 1)`, drawn by the caller so
    /// the choice is testable.
    pub fn order(&self, roll: f64) -> Vec<&RouteTarget> {
        let mut targets: Vec<&RouteTarget> = self.targets.iter().collect();
        match self.mode {
            RouteMode::Fallback => targets.sort_by_key(|t| t.priority),
            RouteMode::Split => {
                targets.sort_by_key(|t| std::cmp::Reverse(t.weight));
                let total: u64 = targets.iter().map(|t| u64::from(t.weight)).sum();
                // Weights are small integers; the float only picks a slot among them.
                let mut point = (roll.clamp(0.0, 0.999_999) * total as f64) as u64;
                let mut chosen = 0;
                for (i, t) in targets.iter().enumerate() {
                    if point < u64::from(t.weight) {
                        chosen = i;
                        break;
                    }
                    point -= u64::from(t.weight);
                }
                let first = targets.remove(chosen);
                targets.insert(0, first);
            }
        }
        targets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(
        model: &str,
        credential: CredentialChoice,
        priority: u32,
        weight: u32,
    ) -> RouteTarget {
        RouteTarget {
            model: model.into(),
            credential,
            priority,
            weight,
        }
    }

    #[test]
    fn fallback_orders_by_priority() {
        let r = Route {
            mode: RouteMode::Fallback,
            targets: vec![
                target("openai:gpt-4o", CredentialChoice::Managed, 1, 1),
                target("anthropic:claude-sonnet-4-5", CredentialChoice::Byok, 0, 1),
            ],
        };
        r.validate("smart").unwrap();
        let order: Vec<&str> = r.order(0.7).iter().map(|t| t.model.as_str()).collect();
        assert_eq!(order, ["anthropic:claude-sonnet-4-5", "openai:gpt-4o"]);
    }

    #[test]
    fn split_picks_by_weight_and_keeps_the_rest_as_fallbacks() {
        let r = Route {
            mode: RouteMode::Split,
            targets: vec![
                target("a:x", CredentialChoice::Byok, 0, 3),
                target("b:y", CredentialChoice::Managed, 0, 1),
            ],
        };
        r.validate("split").unwrap();
        assert_eq!(r.order(0.0)[0].model, "a:x");
        assert_eq!(r.order(0.74)[0].model, "a:x");
        assert_eq!(r.order(0.75)[0].model, "b:y");
        assert_eq!(r.order(0.99)[1].model, "a:x");
    }

    #[test]
    fn invalid_routes_are_named() {
        let bad = Route {
            mode: RouteMode::Fallback,
            targets: vec![],
        };
        assert!(bad.validate("x").is_err());
        let dup = Route {
            mode: RouteMode::Fallback,
            targets: vec![
                target("a:x", CredentialChoice::Any, 0, 1),
                target("b:y", CredentialChoice::Any, 0, 1),
            ],
        };
        assert!(dup.validate("x").unwrap_err().contains("distinct"));
        let ok = Route {
            mode: RouteMode::Split,
            targets: vec![target("a:x", CredentialChoice::Any, 0, 1)],
        };
        assert!(ok.validate("has:colon").is_err());
        assert!(
            Route {
                mode: RouteMode::Split,
                targets: vec![target("nocolon", CredentialChoice::Any, 0, 1)]
            }
            .validate("x")
            .is_err()
        );
    }
}
