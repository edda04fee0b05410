//! One name table per closed set of names.
//!
//! Every enum users spell out (in the config file, on the command line, in `merge.json` or the
//! state manifest) is declared with `named_enum!`: the variants and their names are written
//! once, and parsing (`FromStr`, serde, clap) and printing (`name`, `Display`, serde) all read
//! that one table. A name is parsed once, at the edge; inside pmad only the enum travels, so
//! there is no string round-trip and no silent fallback: an unknown name is an error that lists
//! the accepted ones.

/// Declare a fieldless enum together with its name table.
///
/// ```ignore
/// named_enum! {
///     /// Doc of the enum.
///     pub enum Mode {
///         /// Doc of the variant.
///         Auto = "auto",
///         Poll = "poll",
///     }
/// }
/// ```
/// generates the enum (Debug, Clone, Copy, PartialEq, Eq, Hash), `Mode::ALL` (the table),
/// `name()`, `from_name()`, `one_of()` (for messages), `Display`, `FromStr` (the error says
/// `"x" is not one of auto, poll`), serde `Serialize`/`Deserialize` as the name, and
/// `clap::ValueEnum`.
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $ty:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $name:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $ty {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $ty {
            /// Every value and its name: the one table both directions are read from.
            pub const ALL: &'static [($ty, &'static str)] = &[$(($ty::$variant, $name)),+];

            /// The name users write.
            pub fn name(self) -> &'static str {
                match self {
                    $( $ty::$variant => $name ),+
                }
            }

            /// The value of a name, if it is one.
            pub fn from_name(s: &str) -> Option<Self> {
                Self::ALL.iter().find(|(_, n)| *n == s).map(|(v, _)| *v)
            }

            /// The accepted names, for messages: `a, b, c`.
            pub fn one_of() -> String {
                Self::ALL.iter().map(|(_, n)| *n).collect::<Vec<_>>().join(", ")
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::from_name(s)
                    .ok_or_else(|| format!("{s:?} is not one of {}", Self::one_of()))
            }
        }

        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        impl clap::ValueEnum for $ty {
            fn value_variants<'a>() -> &'a [Self] {
                &[$($ty::$variant),+]
            }
            fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
                Some(clap::builder::PossibleValue::new(self.name()))
            }
        }
    };
}

pub(crate) use named_enum;

#[cfg(test)]
mod tests {
    named_enum! {
        /// A test enum.
        pub enum Colour {
            /// Red.
            Red = "red",
            /// Dark blue.
            DarkBlue = "dark-blue",
        }
    }

    #[test]
    fn one_table_both_ways() {
        for (v, n) in Colour::ALL {
            assert_eq!(v.name(), *n);
            assert_eq!(Colour::from_name(n), Some(*v));
            assert_eq!(n.parse::<Colour>(), Ok(*v));
            let json = serde_json::to_string(v).unwrap();
            assert_eq!(json, format!("{n:?}"));
            assert_eq!(serde_json::from_str::<Colour>(&json).unwrap(), *v);
        }
        assert_eq!(
            "green".parse::<Colour>().unwrap_err(),
            "\"green\" is not one of red, dark-blue"
        );
        assert!(serde_json::from_str::<Colour>("\"green\"").is_err());
        assert_eq!(Colour::DarkBlue.to_string(), "dark-blue");
    }
}
