//! The numeric kinds every layer shares: element encodings ([`FloatKind`]), accumulator
//! precision ([`Accumulator`]) and the output dtype setting ([`OutDtype`]).
//!
//! Names are declared once (see [`crate::names`]) and parsed once, at the edge: the config,
//! the command line, and the state and `merge.json` files all go through the same table.

use crate::names::named_enum;
use safetensors::Dtype;

named_enum! {
    /// Which precision the running sums and one-shot merges use.
    pub enum Accumulator {
        /// f32: enough for bf16/f16 outputs (the default).
        F32 = "f32",
        /// f64: for f32/f64 outputs that must be as exact as possible.
        F64 = "f64",
    }
}

impl Accumulator {
    /// Bytes per accumulated element.
    pub fn size(self) -> usize {
        match self {
            Accumulator::F32 => 4,
            Accumulator::F64 => 8,
        }
    }
}

named_enum! {
    /// The dtype float tensors are written in.
    pub enum OutDtype {
        /// Keep each tensor's input dtype.
        Source = "source",
        /// bfloat16.
        Bf16 = "bf16",
        /// IEEE binary16.
        F16 = "f16",
        /// IEEE binary32.
        F32 = "f32",
    }
}

impl OutDtype {
    /// The float kind every float tensor is converted to, or `None` for `source`.
    pub fn float_kind(self) -> Option<FloatKind> {
        match self {
            OutDtype::Source => None,
            OutDtype::Bf16 => Some(FloatKind::BF16),
            OutDtype::F16 => Some(FloatKind::F16),
            OutDtype::F32 => Some(FloatKind::F32),
        }
    }

    /// The output kind of a float tensor stored as `input`.
    pub fn output_kind(self, input: FloatKind) -> FloatKind {
        self.float_kind().unwrap_or(input)
    }

    /// Whether averages of float tensors stored as `inputs` are written as f32 or f64: then
    /// an f32 accumulator cannot keep every element within 1e-6 of the exact mean (where the
    /// inputs cancel, its rounding errors are of the order of the inputs), and f64 is used.
    pub fn writes_wide(self, mut inputs: impl Iterator<Item = FloatKind>) -> bool {
        match self.float_kind() {
            Some(k) => k.is_wide(),
            None => inputs.any(FloatKind::is_wide),
        }
    }
}

/// Floating-point element encodings pmad can decode and encode.
///
/// Serialised (in the state manifest's accumulator layout) by variant name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FloatKind {
    /// IEEE binary64.
    F64,
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// OCP FP8 E4M3 ("fn": max 448, no infinities).
    F8E4M3,
    /// OCP FP8 E5M2.
    F8E5M2,
}

impl FloatKind {
    /// The float kind of a catalog tensor that is averaged; `None` for a tensor that is
    /// copied (not floating-point, or not selected).
    pub fn of_tensor(t: &crate::format::Tensor) -> Option<FloatKind> {
        if t.average {
            FloatKind::of(t.dtype)
        } else {
            None
        }
    }

    /// The float kind of a safetensors dtype, or `None` for integer, bool and unsupported
    /// float encodings.
    pub fn of(dtype: Dtype) -> Option<FloatKind> {
        match dtype {
            Dtype::F64 => Some(FloatKind::F64),
            Dtype::F32 => Some(FloatKind::F32),
            Dtype::F16 => Some(FloatKind::F16),
            Dtype::BF16 => Some(FloatKind::BF16),
            Dtype::F8_E4M3 => Some(FloatKind::F8E4M3),
            Dtype::F8_E5M2 => Some(FloatKind::F8E5M2),
            _ => None,
        }
    }

    /// The safetensors dtype for this kind.
    pub fn dtype(self) -> Dtype {
        match self {
            FloatKind::F64 => Dtype::F64,
            FloatKind::F32 => Dtype::F32,
            FloatKind::F16 => Dtype::F16,
            FloatKind::BF16 => Dtype::BF16,
            FloatKind::F8E4M3 => Dtype::F8_E4M3,
            FloatKind::F8E5M2 => Dtype::F8_E5M2,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatKind::F64 => 8,
            FloatKind::F32 => 4,
            FloatKind::F16 | FloatKind::BF16 => 2,
            FloatKind::F8E4M3 | FloatKind::F8E5M2 => 1,
        }
    }

    /// Whether an accumulator for this output kind must be f64 to stay within 1e-6 of a
    /// one-shot merge (f32 and f64 outputs).
    pub fn is_wide(self) -> bool {
        matches!(self, FloatKind::F32 | FloatKind::F64)
    }
}

/// Whether a dtype is a float encoding pmad refuses to average (rather than copy).
pub fn is_unsupported_float(dtype: Dtype) -> bool {
    matches!(
        dtype,
        Dtype::F8_E8M0
            | Dtype::F8_E4M3FNUZ
            | Dtype::F8_E5M2FNUZ
            | Dtype::F4
            | Dtype::F6_E2M3
            | Dtype::F6_E3M2
            | Dtype::C64
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_dtype_names_and_kinds() {
        assert_eq!(OutDtype::one_of(), "source, bf16, f16, f32");
        assert_eq!(OutDtype::Bf16.float_kind(), Some(FloatKind::BF16));
        assert_eq!(OutDtype::Source.output_kind(FloatKind::F16), FloatKind::F16);
        assert_eq!(OutDtype::F32.output_kind(FloatKind::BF16), FloatKind::F32);
        assert_eq!(
            "f8".parse::<OutDtype>().unwrap_err(),
            "\"f8\" is not one of source, bf16, f16, f32"
        );
        // The state manifest and merge.json store the names, and refuse unknown ones
        // instead of reading them as a default.
        assert_eq!(serde_json::to_string(&Accumulator::F64).unwrap(), "\"f64\"");
        assert!(serde_json::from_str::<Accumulator>("\"f16\"").is_err());
    }
}
