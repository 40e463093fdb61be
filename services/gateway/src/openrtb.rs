//! The OpenRTB 2.5 / 2.6 bidder face: `POST /openrtb2/auction`.
//!
//! An exchange's `BidRequest` is checked, then mapped onto the native
//! pipeline ([`AdServer::serve_with`]): its imps become slots, grouped by
//! catalog placement (`imp.tagid` through `openrtb.placements`) and floor,
//! one native request per group; `bcat`/`badv` become the block lists,
//! `tmax` (less `openrtb.network_allowance`) the budget, `regs.coppa` COPPA,
//! `device.devicetype` (or `dooh`/`app`/`site` and the user agent) the
//! device, and `imp.bidfloor` a floor on every candidate's reserve and on
//! the price of each bid. Winners become bids: `price` is the winner's
//! price per thousand impressions in `openrtb.currency`, `adm` is markup for
//! the imp's format, linking through the gateway's click redirect
//! (`openrtb.click_url`, `GET /v1/clicks/redirect`: the click is recorded,
//! then the browser lands), and `ext.adserve` carries the impression id and
//! click token for integrators who report clicks themselves (`POST /v1/clicks`).
//!
//! What the catalog cannot serve is a no-bid, never an error: the catalog
//! holds text creatives (a headline and a landing URL), so banner imps and
//! native imps whose required assets are a title, a description or a
//! sponsor get bids; video- and audio-only imps, native imps requiring an
//! image, private-auction (deal-only) imps, floors in another currency and
//! seats the request excludes do not (`adserve_gateway_openrtb_no_bids_total{reason}`).
//! A request with no bid is `204 No Content`.
//!
//! Unknown fields and every `ext` are ignored, as the specification asks; a
//! request that breaks the specification's rules (no `id`, no imps, an imp
//! without an `id` or without any format, duplicate imp ids, both `site` and
//! `app`, a negative floor) is a 400 naming the field.
//!
//! **Users.** The user is `user.buyeruid`, else `user.id`, else
//! `device.ifa`. Nobody is identified (an anonymous request: no user
//! features, no frequency caps) under COPPA, when the device limits ad
//! tracking (`lmt` or `dnt`), when the request is subject to GDPR
//! (`regs.gdpr` or `regs.ext.gdpr` = 1: TCF consent strings are not decoded,
//! so no consent is assumed), or when the id is not a usable one (longer
//! than 128 bytes, control characters).

use std::collections::{BTreeMap, HashSet};

use adserve_proto::v1::{Degradation, GetAdsRequest, RequestContext};
use serde::{Deserialize, Deserializer, Serialize};

use crate::{
    AdServer, ServeError,
    config::OpenRtbConfig,
    pipeline::{ServeOptions, Served},
};

/// Most imps one request may carry.
pub const MAX_IMPS: usize = 64;
/// Highest floor accepted, in currency units per thousand impressions.
pub const MAX_BIDFLOOR: f64 = 1_000_000.0;

fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// An OpenRTB object whose content is not read (only its presence); not
/// being an object is still an error.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct Object {}

/// The parts of an OpenRTB 2.5/2.6 `BidRequest` the bidder reads. Every
/// other field is ignored.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct BidRequest {
    /// Required: the request's id, echoed in the response.
    #[serde(default, deserialize_with = "nullable")]
    pub id: String,
    /// Required: at least one.
    #[serde(default, deserialize_with = "nullable")]
    pub imp: Vec<Imp>,
    /// A website.
    #[serde(default)]
    pub site: Option<Object>,
    /// A non-browser application.
    #[serde(default)]
    pub app: Option<Object>,
    /// A digital out-of-home screen (2.6).
    #[serde(default)]
    pub dooh: Option<Object>,
    /// The device.
    #[serde(default)]
    pub device: Option<Device>,
    /// The user.
    #[serde(default)]
    pub user: Option<User>,
    /// Regulations.
    #[serde(default)]
    pub regs: Option<Regs>,
    /// The exchange's time limit for the answer, ms.
    #[serde(default)]
    pub tmax: Option<u32>,
    /// Currencies bids may be in (empty: any, by convention the exchange's).
    #[serde(default, deserialize_with = "nullable")]
    pub cur: Vec<String>,
    /// Seats allowed to bid (empty: all).
    #[serde(default, deserialize_with = "nullable")]
    pub wseat: Vec<String>,
    /// Seats not allowed to bid.
    #[serde(default, deserialize_with = "nullable")]
    pub bseat: Vec<String>,
    /// Blocked content categories.
    #[serde(default, deserialize_with = "nullable")]
    pub bcat: Vec<String>,
    /// Blocked advertiser domains.
    #[serde(default, deserialize_with = "nullable")]
    pub badv: Vec<String>,
}

/// One impression offered.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct Imp {
    /// Required, unique within the request.
    #[serde(default, deserialize_with = "nullable")]
    pub id: String,
    /// A banner may be served.
    #[serde(default)]
    pub banner: Option<Banner>,
    /// A video may be served.
    #[serde(default)]
    pub video: Option<Object>,
    /// An audio ad may be served.
    #[serde(default)]
    pub audio: Option<Object>,
    /// A native ad may be served.
    #[serde(default)]
    pub native: Option<Native>,
    /// Least price per thousand impressions, in `bidfloorcur`.
    #[serde(default)]
    pub bidfloor: Option<f64>,
    /// Currency of `bidfloor` (default USD).
    #[serde(default)]
    pub bidfloorcur: Option<String>,
    /// The exchange's id of the ad slot.
    #[serde(default)]
    pub tagid: Option<String>,
    /// Private marketplace deals.
    #[serde(default)]
    pub pmp: Option<Pmp>,
}

/// A banner slot.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct Banner {
    /// Width.
    #[serde(default)]
    pub w: Option<u32>,
    /// Height.
    #[serde(default)]
    pub h: Option<u32>,
    /// Allowed sizes.
    #[serde(default, deserialize_with = "nullable")]
    pub format: Vec<Format>,
}

/// One allowed banner size.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct Format {
    /// Width.
    #[serde(default)]
    pub w: Option<u32>,
    /// Height.
    #[serde(default)]
    pub h: Option<u32>,
}

/// A native slot.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct Native {
    /// The Native Ads request: a JSON string (some exchanges send the object).
    #[serde(default)]
    pub request: Option<serde_json::Value>,
    /// Native Ads specification version.
    #[serde(default)]
    pub ver: Option<String>,
}

/// Private marketplace.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct Pmp {
    /// 1: only the deals' bids are eligible.
    #[serde(default)]
    pub private_auction: Option<u8>,
}

/// The device.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct Device {
    /// OpenRTB list "Device Type".
    #[serde(default)]
    pub devicetype: Option<u8>,
    /// Advertising id.
    #[serde(default)]
    pub ifa: Option<String>,
    /// User agent (read only to tell phones and tablets from desktops).
    #[serde(default)]
    pub ua: Option<String>,
    /// 1: limit ad tracking.
    #[serde(default)]
    pub lmt: Option<u8>,
    /// 1: do not track.
    #[serde(default)]
    pub dnt: Option<u8>,
}

