//! Checks and quoting shared by the registry's fields and the deny feeds: an address prefix as
//! the kernel can match it, and a value quoted safely in a message (control characters escaped,
//! a long value cut), so that no input can forge lines of output or flood an error.

use std::net::IpAddr;

use ipnet::IpNet;

/// How much of a value a message quotes.
const QUOTE_MAX_CHARS: usize = 64;

/// `text` in double quotes, control and bidirectional-override characters escaped, cut after
/// `QUOTE_MAX_CHARS` characters with the full length said.
pub fn quoted(text: &str) -> String {
    let mut out = String::from("\"");
    for (n, c) in text.chars().enumerate() {
        if n == QUOTE_MAX_CHARS {
            out.push_str(&format!("…\" ({} bytes)", text.len()));
            return out;
        }
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.push('"');
    out
}

/// A character that must not reach a terminal or a log as it is: a control character (ESC, CR,
/// LF, NUL, ...) or one that reorders text (the bidirectional overrides and isolates).
pub fn unsafe_char(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// A prefix written as a CIDR or a bare address (its own /32 or /128): without host bits, and not
/// an IPv4-mapped IPv6 prefix (IPv4 packets are matched as IPv4, so such a prefix would match
/// nothing; the message gives the IPv4 form).
pub fn prefix(text: &str) -> Result<IpNet, String> {
    let net = text
        .parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            format!(
                "invalid CIDR {} (expected e.g. 10.20.0.0/16 or 2001:db8::/48)",
                quoted(text)
            )
        })?;
    if net.trunc() != net {
        return Err(format!(
            "host bits set in {}: the network is {}",
            quoted(text),
            net.trunc()
        ));
    }
    if let Some(v4) = ipv4_mapped(&net) {
        return Err(format!(
            "{} is an IPv4-mapped IPv6 prefix, which no packet matches (IPv4 traffic is checked as IPv4): write {v4}",
            quoted(text)
        ));
    }
    Ok(net)
}

/// The IPv4 form of an IPv4-mapped IPv6 prefix (`::ffff:a.b.c.d/96+n` is `a.b.c.d/n`).
fn ipv4_mapped(net: &IpNet) -> Option<String> {
    let IpNet::V6(v6) = net else {
        return None;
    };
    let len = v6.prefix_len().checked_sub(96)?;
    let v4 = v6.network().to_ipv4_mapped()?;
    Some(if len == 32 {
        v4.to_string()
    } else {
        format!("{v4}/{len}")
    })
}

#[cfg(test)]
mod tests {
    use super::{prefix, quoted};

    #[test]
    fn quoting_escapes_and_cuts() {
        assert_eq!(quoted("lan"), "\"lan\"");
        assert_eq!(quoted("a\u{1b}[2Jb\r\nc"), "\"a\\u{1b}[2Jb\\r\\nc\"");
        assert_eq!(quoted("x\u{202E}y"), "\"x\\u{202e}y\"");
        let long = "9".repeat(10_000);
        let q = quoted(&long);
        assert!(q.len() < 100 && q.ends_with("(10000 bytes)"), "{q}");
    }

    #[test]
    fn ipv4_mapped_prefixes_are_refused_with_their_ipv4_form() {
        let e = prefix("::ffff:10.0.0.0/104").unwrap_err();
        assert!(e.contains("write 10.0.0.0/8"), "{e}");
        let e = prefix("::ffff:192.0.2.0/120").unwrap_err();
        assert!(e.contains("write 192.0.2.0/24"), "{e}");
        let e = prefix("::ffff:192.0.2.7").unwrap_err();
        assert!(e.contains("write 192.0.2.7"), "{e}");
        assert!(prefix("2001:db8::/32").is_ok());
        assert!(prefix("::/0").is_ok());
        assert!(prefix("10.0.0.1/8").unwrap_err().contains("host bits"));
    }
}
