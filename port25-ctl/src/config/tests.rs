use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("test.yaml"))
}

fn err(text: &str) -> String {
    parse(text).expect_err("should be refused").to_string()
}

const FULL: &str = r#"
interfaces:
  - name: eth1
    hook: xdp
    xdp_mode: generic
  - name: eth2
    hook: tc
    direction: egress
blocked_ports: [25, 2525]
action: drop
subscriber_ranges:
  - 100.64.0.0/10
  - 2001:db8:100::/40
mail_servers:
  - 198.51.100.25/32
  - 2001:db8:25::/64
exempt:
  - prefix: 203.0.113.16/28
    note: "ACME Ltd, ticket 4411"
    until: 2026-12-31T00:00:00Z
limits:
  exempt_ips: 1048576
  exempt_prefixes: 65536
  mail_servers: 4096
  subscriber_ranges: 4096
state_dir: /var/lib/port25
socket: /run/port25/ctl.sock
"#;

#[test]
fn design_example_parses() {
    let c = parse(FULL).unwrap();
    assert_eq!(c.interfaces.len(), 2);
    assert_eq!(c.interfaces[0].xdp_mode, XdpMode::Generic);
    assert_eq!(c.interfaces[1].direction, Direction::Egress);
    assert_eq!(c.blocked_ports, vec![BlockedPort(25), BlockedPort(2525)]);
    assert_eq!(c.exempt[0].note.as_deref(), Some("ACME Ltd, ticket 4411"));
    assert!(c.exempt[0].until.is_some());
    assert_eq!(c.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
}

#[test]
fn defaults_apply() {
    let c = parse("interfaces: []\n").unwrap();
    assert_eq!(c.blocked_ports, vec![BlockedPort(25)]);
    assert_eq!(c.action, Action::Drop);
    assert!(c.subscriber_ranges.is_empty());
    assert_eq!(c.socket, PathBuf::from("/run/port25/ctl.sock"));
    let c = parse("interfaces:\n  - name: eth1\n    hook: xdp\n").unwrap();
    assert_eq!(c.interfaces[0].xdp_mode, XdpMode::Native);
    assert_eq!(
        parse("action: drop\n").unwrap().blocked_ports,
        vec![BlockedPort(25)]
    );
}

#[test]
fn unknown_key_is_refused_with_location() {
    let e = err("blocked_ports: [25]\nmail_server:\n  - 1.2.3.4/32\n");
    assert!(e.starts_with("test.yaml:2:1:"), "{e}");
    assert!(e.contains("mail_server"), "{e}");
    let e = err("interfaces:\n  - name: eth1\n    hook: xdp\n    mode: native\n");
    assert!(e.contains("mode"), "{e}");
}

#[test]
fn duplicate_key_is_refused() {
    // The error points at the duplicate itself, not at the mapping that holds it (which is
    // where serde_yaml points).
    let e = err("action: drop\nblocked_ports: [25]\naction: drop\n");
    assert!(
        e.starts_with("test.yaml:3:1:") && e.contains("duplicate field `action`"),
        "{e}"
    );
    let e = err(
        "interfaces:\n  - name: eth1\n    hook: xdp\n    hook: tc\n  - name: eth2\n    hook: xdp\n",
    );
    assert!(e.starts_with("test.yaml:4:5:"), "{e}");
}

#[test]
fn submission_ports_are_refused() {
    for p in [587, 465] {
        let e = err(&format!("blocked_ports: [25, {p}]\n"));
        assert!(
            e.contains("submission") && e.starts_with("test.yaml:1:"),
            "{e}"
        );
    }
    assert!(err("blocked_ports: [0]\n").contains("not a TCP port"));
    assert!(err("blocked_ports: [70000]\n").contains("not a TCP port"));
    assert!(err("blocked_ports: [25, 25]\n").contains("twice"));
}

#[test]
fn bad_addresses_are_refused_with_location() {
    let e = err("mail_servers:\n  - 198.51.100.25/32\n  - 010.1.1.1/32\n");
    // The location is that of the entry; the message names the value.
    assert!(
        e.starts_with("test.yaml:3:") && e.contains("`010.1.1.1`"),
        "{e}"
    );
    assert!(e.contains("octal"), "{e}");
    let e = err("subscriber_ranges:\n  - 100.64.0.1/10\n");
    assert!(
        e.contains("host bits") && e.starts_with("test.yaml:2:"),
        "{e}"
    );
    let e = err("exempt:\n  - prefix: 2001:db8::1/64\n");
    assert!(e.contains("host bits"), "{e}");
    assert!(err("mail_servers: [1.2.3.4/32, 1.2.3.4/32]\n").contains("twice"));
}

#[test]
fn hook_specific_keys_are_checked() {
    assert!(
        err("interfaces:\n  - name: eth1\n    hook: xdp\n    direction: egress\n")
            .contains("tc only")
    );
    assert!(
        err("interfaces:\n  - name: eth1\n    hook: tc\n    xdp_mode: native\n")
            .contains("xdp only")
    );
    assert!(err("interfaces:\n  - name: eth1\n    hook: bpf\n").contains("unknown variant"));
    assert!(
        err("interfaces:\n  - name: eth1\n    hook: xdp\n  - name: eth1\n    hook: xdp\n")
            .contains("twice")
    );
    assert!(err("interfaces:\n  - name: a/b\n    hook: xdp\n").contains("not a valid interface"));
    assert!(
        err("interfaces:\n  - name: eth1\n    hook: xdp\n    tc_attach: netlink\n")
            .contains("tc only")
    );
    assert!(
        err("interfaces:\n  - name: eth1\n    hook: tc\n    tc_attach: legacy\n")
            .contains("unknown variant")
    );
}

#[test]
fn tc_attach_defaults_to_auto_and_is_written_back_only_when_set() {
    let c = parse("interfaces:\n  - name: a\n    hook: tc\n  - name: b\n    hook: tc\n    tc_attach: netlink\n  - name: c\n    hook: tc\n    tc_attach: tcx\n").unwrap();
    let kinds: Vec<_> = c.interfaces.iter().map(|i| i.tc_attach).collect();
    assert_eq!(kinds, [TcAttach::Auto, TcAttach::Netlink, TcAttach::Tcx]);
    let yaml = serde_yaml::to_string(&c.interfaces).unwrap();
    assert_eq!(yaml.matches("tc_attach").count(), 2, "{yaml}");
    assert!(yaml.contains("tc_attach: netlink"), "{yaml}");
}

#[test]
fn bad_times_and_limits_are_refused() {
    assert!(err("exempt:\n  - prefix: 10.0.0.0/8\n    until: tomorrow\n").contains("RFC 3339"));
    assert!(err("limits:\n  mail_servers: 0\n").contains("at least 1"));
    let e = err("limits:\n  mail_servers: 1\nmail_servers: [1.2.3.4/32, 1.2.3.5/32]\n");
    assert!(e.contains("map full"), "{e}");
    assert!(err("reconcile_interval: soon\n").contains("duration"));
}

#[test]
fn actions() {
    assert_eq!(parse("action: reject\n").unwrap().action, Action::Reject);
    assert_eq!(parse("interfaces: []\n").unwrap().action, Action::Drop);
    assert!(err("action: bounce\n").contains("unknown variant"));
}

#[test]
fn attach_points_are_valid_bpffs_names() {
    let c = parse("interfaces:\n  - name: eth1.100\n    hook: xdp\n  - name: eth1.100\n    hook: tc\n    direction: egress\n").unwrap();
    assert_eq!(c.interfaces[0].attach_point(), "xdp:eth1%2e100");
    assert_eq!(c.interfaces[1].attach_point(), "tc-egress:eth1%2e100");
    assert!(!c.interfaces.iter().any(|i| i.attach_point().contains('.')));
}

#[test]
fn shipped_example_config_is_valid() {
    let text = include_str!("../../../deploy/port25.yaml");
    // The example must load as shipped.
    let cfg = Config::parse(text, Path::new("deploy/port25.yaml")).unwrap();
    assert_eq!(cfg.interfaces.len(), 1);
    assert_eq!(cfg.exempt.len(), 2);
    assert_eq!(cfg.limits.session_prefixes, 1048576);
}

const IFACE: &str = "interfaces:\n  - name: eth1\n    hook: xdp\n";

fn load_text(text: &str) -> Result<Config, ConfigError> {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text).unwrap();
    Config::load(f.path())
}

