//! An error and its causes on one line, for messages that must say *why*
//! (reqwest hides a TLS trust failure three levels down).

/// `e`, then each cause not already part of the text, joined by `": "`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn causes_follow_once_each() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(super::error_chain(&e), "outer: inner");
        let same = Outer(std::io::Error::other("outer"));
        assert_eq!(super::error_chain(&same), "outer");
    }
}
