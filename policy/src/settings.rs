//! Policy settings: `--param key=value` strings, checked and parsed.
//!
//! Every policy declares its keys in a table of [`SettingDoc`] (key, default,
//! meaning), which [`describe`](crate::describe) hands to the CLI and which
//! [`Settings::new`] checks the given keys against: an unknown key is a
//! [`PolicyError::UnknownSetting`], a value that does not parse is a
//! [`PolicyError::BadSetting`] naming the reason. Value syntax:
//!
//! | kind | accepted | example |
//! |---|---|---|
//! | fraction | a decimal in 0..=1, or a percentage | `0.5`, `50%`, `12.5%` |
//! | duration | whole milliseconds, optional `ms` suffix | `1000`, `1000ms` |
//! | seconds | a non-negative decimal, optional `s` suffix | `40`, `2.5s` |
//! | count | a non-negative integer | `29` |
//! | factor | a non-negative decimal | `3`, `2.5` |
//! | switch | `on`/`off`, `true`/`false`, `yes`/`no`, `1`/`0` | `off` |
//!
//! Surrounding whitespace is ignored; nothing else is (`50 %` is refused).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::{PolicyError, PolicyParams};

/// One setting a policy accepts, for help texts and error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettingDoc {
    /// The key, as given to `--param key=value`.
    pub key: &'static str,
    /// The default value, in the syntax the key accepts.
    pub default: &'static str,
    /// What the setting does, one line.
    pub meaning: &'static str,
}

/// The settings given to one policy, checked against its [`SettingDoc`]s.
pub(crate) struct Settings<'a> {
    policy: &'static str,
    values: &'a BTreeMap<String, String>,
}

impl<'a> Settings<'a> {
    /// Check that every key of `params.settings` is one of `docs`.
    pub(crate) fn new(
        policy: &'static str,
        docs: &[SettingDoc],
        params: &'a PolicyParams,
    ) -> Result<Self, PolicyError> {
        if let Some(key) = params
            .settings
            .keys()
            .find(|k| !docs.iter().any(|d| d.key == k.as_str()))
        {
            let known = if docs.is_empty() {
                "none".to_string()
            } else {
                docs.iter().map(|d| d.key).collect::<Vec<_>>().join(", ")
            };
            return Err(PolicyError::UnknownSetting {
                policy: policy.to_string(),
                key: key.clone(),
                known,
            });
        }
        Ok(Self {
            policy,
            values: &params.settings,
        })
    }

