//! A real headless Chromium, driven over the DevTools protocol: what the
//! console tests use to click through pages as an operator would.
//!
//! Chromium is started with the flags the console issue names, a fresh
//! profile in a temporary folder, and `--remote-debugging-port=0`; it writes
//! the port it took to `DevToolsActivePort` in that folder. The test talks
//! to its one page over a WebSocket: navigate, evaluate JavaScript, capture
//! a screenshot. Killed when dropped.

use std::time::Duration;

use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long Chromium gets to start, and a page to load.
const START_WITHIN: Duration = Duration::from_secs(20);
const LOAD_WITHIN: Duration = Duration::from_secs(15);
/// How long one DevTools command may take.
const COMMAND_WITHIN: Duration = Duration::from_secs(15);

/// Where `.ci/run` installs Chromium (Debian's package).
pub const CHROMIUM: &str = "chromium";

pub struct Browser {
    child: tokio::process::Child,
    page: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Browser {
    /// A fresh headless Chromium with a window of `width` x `height`.
    pub async fn start(width: u32, height: u32) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let child = tokio::process::Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
                &format!("--window-size={width},{height}"),
                &format!("--user-data-dir={}", profile.path().display()),
                "about:blank",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| {
                panic!("starting `{CHROMIUM}` (install Debian's chromium package): {err}")
            });
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = tokio::time::Instant::now() + START_WITHIN;
        let port = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file)
                && let Some(port) = text
                    .lines()
                    .next()
                    .and_then(|line| line.parse::<u16>().ok())
            {
                break port;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromium did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let targets: Value = reqwest::get(format!("http://127.0.0.1:{port}/json/list"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let page_url = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|target| target["type"] == "page")
            .and_then(|target| target["webSocketDebuggerUrl"].as_str())
            .expect("chromium has a page")
            .to_owned();
        let (page, _) = tokio_tungstenite::connect_async(page_url).await.unwrap();
        let mut browser = Browser {
            child,
            page,
            next_id: 0,
            _profile: profile,
        };
        browser
            .command(
                "Emulation.setDeviceMetricsOverride",
                json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
            )
            .await;
        browser
    }

    /// Sends one DevTools command and waits for its result (events that
    /// arrive meanwhile are dropped).
    pub async fn command(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let message = json!({"id": id, "method": method, "params": params}).to_string();
        self.page.send(Message::Text(message.into())).await.unwrap();
        let reply = tokio::time::timeout(COMMAND_WITHIN, async {
            loop {
                let message = self.page.next().await.expect("the page is open").unwrap();
                let Message::Text(text) = message else {
                    continue;
                };
                let reply: Value = serde_json::from_str(&text).unwrap();
                if reply["id"] == id {
                    return reply;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{method} got no answer"));
        assert!(reply["error"].is_null(), "{method}: {reply}");
        reply["result"].clone()
    }

    /// The value of a JavaScript expression in the page (awaited if a promise).
    pub async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .command(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        assert!(
            result["exceptionDetails"].is_null(),
            "{expression}: {}",
            result["exceptionDetails"]
        );
        result["result"]["value"].clone()
    }

    /// Opens `url` and waits until it has loaded.
    pub async fn open(&mut self, url: &str) {
        self.mark_document().await;
        self.command("Page.navigate", json!({"url": url})).await;
        self.wait_for_new_document().await;
    }

    /// Clicks what `selector` finds, then waits for the page it leads to.
    pub async fn click_and_wait(&mut self, selector: &str) {
        self.mark_document().await;
        let found = self
            .eval(&format!(
                "(() => {{ const el = document.querySelector({}); if (!el) return false; el.click(); return true; }})()",
                json!(selector)
            ))
            .await;
        assert_eq!(found, json!(true), "nothing matches {selector}");
        self.wait_for_new_document().await;
    }

    /// Sets the value of the input `selector` finds.
    pub async fn fill(&mut self, selector: &str, value: &str) {
        let found = self
            .eval(&format!(
                "(() => {{ const el = document.querySelector({}); if (!el) return false; el.value = {}; return true; }})()",
                json!(selector),
                json!(value)
            ))
            .await;
        assert_eq!(found, json!(true), "nothing matches {selector}");
    }

    /// The text of what `selector` finds, or `None`.
    pub async fn text(&mut self, selector: &str) -> Option<String> {
        let value = self
            .eval(&format!(
                "(() => {{ const el = document.querySelector({}); return el ? el.textContent.trim() : null; }})()",
                json!(selector)
            ))
            .await;
        value.as_str().map(str::to_owned)
    }

    /// How many elements `selector` finds.
    pub async fn count(&mut self, selector: &str) -> usize {
        let value = self
            .eval(&format!(
                "document.querySelectorAll({}).length",
                json!(selector)
            ))
            .await;
        value.as_u64().unwrap() as usize
    }

    /// The page's whole text.
    pub async fn body_text(&mut self) -> String {
        self.eval("document.body ? document.body.innerText : ''")
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// A PNG of the whole page.
    pub async fn screenshot(&mut self) -> Vec<u8> {
        let metrics = self.command("Page.getLayoutMetrics", json!({})).await;
        let height = metrics["cssContentSize"]["height"]
            .as_f64()
            .unwrap_or(900.0);
        let width = metrics["cssContentSize"]["width"]
            .as_f64()
            .unwrap_or(1280.0);
        let shot = self
            .command(
                "Page.captureScreenshot",
                json!({
                    "format": "png",
                    "captureBeyondViewport": true,
                    "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
                }),
            )
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap()
    }

    /// Marks the current document, so that a new one is told apart.
    async fn mark_document(&mut self) {
        self.eval("window.__tally_old_document = true").await;
    }

    async fn wait_for_new_document(&mut self) {
        let deadline = tokio::time::Instant::now() + LOAD_WITHIN;
        loop {
            let ready = self
                .eval("!window.__tally_old_document && document.readyState === 'complete'")
                .await;
            if ready == json!(true) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the page did not load"
            );
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
}
