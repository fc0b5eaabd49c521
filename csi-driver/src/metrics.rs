//! One Prometheus scrape target per node: `/metrics` of the node plugin merges the metrics of
//! every volume's daemon on this node.
//!
//! Each interposer-fs daemon serves its own registry on a loopback port (recorded in the volume's
//! state). On a scrape the node plugin fetches them all and merges them family by family (the
//! exposition format allows each metric family once), adding `csi_interposer_volume_up` so a
//! dead daemon shows as 0 instead of vanishing.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::driver::Driver;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// GET `url` (http://127.0.0.1:PORT/metrics) with short timeouts; the body, or None.
fn fetch(url: &str) -> Option<String> {
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, "metrics"));
    let addr: SocketAddr = host.parse().ok()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let (head, body) = body.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// Merge OpenMetrics expositions: one header per family, the samples of all inputs under it.
pub fn merge(expositions: &[String]) -> String {
    struct Family {
        header: Vec<String>,
        samples: Vec<String>,
    }
    let mut order: Vec<String> = Vec::new();
    let mut families: HashMap<String, Family> = HashMap::new();
    for text in expositions {
        let mut current: Option<String> = None;
        for line in text.lines() {
            if line == "# EOF" || line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                let (_kind, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let fresh = !families.contains_key(name);
                let f = families.entry(name.to_string()).or_insert_with(|| Family {
                    header: Vec::new(),
                    samples: Vec::new(),
                });
                if fresh {
                    order.push(name.to_string());
                }
                if !f.header.iter().any(|h| h == line) {
                    f.header.push(line.to_string());
                }
                current = Some(name.to_string());
            } else if let Some(name) = &current {
                if let Some(f) = families.get_mut(name) {
                    f.samples.push(line.to_string());
                }
            }
        }
    }
    let mut out = String::new();
    for name in order {
        if let Some(f) = families.get(&name) {
            for h in &f.header {
                out.push_str(h);
                out.push('\n');
            }
            for s in &f.samples {
                out.push_str(s);
                out.push('\n');
            }
        }
    }
    out.push_str("# EOF\n");
    out
}

/// The node's exposition: every volume's metrics plus whether each answered.
fn collect(driver: &Driver) -> String {
    let records = driver.state.nodes().unwrap_or_default();
    let mut parts = Vec::new();
    let mut up = String::from(
        "# HELP csi_interposer_volume_up Whether the volume's interposer-fs answered this scrape (1) or not (0)\n\
         # TYPE csi_interposer_volume_up gauge\n",
    );
    for r in &records {
        let Some(url) = &r.metrics_url else { continue };
        let body = fetch(url);
        up.push_str(&format!(
            "csi_interposer_volume_up{{volume=\"{}\"}} {}\n",
            r.id,
            u8::from(body.is_some())
        ));
        parts.extend(body);
    }
    parts.push(up);
    merge(&parts)
}

/// Serve `/metrics` on an already-bound listener until the process ends.
pub async fn serve(driver: Arc<Driver>, listener: TcpListener) -> std::io::Result<()> {
    log::info!(
        "serving node metrics on http://{}/metrics",
        listener.local_addr()?
    );
    loop {
        let (mut sock, _) = listener.accept().await?;
        let driver = driver.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let n = match sock.read(&mut buf).await {
                Ok(n) => n,
                Err(_) => return,
            };
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("");
            let (status, ctype, body) = if path.starts_with("/metrics") {
                let body = tokio::task::spawn_blocking(move || collect(&driver))
                    .await
                    .unwrap_or_default();
                ("200 OK", CONTENT_TYPE, body)
            } else {
                ("404 Not Found", "text/plain", "try /metrics\n".to_string())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_from_several_volumes_are_merged_under_one_header() {
        let a = "# HELP x_total Ops.\n# TYPE x_total counter\nx_total{volume=\"a\"} 1\n# HELP y Y.\n# TYPE y gauge\ny{volume=\"a\"} 2\n# EOF\n".to_string();
        let b = "# HELP x_total Ops.\n# TYPE x_total counter\nx_total{volume=\"b\"} 3\n# EOF\n"
            .to_string();
        let m = merge(&[a, b]);
        assert_eq!(m.matches("# TYPE x_total counter").count(), 1);
        assert!(
            m.contains("x_total{volume=\"a\"} 1\nx_total{volume=\"b\"} 3\n"),
            "{m}"
        );
        assert!(m.ends_with("# EOF\n"));
        assert_eq!(m.matches("# EOF").count(), 1);
        assert!(m.find("# HELP y").unwrap() > m.find("x_total{volume=\"b\"}").unwrap());
    }
}
