//! Error chains as text: an error and its sources joined by ": ", the form every log line
//! and ttrpc status message of the shim uses.

/// An error and its sources, joined by ": ". A ttrpc status reads `CODE: message`.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = match s.downcast_ref::<ttrpc::Error>() {
            Some(ttrpc::Error::RpcStatus(status)) => {
                format!("{:?}: {}", status.code(), status.message())
            }
            _ => s.to_string(),
        };
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn sources_are_joined_once() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(chain(&e), "outer: inner");
    }
}