/// A truncated write by config management must never read as "no interfaces, defaults".
#[test]
fn empty_and_interface_less_files_are_refused() {
    for text in ["", "   \n\t\n", "# only a comment\n", "---\n"] {
        let e = load_text(text).expect_err(text).to_string();
        assert!(
            e.contains("empty") || e.contains("no interfaces"),
            "{text:?}: {e}"
        );
        assert!(parse(text).is_err(), "{text:?}");
    }
    let e = load_text("interfaces: []\n").unwrap_err().to_string();
    assert!(e.contains("no interfaces"), "{e}");
    let e = load_text("action: drop\n").unwrap_err().to_string();
    assert!(e.contains("no interfaces"), "{e}");
    assert!(load_text(IFACE).is_ok());
}

#[test]
fn no_blocked_port_is_refused() {
    let e = err(&format!("{IFACE}blocked_ports: []\n"));
    assert!(e.contains("blocked_ports") && e.contains("empty"), "{e}");
}

#[test]
fn wide_allow_prefixes_are_refused_unless_forced() {
    for (key, wide) in [
        ("mail_servers", "[0.0.0.0/0]"),
        ("mail_servers", "[\"::/0\"]"),
        ("mail_servers", "[10.0.0.0/7]"),
        ("mail_servers", "[\"2000::/15\"]"),
        ("exempt", "[{prefix: 0.0.0.0/0}]"),
        ("exempt", "[{prefix: \"::/0\"}]"),
        ("exempt", "[{prefix: 64.0.0.0/2}]"),
        ("exempt", "[{prefix: \"2000::/3\"}]"),
    ] {
        let e = err(&format!("{IFACE}{key}: {wide}\n"));
        assert!(
            e.contains("wider than") && e.contains("force"),
            "{key} {wide}: {e}"
        );
    }
    // At the floor: fine.
    parse(&format!(
        "{IFACE}mail_servers: [10.0.0.0/8, \"2001::/16\"]\n"
    ))
    .unwrap();
    parse(&format!("{IFACE}exempt: [{{prefix: 10.0.0.0/8}}]\n")).unwrap();
    // Forced per entry.
    let c = parse(&format!(
        "{IFACE}mail_servers: [{{prefix: 0.0.0.0/0, force: true}}, 198.51.100.25/32]\n\
         exempt: [{{prefix: \"::/0\", force: true}}]\n"
    ))
    .unwrap();
    assert!(c.mail_servers[0].force && !c.mail_servers[1].force);
    assert!(c.exempt[0].force);
    assert_eq!(c.forced_wide().len(), 2);
    // A configurable floor.
    let e = err(&format!(
        "{IFACE}limits:\n  min_prefix_v4: 24\nexempt: [{{prefix: 203.0.113.0/25}}, {{prefix: 10.0.0.0/16}}]\n"
    ));
    assert!(e.contains("10.0.0.0/16") && e.contains("/24"), "{e}");
    assert!(err(&format!("{IFACE}limits:\n  min_prefix_v4: 0\n")).contains("min_prefix_v4"));
    assert!(err(&format!("{IFACE}limits:\n  min_prefix_v6: 129\n")).contains("min_prefix_v6"));
    assert!(err(&format!(
        "{IFACE}mail_servers: [{{prefix: 1.2.3.4/32, forced: true}}]\n"
    ))
    .contains("unknown field"));
}

