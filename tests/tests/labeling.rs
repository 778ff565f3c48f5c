//! The review queue and labeling page, as a quality engineer uses them: the daemon (a real
//! process) inspects a synthetic strip with a model trained on it and queues frames for review;
//! the API refuses what it must; headless Chromium (Debian's `chromium` + `chromium-driver`,
//! installed by `.ci/run`) signs in, opens the queue, draws a box, picks a class, looks at the
//! heat map, saves; the export (tar, NEU-DET VOC layout) carries exactly that box. One file: the
//! API and the page are tested against the same running daemon.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e::{Edge, Fixtures, run_ok};
use fantoccini::actions::{InputSource, MouseActions, PointerAction};
use fantoccini::{Client, ClientBuilder, Locator};

const TOKEN: &str = "anna-0123456789abcdef";
const FRAMES: usize = 10;
const T: Duration = Duration::from_secs(90);

/// A daemon with `[review]`, offline, inspecting `FRAMES` frames of a 400x200 synthetic strip
/// with the strip fixture model; every frame is queued (pass_rate 1).
fn start_daemon(dir: &Path) -> (Edge, String) {
    let files = Fixtures::at(dir);
    let public = files.keygen("fleet");
    files.synth(1, 3);
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/strip-nano.safetensors");
    e2e::package(
        &model,
        &files.path("keys/fleet.key"),
        1,
        &files.golden("scratches_1.jpg"),
        &files.path("strip.edgepkg"),
    );
    let port = e2e::free_port();
    let base = e2e::offline_edge_config("cam1", &[], &public, &files.path("strip.edgepkg"), "");
    let config = format!(
        r#"{base}
[http]
listen = "127.0.0.1:{port}"

[source]
kind = "synthetic"
tiles = 2
frame_height = 200
defect_rate = 0.5
seed = 21
frames = {FRAMES}

[pipeline]
tile = 200
tile_overlap = 0
on_full = "block"

[rules]
min_score = 0.15

[review]
labelers = {{ anna = "{TOKEN}", ben = "ben-fedcba9876543210" }}
pass_rate = 1.0
"#,
    );
    let edge = Edge::start(dir, "cam1", &config);
    let base = format!("http://127.0.0.1:{port}");
    assert!(
        e2e::wait_port(port, T),
        "the daemon's HTTP server did not start; edge log:\n{}",
        edge.log()
    );
    // Wait until every frame is queued.
    let until = Instant::now() + T;
    loop {
        if let (200, body) = call(
            "GET",
            &format!("{base}/api/review/config"),
            Some(TOKEN),
            None,
        ) {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            if v["pending"].as_u64() == Some(FRAMES as u64) {
                break;
            }
        }
        assert!(
            Instant::now() < until,
            "frames not queued for review in time; edge log:\n{}",
            edge.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    (edge, base)
}

fn call(method: &str, url: &str, token: Option<&str>, body: Option<&[u8]>) -> (u16, Vec<u8>) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = ureq::http::Request::builder()
        .method(method)
        .uri(url)
        .header("Content-Type", "application/json");
    if let Some(t) = token {
        request = request.header("Authorization", format!("Bearer {t}"));
    }
    let result = agent.run(request.body(body.unwrap_or_default().to_vec()).unwrap());
    let mut resp = result.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .with_config()
        .limit(256 << 20)
        .read_to_vec()
        .unwrap();
    (status, body)
}

fn untar(bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut archive = tar::Archive::new(bytes);
    for entry in archive.entries().unwrap() {
        let mut e = entry.unwrap();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        files.insert(e.path().unwrap().display().to_string(), data);
    }
    files
}

/// `(class, [xmin, ymin, xmax, ymax])` of each object in a VOC annotation.
fn objects(xml: &str) -> Vec<(String, [f32; 4])> {
    let tag = |s: &str, t: &str| -> String {
        let open = format!("<{t}>");
        let start = s.find(&open).map(|i| i + open.len()).unwrap();
        s[start..start + s[start..].find("</").unwrap()].to_string()
    };
    xml.split("<object>")
        .skip(1)
        .map(|o| {
            let n = |t: &str| tag(o, t).trim().parse::<f32>().unwrap();
            (tag(o, "name"), [n("xmin"), n("ymin"), n("xmax"), n("ymax")])
        })
        .collect()
}

#[test]
fn labeling_api_refuses_bad_requests_and_exports_voc() {
    let dir = tempfile::tempdir().unwrap();
    let (edge, base) = start_daemon(dir.path());
    let api = |p: &str| format!("{base}/api/review{p}");
    let reason = |b: &[u8]| String::from_utf8_lossy(b).to_string();

    // Tokens.
    let (s, b) = call("GET", &api("/items"), None, None);
    assert_eq!(s, 401, "{}", reason(&b));
    assert!(
        reason(&b).contains("Authorization: Bearer"),
        "{}",
        reason(&b)
    );
    assert_eq!(
        call("GET", &api("/items"), Some("not-a-token-at-all"), None).0,
        401
    );
    assert_eq!(
        call("GET", &format!("{base}/api/dataset"), None, None).0,
        401
    );

    let (s, b) = call(
        "GET",
        &api("/items?status=pending&limit=100"),
        Some(TOKEN),
        None,
    );
    assert_eq!(s, 200);
    let items: Vec<serde_json::Value> = serde_json::from_slice(&b).unwrap();
    assert_eq!(items.len(), FRAMES);
    let ids: Vec<u64> = items.iter().map(|i| i["id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    let id = ids[0];
    let reasons: Vec<&str> = items
        .iter()
        .map(|i| i["reason"].as_str().unwrap())
        .collect();
    assert!(reasons.contains(&"failed"), "{reasons:?}");

    // Ids and file names from the path are checked.
    for (path, status) in [
        ("/items/abc".to_string(), 400),
        ("/items/..%2F..%2Fetc%2Fpasswd".to_string(), 400),
        ("/items/99999999".to_string(), 404),
        (format!("/items/{id}/..%2Fstate"), 404),
        (format!("/items/{id}/secret.txt"), 404),
        ("/items?limit=0".to_string(), 400),
        ("/items?status=mine".to_string(), 400),
    ] {
        let (s, b) = call("GET", &api(&path), Some(TOKEN), None);
        assert_eq!(s, status, "GET {path}: {}", reason(&b));
    }

    // Bodies: too big, malformed, wrong class, outside the frame, neither boxes nor no_defect.
    let put = |body: &[u8]| {
        call(
            "PUT",
            &api(&format!("/items/{id}/label")),
            Some(TOKEN),
            Some(body),
        )
    };
    let huge = format!(
        r#"{{"boxes": [{}]}}"#,
        vec![r#"{"class":"scratches","bbox":[1,1,5,5]}"#; 3000].join(",")
    );
    assert_eq!(put(huge.as_bytes()).0, 413);
    let (s, b) = put(b"{\"boxes\": [");
    assert_eq!(s, 400, "{}", reason(&b));
    let unprocessable = |body: &[u8], why: &str| {
        let (s, b) = put(body);
        assert_eq!(s, 422, "{}", reason(&b));
        assert!(reason(&b).contains(why), "{}", reason(&b));
    };
    unprocessable(
        br#"{"boxes": [{"class": "dents", "bbox": [1, 1, 9, 9]}]}"#,
        "\"dents\" is not one of",
    );
    unprocessable(
        br#"{"boxes": [{"class": "scratches", "bbox": [300, 10, 500, 90]}]}"#,
        "outside the 400x200 frame",
    );
    let (s, b) = put(br#"{"boxes": []}"#);
    assert_eq!(s, 422);
    assert!(reason(&b).contains("no defect"), "{}", reason(&b));
    let (s, b) = call(
        "PUT",
        &api("/items/99999999/label"),
        Some(TOKEN),
        Some(br#"{"no_defect": true}"#),
    );
    assert_eq!(s, 404, "{}", reason(&b));

    // Good labels: a no-defect frame from ben, two boxes from anna; a discarded frame.
    let (s, b) = call(
        "PUT",
        &api(&format!("/items/{}/label", ids[1])),
        Some("ben-fedcba9876543210"),
        Some(br#"{"no_defect": true}"#),
    );
    assert_eq!(s, 200, "{}", reason(&b));
    let (s, b) = put(
        br#"{"boxes": [{"class": "scratches", "bbox": [10, 20, 110, 60]}, {"class": "patches", "bbox": [200.4, 0, 400, 199.6]}]}"#,
    );
    assert_eq!(s, 200, "{}", reason(&b));
    // Discarding an item: gone, and a second discard finds nothing.
    let discard = || {
        call(
            "DELETE",
            &api(&format!("/items/{}", ids[2])),
            Some(TOKEN),
            None,
        )
        .0
    };
    assert_eq!(discard(), 204);
    assert_eq!(discard(), 404);
    let (_, b) = call("GET", &api("/config"), Some(TOKEN), None);
    let c: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        (c["pending"].as_u64(), c["labeled"].as_u64()),
        (Some(FRAMES as u64 - 3), Some(2))
    );
    assert_eq!(c["labeler"], "anna");
    let (_, metrics) = call("GET", &format!("{base}/metrics"), None, None);
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics.contains(&format!("edge_review_pending {}", FRAMES - 3))
            && metrics.contains("edge_review_labeled 2"),
        "{metrics}"
    );

    // The heat map of where the model looked: a PNG over the frame.
    let (s, png) = call(
        "GET",
        &api(&format!("/items/{id}/heatmap.png")),
        Some(TOKEN),
        None,
    );
    assert_eq!(s, 200, "{}", reason(&png));
    let heat = image::load_from_memory(&png).unwrap().to_rgba8();
    assert_eq!(heat.dimensions(), (400, 200));
    let shown = heat.pixels().filter(|p| p[3] > 0).count();
    assert!(
        shown > 0 && shown < 400 * 200,
        "heat map covers {shown} pixels"
    );

    // The export: NEU-DET layout, the saved boxes, who labeled.
    let (s, tar) = call("GET", &format!("{base}/api/dataset"), Some(TOKEN), None);
    assert_eq!(s, 200);
    let files = untar(&tar);
    let xml = String::from_utf8(files[&format!("annotations/cam1_{id}.xml")].clone()).unwrap();
    assert_eq!(
        objects(&xml),
        vec![
            ("scratches".to_string(), [10.0, 20.0, 110.0, 60.0]),
            ("patches".to_string(), [200.0, 0.0, 400.0, 200.0]),
        ]
    );
    let clean =
        String::from_utf8(files[&format!("annotations/cam1_{}.xml", ids[1])].clone()).unwrap();
    assert!(objects(&clean).is_empty());
    let frame = image::load_from_memory(&files[&format!("images/cam1_{id}.jpg")]).unwrap();
    assert_eq!((frame.width(), frame.height()), (400, 200));
    let provenance = String::from_utf8(files["labels.jsonl"].clone()).unwrap();
    assert!(
        provenance.contains("\"by\":\"ben\"") && provenance.contains("\"by\":\"anna\""),
        "{provenance}"
    );
    assert_eq!(files.len(), 5, "{:?}", files.keys());

    // The trainer trains on it straight from the edge (one step: the pull and the loader).
    let out = dir.path().join("run");
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/strip-nano.safetensors");
    let args = |token: &str| {
        vec![
            "finetune".to_string(),
            "--from-edge".into(),
            base.clone(),
            "--edge-token".into(),
            token.to_string(),
            "--init".into(),
            model.display().to_string(),
            "--out".into(),
            out.display().to_string(),
            "--max-steps".into(),
            "1".into(),
            "--batch-size".into(),
            "2".into(),
            "--epochs".into(),
            "1".into(),
        ]
    };
    let refused = args("wrong-token-0000000000");
    let (ok, text) = e2e::run(
        "trainer",
        &refused.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(!ok && text.contains("the edge refused the token"), "{text}");
    let good = args(TOKEN);
    let text = run_ok(
        "trainer",
        &good.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(text.contains("fetched 2 labeled frames"), "{text}");
    assert!(
        out.join("edge-dataset/annotations")
            .join(format!("cam1_{id}.xml"))
            .exists()
    );
    assert!(
        out.join("model.safetensors").exists() || out.join("best.safetensors").exists(),
        "{text}"
    );
    drop(edge);
}

/// chromedriver on a free port, stopped on drop.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Driver {
        for (bin, package) in [
            ("/usr/bin/chromium", "chromium"),
            ("/usr/bin/chromedriver", "chromium-driver"),
        ] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is missing: `apt-get install -y {package}` (.ci/run installs it)"
            );
        }
        let port = e2e::free_port();
        let child = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        assert!(
            e2e::wait_port(port, Duration::from_secs(20)),
            "chromedriver did not listen"
        );
        Driver { child, port }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver, width: u32, height: u32) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     format!("--window-size={width},{height}"), "--force-device-scale-factor=1"],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a chromium session through chromedriver")
}

/// Evaluates `expr` in the page until it is truthy.
async fn wait_js(c: &Client, expr: &str, what: &str) -> serde_json::Value {
    let until = Instant::now() + T;
    loop {
        let v = c.execute(&format!("return {expr};"), vec![]).await.unwrap();
        if !(v.is_null() || v == false || v == 0 || v == "") {
            return v;
        }
        assert!(
            Instant::now() < until,
            "timed out waiting for {what} ({expr})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn keys(c: &Client, text: &str) {
    c.find(Locator::Css("body"))
        .await
        .unwrap()
        .send_keys(text)
        .await
        .unwrap();
}

fn screenshot(name: &str, png: &[u8]) -> image::RgbaImage {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&path, png).unwrap();
    println!("screenshot: {}", path.display());
    image::load_from_memory(png).unwrap().to_rgba8()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labeling_page_in_headless_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let (edge, base) = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        move || start_daemon(&dir)
    })
    .await
    .unwrap();
    let driver = Driver::start();
    let c = browser(&driver, 1366, 768).await;

    // Sign in; the queue shows a thumbnail per frame, the newest frame opens.
    c.goto(&format!("{base}/label")).await.unwrap();
    c.find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(TOKEN)
        .await
        .unwrap();
    c.find(Locator::Css("#loginForm button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_js(
        &c,
        &format!("document.querySelectorAll('.thumb').length == {FRAMES}"),
        "the queue",
    )
    .await;
    wait_js(
        &c,
        "[...document.querySelectorAll('.thumb img')].every(i => i.naturalWidth > 0)",
        "thumbnails",
    )
    .await;
    let id = wait_js(&c, "st.item && st.item.id", "the first frame")
        .await
        .as_u64()
        .unwrap();
    wait_js(
        &c,
        "document.querySelector('#canvas image')",
        "the frame image",
    )
    .await;

    // Choose "inclusion" (key 2), draw a box from frame pixel (60, 40) to (180, 150).
    keys(&c, "2").await;
    let ctm = c
        .execute("const m = document.getElementById('canvas').getScreenCTM(); return [m.a, m.d, m.e, m.f];", vec![])
        .await
        .unwrap();
    let m: Vec<f64> = serde_json::from_value(ctm).unwrap();
    let to_screen = |x: f64, y: f64| (m[0] * x + m[2], m[1] * y + m[3]);
    let (x1, y1) = to_screen(60.0, 40.0);
    let (x2, y2) = to_screen(180.0, 150.0);
    let step = Duration::from_millis(100);
    let drag = MouseActions::new("mouse".into())
        .then(PointerAction::MoveTo {
            duration: None,
            x: x1,
            y: y1,
        })
        .then(PointerAction::Down {
            button: fantoccini::actions::MOUSE_BUTTON_LEFT,
        })
        .then(PointerAction::MoveTo {
            duration: Some(step),
            x: (x1 + x2) / 2.0,
            y: (y1 + y2) / 2.0,
        })
        .then(PointerAction::MoveTo {
            duration: Some(step),
            x: x2,
            y: y2,
        })
        .then(PointerAction::Up {
            button: fantoccini::actions::MOUSE_BUTTON_LEFT,
        });
    c.perform_actions(drag).await.unwrap();
    wait_js(&c, "st.boxes.length == 1", "the drawn box").await;
    keys(&c, "\u{E00C}").await; // Escape: deselect, so the box shows in its normal colour

    // Look at it: the box's outline is on the screenshot where it was drawn.
    let shot = screenshot("labeling-page.png", &c.screenshot().await.unwrap());
    assert_eq!(shot.dimensions().0, 1366);
    let blue = |x: f64, y: f64| {
        (-2..=2).any(|dy| {
            let p = shot.get_pixel(x as u32, (y as i64 + dy) as u32);
            p[2] > 200 && p[0] < 120 && p[1] > 120
        })
    };
    let edge_points: Vec<bool> = (1..20)
        .map(|i| blue(x1 + (x2 - x1) * i as f64 / 20.0, y1))
        .collect();
    assert!(
        edge_points.iter().filter(|b| **b).count() >= 15,
        "the box's top edge is not on the screenshot: {edge_points:?}"
    );

    // The heat map toggles on (H) and off.
    keys(&c, "h").await;
    wait_js(
        &c,
        "document.querySelectorAll('#canvas image').length == 2",
        "the heat map",
    )
    .await;
    screenshot("labeling-page-heatmap.png", &c.screenshot().await.unwrap());
    keys(&c, "h").await;
    wait_js(
        &c,
        "document.querySelectorAll('#canvas image').length == 1",
        "the heat map off",
    )
    .await;

    // Save (S): the page moves on; the export carries the box.
    keys(&c, "s").await;
    wait_js(
        &c,
        &format!("document.getElementById('msg').textContent.includes('Saved frame #{id}')"),
        "the save",
    )
    .await;
    wait_js(
        &c,
        &format!("st.item && st.item.id != {id}"),
        "the next frame",
    )
    .await;
    let (status, tar) = tokio::task::spawn_blocking({
        let url = format!("{base}/api/dataset");
        move || call("GET", &url, Some(TOKEN), None)
    })
    .await
    .unwrap();
    assert_eq!(status, 200);
    let files = untar(&tar);
    let xml = String::from_utf8(files[&format!("annotations/cam1_{id}.xml")].clone()).unwrap();
    let objs = objects(&xml);
    assert_eq!(objs.len(), 1, "{xml}");
    assert_eq!(objs[0].0, "inclusion");
    for (got, want) in objs[0].1.iter().zip([60.0, 40.0, 180.0, 150.0]) {
        assert!(
            (got - want).abs() <= 2.0,
            "box {:?} vs drawn [60, 40, 180, 150]",
            objs[0].1
        );
    }
    assert!(String::from_utf8_lossy(&files["labels.jsonl"]).contains("\"by\":\"anna\""));

    // A tablet in portrait: nothing overflows sideways, the frame is on screen.
    c.set_window_size(768, 1024).await.unwrap();
    let fits = wait_js(
        &c,
        "document.documentElement.scrollWidth <= innerWidth && document.getElementById('canvas').getBoundingClientRect().width > 600 && 'yes'",
        "the tablet layout",
    )
    .await;
    assert_eq!(fits, "yes");
    screenshot("labeling-page-tablet.png", &c.screenshot().await.unwrap());
    c.close().await.unwrap();
    drop(edge);
}
