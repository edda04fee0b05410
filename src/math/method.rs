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
        /// Weights that emulate a learning-rate decay over the window.
        Schedule = "schedule",
    }
}

named_enum! {
    /// The shape of the learning-rate decay a `schedule` recipe emulates: the LR multiplier
    /// f(x) at fraction x of the decay, f(0) = 1.
    pub enum Shape {
        /// f(x) = 1 − x (the weights are the plain SMA's).
        Linear = "linear",
        /// f(x) = (1 + cos(πx)) / 2.
        Cosine = "cosine",
        /// f(x) = 1 − √x ("1-sqrt").
        MinusSqrt = "minus_sqrt",
    }
}

impl Shape {
    /// The LR multiplier at fraction `x` of the decay.
    pub fn lr(self, x: f64) -> f64 {
        match self {
            Shape::Linear => 1.0 - x,
            Shape::Cosine => (1.0 + (std::f64::consts::PI * x).cos()) / 2.0,
            Shape::MinusSqrt => 1.0 - x.sqrt(),
        }
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
    /// Weights that emulate a learning-rate decay of `shape`, down to `final_lr_ratio` of the
    /// constant LR, over the checkpoints averaged (see [`Method::weights`]).
    Schedule {
        /// The decay's shape.
        shape: Shape,
        /// The LR multiplier at the end of the decay, in [0, 1].
        final_lr_ratio: f64,
    },
}

impl Method {
    /// Which method this is.
    pub fn kind(&self) -> MethodKind {
        match self {
            Method::Sma => MethodKind::Sma,
            Method::Wma => MethodKind::Wma,
            Method::Ema { .. } => MethodKind::Ema,
            Method::Weights(_) => MethodKind::Weights,
            Method::Schedule { .. } => MethodKind::Schedule,
        }
    }

    /// The method's name as used on the command line and in merge.json.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// The decay shape and final LR ratio, for `schedule`.
    pub fn schedule(&self) -> Option<(Shape, f64)> {
        match self {
            Method::Schedule {
                shape,
                final_lr_ratio,
            } => Some((*shape, *final_lr_ratio)),
            _ => None,
        }
    }

    /// The EMA's alpha, for methods that have one.
    pub fn alpha(&self) -> Option<f64> {
        match self {
            Method::Ema { alpha } => Some(*alpha),
            _ => None,
        }
    }

