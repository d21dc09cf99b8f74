//! The control socket, `vublk stat`/`top` and the Prometheus endpoint of a
//! real daemon that served real I/O from a libblkio frontend.

mod common;
mod ops_support;

use std::os::unix::fs::PermissionsExt;

use common::{fill_pattern, Client};
use ops_support::*;

#[test]
fn control_socket_stat_top_and_metrics_report_the_same_io() {
    let dir = tmp();
    let sock = join(&dir, "vhost.sock");
    let ctl = join(&dir, "vublk.ctl");
    let metrics = format!("127.0.0.1:{}", free_port());
    let img = join(&dir, "d.img");
    let mut p = Proc::spawn(image_cmd(
        &sock,
        &img,
        &[
            "--num-queues",
            "2",
            "--control",
            path_str(&ctl),
            "--metrics",
            &metrics,
        ],
    ));
    // The control socket is bound after the vhost-user one.
    wait_for_path(&mut p, &ctl);
    let mode = std::fs::metadata(&ctl).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode");

    // Known I/O: 12 writes and 5 reads of 4 KiB on queue 0, 3 reads on 1.
    let mut c = Client::connect_retry(&sock, 2);
    fill_pattern(c.buf(0, 4096), 1, 0);
    for i in 0..12u64 {
        assert_eq!(c.write(0, i * 4096, 0, 4096), 0);
    }
    for i in 0..5u64 {
        assert_eq!(c.read(0, i * 4096, 8192, 4096), 0);
    }
    for i in 0..3u64 {
        assert_eq!(c.read(1, i * 4096, 16384, 4096), 0);
    }

    let v = control(&ctl, r#"{"cmd":"version"}"#);
    assert_eq!(v["ok"], true);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["pid"], p.pid());

    let s = control(&ctl, "stats");
    assert_eq!(s["ok"], true, "{s}");
    assert_eq!(s["state"], "serving");
    let q = &s["queues"];
    assert_eq!(q.as_array().unwrap().len(), 2);
    assert_eq!(q[0]["writes"], 12);
    assert_eq!(q[0]["reads"], 5);
    assert_eq!(q[0]["bytes_written"], 12 * 4096);
    assert_eq!(q[1]["reads"], 3);
    assert_eq!(q[1]["writes"], 0);
    assert!(q[0]["latency_count"].as_u64().unwrap() >= 17, "{s}");
    assert!(q[0]["latency_p99_ns"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(q[0]["inflight"], 0);
    assert_eq!(s["alarms"]["active"], 0);
    assert_eq!(s["qos"], serde_json::json!({}));

    // Live QoS change, then read back through stats and metrics.
    let r = control(
        &ctl,
        r#"{"cmd":"set-qos","qos-iops":1000,"qos-bps":"100M","qos-iops-burst":2000}"#,
    );
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["qos"]["qos-iops"], 1000);
    assert_eq!(r["qos"]["qos-bps"], 100 << 20);
    let s = control(&ctl, r#"{"cmd":"stats"}"#);
    assert_eq!(s["qos"]["qos-iops-burst"], 2000, "{s}");
    for bad in [
        r#"{"cmd":"set-qos","qos-iops-burst":10}"#,
        r#"{"cmd":"set-qos","qos-iopz":10}"#,
        r#"{"cmd":"set-qos","disk":"null:1G"}"#,
        r#"{"cmd":"reboot"}"#,
        "{not json",
    ] {
        let r = control(&ctl, bad);
        assert_eq!(r["ok"], false, "{bad} -> {r}");
        assert!(r["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let a = control(&ctl, "alarms");
    assert_eq!(a["ok"], true);
    assert_eq!(a["alarms"]["list"], serde_json::json!([]));

    // vublk stat: one snapshot as a table, or the JSON answer.
    let out = run(&["stat", "--control", path_str(&ctl)]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("serving a frontend"), "{text}");
    assert!(text.contains("iops=1000"), "{text}");
    let row0 = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("0"))
        .unwrap_or_else(|| panic!("no queue 0 row:\n{text}"));
    let cols: Vec<&str> = row0.split_whitespace().collect();
    assert_eq!((cols[1], cols[2]), ("5", "12"), "reads, writes: {row0}");
    assert!(text.lines().any(|l| l.starts_with("total")), "{text}");
    let out = run(&["stat", "--json", "--control", path_str(&ctl)]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["queues"][1]["reads"], 3);

    // The same counters through a config file's `control` key.
    let cfg = join(&dir, "vublk.toml");
    std::fs::write(&cfg, format!("control = \"{}\"\n", ctl.display())).unwrap();
    let out = run(&["stat", "--config", path_str(&cfg)]);
    assert!(out.status.success(), "{out:?}");
    let out = run(&["stat"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("control"));

    // vublk top: frames with a clear-screen escape and the rate columns.
    let top = std::process::Command::new(VUBLK)
        .args(["top", "--control", path_str(&ctl), "--interval", "0.2"])
        .args(["--count", "2"])
        .output()
        .unwrap();
    assert!(top.status.success(), "{top:?}");
    let text = String::from_utf8(top.stdout).unwrap();
    assert_eq!(text.matches("\x1b[H\x1b[2J").count(), 2, "{text}");
    assert!(text.contains("r/s") && text.contains("p99") && text.contains("qd"));

    // Prometheus: the same counters.
    let resp = http_get(&metrics, "/metrics");
    assert!(resp.starts_with("HTTP/1.0 200 OK"), "{resp}");
    assert!(resp.contains("Content-Type: text/plain; version=0.0.4"));
    for line in [
        "vublk_requests_total{queue=\"0\",op=\"write\"} 12",
        "vublk_requests_total{queue=\"0\",op=\"read\"} 5",
        "vublk_requests_total{queue=\"1\",op=\"read\"} 3",
        "vublk_bytes_total{queue=\"0\",dir=\"write\"} 49152",
        "vublk_frontend_connected 1",
        "vublk_qos_limit{key=\"qos-iops\"} 1000",
        "vublk_alarms_active 0",
        "# TYPE vublk_request_latency_seconds summary",
    ] {
        assert!(resp.contains(line), "missing `{line}` in\n{resp}");
    }
    assert!(http_get(&metrics, "/nope").starts_with("HTTP/1.0 404"));

    // set-qos with no keys lifts every limit.
    let r = control(&ctl, r#"{"cmd":"set-qos"}"#);
    assert_eq!(r["qos"], serde_json::json!({}));
    drop(c);
    assert!(p.terminate().success());
    assert!(!sock.exists());
}

#[test]
fn a_live_control_socket_is_not_taken_over() {
    let dir = tmp();
    let ctl = join(&dir, "vublk.ctl");
    let a = join(&dir, "a.sock");
    let b = join(&dir, "b.sock");
    let mut first = Proc::spawn(daemon_cmd(&a, &["--control", path_str(&ctl)]));
    wait_for_path(&mut first, &ctl);
    let out = std::process::Command::new(VUBLK)
        .arg("--socket")
        .arg(&b)
        .args(["--disk", "null:1M", "--control", path_str(&ctl)])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{out:?}"
    );
    assert_eq!(control(&ctl, "version")["pid"], first.pid());
    assert!(first.terminate().success());
}