/// jiff timestamps reach year 9999; the kernel's expiry is u64 nanoseconds on the boot clock
/// and the registry's times are i64 nanoseconds: anything after 2262-04-11 cannot be stored.
#[test]
fn until_beyond_what_can_be_stored_is_refused() {
    let e = err(&format!(
        "{IFACE}exempt: [{{prefix: 203.0.113.16/28, until: 2262-04-12T00:00:00Z}}]\n"
    ));
    assert!(e.contains("2262"), "{e}");
    let e = err(&format!(
        "{IFACE}exempt: [{{prefix: 203.0.113.16/28, until: 9000-01-01T00:00:00Z}}]\n"
    ));
    assert!(e.contains("2262"), "{e}");
    parse(&format!(
        "{IFACE}exempt: [{{prefix: 203.0.113.16/28, until: 2262-04-10T00:00:00Z}}]\n"
    ))
    .unwrap();
}

#[test]
fn socket_is_found_in_half_edited_files() {
    let f = tempfile::NamedTempFile::new().unwrap();
    let at = |text: &str| {
        std::fs::write(f.path(), text).unwrap();
        socket_of(f.path())
    };
    let p = |s: &str| PathBuf::from(s);
    assert_eq!(at("socket: /run/a.sock\n"), p("/run/a.sock"));
    assert_eq!(
        at("socket: /run/a.sock\nmail_server: [x]\n"),
        p("/run/a.sock")
    );
    assert_eq!(
        at("exempt: [ {prefix: 1\nsocket: \"/run/b.sock\" # here\n"),
        p("/run/b.sock")
    );
    assert_eq!(at("{{{ nope\n"), p("/run/port25/ctl.sock"));
    assert_eq!(at(""), p("/run/port25/ctl.sock"));
    assert_eq!(
        socket_of(Path::new("/nonexistent/port25.yaml")),
        p("/run/port25/ctl.sock")
    );
}

/// The CLI prints the whole chain (`{:#}`): the OS error appears once, not twice.
#[test]
fn an_unreadable_config_names_its_cause_once() {
    let e = anyhow::Error::from(Config::load(Path::new("/nonexistent/port25.yaml")).unwrap_err());
    let text = format!("{e:#}");
    assert_eq!(text.matches("No such file").count(), 1, "{text}");
    assert!(
        text.starts_with("/nonexistent/port25.yaml: cannot read: "),
        "{text}"
    );
}

const GLOBS: &str = "interfaces:
  - name: ppp*
    hook: tc
  - name: ppp7
    hook: tc
  - name: p?p[0-9]*
    hook: tc
    tc_attach: netlink
  - name: ppp*
    hook: tc
    direction: egress
  - name: '[ab]*'
    hook: xdp
    xdp_mode: generic
";

#[test]
fn a_glob_entry_keeps_its_hook_and_options() {
    let c = parse(GLOBS).unwrap();
    assert!(c.interfaces[0].is_glob() && !c.interfaces[1].is_glob());
    let t = c.targets_for("ab1");
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].iface.name, "ab1");
    assert_eq!(t[0].iface.hook, Hook::Xdp);
    assert_eq!(t[0].iface.xdp_mode, XdpMode::Generic);
    assert_eq!(t[0].glob.as_deref(), Some("[ab]*"));
    assert_eq!(t[0].iface.attach_point(), "xdp:ab1");
    assert!(c.targets_for("cab").is_empty());
}

