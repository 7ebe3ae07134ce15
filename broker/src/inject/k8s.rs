//! Values in Kubernetes' own syntax that annotations and `inject.toml`
//! both give, checked as the API server would: resource quantities and DNS
//! labels (container and namespace names).

/// A Kubernetes resource quantity, kept as written (Kubernetes accepts any
/// valid spelling) with its value for comparisons.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantity {
    pub text: String,
    /// In base units (cores, bytes).
    pub value: f64,
}

impl Quantity {
    /// Parses `<number><suffix>` as Kubernetes does: a non-negative decimal
    /// number, then a binary (`Ki`…`Ei`), decimal (`n u m k M G T P E`) or
    /// exponent (`e3`, `E-2`) suffix.
    pub fn parse(text: &str) -> Result<Quantity, String> {
        if text.is_empty() {
            return Err("empty".into());
        }
        if text.len() > 64 {
            return Err("longer than 64 characters".into());
        }
        let digits_end = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
            .unwrap_or(text.len());
        let (number, suffix) = text.split_at(digits_end);
        let number = number.strip_prefix('+').unwrap_or(number);
        if number.is_empty() || number == "." {
            return Err("no number".into());
        }
        if number.contains('+') || number.matches('.').count() > 1 {
            return Err("malformed number".into());
        }
        let base: f64 = number.parse().map_err(|_| "malformed number".to_owned())?;
        let factor = match suffix {
            "" => 1.0,
            "n" => 1e-9,
            "u" => 1e-6,
            "m" => 1e-3,
            "k" => 1e3,
            "M" => 1e6,
            "G" => 1e9,
            "T" => 1e12,
            "P" => 1e15,
            "E" => 1e18,
            "Ki" => 1024f64,
            "Mi" => 1024f64.powi(2),
            "Gi" => 1024f64.powi(3),
            "Ti" => 1024f64.powi(4),
            "Pi" => 1024f64.powi(5),
            "Ei" => 1024f64.powi(6),
            exp if exp.starts_with(['e', 'E']) => {
                let e = &exp[1..];
                let valid = !e.is_empty()
                    && e.strip_prefix(['+', '-'])
                        .unwrap_or(e)
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                    && e.len() <= 4;
                match e.parse::<i32>() {
                    Ok(n) if valid => 10f64.powi(n),
                    _ => return Err(format!("bad exponent {exp:?}")),
                }
            }
            other => {
                return Err(format!(
                    "unknown suffix {other:?}: use Ki, Mi, Gi, Ti, Pi, Ei, n, u, m, k, M, G, T, P, E"
                ));
            }
        };
        Ok(Quantity {
            text: text.to_owned(),
            value: base * factor,
        })
    }
}

/// An RFC 1123 label: what Kubernetes accepts as a container name.
pub fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_follow_kubernetes() {
        for (q, v) in [
            ("16Mi", 16.0 * 1024.0 * 1024.0),
            ("5m", 0.005),
            ("0.5", 0.5),
            ("1", 1.0),
            ("1k", 1000.0),
            ("1e3", 1000.0),
            ("2E-3", 0.002),
            ("+1Gi", 1024f64.powi(3)),
            (".5", 0.5),
        ] {
            let parsed = Quantity::parse(q).unwrap_or_else(|e| panic!("{q}: {e}"));
            assert!((parsed.value - v).abs() < 1e-9 * v.max(1.0), "{q}");
            assert_eq!(parsed.text, q);
        }
        for bad in [
            "", "Mi", "1..2", "1.2.3", "-1", "1MB", "1 Mi", "1e", "1e+", "1ee3", "0x10", "1++",
        ] {
            assert!(Quantity::parse(bad).is_err(), "{bad:?}");
        }
    }
}