/// The user.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct User {
    /// The exchange's id.
    #[serde(default)]
    pub id: Option<String>,
    /// The bidder's own id of the user, as mapped by the exchange.
    #[serde(default)]
    pub buyeruid: Option<String>,
}

/// Regulations.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct Regs {
    /// 1: subject to COPPA.
    #[serde(default)]
    pub coppa: Option<u8>,
    /// 1: subject to GDPR (2.6).
    #[serde(default)]
    pub gdpr: Option<u8>,
    /// 2.5's extension carrying `gdpr`.
    #[serde(default)]
    pub ext: Option<RegsExt>,
}

/// `regs.ext` as OpenRTB 2.5 exchanges send it.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RegsExt {
    /// 1: subject to GDPR.
    #[serde(default)]
    pub gdpr: Option<u8>,
}

/// The answer to an exchange.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BidResponse {
    /// The request's id.
    pub id: String,
    /// One seat's bids.
    pub seatbid: Vec<SeatBid>,
    /// The bidder's id of this answer (the native request id).
    pub bidid: String,
    /// Currency of every price.
    pub cur: String,
    /// What degraded while bidding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ext: Option<ResponseExt>,
}

/// `BidResponse.ext`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResponseExt {
    /// adserve's own.
    pub adserve: ResponseExtAdserve,
}

/// `BidResponse.ext.adserve`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResponseExtAdserve {
    /// Components that degraded and the fallback taken (as in the native answer).
    pub degraded: Vec<Degraded>,
}

/// One degradation, as `degraded` in the native answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Degraded {
    /// What degraded.
    pub component: String,
    /// Why, and the fallback taken.
    pub reason: String,
}

impl From<Degradation> for Degraded {
    fn from(d: Degradation) -> Self {
        Self { component: d.component, reason: d.reason }
    }
}

/// Bids from one seat.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SeatBid {
    /// The seat (`openrtb.seat`).
    pub seat: String,
    /// One bid per imp at most.
    pub bid: Vec<Bid>,
}

/// One bid.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Bid {
    /// The impression id (unique per bid).
    pub id: String,
    /// The imp bid on.
    pub impid: String,
    /// Price per thousand impressions, in `cur`.
    pub price: f64,
    /// The creative's markup for the imp's format.
    pub adm: String,
    /// The billing notice the exchange fires when the bid wins and the ad
    /// is shown (`openrtb.billing_url`, signed, with `${AUCTION_PRICE}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burl: Option<String>,
    /// The advertiser's domain, when the catalog knows it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adomain: Vec<String>,
    /// Campaign id.
    pub cid: String,
    /// Creative (ad) id.
    pub crid: String,
    /// Width of a banner creative.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub w: Option<u32>,
    /// Height of a banner creative.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h: Option<u32>,
    /// Markup type (2.6): 1 banner, 4 native.
    pub mtype: u8,
    /// What a click is recorded with.
    pub ext: BidExt,
}

/// `Bid.ext`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BidExt {
    /// adserve's own.
    pub adserve: BidExtAdserve,
}

/// `Bid.ext.adserve`: send `impression_id` and `click_token` to
/// `POST /v1/clicks` when the ad is clicked.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BidExtAdserve {
    /// The logged impression's id.
    pub impression_id: String,
    /// Its click token.
    pub click_token: String,
    /// The ad's content category in the catalog.
    pub category: String,
    /// The calibrated pCTR the auction used.
    pub pctr: f32,
    /// The model that scored it.
    pub model_version: String,
}

/// Why an imp got no bid: the `reason` label of
/// `adserve_gateway_openrtb_no_bids_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NoBid {
    /// Video or audio only: the catalog has no such creatives.
    Format,
    /// A native imp requires an asset a text creative cannot fill.
    NativeAssets,
    /// Deals only (`pmp.private_auction` = 1): the catalog has no deals.
    PrivateAuction,
    /// `bidfloorcur` is not `openrtb.currency`.
    FloorCurrency,
    /// `cur` does not allow `openrtb.currency`.
    Currency,
    /// `wseat`/`bseat` exclude `openrtb.seat`.
    Seat,
    /// `tmax` leaves less time than the impression log needs.
    Tmax,
    /// The pipeline answered without a winner for this imp.
    NoFill,
    /// The pipeline failed for this imp's group (a dependency it cannot
    /// serve without is down) while other groups were bid on.
    Unavailable,
}

impl NoBid {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Format => "format",
            Self::NativeAssets => "native_assets",
            Self::PrivateAuction => "private_auction",
            Self::FloorCurrency => "floor_currency",
            Self::Currency => "currency",
            Self::Seat => "seat",
            Self::Tmax => "tmax",
            Self::NoFill => "no_fill",
            Self::Unavailable => "unavailable",
        }
    }
}

/// What an imp's creative must look like.
#[derive(Debug, Clone, PartialEq)]
pub enum Slot {
    /// Banner markup (HTML) of this size, if the imp gave one.
    Banner {
        /// Width.
        w: Option<u32>,
        /// Height.
        h: Option<u32>,
    },
    /// Native Ads response markup filling these assets.
    Native(NativePlan),
}

/// The assets a native response fills.
#[derive(Debug, Clone, PartialEq)]
pub struct NativePlan {
    /// The request's version (echoed).
    pub ver: String,
    /// Whether the request was wrapped in `{"native": ...}` (Native 1.0):
    /// the response is wrapped the same way.
    pub wrapped: bool,
    /// (asset id, what fills it).
    pub assets: Vec<(i64, Fill)>,
}

/// What fills one native asset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// The headline, cut to `len` characters.
    Title(Option<u32>),
    /// Data type 1 (sponsored by): the advertiser's domain.
    Sponsored(Option<u32>),
    /// Data type 2 (description): the headline.
    Description(Option<u32>),
}

/// One imp to bid on.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedImp {
    /// `imp.id`.
    pub id: String,
    /// Its format.
    pub slot: Slot,
}

/// One native request: the imps of one placement and floor.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// The request.
    pub request: GetAdsRequest,
    /// The floor, micro units per mille.
    pub floor_ecpm_micros: i64,
    /// Its imps, in slot order (slot 0 goes to the first).
    pub imps: Vec<PlannedImp>,
}

/// How a checked request is bid on.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// Native requests to serve, at most `MAX_SLOTS` imps each.
    pub groups: Vec<Group>,
    /// Imps not bid on, and why.
    pub no_bids: Vec<(String, NoBid)>,
    /// Nobody is identified (COPPA, tracking limited, GDPR, no id).
    pub anonymous: bool,
}

fn invalid(field: impl std::fmt::Display, why: impl std::fmt::Display) -> ServeError {
    ServeError::InvalidArgument(format!("{field}: {why}"))
}

