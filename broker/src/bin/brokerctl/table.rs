//! Tables as brokerctl prints them: aligned columns of a few fields.

use serde_json::Value;

/// Prints rows as an aligned table.
pub(crate) fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_uppercase()).collect());
    for row in rows {
        line(row);
    }
}

pub(crate) fn s(v: &Value, key: &str) -> String {
    match v.get(key) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

pub(crate) fn when(v: &Value, key: &str) -> String {
    match v.get(key).and_then(Value::as_i64) {
        None => "never".into(),
        Some(t) => time::OffsetDateTime::from_unix_timestamp(t)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| t.to_string()),
    }
}

pub(crate) fn rule_rows(rules: &[Value]) -> Vec<Vec<String>> {
    rules
        .iter()
        .map(|r| {
            vec![
                s(r, "id"),
                s(r, "namespace"),
                s(r, "service_account"),
                s(r, "pod_uid"),
                s(r, "secret"),
                s(r, "reason"),
                s(r, "created_by"),
                when(r, "expires_at"),
            ]
        })
        .collect()
}

pub(crate) const RULE_HEADERS: [&str; 8] = [
    "id",
    "namespace",
    "service account",
    "pod uid",
    "secret",
    "reason",
    "by",
    "lapses",
];