    /// Weights for `n` checkpoints, oldest first, summing to 1.
    ///
    /// `schedule`: averaging checkpoints θ_0..θ_{n−1} (0 = oldest, taken at equal intervals)
    /// with weights c_j equals continuing from θ_0 with the learning rate scaled, for the
    /// updates between θ_i and θ_{i+1}, by w_i = Σ_{j≥i} c_j. Emulating a decay f therefore
    /// means w_i = f(i/n), i.e. c_j = f(j/n) − f((j+1)/n) for j < n−1 and c_{n−1} = f((n−1)/n),
    /// with f floored at the final LR ratio r as r + (1 − r) f. For `minus_sqrt` and n = 10
    /// the oldest checkpoint gets √0.1 = 0.316 and the newest 1 − √0.9 = 0.051: each weight is
    /// the drop of the emulated LR at that checkpoint, and 1 − √x drops fastest at its start.
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
            Method::Schedule {
                shape,
                final_lr_ratio: r,
            } => {
                if !(0.0..=1.0).contains(r) {
                    return Err(format!("final_lr_ratio must be in [0, 1], got {r}"));
                }
                let f = |j: usize| r + (1.0 - r) * shape.lr(j as f64 / n as f64);
                (0..n)
                    .map(|j| if j + 1 < n { f(j) - f(j + 1) } else { f(j) })
                    .collect()
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
    fn schedule_weights_follow_the_closed_forms() {
        let sched = |shape, r| Method::Schedule {
            shape,
            final_lr_ratio: r,
        };
        let close = |a: &[f64], b: &[f64]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12)
        };
        for n in [1, 2, 3, 10, 64] {
            // linear: the plain SMA.
            let w = sched(Shape::Linear, 0.0).weights(n).unwrap();
            assert!(close(&w, &Method::Sma.weights(n).unwrap()), "{w:?}");
            // minus_sqrt: c_j = sqrt((j+1)/n) - sqrt(j/n), the last 1 - sqrt((n-1)/n).
            let w = sched(Shape::MinusSqrt, 0.0).weights(n).unwrap();
            let want: Vec<f64> = (0..n)
                .map(|j| {
                    let (a, b) = (j as f64 / n as f64, (j + 1) as f64 / n as f64);
                    if j + 1 < n {
                        b.sqrt() - a.sqrt()
                    } else {
                        1.0 - a.sqrt()
                    }
                })
                .collect();
            assert!(close(&w, &want), "n={n}: {w:?}");
            // cosine: c_j = (cos(pi j/n) - cos(pi (j+1)/n)) / 2, the last (1 + cos(pi (n-1)/n)) / 2.
            let w = sched(Shape::Cosine, 0.0).weights(n).unwrap();
            let pi = std::f64::consts::PI;
            let want: Vec<f64> = (0..n)
                .map(|j| {
                    let (a, b) = (j as f64 / n as f64, (j + 1) as f64 / n as f64);
                    if j + 1 < n {
                        ((pi * a).cos() - (pi * b).cos()) / 2.0
                    } else {
                        (1.0 + (pi * a).cos()) / 2.0
                    }
                })
                .collect();
            assert!(close(&w, &want), "n={n}: {w:?}");
            // A final LR ratio r scales every weight by 1 - r and gives the newest r more.
            let r = 0.1;
            let w = sched(Shape::MinusSqrt, r).weights(n).unwrap();
            let mut want: Vec<f64> = sched(Shape::MinusSqrt, 0.0)
                .weights(n)
                .unwrap()
                .iter()
                .map(|c| c * (1.0 - r))
                .collect();
            want[n - 1] += r;
            assert!(close(&w, &want), "n={n}: {w:?}");
        }
        // The README's example: n = 10 minus_sqrt, the oldest gets the most.
        let w = sched(Shape::MinusSqrt, 0.0).weights(10).unwrap();
        assert!((w[0] - 0.1f64.sqrt()).abs() < 1e-12 && (w[0] - 0.316).abs() < 1e-3);
        assert!((w[9] - 0.051).abs() < 1e-3);
        assert!(w.windows(2).all(|p| p[0] > p[1]), "decreasing: {w:?}");
        // Cosine weights are bell-shaped: small at both ends.
        let w = sched(Shape::Cosine, 0.0).weights(10).unwrap();
        assert!(w[0] < w[4] && w[9] < w[5], "{w:?}");
        assert!(sched(Shape::Linear, 1.5).weights(3).is_err());
        assert!(sched(Shape::Linear, f64::NAN).weights(3).is_err());
        // r = 1 (no decay at all) puts everything on the newest checkpoint.
        assert_eq!(
            sched(Shape::Cosine, 1.0).weights(3).unwrap(),
            [0.0, 0.0, 1.0]
        );
    }

    #[test]
    fn kinds_and_names_agree() {
        for m in [
            Method::Sma,
            Method::Wma,
            Method::Ema { alpha: 0.5 },
            Method::Weights(vec![1.0]),
            Method::Schedule {
                shape: Shape::Cosine,
                final_lr_ratio: 0.0,
            },
        ] {
            assert_eq!(MethodKind::from_name(m.name()), Some(m.kind()));
        }
        assert_eq!(MethodKind::one_of(), "sma, wma, ema, weights, schedule");
        assert_eq!(Shape::one_of(), "linear, cosine, minus_sqrt");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn weights_sum_to_one(n in 1usize..64, alpha in 0.01f64..1.0,
                              given in proptest::collection::vec(0.0f64..10.0, 64)) {
            let mut given = given[..n].to_vec();
            given[0] += 0.5; // positive sum
            let shapes = [Shape::Linear, Shape::Cosine, Shape::MinusSqrt];
            let schedule = Method::Schedule { shape: shapes[n % 3], final_lr_ratio: alpha - 0.01 };
            for m in [Method::Sma, Method::Wma, Method::Ema { alpha }, Method::Weights(given), schedule] {
                let w = m.weights(n).unwrap();
                prop_assert_eq!(w.len(), n);
                prop_assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
                prop_assert!(w.iter().all(|x| *x >= 0.0));
            }
        }
    }
}