/// Checks the specification's rules the bidder relies on.
pub fn check(req: &BidRequest) -> Result<(), ServeError> {
    if req.id.trim().is_empty() {
        return Err(invalid("id", "required (the request's id)"));
    }
    if req.id.len() > 256 {
        return Err(invalid("id", "at most 256 bytes"));
    }
    if req.imp.is_empty() {
        return Err(invalid("imp", "required: at least one imp"));
    }
    if req.imp.len() > MAX_IMPS {
        return Err(invalid("imp", format!("at most {MAX_IMPS} imps, got {}", req.imp.len())));
    }
    let present = [("site", req.site.is_some()), ("app", req.app.is_some()), ("dooh", req.dooh.is_some())];
    let given: Vec<&str> = present.iter().filter(|(_, p)| *p).map(|(n, _)| *n).collect();
    if given.len() > 1 {
        return Err(invalid(given.join("/"), "at most one of site, app and dooh may be present"));
    }
    if req.tmax == Some(0) {
        return Err(invalid("tmax", "must be positive when present"));
    }
    let mut ids = HashSet::with_capacity(req.imp.len());
    for (i, imp) in req.imp.iter().enumerate() {
        let at = |field: &str| format!("imp[{i}].{field}");
        if imp.id.trim().is_empty() {
            return Err(invalid(at("id"), "required"));
        }
        if imp.id.len() > 256 {
            return Err(invalid(at("id"), "at most 256 bytes"));
        }
        if !ids.insert(imp.id.as_str()) {
            return Err(invalid(at("id"), format!("{:?} is not unique within the request", imp.id)));
        }
        if imp.banner.is_none() && imp.video.is_none() && imp.audio.is_none() && imp.native.is_none() {
            return Err(invalid(format!("imp[{i}]"), "must offer at least one of banner, video, audio and native"));
        }
        if let Some(floor) = imp.bidfloor
            && !(0.0..=MAX_BIDFLOOR).contains(&floor)
        {
            return Err(invalid(at("bidfloor"), format!("must be in [0, {MAX_BIDFLOOR}], got {floor}")));
        }
        if let Some(native) = &imp.native
            && imp.banner.is_none()
        {
            // Only parsed when it decides the bid: a banner is preferred.
            native_plan(native).map_err(|why| invalid(at("native.request"), why))?;
        }
    }
    Ok(())
}

/// The assets of a Native Ads request, or why it is not one.
fn native_plan(native: &Native) -> Result<Option<NativePlan>, String> {
    #[derive(Deserialize)]
    struct Request {
        #[serde(default)]
        ver: Option<String>,
        #[serde(default, deserialize_with = "nullable")]
        assets: Vec<Asset>,
    }
    #[derive(Deserialize)]
    struct Asset {
        id: i64,
        #[serde(default)]
        required: Option<u8>,
        #[serde(default)]
        title: Option<Title>,
        // img, video: not read; an asset that is neither a title nor
        // fillable data cannot be filled by a text creative.
        #[serde(default)]
        data: Option<Data>,
    }
    #[derive(Deserialize)]
    struct Title {
        #[serde(default)]
        len: Option<u32>,
    }
    #[derive(Deserialize)]
    struct Data {
        #[serde(rename = "type")]
        kind: u32,
        #[serde(default)]
        len: Option<u32>,
    }
    let value = match &native.request {
        None | Some(serde_json::Value::Null) => return Err("required".into()),
        Some(serde_json::Value::String(s)) => {
            serde_json::from_str::<serde_json::Value>(s).map_err(|e| format!("not JSON: {e}"))?
        }
        Some(v @ serde_json::Value::Object(_)) => v.clone(),
        Some(_) => return Err("must be a string holding a Native Ads request".into()),
    };
    // Native 1.0 wraps the request in {"native": {...}}.
    let (value, wrapped) = match value {
        serde_json::Value::Object(mut m) if m.contains_key("native") && !m.contains_key("assets") => {
            (m.remove("native").unwrap_or_default(), true)
        }
        v => (v, false),
    };
    let request: Request = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        format!("not a Native Ads request: {path}: {}", e.into_inner())
    })?;
    if request.assets.is_empty() {
        return Err("assets: required: at least one".into());
    }
    let mut assets = Vec::new();
    for a in &request.assets {
        let fill = match (&a.title, &a.data) {
            (Some(t), _) => Some(Fill::Title(t.len)),
            (None, Some(d)) if d.kind == 1 => Some(Fill::Sponsored(d.len)),
            (None, Some(d)) if d.kind == 2 => Some(Fill::Description(d.len)),
            _ => None,
        };
        match fill {
            Some(f) => assets.push((a.id, f)),
            // An image, a video or data a text creative does not have.
            None if a.required == Some(1) => return Ok(None),
            None => {}
        }
    }
    if !assets.iter().any(|(_, f)| matches!(f, Fill::Title(_))) {
        // Nothing to show without a headline.
        return Ok(None);
    }
    let ver = request.ver.or_else(|| native.ver.clone()).unwrap_or_else(|| "1.2".into());
    Ok(Some(NativePlan { ver, wrapped, assets }))
}