    /// Parse `key` with `parse`, or return `default` when it is not given.
    fn get<T>(
        &self,
        key: &str,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, PolicyError> {
        let Some(value) = self.values.get(key) else {
            return Ok(default);
        };
        parse(value.trim()).map_err(|reason| PolicyError::BadSetting {
            policy: self.policy.to_string(),
            key: key.to_string(),
            value: value.clone(),
            reason,
        })
    }

    /// A fraction within `[min, max]` (both within 0..=1).
    pub(crate) fn fraction(
        &self,
        key: &str,
        default: f64,
        min: f64,
        max: f64,
    ) -> Result<f64, PolicyError> {
        self.get(key, default, |s| {
            let f = parse_fraction(s)?;
            if f < min || f > max {
                return Err(format!(
                    "must be between {} and {}",
                    percent(min),
                    percent(max)
                ));
            }
            Ok(f)
        })
    }

    /// A whole number of milliseconds.
    pub(crate) fn millis(&self, key: &str, default: Duration) -> Result<Duration, PolicyError> {
        self.get(key, default, |s| {
            let digits = s.strip_suffix("ms").unwrap_or(s);
            parse_count(digits).map(Duration::from_millis)
        })
    }

    /// A non-negative integer that fits a `u32`.
    pub(crate) fn count_u32(&self, key: &str, default: u32) -> Result<u32, PolicyError> {
        self.get(key, default, |s| {
            u32::try_from(parse_count(s)?).map_err(|_| format!("must be at most {}", u32::MAX))
        })
    }

    /// A non-negative integer that fits a `u32` and is at least `min`.
    pub(crate) fn count_at_least(
        &self,
        key: &str,
        default: u32,
        min: u32,
    ) -> Result<u32, PolicyError> {
        self.get(key, default, |s| {
            let n = u32::try_from(parse_count(s)?)
                .map_err(|_| format!("must be at most {}", u32::MAX))?;
            if n < min {
                return Err(format!("must be at least {min}"));
            }
            Ok(n)
        })
    }

    /// A non-negative integer.
    pub(crate) fn count_u64(&self, key: &str, default: u64) -> Result<u64, PolicyError> {
        self.get(key, default, parse_count)
    }

    /// A non-negative finite decimal.
    pub(crate) fn factor(&self, key: &str, default: f64) -> Result<f64, PolicyError> {
        self.get(key, default, parse_factor)
    }

    /// A non-negative number of seconds (decimal, optional `s` suffix).
    pub(crate) fn seconds(&self, key: &str, default: Duration) -> Result<Duration, PolicyError> {
        self.get(key, default, |s| {
            let number = s.strip_suffix('s').unwrap_or(s);
            Duration::try_from_secs_f64(parse_decimal(number)?)
                .map_err(|_| "too many seconds".to_string())
        })
    }

    /// An on/off switch.
    pub(crate) fn switch(&self, key: &str, default: bool) -> Result<bool, PolicyError> {
        self.get(key, default, parse_switch)
    }
}

/// `0.5` or `50%` → 0.5; anything outside 0..=1 is refused.
pub(crate) fn parse_fraction(s: &str) -> Result<f64, String> {
    let (number, scale) = match s.strip_suffix('%') {
        Some(n) => (n, 100.0),
        None => (s, 1.0),
    };
    let f = parse_decimal(number)? / scale;
    if f > 1.0 {
        return Err(if scale == 1.0 {
            "a fraction is between 0 and 1 (or write a percentage: 50%)".to_string()
        } else {
            "a percentage is at most 100%".to_string()
        });
    }
    Ok(f)
}

/// A non-negative integer, digits only.
pub(crate) fn parse_count(s: &str) -> Result<u64, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err("expected a non-negative integer".to_string());
    }
    s.parse::<u64>()
        .map_err(|_| format!("must be at most {}", u64::MAX))
}

/// A non-negative finite decimal number.
pub(crate) fn parse_factor(s: &str) -> Result<f64, String> {
    parse_decimal(s)
}

/// `on`/`off` and the usual synonyms.
pub(crate) fn parse_switch(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err("expected on or off".to_string()),
    }
}

/// Digits with at most one decimal point; no sign, exponent, `inf` or `NaN`.
fn parse_decimal(s: &str) -> Result<f64, String> {
    let digits = s.bytes().filter(u8::is_ascii_digit).count();
    let points = s.bytes().filter(|&b| b == b'.').count();
    if digits == 0 || points > 1 || digits + points != s.len() {
        return Err("expected a non-negative decimal number".to_string());
    }
    s.parse::<f64>()
        .map_err(|_| "expected a non-negative decimal number".to_string())
}