/// A concrete entry wins over any glob; between globs the first in file order wins.
#[test]
fn concrete_first_then_the_first_glob_in_file_order() {
    let c = parse(GLOBS).unwrap();
    let ingress = |d: &str| c.owner(d, "tc-ingress").map(|i| i.name.clone());
    assert_eq!(ingress("ppp7").as_deref(), Some("ppp7"));
    assert_eq!(ingress("ppp8").as_deref(), Some("ppp*"));
    assert_eq!(ingress("pap8").as_deref(), Some("p?p[0-9]*"));
    assert_eq!(
        c.owner("pap8", "tc-ingress").unwrap().tc_attach,
        TcAttach::Netlink
    );
    assert_eq!(ingress("eth0"), None);
    let shadowed: Vec<_> = c
        .shadowed("ppp7", "tc-ingress")
        .iter()
        .map(|i| i.name.clone())
        .collect();
    assert_eq!(shadowed, vec!["ppp*", "p?p[0-9]*"]);
    // Another kind is another attach point: both apply.
    let kinds: Vec<_> = c
        .targets_for("ppp7")
        .iter()
        .map(|t| t.iface.attach_point())
        .collect();
    assert_eq!(kinds, vec!["tc-ingress:ppp7", "tc-egress:ppp7"]);
    let devs: Vec<String> = ["ppp1", "eth0", "ppp7", "b.1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let points: Vec<_> = c
        .targets(&devs)
        .iter()
        .map(|t| t.iface.attach_point())
        .collect();
    assert_eq!(
        points,
        vec![
            "tc-ingress:ppp7",
            "tc-ingress:ppp1",
            "tc-egress:ppp1",
            "tc-egress:ppp7",
            "xdp:b%2e1"
        ]
    );
    assert_eq!(
        c.glob_owner("xdp:b%2e1").map(|i| i.name.as_str()),
        Some("[ab]*")
    );
    assert_eq!(c.glob_owner("tc-ingress:ppp7"), None);
    assert_eq!(c.glob_owner("tc-ingress:eth0"), None);
}

#[test]
fn bad_or_impossible_globs_are_refused() {
    let one = |name: &str| err(&format!("interfaces:\n  - name: '{name}'\n    hook: tc\n"));
    assert!(
        one("ppp[").contains("interface pattern `ppp[`"),
        "{}",
        one("ppp[")
    );
    assert!(one("ppp[a-").contains("interface pattern"));
    assert!(one("ppp/*").contains("can never match"));
    assert!(one("a:*").contains("can never match"));
    assert!(one("abcdefghijklmnop*").contains("at least 16 bytes"));
    // Long as text, short as a match: accepted.
    parse("interfaces:\n  - name: '[abcdefghijklmnopqrstuvwxyz]*'\n    hook: tc\n").unwrap();
    parse("interfaces:\n  - name: 'abcdefghijklmn?'\n    hook: tc\n").unwrap();
    assert!(one("abcdefghijklmno?").contains("at least 16"));
    // The same glob twice for one hook is a duplicate like a name.
    assert!(
        err("interfaces:\n  - name: ppp*\n    hook: tc\n  - name: ppp*\n    hook: tc\n")
            .contains("listed twice")
    );
}

#[test]
fn metrics_listen_default_off_and_errors() {
    let c = parse("interfaces: []\n").unwrap();
    assert_eq!(c.metrics_listen.to_string(), DEFAULT_METRICS_LISTEN);
    let c = parse("interfaces: []\nmetrics_listen: off\n").unwrap();
    assert_eq!(c.metrics_listen, MetricsListen::Off);
    let c = parse("interfaces: []\nmetrics_listen: \"[::]:9100\"\n").unwrap();
    assert_eq!(c.metrics_listen.addr(), Some("[::]:9100".parse().unwrap()));
    for bad in [
        "metrics_listen: localhost:9725",
        "metrics_listen: 9725",
        "metrics_listen: false",
        "metrics_listen: [127.0.0.1, 9725]",
    ] {
        let e = err(&format!("interfaces: []\nsocket: /x\n{bad}\n"));
        assert!(
            e.starts_with("test.yaml:3:") && e.contains("metrics_listen"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn the_abuse_section_has_defaults_sizes_the_tracking_map_and_is_strict() {
    let c = parse("blocked_ports: [25]\n").unwrap();
    assert_eq!(c.abuse, crate::config::Abuse::default());
    assert_eq!(c.abuse.track_sources, 65536);
    assert_eq!(c.limits.track_sources, 65536);
    assert!(c.abuse.flagged(101, 1) && c.abuse.flagged(0, 21));
    assert!(
        !c.abuse.flagged(100, 20),
        "at the thresholds is not more than them"
    );
    let c = parse(
        "abuse:\n  track_sources: 0\n  event_interval: 1m\n  flag_window: 1h\n  flag_attempts: 5\n",
    )
    .unwrap();
    assert_eq!(
        c.limits.track_sources, 0,
        "the map list sizes from `limits`"
    );
    assert_eq!(c.abuse.kernel().track, 0);
    assert_eq!(c.abuse.kernel().event_interval_ns, 60_000_000_000);
    assert_eq!(c.abuse.kernel().window_ns, 3_600_000_000_000);
    let e = err("abuse:\n  track_source: 10\n");
    assert!(e.contains("track_source") && e.contains(":2:"), "{e}");
    let e = err("abuse:\n  flag_window: 0s\n");
    assert!(e.contains("at least 1s"), "{e}");
    let c = parse(include_str!("../../../deploy/port25.yaml")).unwrap();
    assert_eq!(c.abuse, crate::config::Abuse::default());
}

#[test]
fn notify_command_is_a_list_naming_an_absolute_executable() {
    let c = parse("abuse:\n  auto_hold: true\n  notify_command: [/bin/true, --from, port25]\n  notify_interval: 30m\n  scan_interval: 2s\n").unwrap();
    assert!(c.abuse.auto_hold);
    assert_eq!(
        c.abuse.notify_command.as_deref(),
        Some(&["/bin/true".to_string(), "--from".into(), "port25".into()][..])
    );
    assert_eq!(c.abuse.notify_interval, Duration::from_secs(1800));
    assert_eq!(c.abuse.scan_interval, Duration::from_secs(2));
    let d = parse("blocked_ports: [25]\n").unwrap().abuse;
    assert!(!d.auto_hold && d.notify_command.is_none());
    assert_eq!(d.notify_interval, Duration::from_secs(3600));
    assert!(parse("abuse:\n  notify_command:\n")
        .unwrap()
        .abuse
        .notify_command
        .is_none());

    let e = err("abuse:\n  notify_command: \"/bin/true --from port25\"\n");
    assert!(
        e.contains("must be a list") && e.contains("[\"/bin/true\"") && e.contains(":2:"),
        "{e}"
    );
    let e = err("abuse:\n  notify_command: [true]\n");
    assert!(e.contains("not an absolute path"), "{e}");
    let e = err("abuse:\n  notify_command: [/nonexistent/notify]\n");
    assert!(e.contains("/nonexistent/notify"), "{e}");
    let plain = std::env::temp_dir().join(format!("port25-notify-{}", std::process::id()));
    std::fs::write(&plain, "#!/bin/sh\n").unwrap();
    let e = err(&format!(
        "abuse:\n  notify_command: [{}]\n",
        plain.display()
    ));
    std::fs::remove_file(&plain).unwrap();
    assert!(e.contains("not executable"), "{e}");
    let e = err("abuse:\n  notify_command: [/etc]\n");
    assert!(e.contains("not a file"), "{e}");
    let e = err("abuse:\n  notify_command: []\n");
    assert!(e.contains("empty list"), "{e}");
    let e = err("abuse:\n  notify_command: [/bin/true, [x]]\n");
    assert!(e.contains("notify_command") || e.contains("string"), "{e}");
}

#[test]
fn registry_absent_is_sqlite_alone() {
    assert_eq!(parse("interfaces: []\n").unwrap().registry, None);
}

#[test]
fn registry_section_parses() {
    let c = parse(
        "interfaces: []\nregistry:\n  postgres: \"host=db.example.net dbname=port25 user=port25\"\n  router: bras-1\n",
    )
    .unwrap();
    let r = c.registry.unwrap();
    assert_eq!(r.router_name(), "bras-1");
    assert_eq!(r.password().unwrap(), None);
    let c =
        parse("interfaces: []\nregistry:\n  postgres: \"host=/run/postgresql dbname=port25\"\n")
            .unwrap();
    // Default router: the host name.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let host = host.trim();
    assert_eq!(c.registry.unwrap().router_name(), host);
}

#[test]
fn registry_refuses_a_password_in_the_connection_string() {
    let e = err("interfaces: []\nregistry:\n  postgres: \"host=db dbname=p password=s3cret\"\n");
    assert!(e.contains("must not hold a password"), "{e}");
    assert!(!e.contains("s3cret"), "the error repeats the password: {e}");
    let e = err("interfaces: []\nregistry:\n  postgres: \"postgresql://u:s3cret@db/p\"\n");
    assert!(e.contains("must not hold a password"), "{e}");
}

#[test]
fn registry_refuses_bad_values() {
    for (yaml, want) in [
        ("  postgres: \"dbname=p\"\n", "names no host"),
        ("  postgres: \"host=db\"\n", "names no database"),
        (
            "  postgres: \"host=db dbname=p bogus=1\"\n",
            "not a connection string",
        ),
        (
            "  postgres: \"host=db dbname=p\"\n  router: \"a b\"\n",
            "registry.router",
        ),
        (
            "  postgres: \"host=db dbname=p\"\n  router: \"\"\n",
            "registry.router",
        ),
        (
            "  postgres: \"host=db dbname=p\"\n  pasword_file: /x\n",
            "unknown field",
        ),
        (
            "  postgres: \"host=db dbname=p\"\n  password_file: rel/pw\n",
            "absolute",
        ),
        ("  router: r\n", "missing field `postgres`"),
    ] {
        let e = err(&format!("interfaces: []\nregistry:\n{yaml}"));
        assert!(e.contains(want), "{yaml}: {e}");
    }
}

#[test]
fn registry_password_file_must_be_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pg.pass");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let yaml = format!(
        "interfaces: []\nregistry:\n  postgres: \"host=db dbname=p\"\n  password_file: {}\n",
        pw.display()
    );
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = err(&yaml);
    assert!(e.contains("mode 644") && e.contains("chmod 0600"), "{e}");
    assert!(!e.contains("s3cret"), "{e}");
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let c = parse(&yaml).unwrap();
    assert_eq!(
        c.registry.unwrap().password().unwrap().as_deref(),
        Some("s3cret")
    );
    let e = err(&yaml.replace(&pw.display().to_string(), "/nonexistent/pg.pass"));
    assert!(e.contains("/nonexistent/pg.pass"), "{e}");
}

/// The daemon runs `notify_command` as root, and a subscriber can make it run (spray until
/// flagged): a program another local user could change or replace is refused, as sshd and
/// cron refuse such files.
#[test]
fn notify_command_others_could_change_is_refused() {
    use std::os::unix::fs::{chown, PermissionsExt};
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (chown)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("port25-notify-own-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let prog = dir.join("notify");
    std::fs::write(&prog, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = format!("abuse:\n  notify_command: [{}]\n", prog.display());
    parse(&cfg).expect("a root-owned 0755 program in a root-owned 0755 directory");

    let refused = |what: &str, want: &str| {
        let e = err(&cfg);
        assert!(e.contains(want) && e.contains("notify"), "{what}: {e}");
    };
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o777)).unwrap();
    refused("world-writable program", "writable");
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o775)).unwrap();
    refused("group-writable program", "writable");
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
    chown(&prog, Some(65534), None).unwrap();
    refused("program owned by nobody", "owned by uid 65534");
    chown(&prog, Some(0), None).unwrap();
    chown(&dir, Some(65534), None).unwrap();
    refused("directory owned by nobody", "owned by uid 65534");
    chown(&dir, Some(0), None).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    refused("world-writable directory", "writable");
    // Sticky and root's (as /tmp): others cannot rename or remove root's file in it.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    parse(&cfg).expect("a root-owned program in a sticky root-owned directory");
    // Through a symlink: the file it leads to is what runs.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let link = dir.join("link");
    std::os::unix::fs::symlink(&prog, &link).unwrap();
    chown(&prog, Some(65534), None).unwrap();
    let e = err(&format!("abuse:\n  notify_command: [{}]\n", link.display()));
    assert!(
        e.contains("owned by uid 65534"),
        "symlink to nobody's program: {e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The line scan that spares client verbs a YAML parse of a big config answers only where
/// YAML would answer the same; everything else goes to YAML.
#[test]
fn socket_scan_agrees_with_yaml_or_defers() {
    let yaml = |text: &str| match serde_yaml::from_str::<serde_yaml::Value>(text) {
        Ok(serde_yaml::Value::Mapping(m)) => Some(match m.get("socket") {
            Some(serde_yaml::Value::String(s)) if !s.is_empty() => Some(PathBuf::from(s)),
            _ => None,
        }),
        _ => None,
    };
    let sure = [
        "socket: /run/a.sock\n",
        "socket: \"/run/a b.sock\" # quoted\n",
        "socket: '/run/s.sock'\n",
        "interfaces:\n  - name: rs\n    hook: xdp\nsocket: /run/a.sock\npin_dir: /sys/fs/bpf/x\n",
        "exempt:\n- {prefix: 10.0.0.1/32}\n- {prefix: \"2001:db8::1/128\", note: \"it's [x\"}\nsocket: /run/c.sock\n",
        "subscriber_ranges: [100.64.0.0/10, \"2001:db8:100::/40\"]\nsocket:   /run/d.sock   # x\n",
        "mail_servers: [198.51.100.25/32]\n",
        "---\n# comment [\nsocket: /run/e.sock\n",
        // The scan stops at a sure `socket:`: what follows cannot name another (YAML
        // refuses a key given twice).
        "socket: /run/g.sock\nexempt: [10.0.0.1/32,\n  10.0.0.2/32]\n",
        "socket: /run/h.sock\nnote: \"a\nsocket: /run/x\"\n",
    ];
    for t in sure {
        let scan = scan_socket(t);
        assert_ne!(scan, Scan::Unsure, "{t:?}");
        let want = match yaml(t).expect("valid YAML") {
            Some(p) => Scan::Found(p),
            None => Scan::Absent,
        };
        assert_eq!(scan, want, "{t:?}");
    }
    // Where lines and YAML part: inside a flow collection or quoted scalar spanning lines,
    // a continued plain scalar, another kind of value, an unusual key.
    let unsure = [
        "a: [1,\nsocket: /run/x]\n",
        "a: {b: 1,\nsocket: /run/x}\n",
        "a: \"abc\nsocket: /run/x\"\n",
        "a: 'q\nsocket: /run/x'\n",
        "a: \"q\\\" [\nsocket: /run/x\"\n",
        "socket: /run/a\n  b\n",
        "socket: ~\n",
        "socket: 12\n",
        "socket: *anchor\n",
        "\"socket\": /run/x\n",
        "{socket: /run/x}\n",
        "<<: *base\n",
        "socket: \"/run/\\x41\"\n",
        // Conservative: a block scalar's text is judged as if it were flow.
        "a: |\n  x [\nsocket: /run/f.sock\n",
        // YAML's key is `socket` (a plain scalar's trailing blanks are not part of it).
        "socket : /run/x\n",
        "socket\t: /run/x\n",
        // A top-level mapping indented as a whole: YAML's keys all the same.
        "  socket: /run/x\n  pin_dir: /sys/fs/bpf/x\n",
        "# c\n\n  socket: /run/x\n",
        // Line breaks YAML (libyaml) sees where `\n` lines do not.
        "a: x\rsocket: /run/x\n",
        "a: x\u{2028}socket: /run/x\n",
        "a: x\u{2029}socket: /run/x\n",
        "a: x\u{85}socket: /run/x\n",
    ];
    for t in unsure {
        assert_eq!(scan_socket(t), Scan::Unsure, "{t:?}");
    }
    // These name a socket for YAML (and the daemon) where lines saw none.
    for t in [
        "socket : /run/x\n",
        "  socket: /run/x\n  pin_dir: /sys/fs/bpf/x\n",
    ] {
        assert_eq!(yaml(t), Some(Some(PathBuf::from("/run/x"))), "{t:?}");
    }
    // And a sure answer for the big config the scan is for, where YAML takes seconds.
    let mut big = String::from("socket: /run/big.sock\nexempt:\n");
    for i in 0..100_000u32 {
        let [a, b, c, d] = (0x0a00_0000 + i).to_be_bytes();
        big.push_str(&format!(
            "  - {{prefix: {a}.{b}.{c}.{d}/32, note: \"n{i}\"}}\n"
        ));
    }
    assert_eq!(scan_socket(&big), Scan::Found("/run/big.sock".into()));
    // YAML refuses a second top-level `socket:`, so the first sure one is the only one a
    // daemon could have started with.
    assert!(yaml("socket: /run/a\nsocket: /run/b\n").is_none());
    assert_eq!(
        scan_socket("socket: /run/a\nsocket: /run/b\n"),
        Scan::Found("/run/a".into())
    );
}

/// `status` and `check` parse only the sections they read when the file's top level can be
/// told apart by lines; what they get is what the whole parse gives for those keys.
#[test]
fn reading_verbs_parse_only_their_sections() {
    let text = format!(
        "{IFACE}subscriber_ranges: [100.64.0.0/10, \"2001:db8:100::/40\"]\nexempt:\n- {{prefix: 10.0.0.1/32, note: \"a: b\"}}\n- prefix: 10.0.0.2/32\npin_dir: /sys/fs/bpf/x\nstate_dir: \"/var/lib/x\"\nsocket: /run/x.sock # c\n"
    );
    let small = sections(&text, &["interfaces", "pin_dir", "state_dir", "socket"]).unwrap();
    assert!(
        !small.contains("exempt") && !small.contains("subscriber"),
        "{small}"
    );
    let (full, part) = (parse(&text).unwrap(), parse(&small).unwrap());
    assert_eq!(full.interfaces, part.interfaces);
    assert_eq!(
        (full.pin_dir, full.state_dir, full.socket),
        (part.pin_dir, part.state_dir, part.socket)
    );
    // A flow collection over lines, a quoted key: the whole file is parsed.
    assert_eq!(
        sections("exempt: [10.0.0.1/32,\n  10.0.0.2/32]\n", &["x"]),
        None
    );
    assert_eq!(sections("\"pin_dir\": /x\n", &["x"]), None);
    // YAML reads `pin_dir : /x` as pin_dir, and an indented top level as the top level.
    assert_eq!(sections("pin_dir : /x\n", &["pin_dir"]), None);
    assert_eq!(
        sections("  pin_dir: /x\n  socket: /y\n", &["pin_dir"]),
        None
    );
}

/// `status` is where an operator looks: a config whose next reload or start would fail is
/// reported there (non-zero exit), as before the reading verbs parsed only their sections.
/// Only a config too big to parse quickly is read by sections.
#[test]
fn status_still_reports_a_broken_config() {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        f.path(),
        format!("{IFACE}exempt:\n- 10.0.0.1/33\npin_dir: /sys/fs/bpf/x\n"),
    )
    .unwrap();
    let e = Config::load_for_reading(f.path()).expect_err("a broken exempt entry");
    assert!(e.to_string().contains("10.0.0.1/33"), "{e}");
}

/// The scan's sure answer is kept on the file (root only: `trusted.*`): the next client
/// verb reads it without scanning, and any write to the file voids it.
#[test]
fn the_socket_hint_answers_until_the_file_changes() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: trusted.* extended attributes need root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("port25.yaml");
    std::fs::write(&f, "interfaces: []\nsocket: /run/a.sock\n").unwrap();
    assert_eq!(socket_named(&f), Some(PathBuf::from("/run/a.sock")));
    let file = std::fs::File::open(&f).unwrap();
    let id = socket_hint::identity(&file).unwrap();
    assert_eq!(
        socket_hint::read(&file, &id),
        Some(Some(PathBuf::from("/run/a.sock"))),
        "the answer is kept on the file"
    );
    // The kept answer is what a client verb reads (here one planted for the same file).
    socket_hint::write(&file, &id, Some(Path::new("/run/kept.sock")));
    assert_eq!(socket_named(&f), Some(PathBuf::from("/run/kept.sock")));
    // Written in place (same inode, same size): the hint no longer describes the file.
    std::fs::write(&f, "interfaces: []\nsocket: /run/b.sock\n").unwrap();
    assert_eq!(socket_named(&f), Some(PathBuf::from("/run/b.sock")));
    std::fs::write(&f, "interfaces: []\n").unwrap();
    assert_eq!(socket_named(&f), None);
    assert_eq!(socket_named(&f), None, "an absent socket is kept too");
    // An unsure scan keeps nothing: YAML decides each time.
    std::fs::write(&f, "a: [1,\nsocket: /run/x]\nsocket: /run/c.sock\n").unwrap();
    assert_eq!(socket_named(&f), Some(PathBuf::from("/run/c.sock")));
    let file = std::fs::File::open(&f).unwrap();
    let id = socket_hint::identity(&file).unwrap();
    assert_eq!(socket_hint::read(&file, &id), None);
}

/// The plain list forms are read by the fast path (not deferred), with what YAML reads,
/// and a refusal after the list keeps its line.
#[test]
fn plain_exempt_list_takes_the_fast_path() {
    let path = Path::new("f.yaml");
    let mut text = String::from("interfaces:\n  - {name: eth1, hook: xdp}\nexempt:\n");
    for i in 0..300u32 {
        let [a, b, c, d] = (0x0a00_0000u32 + i).to_be_bytes();
        if i % 3 == 0 {
            text.push_str(&format!("  - prefix: {a}.{b}.{c}.{d}/32\n"));
        } else {
            text.push_str(&format!("  - {{prefix: {a}.{b}.{c}.{d}/32}}\n"));
        }
        if i % 50 == 0 {
            text.push_str("  # a comment\n\n");
        }
    }
    text.push_str("  - {prefix: 2001:db8::/48}\nsocket: /run/x.sock\n");
    let split = super::fast::split_exempt(&text).expect("the plain form is taken");
    assert_eq!(split.exempt.len(), 301);
    assert_eq!(split.rest.lines().count(), text.lines().count());
    let fast = Config::parse_with(&text, path, true).unwrap();
    assert_eq!(fast, Config::parse_with(&text, path, false).unwrap());
    assert_eq!(fast.exempt.len(), 301);

    let bad = format!("{text}bogus: 1\n");
    let line = bad.lines().count();
    assert!(super::fast::split_exempt(&bad).is_some());
    match Config::parse_with(&bad, path, true).unwrap_err() {
        ConfigError::Syntax { line: l, msg, .. } => {
            assert_eq!(l, line, "{msg}");
            assert!(msg.contains("bogus"), "{msg}");
        }
        e => panic!("{e}"),
    }
    assert_eq!(
        Config::parse_with(&bad, path, true)
            .unwrap_err()
            .to_string(),
        Config::parse_with(&bad, path, false)
            .unwrap_err()
            .to_string()
    );
}

/// Times the parse of a config named by PORT25_TIME_CONFIG (by hand: a million entries).
#[test]
#[ignore]
fn time_parse() {
    let Ok(p) = std::env::var("PORT25_TIME_CONFIG") else {
        return;
    };
    let text = std::fs::read_to_string(&p).unwrap();
    for fast in [true, false, true] {
        let t = std::time::Instant::now();
        let c = Config::parse_with(&text, Path::new(&p), fast).unwrap();
        eprintln!(
            "fast {fast}: {} ms, {} exempt",
            t.elapsed().as_millis(),
            c.exempt.len()
        );
    }
}

/// The plain `exempt:` fast path against YAML on forms the proptest does not generate:
/// document markers and a block-scalar document, a BOM, an entry list at column 0 with a
/// later list at column 0 under another key, lines after the section that YAML would take
/// for entries, odd bytes in comments and blank lines, prefixes YAML could read as numbers,
/// leading zeros in a length. Each text as the whole file, after `interfaces:`, and before it.
#[test]
fn fast_exempt_list_agrees_with_yaml_on_markers_and_odd_lines() {
    let head = "interfaces:\n  - name: eth1\n    hook: xdp\n";
    let cases = [
        "--- |\nexempt:\n  - prefix: 10.0.0.0/8\n",
        "---\nexempt:\n  - prefix: 10.0.0.0/8\n",
        "--- !!map\nexempt:\n  - prefix: 10.0.0.0/8\n",
        "exempt:\n- prefix: 10.0.0.0/8\n- {prefix: 10.1.0.0/16}\n",
        "exempt:\n  - prefix: 10.0.0.0/8\n...\n",
        "exempt:\n  - prefix: 10.0.0.0/8\n---\nexempt:\n  - prefix: 10.1.0.0/16\n",
        "socket: >\n  x\nexempt:\n  - prefix: 10.0.0.0/8\n",
        "exempt:\n  - prefix: 10.0.0.0/8\n  #\x7f\n",
        "exempt:\n  - prefix: 10.0.0.0/8\n\x0c\n",
        "exempt:\n  - prefix: 10.0.0.0/8\n \t\n",
        "exempt:\n  - prefix: 10.0.0.0/8\n\n\n  - prefix: 10.1.0.0/16\nsocket: /run/x\n",
        "exempt:\n  - prefix: 10.0.0.0/8\r\n  - prefix: 10.1.0.0/16\r\n",
        "exempt:\n  - prefix: 1:2:3:4:5:6:7:8\n",
        "exempt:\n  - {prefix: 1:2:3:4:5:6:7:8}\n",
        "exempt:\n  - {prefix: 1:2:3::/48}\n",
        "exempt:\n  - prefix: 0x0a.0.0.0/8\n",
        "exempt:\n  - prefix: 10.0.0.0/08\n",
        "exempt:\n  - prefix: 10.0.0.0/008\n",
        "exempt:\n  - prefix: 1.2.3.4/32\n  - prefix: 1.2.3.4\n",
        "exempt:\n  - prefix: 10.0.0.0/8\nexempt_x: 1\n",
        "exempt:\n  - prefix: 10.0.0.0/8\n\u{feff}socket: /x\n",
        "exempt:\n  - prefix: 10.0.0.0/8\n  - prefix: 10.1.0.0/16\n  \n# end\n",
        "exempt:\n  - prefix: 10.0.0.0/8\n  - prefix: 10.1.0.0/16",
        "exempt:\n  - prefix: 10.0.0.0/8\n  - prefix: 10.1.0.0/16\r",
        "exempt:\n  - prefix: 10.0.0.0/8\n#\x01\n",
        "exempt:\n  - prefix: 10.0.0.0/8\n  - prefix: 10.1.0.0/16\n-\n",
        "exempt:\n  - prefix: 10.0.0.0/8\n  - prefix: 10.1.0.0/16\n- prefix: 10.2.0.0/16\n",
        "exempt:\n- prefix: 10.0.0.0/8\nsocket: /x\n- prefix: 10.2.0.0/16\n",
        "exempt:\n  - {prefix: 10.0.0.0/8}}\n",
        "exempt:\n  - prefix: 10.0.0.0/8:\n",
        "exempt:\n  - prefix: 2001:db8::1:\n",
        "exempt:\n  - prefix: 2001:db8:0:0:0:0:0:0/32\n",
        "exempt:\n  - prefix: 1.2.3.0/24\n  - prefix: 1.2.3.0/024\n",
    ];
    for c in cases {
        for text in [format!("{head}{c}"), c.to_string(), format!("{c}\n{head}")] {
            let path = Path::new("f.yaml");
            let fast = Config::parse_with(&text, path, true).map_err(|e| e.to_string());
            let yaml = Config::parse_with(&text, path, false).map_err(|e| e.to_string());
            assert_eq!(fast, yaml, "{text:?}");
        }
    }
}

/// The two-pass form [`closes_what_it_opens`] replaced (a byte class fold over the line, then
/// the brackets and quotes), kept as the reference the one-pass form must agree with.
/// Whether `line` closes every flow bracket and quoted scalar it opens (a comment ends it),
/// and holds no line break YAML sees and `\n` lines do not.
pub(super) fn closes_what_it_opens_two_pass(line: &str) -> bool {
    let b = line.as_bytes();
    let class = b.iter().fold(0, |c, x| c | TWO_PASS_CLASS[*x as usize]);
    if class == 0 {
        return true;
    }
    // A line break YAML (libyaml) knows inside what `\n` lines take for one line: a bare CR,
    // NEL, LS or PS. What follows it may be a key of its own.
    if class & BREAK != 0
        && (b.contains(&b'\r')
            || b.windows(2).any(|w| w == [0xc2, 0x85])
            || b.windows(3)
                .any(|w| w == [0xe2, 0x80, 0xa8] || w == [0xe2, 0x80, 0xa9]))
    {
        return false;
    }
    if class & OPENS == 0 {
        return true;
    }
    let (mut depth, mut i) = (0i32, 0);
    while i < b.len() {
        match b[i] {
            b'"' => loop {
                i += 1;
                match b.get(i) {
                    None => return false,
                    Some(b'\\') => i += 1,
                    Some(b'"') => break,
                    _ => {}
                }
            },
            // Only at the start of a scalar is `'` a quote (`it's` is plain text).
            b'\'' if i == 0 || matches!(b[i - 1], b' ' | b'\t' | b'[' | b'{' | b',' | b':') => {
                loop {
                    i += 1;
                    match b.get(i) {
                        None => return false,
                        Some(b'\'') if b.get(i + 1) == Some(&b'\'') => i += 1,
                        Some(b'\'') => break,
                        _ => {}
                    }
                }
            }
            b'#' if i == 0 || matches!(b[i - 1], b' ' | b'\t') => break,
            b'[' | b'{' => depth += 1,
            b']' | b'}' => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => {}
        }
        i += 1;
    }
    depth == 0
}

/// `TWO_PASS_CLASS` of the bytes that may open or close something across lines: brackets, quotes.
const OPENS: u8 = 1;
/// `TWO_PASS_CLASS` of the bytes that may start a line break other than `\n`: CR, and the first
/// bytes of NEL, LS and PS.
const BREAK: u8 = 2;
/// What a byte may mean to the two-pass form (one table, one pass over a line).
const TWO_PASS_CLASS: [u8; 256] = {
    let mut t = [0; 256];
    let (opens, breaks) = (b"[]{}\"'", b"\r\xc2\xe2");
    let mut i = 0;
    while i < opens.len() {
        t[opens[i] as usize] = OPENS;
        i += 1;
    }
    i = 0;
    while i < breaks.len() {
        t[breaks[i] as usize] = BREAK;
        i += 1;
    }
    t
};