/// Maps a checked request onto native requests.
pub fn plan(req: &BidRequest, config: &OpenRtbConfig) -> Plan {
    let mut out = Plan::default();
    let all = |reason: NoBid| req.imp.iter().map(|i| (i.id.clone(), reason)).collect::<Vec<_>>();
    if !req.cur.is_empty() && !req.cur.iter().any(|c| c.eq_ignore_ascii_case(&config.currency)) {
        out.no_bids = all(NoBid::Currency);
        return out;
    }
    if (!req.wseat.is_empty() && !req.wseat.contains(&config.seat)) || req.bseat.contains(&config.seat) {
        out.no_bids = all(NoBid::Seat);
        return out;
    }
    let regs = req.regs.clone().unwrap_or_default();
    let coppa = regs.coppa == Some(1);
    let gdpr = regs.gdpr == Some(1) || regs.ext.as_ref().and_then(|e| e.gdpr) == Some(1);
    let device = req.device.clone().unwrap_or_default();
    let tracking_limited = device.lmt == Some(1) || device.dnt == Some(1);
    let user_id = if coppa || gdpr || tracking_limited { String::new() } else { user_id(req.user.as_ref(), &device) };
    out.anonymous = user_id.is_empty();
    let surface = if req.app.is_some() {
        "app"
    } else if req.dooh.is_some() {
        "dooh"
    } else {
        "site"
    };
    let context = |placement: &str| RequestContext {
        placement: placement.to_string(),
        device: device_class(&device, surface).to_string(),
        surface: surface.to_string(),
        coppa,
    };
    // (placement, floor) -> imps, in request order.
    let mut groups: BTreeMap<(String, i64), Vec<PlannedImp>> = BTreeMap::new();
    let mut order = Vec::new();
    for imp in &req.imp {
        let floor_currency = imp.bidfloorcur.as_deref().unwrap_or("USD");
        let no_bid = |reason| (imp.id.clone(), reason);
        if imp.bidfloor.unwrap_or(0.0) > 0.0 && !floor_currency.eq_ignore_ascii_case(&config.currency) {
            out.no_bids.push(no_bid(NoBid::FloorCurrency));
            continue;
        }
        if imp.pmp.as_ref().and_then(|p| p.private_auction) == Some(1) {
            out.no_bids.push(no_bid(NoBid::PrivateAuction));
            continue;
        }
        let slot = if let Some(b) = &imp.banner {
            let first = b.format.first();
            Slot::Banner { w: b.w.or(first.and_then(|f| f.w)), h: b.h.or(first.and_then(|f| f.h)) }
        } else if let Some(n) = &imp.native {
            match native_plan(n) {
                Ok(Some(p)) => Slot::Native(p),
                _ => {
                    out.no_bids.push(no_bid(NoBid::NativeAssets));
                    continue;
                }
            }
        } else {
            out.no_bids.push(no_bid(NoBid::Format));
            continue;
        };
        let placement =
            imp.tagid.as_ref().and_then(|t| config.placements.get(t)).unwrap_or(&config.default_placement).clone();
        let floor = (imp.bidfloor.unwrap_or(0.0) * 1e6).ceil() as i64;
        let key = (placement, floor);
        if !groups.contains_key(&key) {
            order.push(key.clone());
        }
        groups.entry(key).or_default().push(PlannedImp { id: imp.id.clone(), slot });
    }
    let tmax_ms = req.tmax.map_or(0, |t| {
        let allowance = config.network_allowance.as_millis() as u32;
        // Never 0 (that would mean "no limit"): 1 ms is refused as too short.
        t.saturating_sub(allowance).max(1)
    });
    for key in order {
        let imps = groups.remove(&key).unwrap_or_default();
        for chunk in imps.chunks(adserve_auction::MAX_SLOTS) {
            out.groups.push(Group {
                request: GetAdsRequest {
                    user_id: user_id.clone(),
                    context: Some(context(&key.0)),
                    slots: chunk.len() as u32,
                    blocked_categories: req.bcat.iter().filter(|c| !c.trim().is_empty()).cloned().collect(),
                    blocked_advertisers: req.badv.iter().filter(|c| !c.trim().is_empty()).cloned().collect(),
                    tmax_ms,
                },
                floor_ecpm_micros: key.1,
                imps: chunk.to_vec(),
            });
        }
    }
    out
}

/// The id the user is known by, or empty.
fn user_id(user: Option<&User>, device: &Device) -> String {
    let usable = |s: &&String| {
        let t = s.trim();
        !t.is_empty()
            && t.len() <= adserve_features::request::MAX_USER_ID_LEN
            && !t.chars().any(char::is_control)
            // An all-zero advertising id is what a device sends when tracking is off.
            && !t.chars().all(|c| c == '0' || c == '-')
    };
    let user = user.cloned().unwrap_or_default();
    [user.buyeruid, user.id, device.ifa.clone()]
        .into_iter()
        .flatten()
        .find(|s| usable(&s))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The request contract's device class.
fn device_class(device: &Device, surface: &str) -> &'static str {
    match device.devicetype {
        Some(5) => return "tablet",
        Some(1 | 4) => return "mobile",
        Some(2) => return "desktop",
        Some(3 | 6 | 7 | 8) => return "ctv",
        _ => {}
    }
    if surface == "dooh" {
        // A shared screen, no one's phone.
        return "ctv";
    }
    let ua = device.ua.as_deref().unwrap_or("");
    if ua.contains("iPad") || ua.contains("Tablet") {
        "tablet"
    } else if ua.contains("Mobi") || ua.contains("Android") || surface == "app" {
        "mobile"
    } else {
        "desktop"
    }
}

fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn cut(s: &str, len: Option<u32>) -> String {
    match len {
        Some(n) if n > 0 => s.chars().take(n as usize).collect(),
        _ => s.to_string(),
    }
}

/// Where a creative links: through `click_url` (the gateway's click
/// redirect) when it is set, else straight to the landing page.
pub fn link(click_url: &str, landing_url: &str, impression_id: &str, click_token: &str) -> String {
    if click_url.is_empty() {
        return landing_url.to_string();
    }
    // A UUID and a token of [A-Za-z0-9._-]: nothing to escape.
    format!("{click_url}?impression_id={impression_id}&click_token={click_token}")
}

/// The macro an exchange replaces with the clearing price in `burl`.
pub const AUCTION_PRICE_MACRO: &str = "${AUCTION_PRICE}";

/// A bid's billing notice URL: `billing_url` with the impression, its
/// billing token and the clearing price macro (None without `billing_url`).
pub fn burl(billing_url: &str, impression_id: &str, billing_token: &str) -> Option<String> {
    if billing_url.is_empty() || billing_token.is_empty() {
        return None;
    }
    // A UUID and a token of [A-Za-z0-9._-]: nothing to escape. The macro
    // stays as it is: the exchange replaces it.
    Some(format!(
        "{billing_url}?impression_id={impression_id}&billing_token={billing_token}&price={AUCTION_PRICE_MACRO}"
    ))
}

/// The creative's markup for `slot`, linking to `href`.
pub fn markup(slot: &Slot, title: &str, href: &str, advertiser_domain: &str) -> String {
    match slot {
        Slot::Banner { .. } => {
            format!("<a href=\"{}\" target=\"_blank\" rel=\"noopener\">{}</a>", escape_html(href), escape_html(title))
        }
        Slot::Native(plan) => {
            let assets: Vec<serde_json::Value> = plan
                .assets
                .iter()
                .map(|(id, fill)| match fill {
                    Fill::Title(len) => serde_json::json!({"id": id, "title": {"text": cut(title, *len)}}),
                    Fill::Sponsored(len) => {
                        let by = if advertiser_domain.is_empty() { "Sponsored" } else { advertiser_domain };
                        serde_json::json!({"id": id, "data": {"value": cut(by, *len)}})
                    }
                    Fill::Description(len) => serde_json::json!({"id": id, "data": {"value": cut(title, *len)}}),
                })
                .collect();
            let body = serde_json::json!({"ver": plan.ver, "assets": assets, "link": {"url": href}});
            let doc = if plan.wrapped { serde_json::json!({ "native": body }) } else { body };
            doc.to_string()
        }
    }
}

