//! Averaging methods and the weights they give each checkpoint.
//!
//! The home of a recipe kind's math: its name ([`MethodKind`]), its parameters ([`Method`]) and
//! its weights. How the daemon keeps each kind up to date incrementally is in
//! [`crate::math::incremental`]. Invariant: weights are computed in f64, are non-negative and
//! sum to 1 (oldest checkpoint first).

use crate::names::named_enum;

named_enum! {
    /// The name of an averaging method, as written in configs, on the command line and in
    /// `merge.json`.
    pub enum MethodKind {
        /// Simple moving average.
        Sma = "sma",
        /// Linearly weighted moving average.
        Wma = "wma",
        /// Exponential moving average.
        Ema = "ema",
        /// Explicit weights.
        Weights = "weights",
    }
}

/// How checkpoints are weighted (oldest = 1, newest = N).
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// Simple moving average: 1/N each.
    Sma,
    /// Linearly weighted: i / (N(N+1)/2).
    Wma,
    /// Exponential: e_1 = x_1, e_k = alpha x_k + (1 - alpha) e_{k-1}.
    Ema {
        /// Weight of the newest checkpoint, in (0, 1].
        alpha: f64,
    },
    /// Explicit weights, oldest first, renormalised to sum to 1.
    Weights(Vec<f64>),
}

impl Method {
    /// Which method this is.
    pub fn kind(&self) -> MethodKind {
        match self {
            Method::Sma => MethodKind::Sma,
            Method::Wma => MethodKind::Wma,
            Method::Ema { .. } => MethodKind::Ema,
            Method::Weights(_) => MethodKind::Weights,
        }
    }

    /// The method's name as used on the command line and in merge.json.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// The EMA's alpha, for methods that have one.
    pub fn alpha(&self) -> Option<f64> {
        match self {
            Method::Ema { alpha } => Some(*alpha),
            _ => None,
        }
    }

    /// Weights for `n` checkpoints, oldest first, summing to 1.
    pub fn weights(&self, n: usize) -> Result<Vec<f64>, String> {
        if n == 0 {
            return Err("no checkpoints to merge".into());
        }
        let w = match self {
            Method::Sma => vec![1.0 / n as f64; n],
            Method::Wma => {
                let total = (n * (n + 1)) as f64 / 2.0;
                (1..=n).map(|i| i as f64 / total).collect()
            }
            Method::Ema { alpha } => {
                let a = *alpha;
                if !(a > 0.0 && a <= 1.0) {
                    return Err(format!("alpha must be in (0, 1], got {a}"));
                }
                // e_1 = x_1 gives the oldest weight (1-a)^(n-1); the k-th (k >= 2) gets
                // a (1-a)^(n-k). These sum to 1 exactly in real arithmetic.
                (1..=n)
                    .map(|k| {
                        if k == 1 {
                            (1.0 - a).powi((n - 1) as i32)
                        } else {
                            a * (1.0 - a).powi((n - k) as i32)
                        }
                    })
                    .collect()
            }
            Method::Weights(given) => {
                if given.len() != n {
                    return Err(format!(
                        "{} weights given for {} checkpoints; give one weight per checkpoint",
                        given.len(),
                        n
                    ));
                }
                if let Some(bad) = given.iter().find(|w| !(w.is_finite() && **w >= 0.0)) {
                    return Err(format!("weights must be finite and >= 0, got {bad}"));
                }
                given.clone()
            }
        };
        normalise(w)
    }
}

fn normalise(w: Vec<f64>) -> Result<Vec<f64>, String> {
    let sum: f64 = w.iter().sum();
    if !(sum > 0.0 && sum.is_finite()) {
        return Err(format!("weights must have a positive sum, got {sum}"));
    }
    Ok(w.into_iter().map(|x| x / sum).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn weights_match_design() {
        assert_eq!(Method::Sma.weights(4).unwrap(), vec![0.25; 4]);
        let w = Method::Wma.weights(3).unwrap();
        assert_eq!(w, vec![1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]);
        let e = Method::Ema { alpha: 0.2 }.weights(3).unwrap();
        // e_3 = .2 x3 + .8 (.2 x2 + .8 x1)
        let expect = [0.64, 0.16, 0.2];
        for (a, b) in e.iter().zip(expect) {
            assert!((a - b).abs() < 1e-15);
        }
        let g = Method::Weights(vec![1.0, 3.0]).weights(2).unwrap();
        assert_eq!(g, vec![0.25, 0.75]);
        assert!(Method::Weights(vec![1.0]).weights(2).is_err());
        assert!(Method::Weights(vec![-1.0, 2.0]).weights(2).is_err());
        assert!(Method::Weights(vec![0.0, 0.0]).weights(2).is_err());
        assert!(Method::Ema { alpha: 0.0 }.weights(2).is_err());
        assert!(Method::Sma.weights(0).is_err());
    }

    #[test]
    fn kinds_and_names_agree() {
        for m in [
            Method::Sma,
            Method::Wma,
            Method::Ema { alpha: 0.5 },
            Method::Weights(vec![1.0]),
        ] {
            assert_eq!(MethodKind::from_name(m.name()), Some(m.kind()));
        }
        assert_eq!(MethodKind::one_of(), "sma, wma, ema, weights");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn weights_sum_to_one(n in 1usize..64, alpha in 0.01f64..1.0,
                              given in proptest::collection::vec(0.0f64..10.0, 64)) {
            let mut given = given[..n].to_vec();
            given[0] += 0.5; // positive sum
            for m in [Method::Sma, Method::Wma, Method::Ema { alpha }, Method::Weights(given)] {
                let w = m.weights(n).unwrap();
                prop_assert_eq!(w.len(), n);
                prop_assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
                prop_assert!(w.iter().all(|x| *x >= 0.0));
            }
        }
    }
}
