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

/// An `exempt:` list in the forms a hand or a generator writes, plain and not: the fast
/// path's forms, odd spacing, quotes, tags, anchors, notes, duplicate keys, comments, bad
/// addresses; between other top-level keys, good and bad.
fn exempt_listish() -> impl Strategy<Value = String> {
    // Mostly what the fast path takes (so it is exercised), with the rest mixed in.
    let prefix = prop_oneof![
        4 => prop::sample::select(vec![
            "10.0.0.1/32",
            "10.0.0.1",
            "10.0.0.2/32",
            "203.0.113.16/28",
            "2001:db8::/32",
            "2001:db8::1/128",
            "2001:db8::1",
            "FE80::/10",
        ]),
        1 => prop::sample::select(vec![
            "203.0.113.17/28",
            "010.0.0.1/32",
            "10.0.0.0/33",
            "0.0.0.0/0",
            "1.2.3.4/",
            "2001:db8::",
            "2001:db8::/129",
            "::/0",
            "::1",
            "::",
            "1:2:3:4:5:6:7:8",
            "fe80::/10",
            "1e5",
            "1.5",
            "10.0.0.1/32 ",
            "",
        ]),
    ];
    let form = prop_oneof![
        8 => prop::sample::select(vec!["- {prefix: P}", "- prefix: P"]),
        1 => prop::sample::select(vec![
            "-  {prefix: P}",
            "- {prefix:  P}",
            "- {prefix: P }",
            "- {prefix:P}",
            "- prefix:  P",
            "-   prefix: P",
            "- {prefix: \"P\"}",
            "- {prefix: 'P'}",
            "- prefix: \"P\"",
            "- {prefix: !!str P}",
            "- !!map {prefix: P}",
            "- &a {prefix: P}",
            "- *a",
            "- {prefix: P, note: x}",
            "- {prefix: P, prefix: P}",
            "- {prefix: P, until: 2026-12-31T00:00:00Z}",
            "- prefix: P # c",
            "- prefix: P\n    note: n",
            "- P",
            "- {prefix: P}\t",
            "- {prefix: [P]}",
            "- {prefix: P",
        ]),
    ];
    // An item's indentation: the list's, or (rarely) another.
    let indent = prop_oneof![
        12 => Just(None),
        1 => prop::sample::select(vec!["", " ", "   ", "    ", "\t"]).prop_map(Some),
    ];
    let item = (indent, form, prefix).prop_map(|(i, f, p)| (i, format!("{}\n", f.replace('P', p))));
    let filler = prop::sample::select(vec![
        "\n",
        "  \n",
        "  # a comment\n",
        "# at column 0\n",
        "  # \u{e9}\n",
        "  #\u{2028}bogus: 1\n",
        "\r\n",
    ])
    .prop_map(|f| (Some(""), f.to_string()));
    let line = prop_oneof![8 => item, 1 => filler];
    let header = prop_oneof![
        8 => Just("exempt:\n"),
        1 => prop::sample::select(vec![
            "exempt:  \n",
            "exempt: # c\n",
            "exempt :\n",
            "exempt: !!seq\n",
            "exempt: &list\n",
            "\"exempt\":\n",
        ]),
    ];
    let other = prop_oneof![
        6 => prop::sample::select(vec![
            "",
            "socket: /run/x.sock\n",
            "limits: {exempt_ips: 3}\n",
            "limits:\n  min_prefix_v4: 16\n",
            "mail_servers: [198.51.100.25/32]\n",
            "subscriber_ranges: [100.64.0.0/10]\n",
        ]),
        1 => prop::sample::select(vec![
            "bogus: 1\n",
            "exempt: []\n",
            "exempt:\n  - {prefix: 10.9.9.9/32}\n",
            "---\n",
            "note: \"open\n",
            "action: [\n",
            "interfaces:\n  - {name: eth9, hook: xdp}\n",
            "  indented: 1\n",
        ]),
    ];
    let list_indent = prop::sample::select(vec!["", "  ", "  ", "    "]);
    (
        other.clone(),
        header,
        list_indent,
        prop::collection::vec(line, 0..8),
        other,
    )
        .prop_map(|(before, header, list, lines, after)| {
            let body: String = lines
                .into_iter()
                .map(|(i, l)| format!("{}{l}", i.unwrap_or(list)))
                .collect();
            format!("interfaces:\n  - name: eth1\n    hook: xdp\n{before}{header}{body}{after}")
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    /// The plain `exempt:` list read without YAML gives what YAML gives: the same config,
    /// or the same refusal at the same place (it defers wherever it is not sure).
    #[test]
    fn fast_exempt_list_agrees_with_yaml(text in exempt_listish()) {
        let path = Path::new("f.yaml");
        let fast = Config::parse_with(&text, path, true).map_err(|e| e.to_string());
        let yaml = Config::parse_with(&text, path, false).map_err(|e| e.to_string());
        prop_assert_eq!(fast, yaml, "{:?}", text);
    }
}

/// The bytes that matter to a line scan, and ordinary ones around them.
fn scan_line() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "[",
        "]",
        "{",
        "}",
        "\"",
        "'",
        "''",
        "\\",
        "\\\"",
        "#",
        " #",
        " ",
        "\t",
        ",",
        ":",
        "a",
        "10.0.0.1/32",
        "\r",
        "\u{85}",
        "\u{2028}",
        "\u{2029}",
        "\u{e9}",
        "\u{2026}",
        "-",
    ]);
    prop::collection::vec(pieces, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    /// The one-pass line scan answers as the two-pass form it replaced, on lines made of
    /// the bytes either looks at (brackets, both quotes and their escapes, comments, every
    /// line break YAML knows and `\n` lines do not, other multi-byte characters).
    #[test]
    fn line_scan_agrees_with_the_two_pass_form(line in scan_line()) {
        prop_assert_eq!(
            closes_what_it_opens(&line),
            super::tests::closes_what_it_opens_two_pass(&line),
            "{:?}", line
        );
    }
}