/// The bids of one served group, one per winner, winners in slot order.
fn bids(group: &Group, served: &Served, config: &OpenRtbConfig) -> (Vec<Bid>, Vec<String>) {
    let mut winners: Vec<_> = served.response.winners.iter().zip(&served.creatives).collect();
    winners.sort_by_key(|(w, _)| w.slot);
    let mut bids = Vec::new();
    for (imp, (w, creative)) in group.imps.iter().zip(winners) {
        let (w_px, h_px, mtype) = match &imp.slot {
            Slot::Banner { w, h } => (*w, *h, 1),
            Slot::Native(_) => (None, None, 4),
        };
        bids.push(Bid {
            id: w.impression_id.clone(),
            impid: imp.id.clone(),
            price: creative.price_per_mille_micros as f64 / 1e6,
            adm: markup(
                &imp.slot,
                &w.title,
                &link(&config.click_url, &w.landing_url, &w.impression_id, &w.click_token),
                &creative.advertiser_domain,
            ),
            burl: burl(&config.billing_url, &w.impression_id, &creative.billing_token),
            adomain: if creative.advertiser_domain.is_empty() {
                vec![]
            } else {
                vec![creative.advertiser_domain.clone()]
            },
            cid: w.campaign_id.to_string(),
            crid: w.ad_id.to_string(),
            w: w_px,
            h: h_px,
            mtype,
            ext: BidExt {
                adserve: BidExtAdserve {
                    impression_id: w.impression_id.clone(),
                    click_token: w.click_token.clone(),
                    category: creative.category.clone(),
                    pctr: w.pctr,
                    model_version: creative.model_version.clone(),
                },
            },
        });
    }
    let unfilled = group.imps.iter().skip(bids.len()).map(|i| i.id.clone()).collect();
    (bids, unfilled)
}

fn count_no_bid(reason: NoBid) {
    metrics::counter!("adserve_gateway_openrtb_no_bids_total", "reason" => reason.label()).increment(1);
}

/// The query of `GET /openrtb2/billing`: what a bid's `burl` carries, with
/// `price` the clearing price the exchange put in for `${AUCTION_PRICE}`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct BillingNotice {
    /// The bid's impression id.
    pub impression_id: String,
    /// Its billing token.
    pub billing_token: String,
    /// Clearing price per thousand impressions, in `openrtb.currency`.
    pub price: String,
}

/// Highest clearing price accepted, per thousand impressions.
pub const MAX_PRICE: f64 = 1_000_000.0;

/// A billing notice's clearing price, as the exchange sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClearingPrice<'a> {
    /// A decimal price, in micro units per mille.
    Micros(i64),
    /// An encrypted one ([`crate::price_crypto`]), decrypted only once the
    /// notice's billing token has verified.
    Encrypted(&'a str),
}

impl ClearingPrice<'_> {
    /// The price in micro units per mille: an encrypted one decrypted with
    /// `keys`, a 403 (counted) when it does not verify with them.
    pub fn micros(self, keys: Option<&crate::price_crypto::PriceKeys>) -> Result<i64, ServeError> {
        let (text, keys) = match (self, keys) {
            (Self::Micros(micros), None) => return Ok(micros),
            (Self::Encrypted(text), Some(keys)) => (text, keys),
            // check() sorted them by the same keys.
            (Self::Micros(_), Some(_)) | (Self::Encrypted(_), None) => {
                return Err(ServeError::InvalidArgument("price: does not match openrtb.price_keys".into()));
            }
        };
        match keys.decrypt(text) {
            Ok(micros) if micros <= (MAX_PRICE * 1e6) as u64 => Ok(micros as i64),
            Ok(micros) => Err(ServeError::InvalidArgument(format!(
                "price: must be 0..={MAX_PRICE}, got {} (decrypted)",
                micros as f64 / 1e6
            ))),
            Err(e @ crate::price_crypto::PriceError::Malformed) => {
                Err(ServeError::InvalidArgument(format!("price: {e}")))
            }
            Err(e @ crate::price_crypto::PriceError::Integrity) => {
                metrics::counter!("adserve_gateway_billing_notices_refused_total", "reason" => "price_integrity")
                    .increment(1);
                Err(ServeError::Forbidden(format!("price: {e}")))
            }
        }
    }
}

impl BillingNotice {
    /// The impression id and the clearing price, or a 400 naming the field.
    /// With `encrypted` (`openrtb.price_keys` set) the price must be an
    /// encrypted one (28 bytes of base64), otherwise a decimal.
    pub fn check(&self, encrypted: bool) -> Result<(&str, ClearingPrice<'_>), ServeError> {
        let impression_id = self.impression_id.trim();
        if uuid::Uuid::parse_str(impression_id).is_err() {
            return Err(ServeError::InvalidArgument(format!(
                "impression_id: must be the bid's id (a UUID), got {:?}",
                impression_id.chars().take(40).collect::<String>()
            )));
        }
        if self.billing_token.is_empty() {
            return Err(ServeError::InvalidArgument("billing_token: required (it is in the bid's burl)".into()));
        }
        let price = self.price.trim();
        if price.is_empty() {
            return Err(ServeError::InvalidArgument("price: required (the clearing price)".into()));
        }
        if price.contains("AUCTION_PRICE") {
            return Err(ServeError::InvalidArgument(format!(
                "price: the exchange did not replace {AUCTION_PRICE_MACRO} with the clearing price"
            )));
        }
        let shown = || price.chars().take(40).collect::<String>();
        if encrypted {
            // Untrimmed: a standard-alphabet '+' arrives as a space.
            if !crate::price_crypto::is_ciphertext(&self.price) {
                return Err(ServeError::InvalidArgument(format!(
                    "price: must be encrypted with openrtb.price_keys ({} bytes in web-safe base64), got {:?}",
                    crate::price_crypto::CIPHERTEXT_BYTES,
                    shown()
                )));
            }
            return Ok((impression_id, ClearingPrice::Encrypted(&self.price)));
        }
        let value: f64 = price.parse().map_err(|_| {
            ServeError::InvalidArgument(format!(
                "price: must be a decimal clearing price (encrypted prices need openrtb.price_keys), got {:?}",
                shown()
            ))
        })?;
        if !value.is_finite() || !(0.0..=MAX_PRICE).contains(&value) {
            return Err(ServeError::InvalidArgument(format!("price: must be 0..={MAX_PRICE}, got {price}")));
        }
        Ok((impression_id, ClearingPrice::Micros((value * 1e6).round() as i64)))
    }
}

impl AdServer {
    /// Records a bid's billing notice (`GET /openrtb2/billing`).
    pub async fn openrtb_billing(&self, notice: BillingNotice) -> Result<(), ServeError> {
        let (impression_id, price) = notice.check(self.price_keys().is_some())?;
        self.billing_notice(impression_id, &notice.billing_token, price).await
    }

