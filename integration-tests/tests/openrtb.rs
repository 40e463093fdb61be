//! The OpenRTB endpoint against the real stack: the third-party sample
//! requests get bids (or a 204 where the catalog has no creative for the
//! format), every bid is an impression logged on Kafka with the served
//! features and can be clicked, and invalid requests are refused naming
//! the field.

use std::collections::HashMap;

use adserve_gateway::openrtb::BidResponse;
use adserve_integration_tests::{Stack, repo_root};
use serde_json::{Value, json};

/// A desktop Chrome's user agent: a person's browser to the click filter.
const BROWSER: &str =
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36";

fn sample(name: &str) -> Value {
    let path = repo_root().join("services/gateway/tests/data/openrtb").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

async fn auction(stack: &Stack, body: &Value) -> anyhow::Result<reqwest::Response> {
    let url = format!("{}/openrtb2/auction", stack.http);
    Ok(adserve_integration_tests::http_client().post(url).json(body).send().await?)
}

#[tokio::test]
async fn the_samples_get_bids_that_are_logged_impressions_or_a_no_bid() -> anyhow::Result<()> {
    let stack = Stack::ready().await?;
    // (sample, bid expected, the user the impression is logged for)
    let cases = [
        ("simple-banner.json", true, "55816b39711f9b5acf3b90e313ed29e51665623f"),
        ("mobile-app.json", true, "ffffffd5135596709273b3a1a07e466ea2bf4fff"),
        ("prebid__exemplary__simple.json", true, ""),
        ("prebid__exemplary__dooh.json", true, ""),
        // COPPA (and GDPR): anonymous, COPPA-safe ads only.
        ("prebid__smaato__simple-banner-app.json", true, ""),
        // Video only, and native requiring images: the catalog has text creatives.
        ("prebid__pubmatic__video.json", false, ""),
        ("prebid__smaato__native.json", false, ""),
    ];
    // (sample, user, bid): checked against the impressions log in one pass.
    let mut checks = Vec::new();
    for (name, expect_bid, user) in cases {
        let mut request = sample(name);
        // The local stack's impression log has a 1 s timeout (its in-memory
        // broker shares two cores), so a 500 ms tmax would be a no-bid here
        // (see the test below); the mapping of tmax is a unit test's.
        request.as_object_mut().unwrap().remove("tmax");
        let resp = auction(&stack, &request).await?;
        assert_eq!(resp.headers().get("x-openrtb-version").map(|v| v.to_str().unwrap()), Some("2.6"), "{name}");
        if !expect_bid {
            assert_eq!(resp.status(), 204, "{name}: {}", resp.text().await?);
            continue;
        }
        assert_eq!(resp.status(), 200, "{name}");
        let answer: BidResponse = resp.json().await?;
        assert_eq!(answer.id, request["id"].as_str().unwrap(), "{name}");
        assert_eq!(answer.cur, "USD");
        assert!(answer.ext.is_none(), "{name}: nothing degraded: {:?}", answer.ext);
        let imps: HashMap<&str, &Value> =
            request["imp"].as_array().unwrap().iter().map(|i| (i["id"].as_str().unwrap(), i)).collect();
        let bids = &answer.seatbid[0].bid;
        assert_eq!(answer.seatbid[0].seat, "adserve");
        assert!(!bids.is_empty(), "{name}");
        for bid in bids {
            let imp = imps.get(bid.impid.as_str()).unwrap_or_else(|| panic!("{name}: bid on an unknown imp"));
            let floor = imp["bidfloor"].as_f64().unwrap_or(0.0);
            assert!(bid.price > 0.0 && bid.price >= floor, "{name}: price {} under the floor {floor}", bid.price);
            assert_eq!(bid.mtype, 1, "{name}: a banner");
            assert!(bid.adm.starts_with("<a href=\"http"), "{name}: {}", bid.adm);
            checks.push((name, user, bid.clone()));
        }
        // IAB's app blocks apple.com and two others: none of them bid.
        if let Some(badv) = request["badv"].as_array() {
            for bid in bids {
                for d in &bid.adomain {
                    assert!(!badv.iter().any(|b| b.as_str() == Some(d.as_str())), "{name}: blocked {d}");
                }
            }
        }
    }
    // Every bid is an impression on Kafka, with the features served.
    let ids: Vec<&str> = checks.iter().map(|(_, _, b)| b.ext.adserve.impression_id.as_str()).collect();
    let logged = stack.impression_events(&ids).await?;
    for (name, user, bid) in &checks {
        let event = &logged[&bid.ext.adserve.impression_id];
        assert_eq!(event.ad_id.to_string(), bid.crid, "{name}");
        assert_eq!(event.user_id, *user, "{name}");
        assert_eq!(event.pctr, bid.ext.adserve.pctr, "{name}");
        assert!(event.features.as_ref().is_some_and(|f| !f.values.is_empty()), "{name}");
        let ctx = (event.placement.as_str(), event.device.as_str());
        match *name {
            "prebid__exemplary__dooh.json" => assert_eq!(ctx, ("openrtb", "ctv")),
            "mobile-app.json" => assert_eq!(ctx, ("openrtb", "mobile")),
            _ => {}
        }
        assert_eq!(event.coppa, *name == "prebid__smaato__simple-banner-app.json", "{name}");
    }
    Ok(())
}

#[tokio::test]
async fn a_bid_is_clicked_with_its_token_and_a_floor_above_every_price_is_a_no_bid() -> anyhow::Result<()> {
    let stack = Stack::ready().await?;
    let mut request = sample("simple-banner.json");
    request["id"] = json!(format!("click-{}", uuid::Uuid::new_v4()));
    request["user"]["id"] = json!(format!("rtb-{}", uuid::Uuid::new_v4()));
    let answer: BidResponse = auction(&stack, &request).await?.json().await?;
    let bid = &answer.seatbid[0].bid[0];
    let click = json!({"impression_id": bid.ext.adserve.impression_id, "click_token": bid.ext.adserve.click_token});
    let http = adserve_integration_tests::http_client();
    let clicked = http.post(format!("{}/v1/clicks", stack.http)).json(&click).send().await?;
    assert_eq!(clicked.status(), 202);
    let again = http.post(format!("{}/v1/clicks", stack.http)).json(&click).send().await?;
    assert_eq!(again.status(), 409, "a replayed click");

    // The creative links through the click redirect (the local stack sets
    // openrtb.click_url): a click is recorded, then the browser lands.
    let mut request = request.clone();
    request["id"] = json!(format!("redirect-{}", uuid::Uuid::new_v4()));
    let answer: BidResponse = auction(&stack, &request).await?.json().await?;
    let bid = &answer.seatbid[0].bid[0];
    let href = bid.adm.split('"').nth(1).expect("an href").replace("&amp;", "&");
    let redirect = format!("{}/v1/clicks/redirect?", stack.http);
    assert!(href.starts_with(&redirect), "{href}");
    let no_redirects = || adserve_integration_tests::http_builder().redirect(reqwest::redirect::Policy::none());
    let browser = no_redirects().user_agent(BROWSER).build()?;
    let landed = browser.get(&href).send().await?;
    assert_eq!(landed.status(), 302);
    let location = landed.headers()["location"].to_str()?.to_string();
    assert!(location.starts_with("https://"), "{location}");
    let click = json!({"impression_id": bid.ext.adserve.impression_id, "click_token": bid.ext.adserve.click_token});
    let reported = http.post(format!("{}/v1/clicks", stack.http)).json(&click).send().await?;
    assert_eq!(reported.status(), 409, "the redirect recorded the click");
    // A second click through still lands (and is not recorded again).
    let twice = browser.get(&href).send().await?;
    assert_eq!((twice.status().as_u16(), twice.headers()["location"].to_str()?), (302, location.as_str()));
    // A token that is not this gateway's lands nobody anywhere.
    let forged = href.replace("click_token=v1.", "click_token=v1.9");
    let refused = browser.get(&forged).send().await?;
    assert!(refused.status() == 403 || refused.status() == 400, "{}", refused.status());
    assert!(refused.headers().get("location").is_none());
    let missing = browser.get(format!("{redirect}impression_id={}", bid.ext.adserve.impression_id)).send().await?;
    assert_eq!(missing.status(), 400);

    // A link preview, a crawler, a script without a user agent and a
    // browser's prefetch all land, and none is a click: the person's own
    // click afterwards is recorded (202, not 409).
    request["id"] = json!(format!("bots-{}", uuid::Uuid::new_v4()));
    let answer: BidResponse = auction(&stack, &request).await?.json().await?;
    let bid = &answer.seatbid[0].bid[0];
    let href = bid.adm.split('"').nth(1).expect("an href").replace("&amp;", "&");
    let metrics = format!("http://{}/metrics", stack.metrics.iter().find(|(n, _)| n == "gateway").unwrap().1);
    let refusals = async |reason: &str| -> anyhow::Result<f64> {
        let text = adserve_integration_tests::bench::prom::scrape(&metrics).await?;
        Ok(adserve_integration_tests::bench::prom::counter(
            &text,
            "adserve_gateway_clicks_refused_total",
            &[&format!("reason=\"{reason}\"")],
        ))
    };
    let (bots, prefetches) = (refusals("bot").await?, refusals("prefetch").await?);
    for agent in
        ["Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)", "Mozilla/5.0 (compatible; Googlebot/2.1)"]
    {
        let fetched = no_redirects().user_agent(agent).build()?.get(&href).send().await?;
        assert_eq!(fetched.status(), 302, "{agent}");
        assert!(fetched.headers()["location"].to_str()?.starts_with("https://"), "{agent}: lands");
    }
    let scripted = no_redirects().build()?.get(&href).send().await?;
    assert_eq!(scripted.status(), 302, "no user agent");
    let head = browser.head(&href).send().await?;
    assert_eq!(head.status(), 302);
    let prefetch = browser.get(&href).header("sec-purpose", "prefetch").send().await?;
    assert_eq!(prefetch.status(), 302);
    assert_eq!(refusals("bot").await? - bots, 3.0);
    assert_eq!(refusals("prefetch").await? - prefetches, 2.0);
    let click = json!({"impression_id": bid.ext.adserve.impression_id, "click_token": bid.ext.adserve.click_token});
    let person = http.post(format!("{}/v1/clicks", stack.http)).json(&click).send().await?;
    assert_eq!(person.status(), 202, "no fetch above was recorded as the click");

    // A floor no demo ad reaches: no bid (and nothing served, so nothing logged).
    request["imp"][0]["bidfloor"] = json!(900_000.0);
    let resp = auction(&stack, &request).await?;
    assert_eq!(resp.status(), 204);
    // A request that must be answered faster than the impression can be logged: no bid.
    request["imp"][0]["bidfloor"] = json!(0.01);
    request["tmax"] = json!(20);
    assert_eq!(auction(&stack, &request).await?.status(), 204);
    Ok(())
}

#[tokio::test]
async fn invalid_bid_requests_are_refused_naming_the_field() -> anyhow::Result<()> {
    let stack = Stack::ready().await?;
    let cases = [
        (json!({"id": "r", "imp": []}), "imp: required"),
        (json!({"imp": [{"id": "1", "banner": {}}]}), "id: required"),
        (json!({"id": "r", "imp": [{"id": "1"}]}), "imp[0]: must offer"),
        (json!({"id": "r", "imp": [{"id": "1", "banner": {"w": "wide"}}]}), "imp[0].banner.w: invalid type"),
        (json!({"id": "r", "imp": [{"id": "1", "banner": {}, "bidfloor": -2}]}), "imp[0].bidfloor"),
        (json!({"id": "r", "site": {}, "app": {}, "imp": [{"id": "1", "banner": {}}]}), "site/app"),
        (json!({"id": "r", "imp": {"id": "1", "banner": {}}}), "imp: invalid type: map, expected a sequence"),
        (json!({"id": "r", "tmax": -5, "imp": [{"id": "1", "banner": {}}]}), "tmax: invalid value: integer `-5`"),
        (
            json!({"id": "r", "imp": [{"id": "1", "banner": {}, "bidfloor": "0.5"}]}),
            "imp[0].bidfloor: invalid type: string",
        ),
        (json!({"id": "r", "imp": [{"id": "1", "banner": {}}, {"banner": {}}]}), "imp[1].id: required"),
    ];
    for (body, expected) in cases {
        let resp = auction(&stack, &body).await?;
        assert_eq!(resp.status(), 400, "{body}");
        let error: Value = resp.json().await?;
        assert_eq!(error["error"]["code"], "invalid_argument");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{body}: {message}");
    }
    // Exchanges' requests run larger than native ones: 20 KiB of extensions
    // pass on this route (openrtb.max_body_bytes, 64 KiB), not on /v1/ads
    // (max_body_bytes, 16 KiB); 100 KiB is refused here too.
    let mut big = sample("simple-banner.json");
    big["ext"] = json!({"padding": "x".repeat(20 * 1024)});
    assert_eq!(auction(&stack, &big).await?.status(), 200);
    let on_native = adserve_integration_tests::http_client()
        .post(format!("{}/v1/ads", stack.http))
        .header("content-type", "application/json")
        .body(big.to_string())
        .send()
        .await?;
    assert_eq!(on_native.status(), 413);
    big["ext"] = json!({"padding": "x".repeat(100 * 1024)});
    assert_eq!(auction(&stack, &big).await?.status(), 413);
    let garbage = adserve_integration_tests::http_client()
        .post(format!("{}/openrtb2/auction", stack.http))
        .header("content-type", "application/json")
        .body("{\"id\": \"r\", \"imp\": [")
        .send()
        .await?;
    assert_eq!(garbage.status(), 400);
    Ok(())
}

#[tokio::test]
async fn a_bids_burl_logs_its_billing_notice_and_bad_notices_are_refused_naming_the_field() -> anyhow::Result<()> {
    let stack = Stack::ready().await?;
    let mut request = sample("simple-banner.json");
    request["id"] = json!(format!("burl-{}", uuid::Uuid::new_v4()));
    request.as_object_mut().unwrap().remove("tmax");
    let answer: BidResponse = auction(&stack, &request).await?.json().await?;
    let bid = &answer.seatbid[0].bid[0];
    let burl = bid.burl.clone().expect("the local stack sets openrtb.billing_url");
    assert!(burl.starts_with(&format!("{}/openrtb2/billing?", stack.http)), "{burl}");
    assert!(burl.ends_with("&price=${AUCTION_PRICE}"), "{burl}");
    assert!(stack.impression_event(&bid.id).await?.billed_on_notice);

    let http = adserve_integration_tests::http_client();
    let get = |url: String| {
        let http = http.clone();
        async move { anyhow::Ok(http.get(url).send().await?) }
    };
    let with_price = |price: &str| burl.replace("${AUCTION_PRICE}", price);
    // The exchange cleared at 80% of the bid.
    let cleared = bid.price * 0.8;
    let ok = get(with_price(&format!("{cleared:.6}"))).await?;
    assert_eq!(ok.status(), 204, "{}", ok.text().await?);
    let (payload, ..) = stack.keyed_message(adserve_events::CLICKS_TOPIC, &bid.id).await?;
    let notice = adserve_events::decode_click(&payload).map_err(anyhow::Error::msg)?;
    assert!(notice.billing_notice);
    assert_eq!(notice.price_cpm_micros, (cleared * 1e6).round() as i64);
    // An exchange that rounds the clearing price up to a cent per mille: taken as the bid.
    let rounded = get(with_price(&format!("{:.6}", bid.price + 0.005))).await?;
    assert_eq!(rounded.status(), 204, "{}", rounded.text().await?);

    let token = burl.split("billing_token=").nth(1).unwrap().split('&').next().unwrap().to_string();
    let base = format!("{}/openrtb2/billing", stack.http);
    let cases = [
        (burl.clone(), 400, "price: the exchange did not replace ${AUCTION_PRICE}"),
        (with_price(&format!("{:.6}", bid.price * 1.5)), 400, "price: the clearing price"),
        (with_price("-1"), 400, "price: must be 0..="),
        (with_price("NaN"), 400, "price: must be 0..="),
        (with_price("AAABiQ1vFZ0"), 400, "price: must be a decimal clearing price"),
        (format!("{base}?impression_id={}&price=1", bid.id), 400, "billing_token: required"),
        (format!("{base}?impression_id=nope&billing_token={token}&price=1"), 400, "impression_id: must be"),
        (
            format!("{base}?impression_id={}&billing_token={token}&price=1", uuid::Uuid::new_v4()),
            403,
            "billing_token: does not match",
        ),
        // The click token (in every browser's markup) is not a billing token.
        (
            format!("{base}?impression_id={}&billing_token={}&price=1", bid.id, bid.ext.adserve.click_token),
            400,
            "billing_token: malformed",
        ),
    ];
    for (url, status, expected) in cases {
        let resp = get(url.clone()).await?;
        assert_eq!(resp.status(), status, "{url}");
        let error: Value = resp.json().await?;
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{url}: {message}");
    }

    // The repeats were accepted and not logged again: a replayed `burl`
    // costs no Kafka write. A second bid's notice, logged after them (one
    // partition), shows that the first bid's notice is on the topic once.
    request["id"] = json!(format!("burl-{}", uuid::Uuid::new_v4()));
    let second: BidResponse = auction(&stack, &request).await?.json().await?;
    let second = &second.seatbid[0].bid[0];
    let ok = get(second.burl.clone().unwrap().replace("${AUCTION_PRICE}", "0.5")).await?;
    assert_eq!(ok.status(), 204);
    let keys = stack.keys_until(adserve_events::CLICKS_TOPIC, &adserve_events::join_key(&second.id)).await?;
    let first_key = adserve_events::join_key(&bid.id);
    assert_eq!(keys.iter().filter(|k| **k == first_key).count(), 1, "one notice logged for {}", bid.id);
    Ok(())
}

/// An exchange that encrypts `${AUCTION_PRICE}` (Google's scheme): the
/// gateway with its keys decrypts the price, checks it against the bid and
/// logs it; an altered price, or one encrypted under other keys, is refused
/// and never logged. A gateway of the test's own, over HTTP, on the stack's
/// broker and stores.
#[tokio::test]
async fn an_encrypted_clearing_price_is_decrypted_verified_and_logged() -> anyhow::Result<()> {
    use adserve_gateway::price_crypto::{PriceKeys, decode_key};
    // The example keys of Google's "Decrypt price confirmations".
    const ENCRYPTION: &str = "skU7Ax_NL5pPAFyKdkfZjZz2-VhIN8bjj1rVFOaJ_5o=";
    const INTEGRITY: &str = "arO23ykdNqUQ5LEoQ0FVmPkBd7xB5CO89PDZlSjpFxo=";
    let stack = Stack::ready().await?;
    let public = "https://ads.example/openrtb2/billing";
    let gateway = stack
        .in_process_gateway(|c| {
            c.openrtb.billing_url = public.into();
            c.openrtb.price_keys.encryption_key = ENCRYPTION.into();
            c.openrtb.price_keys.integrity_key = INTEGRITY.into();
        })
        .await?;
    let http = adserve_integration_tests::http_client();
    let mut request = sample("simple-banner.json");
    request["id"] = json!(format!("encrypted-{}", uuid::Uuid::new_v4()));
    request.as_object_mut().unwrap().remove("tmax");
    let resp = http.post(format!("{gateway}/openrtb2/auction")).json(&request).send().await?;
    assert_eq!(resp.status(), 200);
    let answer: BidResponse = resp.json().await?;
    let bid = &answer.seatbid[0].bid[0];
    let burl = bid.burl.clone().expect("billing_url is set").replace(public, &format!("{gateway}/openrtb2/billing"));
    let exchange = PriceKeys::new(
        &decode_key(ENCRYPTION).map_err(anyhow::Error::msg)?,
        &decode_key(INTEGRITY).map_err(anyhow::Error::msg)?,
    );
    // The exchange's iv: the time, then its server's id.
    let mut iv = [0u8; 16];
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    iv[..4].copy_from_slice(&(now.as_secs() as u32).to_be_bytes());
    iv[4..8].copy_from_slice(&now.subsec_micros().to_be_bytes());
    iv[8..].copy_from_slice(b"exchange");
    let get = |price: String| {
        let (http, url) = (http.clone(), burl.replace("${AUCTION_PRICE}", &price));
        async move {
            let resp = http.get(url).send().await?;
            let status = resp.status().as_u16();
            anyhow::Ok((status, resp.text().await?))
        }
    };

    // Under other keys, altered, above the bid: refused, nothing logged.
    let cleared = (bid.price * 0.7 * 1e6).round() as u64;
    let other = PriceKeys::new(&[7; 32], &[8; 32]);
    let (status, body) = get(other.encrypt(cleared, iv)).await?;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("price: the encrypted price does not verify"), "{body}");
    let mut altered = exchange.encrypt(cleared, iv).into_bytes();
    altered[20] = if altered[20] == b'A' { b'B' } else { b'A' };
    let (status, body) = get(String::from_utf8(altered)?).await?;
    assert_eq!(status, 403, "{body}");
    let (status, body) = get(exchange.encrypt((bid.price * 2.0 * 1e6) as u64, iv)).await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("price: the clearing price"), "{body}");
    // With keys, a price must be encrypted: a decimal one from whoever saw
    // the burl would otherwise be logged first.
    for plain in ["not-a-price", "0.01"] {
        let (status, body) = get(plain.into()).await?;
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("price: must be encrypted with openrtb.price_keys"), "{body}");
    }
    // A forged token is refused for the token, before any decryption.
    let forged = burl.replace(&format!("impression_id={}", bid.id), &format!("impression_id={}", uuid::Uuid::new_v4()));
    let resp = http.get(forged.replace("${AUCTION_PRICE}", &other.encrypt(cleared, iv))).send().await?;
    assert_eq!(resp.status(), 403);
    let body = resp.text().await?;
    assert!(body.contains("billing_token: does not match"), "{body}");

    // The genuine notice: logged with the decrypted price. It is the first
    // message for this impression on the clicks topic: none of the refused
    // notices before it was logged (the one above the bid would carry the
    // bid's price).
    let (status, body) = get(exchange.encrypt(cleared, iv)).await?;
    assert_eq!(status, 204, "{body}");
    let (payload, ..) = stack.keyed_message(adserve_events::CLICKS_TOPIC, &bid.id).await?;
    let notice = adserve_events::decode_click(&payload).map_err(anyhow::Error::msg)?;
    assert!(notice.billing_notice);
    assert_eq!(notice.price_cpm_micros, cleared as i64);
    Ok(())
}