/// 0.99 → "99%", for error messages.
fn percent(f: f64) -> String {
    format!("{}%", (f * 1e4).round() / 1e2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions() {
        let cases: &[(&str, Option<f64>)] = &[
            ("0.5", Some(0.5)),
            ("50%", Some(0.5)),
            ("12.5%", Some(0.125)),
            ("0", Some(0.0)),
            ("1", Some(1.0)),
            ("100%", Some(1.0)),
            (".25", Some(0.25)),
            ("0%", Some(0.0)),
            ("50", None),
            ("101%", None),
            ("1.5", None),
            ("-0.1", None),
            ("", None),
            ("%", None),
            ("50 %", None),
            ("0.5.1", None),
            ("NaN", None),
            ("inf", None),
            ("1e-1", None),
        ];
        for &(s, want) in cases {
            assert_eq!(parse_fraction(s).ok(), want, "{s:?}");
        }
    }

    #[test]
    fn counts_factors_switches() {
        assert_eq!(parse_count("29"), Ok(29));
        assert_eq!(parse_count("0"), Ok(0));
        for bad in ["", "-1", "+1", "1.0", "2x", "99999999999999999999"] {
            assert!(parse_count(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_factor("3"), Ok(3.0));
        assert_eq!(parse_factor("2.5"), Ok(2.5));
        for bad in ["", "-3", "3x", "inf", "."] {
            assert!(parse_factor(bad).is_err(), "{bad:?}");
        }
        for on in ["on", "ON", "true", "yes", "1"] {
            assert_eq!(parse_switch(on), Ok(true), "{on}");
        }
        for off in ["off", "False", "no", "0"] {
            assert_eq!(parse_switch(off), Ok(false), "{off}");
        }
        assert!(parse_switch("maybe").is_err());
    }

    #[test]
    fn typed_getters() {
        let docs = [SettingDoc {
            key: "k",
            default: "",
            meaning: "",
        }];
        let with = |v: &str| PolicyParams {
            settings: [("k".to_string(), v.to_string())].into(),
            ..Default::default()
        };
        let p = with(" 1500ms ");
        let s = Settings::new("t", &docs, &p).unwrap();
        assert_eq!(
            s.millis("k", Duration::ZERO),
            Ok(Duration::from_millis(1500))
        );
        let p = with("1500");
        let s = Settings::new("t", &docs, &p).unwrap();
        assert_eq!(
            s.millis("k", Duration::ZERO),
            Ok(Duration::from_millis(1500))
        );
        assert_eq!(s.count_u32("k", 0), Ok(1500));
        assert_eq!(s.count_u64("k", 0), Ok(1500));
        assert!(s.count_at_least("k", 0, 1501).is_err());
        assert!(s.fraction("k", 0.0, 0.0, 1.0).is_err());
        let p = with("5000000000");
        let s = Settings::new("t", &docs, &p).unwrap();
        assert!(s.count_u32("k", 0).is_err());
        let p = with("100%");
        let s = Settings::new("t", &docs, &p).unwrap();
        let err = s.fraction("k", 0.0, 0.01, 0.99).unwrap_err();
        assert!(
            matches!(&err, PolicyError::BadSetting { policy, key, value, reason }
                if policy == "t" && key == "k" && value == "100%"
                    && reason == "must be between 1% and 99%"),
            "{err:?}"
        );
        // Absent keys give the default.
        let empty = PolicyParams::default();
        let s = Settings::new("t", &docs, &empty).unwrap();
        assert_eq!(s.fraction("k", 0.25, 0.0, 1.0), Ok(0.25));
        assert_eq!(s.switch("k", true), Ok(true));
        assert_eq!(s.seconds("k", Duration::ZERO), Ok(Duration::ZERO));
        for (v, want) in [("40", 40_000), ("2.5s", 2_500), (" 0.25 ", 250)] {
            let p = with(v);
            let s = Settings::new("t", &docs, &p).unwrap();
            assert_eq!(
                s.seconds("k", Duration::ZERO),
                Ok(Duration::from_millis(want))
            );
        }
        for v in ["-1", "1 s", "s", "1e3", "inf"] {
            let p = with(v);
            let s = Settings::new("t", &docs, &p).unwrap();
            assert!(s.seconds("k", Duration::ZERO).is_err(), "{v}");
        }
    }

    #[test]
    fn unknown_keys() {
        let p = PolicyParams {
            settings: [("nope".to_string(), "1".to_string())].into(),
            ..Default::default()
        };
        let err = Settings::new("t", &[], &p).err();
        assert!(
            matches!(&err, Some(PolicyError::UnknownSetting { policy, key, known })
                if policy == "t" && key == "nope" && known == "none"),
            "{err:?}"
        );
    }
}