    /// Bids on an OpenRTB request: `None` is no bid (HTTP 204).
    pub async fn openrtb(&self, req: BidRequest) -> Result<Option<BidResponse>, ServeError> {
        check(&req)?;
        let config = &self.config().openrtb;
        let mut plan = plan(&req, config);
        let log_reserve = self.config().kafka.publish_timeout;
        let short = plan.groups.first().is_some_and(|g| {
            crate::budget::requested(g.request.tmax_ms, None, self.config().deadlines.request, log_reserve).is_err()
        });
        if short {
            // A valid request this gateway cannot answer in time: no bid.
            for g in plan.groups.drain(..) {
                plan.no_bids.extend(g.imps.into_iter().map(|i| (i.id, NoBid::Tmax)));
            }
        }
        let options = |g: &Group| ServeOptions {
            anonymous: plan.anonymous,
            floor_ecpm_micros: g.floor_ecpm_micros,
            billed_on_notice: !config.billing_url.is_empty(),
        };
        let served =
            futures::future::join_all(plan.groups.iter().map(|g| self.serve_with(g.request.clone(), None, options(g))))
                .await;
        let mut all_bids = Vec::new();
        let mut degraded = Vec::new();
        let mut bidid = String::new();
        let mut first_error = None;
        for (group, result) in plan.groups.iter().zip(served) {
            match result {
                Ok(served) => {
                    let (bids, unfilled) = bids(group, &served, config);
                    plan.no_bids.extend(unfilled.into_iter().map(|id| (id, NoBid::NoFill)));
                    if bidid.is_empty() {
                        bidid = served.response.request_id.clone();
                    }
                    for d in served.response.degraded.into_iter().map(Degraded::from) {
                        if !degraded.contains(&d) {
                            degraded.push(d);
                        }
                    }
                    all_bids.extend(bids);
                }
                Err(e) => {
                    plan.no_bids.extend(group.imps.iter().map(|i| (i.id.clone(), NoBid::Unavailable)));
                    first_error.get_or_insert(e);
                }
            }
        }
        for (_, reason) in &plan.no_bids {
            count_no_bid(*reason);
        }
        if all_bids.is_empty() {
            // Every group failed: the exchange hears it (503), not a no-bid.
            return match first_error {
                Some(e) => Err(e),
                None => Ok(None),
            };
        }
        metrics::counter!("adserve_gateway_openrtb_bids_total").increment(all_bids.len() as u64);
        Ok(Some(BidResponse {
            id: req.id,
            seatbid: vec![SeatBid { seat: config.seat.clone(), bid: all_bids }],
            bidid,
            cur: config.currency.clone(),
            ext: (!degraded.is_empty()).then_some(ResponseExt { adserve: ResponseExtAdserve { degraded } }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> BidRequest {
        serde_json::from_str(json).unwrap()
    }

    fn config() -> OpenRtbConfig {
        OpenRtbConfig::default()
    }

    fn samples() -> Vec<(String, BidRequest)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/openrtb");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                let text = std::fs::read_to_string(&path).unwrap();
                let req: BidRequest = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"));
                out.push((path.file_name().unwrap().to_string_lossy().into_owned(), req));
            }
        }
        assert!(out.len() >= 7, "the samples are in {dir:?}");
        out
    }

    #[test]
    fn every_sample_is_valid_and_maps_onto_valid_native_requests() {
        for (name, req) in samples() {
            check(&req).unwrap_or_else(|e| panic!("{name}: {e}"));
            let plan = plan(&req, &config());
            let planned: usize = plan.groups.iter().map(|g| g.imps.len()).sum();
            assert_eq!(planned + plan.no_bids.len(), req.imp.len(), "{name}: every imp is bid on or not, once");
            for g in &plan.groups {
                // The native contract's own validation, anonymous users allowed.
                let r = &g.request;
                adserve_features::request::check_context(r.context.as_ref(), adserve_features::registry())
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                assert!((1..=adserve_auction::MAX_SLOTS as u32).contains(&r.slots), "{name}");
                assert!(r.user_id.is_empty() == plan.anonymous, "{name}");
            }
        }
    }

    #[test]
    fn the_samples_map_as_the_specification_says() {
        let by_name: BTreeMap<String, BidRequest> = samples().into_iter().collect();
        let p = |n: &str| plan(&by_name[n], &config());

        // IAB's banner on a site: user.id, floor 0.03 USD per mille.
        let banner = p("simple-banner.json");
        assert_eq!(banner.groups.len(), 1);
        let g = &banner.groups[0];
        assert_eq!(g.floor_ecpm_micros, 30_000);
        assert_eq!(g.request.user_id, "55816b39711f9b5acf3b90e313ed29e51665623f");
        let ctx = g.request.context.as_ref().unwrap();
        assert_eq!((ctx.device.as_str(), ctx.surface.as_str(), ctx.coppa), ("desktop", "site", false));
        assert_eq!(g.imps[0].slot, Slot::Banner { w: Some(300), h: Some(250) });

        // IAB's app: devicetype 1 (mobile/tablet), block lists carried over.
        let app = p("mobile-app.json");
        let g = &app.groups[0];
        let ctx = g.request.context.as_ref().unwrap();
        assert_eq!((ctx.device.as_str(), ctx.surface.as_str()), ("mobile", "app"));
        assert_eq!(g.request.blocked_advertisers, ["apple.com", "go-text.me", "heywire.com"]);
        assert_eq!(g.request.blocked_categories.len(), 5);
        assert_eq!(g.floor_ecpm_micros, 500_000);

        // A DOOH screen: no user, a shared screen.
        let dooh = p("prebid__exemplary__dooh.json");
        assert!(dooh.anonymous);
        let ctx = dooh.groups[0].request.context.as_ref().unwrap();
        assert_eq!((ctx.device.as_str(), ctx.surface.as_str()), ("ctv", "dooh"));
        assert_eq!(dooh.groups[0].request.tmax_ms, 490, "tmax less the network allowance");
        // The first allowed size.
        assert_eq!(dooh.groups[0].imps[0].slot, Slot::Banner { w: Some(1920), h: Some(1080) });

        // Video only: no video creatives, no bid.
        let video = p("prebid__pubmatic__video.json");
        assert!(video.groups.is_empty());
        assert_eq!(video.no_bids, vec![("test-video-imp".to_string(), NoBid::Format)]);

        // Native requiring images: no bid. COPPA: anonymous.
        let native = p("prebid__smaato__native.json");
        assert_eq!(native.no_bids, vec![("postbid_iframe".to_string(), NoBid::NativeAssets)]);
        assert!(native.anonymous);

        // COPPA and GDPR (2.5's regs.ext.gdpr) app banner.
        let app_banner = p("prebid__smaato__simple-banner-app.json");
        assert!(app_banner.anonymous);
        assert!(app_banner.groups[0].request.context.as_ref().unwrap().coppa);
    }

    #[test]
    fn invalid_requests_are_refused_naming_the_field() {
        let cases = [
            (r#"{"imp":[{"id":"1","banner":{}}]}"#, "id: required"),
            (r#"{"id":"r","imp":[]}"#, "imp: required"),
            (r#"{"id":"r"}"#, "imp: required"),
            (r#"{"id":"r","imp":[{"banner":{}}]}"#, "imp[0].id: required"),
            (r#"{"id":"r","imp":[{"id":"1"}]}"#, "imp[0]: must offer"),
            (r#"{"id":"r","imp":[{"id":"1","banner":{}},{"id":"1","banner":{}}]}"#, "imp[1].id:"),
            (r#"{"id":"r","imp":[{"id":"1","banner":{},"bidfloor":-1}]}"#, "imp[0].bidfloor:"),
            (r#"{"id":"r","site":{},"app":{},"imp":[{"id":"1","banner":{}}]}"#, "site/app:"),
            (r#"{"id":"r","tmax":0,"imp":[{"id":"1","banner":{}}]}"#, "tmax:"),
            (r#"{"id":"r","imp":[{"id":"1","native":{"request":"{not json"}}]}"#, "imp[0].native.request: not JSON"),
            (r#"{"id":"r","imp":[{"id":"1","native":{}}]}"#, "imp[0].native.request: required"),
            (
                r#"{"id":"r","imp":[{"id":"1","native":{"request":"{\"assets\":[{\"title\":{}}]}"}}]}"#,
                "missing field `id`",
            ),
        ];
        for (json, expected) in cases {
            let err = check(&parse(json)).unwrap_err();
            assert!(matches!(err, ServeError::InvalidArgument(_)), "{json}");
            assert!(err.to_string().contains(expected), "{json}: {err}");
        }
        // Wrong types are refused by the parser, with the path.
        let e = serde_json::from_str::<BidRequest>(r#"{"id":"r","imp":[{"id":"1","banner":{"w":"wide"}}]}"#);
        assert!(e.is_err());
        // Unknown fields and extensions are ignored; null is absent.
        let ok = parse(
            r#"{"id":"r","imp":[{"id":"1","banner":{"w":320,"h":50,"future":1},"ext":{"x":[1]}}],"site":null,"user":{"id":null},"source":{"fd":1},"ext":{"y":true},"cur":null}"#,
        );
        check(&ok).unwrap();
    }

    #[test]
    fn what_cannot_be_served_is_a_no_bid_with_its_reason() {
        let c = config();
        let one = |json: &str| plan(&parse(json), &c).no_bids;
        assert_eq!(one(r#"{"id":"r","cur":["EUR"],"imp":[{"id":"1","banner":{}}]}"#), [("1".into(), NoBid::Currency)]);
        assert!(one(r#"{"id":"r","cur":["EUR","USD"],"imp":[{"id":"1","banner":{}}]}"#).is_empty());
        assert_eq!(one(r#"{"id":"r","wseat":["other"],"imp":[{"id":"1","banner":{}}]}"#), [("1".into(), NoBid::Seat)]);
        assert_eq!(
            one(r#"{"id":"r","bseat":["adserve"],"imp":[{"id":"1","banner":{}}]}"#),
            [("1".into(), NoBid::Seat)]
        );
        assert_eq!(
            one(r#"{"id":"r","imp":[{"id":"1","banner":{},"bidfloor":1,"bidfloorcur":"EUR"}]}"#),
            [("1".into(), NoBid::FloorCurrency)]
        );
        assert_eq!(
            one(r#"{"id":"r","imp":[{"id":"1","banner":{},"pmp":{"private_auction":1,"deals":[]}}]}"#),
            [("1".into(), NoBid::PrivateAuction)]
        );
        assert_eq!(one(r#"{"id":"r","imp":[{"id":"1","audio":{}}]}"#), [("1".into(), NoBid::Format)]);
        // A banner beside a video is bid on as a banner.
        assert!(one(r#"{"id":"r","imp":[{"id":"1","video":{},"banner":{"w":1,"h":1}}]}"#).is_empty());
    }

    #[test]
    fn imps_are_grouped_by_placement_and_floor_at_most_ten_per_request() {
        let mut c = config();
        c.placements.insert("top".into(), "feed_top".into());
        let imps: Vec<String> = (0..13)
            .map(|i| {
                format!(
                    r#"{{"id":"{i}","banner":{{}},"tagid":"{}","bidfloor":{}}}"#,
                    if i < 12 { "top" } else { "x" },
                    if i == 0 { 2 } else { 0 }
                )
            })
            .collect();
        let json = format!(r#"{{"id":"r","user":{{"id":"u1"}},"imp":[{}]}}"#, imps.join(","));
        let plan = plan(&parse(&json), &c);
        let shape: Vec<(String, i64, usize)> = plan
            .groups
            .iter()
            .map(|g| (g.request.context.as_ref().unwrap().placement.clone(), g.floor_ecpm_micros, g.imps.len()))
            .collect();
        assert_eq!(
            shape,
            [
                ("feed_top".into(), 2_000_000, 1),
                ("feed_top".into(), 0, 10),
                ("feed_top".into(), 0, 1),
                ("openrtb".into(), 0, 1)
            ]
        );
        assert!(plan.groups.iter().all(|g| g.request.slots as usize == g.imps.len()));
    }

    #[test]
    fn users_are_identified_only_when_allowed() {
        let c = config();
        let id = |json: &str| {
            let p = plan(&parse(json), &c);
            p.groups[0].request.user_id.clone()
        };
        let imp = r#""imp":[{"id":"1","banner":{}}]"#;
        assert_eq!(id(&format!(r#"{{"id":"r",{imp},"user":{{"id":"x","buyeruid":"mine"}}}}"#)), "mine");
        assert_eq!(id(&format!(r#"{{"id":"r",{imp},"user":{{"id":"x"}}}}"#)), "x");
        assert_eq!(id(&format!(r#"{{"id":"r",{imp},"device":{{"ifa":"abc-123"}}}}"#)), "abc-123");
        assert_eq!(id(&format!(r#"{{"id":"r",{imp},"device":{{"ifa":"00000000-0000-0000-0000-000000000000"}}}}"#)), "");
        assert_eq!(id(&format!(r#"{{"id":"r",{imp},"device":{{"ifa":"abc","lmt":1}}}}"#)), "");
        assert_eq!(id(&format!(r#"{{"id":"r",{imp},"user":{{"id":"x"}},"regs":{{"gdpr":1}}}}"#)), "");
        assert_eq!(id(&format!(r#"{{"id":"r",{imp},"user":{{"id":"x"}},"regs":{{"ext":{{"gdpr":1}}}}}}"#)), "");
        assert_eq!(id(&format!(r#"{{"id":"r",{imp},"user":{{"id":"{}"}}}}"#, "x".repeat(200))), "");
    }

    #[test]
    fn creatives_link_through_the_click_redirect_when_it_is_configured() {
        assert_eq!(link("", "https://l.example/x", "imp", "v1.1.2.s"), "https://l.example/x");
        assert_eq!(
            link("https://ads.example/v1/clicks/redirect", "https://l.example/x", "imp", "v1.1.2.s"),
            "https://ads.example/v1/clicks/redirect?impression_id=imp&click_token=v1.1.2.s"
        );
        let mut c = crate::GatewayConfig::default();
        for bad in ["ads.example/r", "https://a.example/r?x=1", "https://a.example/r#f", "javascript:alert(1)"] {
            c.openrtb.click_url = bad.into();
            let e = adserve_core::Validate::validate(&c).unwrap_err();
            assert_eq!(e.key, "openrtb.click_url", "{bad}");
        }
        c.openrtb.click_url = "https://ads.example/v1/clicks/redirect".into();
        adserve_core::Validate::validate(&c).unwrap();
    }

    #[test]
    fn markup_escapes_and_fills_native_assets() {
        let banner = markup(&Slot::Banner { w: None, h: None }, "Tom & <Jerry>", "https://a.example/?a=1&b=\"2\"", "");
        assert_eq!(
            banner,
            "<a href=\"https://a.example/?a=1&amp;b=&quot;2&quot;\" target=\"_blank\" rel=\"noopener\">Tom &amp; &lt;Jerry&gt;</a>"
        );
        let native = native_plan(&Native {
            request: Some(serde_json::json!(
                r#"{"ver":"1.2","assets":[{"id":1,"required":1,"title":{"len":5}},{"id":2,"data":{"type":1}},{"id":3,"img":{"type":3}},{"id":4,"required":0,"data":{"type":2,"len":3}}]}"#
            )),
            ver: None,
        })
        .unwrap()
        .unwrap();
        let adm: serde_json::Value =
            serde_json::from_str(&markup(&Slot::Native(native), "Headline", "https://l.example", "brand.example"))
                .unwrap();
        assert_eq!(
            adm,
            serde_json::json!({"ver": "1.2", "assets": [
                {"id": 1, "title": {"text": "Headl"}},
                {"id": 2, "data": {"value": "brand.example"}},
                {"id": 4, "data": {"value": "Hea"}}
            ], "link": {"url": "https://l.example"}})
        );
        // Native 1.0's wrapper is echoed.
        let wrapped = native_plan(&Native {
            request: Some(serde_json::json!(r#"{"native":{"ver":"1","assets":[{"id":0,"title":{"len":90}}]}}"#)),
            ver: Some("1.0".into()),
        })
        .unwrap()
        .unwrap();
        assert!(wrapped.wrapped);
        let adm: serde_json::Value = serde_json::from_str(&markup(&Slot::Native(wrapped), "H", "u", "")).unwrap();
        assert_eq!(adm["native"]["assets"][0]["title"]["text"], "H");
    }

    #[test]
    fn a_burl_carries_the_bid_its_token_and_the_price_macro_and_notices_are_checked() {
        assert_eq!(burl("", "i", "b1.x"), None, "no billing_url: no burl");
        let url =
            burl("https://ads.example/openrtb2/billing", "0190b7a2-1c2d-7e3f-8a9b-0c1d2e3f4a5b", "b1.1.2.3.s").unwrap();
        assert_eq!(
            url,
            "https://ads.example/openrtb2/billing?impression_id=0190b7a2-1c2d-7e3f-8a9b-0c1d2e3f4a5b\
             &billing_token=b1.1.2.3.s&price=${AUCTION_PRICE}"
        );
        let notice = |price: &str| BillingNotice {
            impression_id: "0190b7a2-1c2d-7e3f-8a9b-0c1d2e3f4a5b".into(),
            billing_token: "b1.1.2.3.s".into(),
            price: price.into(),
        };
        assert_eq!(notice("1.2345").check(false).unwrap().1, ClearingPrice::Micros(1_234_500));
        assert_eq!(notice(" 0 ").check(false).unwrap().1, ClearingPrice::Micros(0));
        for (price, expected) in [
            ("${AUCTION_PRICE}", "price: the exchange did not replace"),
            ("", "price: required"),
            ("inf", "price: must be 0..="),
            ("-0.5", "price: must be 0..="),
            ("2000000", "price: must be 0..="),
            ("1,5", "price: must be a decimal clearing price (encrypted prices need openrtb.price_keys)"),
        ] {
            let e = notice(price).check(false).unwrap_err().to_string();
            assert!(e.starts_with(expected), "{price:?}: {e}");
        }
        let e = BillingNotice { impression_id: "x".into(), ..notice("1") }.check(false).unwrap_err().to_string();
        assert!(e.starts_with("impression_id:"), "{e}");
        let e = BillingNotice { billing_token: String::new(), ..notice("1") }.check(false).unwrap_err().to_string();
        assert!(e.starts_with("billing_token: required"), "{e}");
    }

    #[test]
    fn with_price_keys_a_price_must_be_encrypted_and_verify() {
        use crate::price_crypto::PriceKeys;
        let keys = PriceKeys::new(&[1; 32], &[2; 32]);
        let notice = |price: String| BillingNotice {
            impression_id: "0190b7a2-1c2d-7e3f-8a9b-0c1d2e3f4a5b".into(),
            billing_token: "b1.1.2.3.s".into(),
            price,
        };
        let encrypted = keys.encrypt(1_234_500, [9; 16]);
        let n = notice(encrypted.clone());
        let (_, price) = n.check(true).unwrap();
        assert_eq!(price, ClearingPrice::Encrypted(&encrypted), "decrypted only after the token verifies");
        assert_eq!(price.micros(Some(&keys)).unwrap(), 1_234_500);
        // With keys, a decimal price is refused (anyone with the burl could set it).
        let e = notice("0.5".into()).check(true).unwrap_err().to_string();
        assert!(e.starts_with("price: must be encrypted with openrtb.price_keys"), "{e}");
        // Without keys, an encrypted price is named as such.
        let e = notice(encrypted.clone()).check(false).unwrap_err().to_string();
        assert!(e.contains("encrypted prices need openrtb.price_keys"), "{e}");
        // Under other keys (or altered): 403, never billed.
        let other = PriceKeys::new(&[3; 32], &[4; 32]);
        let e = price.micros(Some(&other)).unwrap_err();
        assert!(
            matches!(e, ServeError::Forbidden(ref m) if m.starts_with("price: the encrypted price does not verify")),
            "{e}"
        );
        // Decrypted, and still beyond the highest price.
        let huge = keys.encrypt(u64::MAX, [9; 16]);
        let e = ClearingPrice::Encrypted(&huge).micros(Some(&keys)).unwrap_err().to_string();
        assert!(e.starts_with("price: must be 0..="), "{e}");
        // The standard alphabet's '+' arrives from a query string as a space.
        let plus = (0u8..=255)
            .map(|b| keys.encrypt(1_000, [b; 16]))
            .find(|c| {
                base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD_NO_PAD,
                    base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, c).unwrap(),
                )
                .contains('+')
            })
            .expect("some iv gives a '+'");
        let standard = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD_NO_PAD,
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &plus).unwrap(),
        )
        .replace('+', " ");
        let n = notice(standard);
        let (_, price) = n.check(true).unwrap();
        assert_eq!(price.micros(Some(&keys)).unwrap(), 1_000);
    }
}
