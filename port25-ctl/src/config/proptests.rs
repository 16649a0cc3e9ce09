//! Property tests of the config parser (issue 8, section 2): arbitrary YAML text and
//! mutations of valid configs never panic; each gives a valid config or an error that
//! says where (line and column) or, for whole-file rules, what.

use proptest::prelude::*;

use super::*;

const VALID: &[&str] = &[
    include_str!("../../../deploy/port25.yaml"),
    "interfaces:\n  - name: eth1\n    hook: xdp\nsubscriber_ranges: [100.64.0.0/10]\n",
    "interfaces:\n  - {name: ppp0, hook: tc, direction: egress}\nblocked_ports: [25, 2525]\n\
     action: reject\nmail_servers: [{prefix: 0.0.0.0/0, force: true}, \"2001:db8:25::/64\"]\n\
     exempt:\n  - {prefix: 203.0.113.16/28, until: 2026-12-31T00:00:00Z, note: x}\n\
     limits: {min_prefix_v4: 12, exempt_ips: 10}\nreconcile_interval: 5m\n",
];

fn check(text: &str) -> Result<(), TestCaseError> {
    match Config::parse(text, Path::new("f.yaml")) {
        Ok(cfg) => {
            // What was accepted is valid, and reads back the same from its own serialization.
            prop_assert!(cfg.validate().is_ok());
            prop_assert!(!cfg.blocked_ports.is_empty());
            let again = serde_yaml::to_string(&cfg).unwrap();
            let back = Config::parse(&again, Path::new("again.yaml"));
            prop_assert!(matches!(&back, Ok(b) if *b == cfg), "{again}\n{back:?}");
        }
        Err(ConfigError::Syntax {
            line, column, msg, ..
        }) => {
            prop_assert!(line >= 1 && column >= 1, "no location: {msg}");
            prop_assert!(!msg.is_empty());
        }
        Err(ConfigError::Invalid { msg, .. }) => prop_assert!(!msg.is_empty()),
        Err(e @ ConfigError::Read { .. }) => prop_assert!(false, "{e}"),
    }
    Ok(())
}

/// Text built from the tokens configs are made of, so most cases get past the YAML layer.
fn yamlish() -> impl Strategy<Value = String> {
    let token = prop::sample::select(vec![
        "interfaces:",
        "blocked_ports:",
        "subscriber_ranges:",
        "mail_servers:",
        "exempt:",
        "limits:",
        "action:",
        "socket:",
        "prefix:",
        "force:",
        "until:",
        "name:",
        "hook:",
        " - ",
        "  ",
        "\n",
        "[",
        "]",
        "{",
        "}",
        ",",
        ": ",
        "25",
        "587",
        "0",
        "-1",
        "65536",
        "true",
        "xdp",
        "tc",
        "drop",
        "0.0.0.0/0",
        "::/0",
        "10.0.0.0/8",
        "010.0.0.1",
        "2001:db8::/32",
        "2262-04-12T00:00:00Z",
        "\"",
        "'",
        "#",
        "&a",
        "*a",
        "!!str",
        "~",
        "---",
        "\t",
        "é",
        "\u{202e}",
        "\0",
    ]);
    prop::collection::vec(token, 0..60).prop_map(|v| v.concat())
}

/// A valid config with a few byte-level edits: cut, insert, duplicate a line, swap lines.
fn mutated() -> impl Strategy<Value = String> {
    let edit = (
        0..4u8,
        any::<prop::sample::Index>(),
        any::<prop::sample::Index>(),
        ".{0,6}",
    );
    (
        prop::sample::select(VALID.to_vec()),
        prop::collection::vec(edit, 1..5),
    )
        .prop_map(|(base, edits)| {
            let mut lines: Vec<String> = base.lines().map(String::from).collect();
            for (kind, a, b, ins) in edits {
                if lines.is_empty() {
                    break;
                }
                let i = a.index(lines.len());
                let j = b.index(lines.len());
                match kind {
                    0 => {
                        let l = &mut lines[i];
                        let cut = b.index(l.len() + 1);
                        let cut = (0..=cut).rev().find(|c| l.is_char_boundary(*c)).unwrap();
                        l.truncate(cut);
                    }
                    1 => {
                        let l = &mut lines[i];
                        let at = b.index(l.len() + 1);
                        let at = (0..=at).rev().find(|c| l.is_char_boundary(*c)).unwrap();
                        l.insert_str(at, &ins);
                    }
                    2 => {
                        let l = lines[i].clone();
                        lines.insert(j, l);
                    }
                    _ => lines.swap(i, j),
                }
            }
            lines.join("\n")
        })
}

/// Text made of what decides where a top-level `socket:` is: keys at the start of a line
/// and indented, flow brackets, quotes, comments, block scalars, every line break YAML
/// knows, and `socket:` lines with sure and unsure values.
fn socketish() -> impl Strategy<Value = String> {
    let token = prop::sample::select(vec![
        "socket: /run/a.sock",
        "socket: \"/run/b.sock\"",
        "socket: '/run/c.sock' # c",
        "socket: /run/d",
        "socket : /run/e",
        "\"socket\": /run/f",
        "socket:",
        "exempt:",
        "a: ",
        "  b: ",
        "\n",
        "\n",
        "\n",
        "\r\n",
        "\r",
        "\u{2028}",
        "\u{85}",
        "  ",
        "\t",
        "- ",
        "[",
        "]",
        "{",
        "}",
        ",",
        "\"",
        "'",
        "it's",
        "#",
        " # x",
        "|",
        ">",
        "---",
        "...",
        "? ",
        ": ",
        "&a ",
        "*a",
        "!!str ",
        "x",
        "/run/z",
        "10.0.0.1/32",
    ]);
    prop::collection::vec(token, 0..40).prop_map(|v| v.concat())
}

/// The socket YAML reads in `text`: None when YAML does not read it as a mapping.
fn yaml_socket(text: &str) -> Option<Option<PathBuf>> {
    match serde_yaml::from_str::<serde_yaml::Value>(text) {
        Ok(serde_yaml::Value::Mapping(m)) => Some(match m.get("socket") {
            Some(serde_yaml::Value::String(s)) if !s.is_empty() => Some(PathBuf::from(s)),
            _ => None,
        }),
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Wherever the line scan answers (it stops at the first sure `socket:`), YAML reading
    /// the whole text answers the same, or refuses the text.
    #[test]
    fn socket_scan_agrees_with_yaml_or_defers(text in socketish()) {
        let want = yaml_socket(&text);
        match (scan_socket(&text), want) {
            (Scan::Unsure, _) | (_, None) => {}
            (Scan::Found(p), Some(y)) => prop_assert_eq!(Some(p), y, "{:?}", text),
            (Scan::Absent, Some(y)) => prop_assert_eq!(None, y, "{:?}", text),
        }
    }

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        check(&text)?;
    }

    #[test]
    fn yaml_shaped_text_never_panics(text in yamlish()) {
        check(&text)?;
    }

    #[test]
    fn mutated_valid_configs_never_panic(text in mutated()) {
        check(&text)?;
    }
}
