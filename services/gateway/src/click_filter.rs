//! Which clicks through the click redirect (`GET /v1/clicks/redirect`) are
//! not a person's, and so are neither recorded nor labelled.
//!
//! A creative's link is fetched by much that is not a user: search and
//! social crawlers, chat apps and mail scanners expanding a link preview,
//! browsers prefetching a link, monitoring and scripts. Counted as clicks,
//! they would become label-1 training rows and CPC charges. This is the
//! industry's *general* invalid-traffic filter (known crawlers by their
//! declared user agent, non-browser fetches), not fraud detection: a bot
//! that claims to be a browser passes it.
//!
//! A filtered fetch is still redirected to the landing page (a preview
//! shows the right page) and is counted in
//! `adserve_gateway_clicks_refused_total{reason}`: `bot` (a user agent
//! matching one of `click_filter.user_agents`, or none at all), `prefetch`
//! (a `HEAD` request, or a `Sec-Purpose` / `Purpose` / `X-Purpose`
//! prefetch or prerender header). The impression is not marked clicked, so
//! the person's own click afterwards is recorded.

use adserve_core::{Invalid, check_range};
use serde::{Deserialize, Serialize};

/// What the click redirect filters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClickFilterConfig {
    /// Off: every genuine token's fetch is recorded.
    pub enabled: bool,
    /// Case-insensitive substrings of a user agent that is not a person's
    /// browser. The default lists the major crawlers, link previewers,
    /// headless browsers and HTTP libraries of scripts; ad SDKs' own HTTP
    /// clients (okhttp, CFNetwork) are left out on purpose: some fire the
    /// click for a real tap.
    pub user_agents: Vec<String>,
    /// A fetch without a `User-Agent` (every browser sends one) is a bot.
    pub require_user_agent: bool,
}

/// The default `click_filter.user_agents`.
pub const DEFAULT_BOT_USER_AGENTS: &[&str] = &[
    // Crawlers and link previewers that say so.
    "bot/",
    "bot-",
    "bot;",
    "crawler",
    "spider",
    "slurp",
    "googlebot",
    "bingbot",
    "adsbot-google",
    "mediapartners-google",
    "google-inspectiontool",
    "facebookexternalhit",
    "facebookcatalog",
    "twitterbot",
    "linkedinbot",
    "slackbot",
    "discordbot",
    "telegrambot",
    "whatsapp/",
    "skypeuripreview",
    "embedly",
    "pinterestbot",
    "redditbot",
    "applebot",
    "duckduckbot",
    "yandex",
    "baiduspider",
    "bytespider",
    "petalbot",
    "gptbot",
    "ccbot",
    "preview",
    // Headless browsers and scripts.
    "headlesschrome",
    "phantomjs",
    "lighthouse",
    "curl/",
    "wget/",
    "python-requests",
    "python-urllib",
    "aiohttp",
    "httpx",
    "libwww-perl",
    "scrapy",
    "node-fetch",
    "axios/",
    "apache-httpclient",
];

impl Default for ClickFilterConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            user_agents: DEFAULT_BOT_USER_AGENTS.iter().map(|s| (*s).to_string()).collect(),
            require_user_agent: true,
        }
    }
}

impl ClickFilterConfig {
    /// Checks every field, naming it under `prefix`.
    pub fn validate(&self, prefix: &str) -> Result<(), Invalid> {
        check_range(&format!("{prefix}.user_agents"), self.user_agents.len(), 0..=10_000)?;
        for (i, pattern) in self.user_agents.iter().enumerate() {
            if pattern.trim().is_empty() || pattern.len() > 256 || pattern.chars().any(char::is_control) {
                return Err(Invalid::new(
                    format!("{prefix}.user_agents[{i}]"),
                    format!("must be 1..=256 printable bytes, got {pattern:?}"),
                ));
            }
        }
        Ok(())
    }
}

/// What the redirect knows of the fetch.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fetch<'a> {
    /// The `User-Agent` header, if any (and valid UTF-8).
    pub user_agent: Option<&'a str>,
    /// A `HEAD` request, or a prefetch / prerender by its purpose header.
    pub prefetch: bool,
}

/// Why a fetch is not recorded as a click: a label of
/// `adserve_gateway_clicks_refused_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotAClick {
    /// A declared crawler, previewer or script, or no user agent.
    Bot,
    /// A prefetch, prerender or `HEAD`.
    Prefetch,
}

impl NotAClick {
    /// The metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Bot => "bot",
            Self::Prefetch => "prefetch",
        }
    }
}

/// The filter, its patterns lowercased once.
#[derive(Debug, Clone)]
pub struct ClickFilter {
    enabled: bool,
    patterns: Vec<String>,
    require_user_agent: bool,
}

impl ClickFilter {
    /// From a checked config.
    pub fn new(config: &ClickFilterConfig) -> Self {
        Self {
            enabled: config.enabled,
            patterns: config.user_agents.iter().map(|p| p.trim().to_ascii_lowercase()).collect(),
            require_user_agent: config.require_user_agent,
        }
    }

    /// `None` for a fetch that may be a person's click.
    pub fn judge(&self, fetch: Fetch<'_>) -> Option<NotAClick> {
        if !self.enabled {
            return None;
        }
        if fetch.prefetch {
            return Some(NotAClick::Prefetch);
        }
        let agent = fetch.user_agent.map(str::trim).filter(|a| !a.is_empty());
        let Some(agent) = agent else {
            return self.require_user_agent.then_some(NotAClick::Bot);
        };
        let agent = agent.to_ascii_lowercase();
        self.patterns.iter().any(|p| agent.contains(p.as_str())).then_some(NotAClick::Bot)
    }
}

/// Whether a `Sec-Purpose`, `Purpose` or `X-Purpose` header value asks for
/// a prefetch or prerender (browsers' speculative loads).
pub fn is_prefetch_purpose(value: &str) -> bool {
    let v = value.to_ascii_lowercase();
    v.contains("prefetch") || v.contains("prerender") || v.contains("preview")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHROME: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) \
                          Chrome/124.0.0.0 Safari/537.36";
    const SAFARI_IOS: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 \
                              (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1";
    const ANDROID_WEBVIEW: &str = "Mozilla/5.0 (Linux; Android 13; CUBOT X70 Build/TP1A.220624.014; wv) \
                                   AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/120.0.6099.230 \
                                   Mobile Safari/537.36";
    const SDK: &str = "okhttp/4.12.0";

    fn judge(agent: Option<&str>) -> Option<NotAClick> {
        ClickFilter::new(&ClickFilterConfig::default()).judge(Fetch { user_agent: agent, prefetch: false })
    }

    #[test]
    fn browsers_webviews_and_sdk_clients_are_clicks() {
        for agent in [CHROME, SAFARI_IOS, ANDROID_WEBVIEW, SDK] {
            assert_eq!(judge(Some(agent)), None, "{agent}");
        }
    }

    #[test]
    fn crawlers_previewers_and_scripts_are_not() {
        for agent in [
            "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
            "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
            "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
            "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
            "Twitterbot/1.0",
            "TelegramBot (like TwitterBot)",
            "WhatsApp/2.23.20.0 A",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/124.0.0.0 Safari/537.36",
            "curl/8.5.0",
            "python-requests/2.32.3",
            "Wget/1.21.4",
            "Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)",
        ] {
            assert_eq!(judge(Some(agent)), Some(NotAClick::Bot), "{agent}");
        }
    }

    #[test]
    fn no_user_agent_is_a_bot_unless_allowed() {
        assert_eq!(judge(None), Some(NotAClick::Bot));
        assert_eq!(judge(Some("  ")), Some(NotAClick::Bot));
        let lenient = ClickFilter::new(&ClickFilterConfig { require_user_agent: false, ..Default::default() });
        assert_eq!(lenient.judge(Fetch::default()), None);
    }

    #[test]
    fn prefetches_are_not_clicks_and_the_filter_can_be_turned_off() {
        let filter = ClickFilter::new(&ClickFilterConfig::default());
        assert_eq!(filter.judge(Fetch { user_agent: Some(CHROME), prefetch: true }), Some(NotAClick::Prefetch));
        for purpose in ["prefetch", "prefetch;prerender", "Prefetch", "preview"] {
            assert!(is_prefetch_purpose(purpose), "{purpose}");
        }
        assert!(!is_prefetch_purpose("navigate"));
        let off = ClickFilter::new(&ClickFilterConfig { enabled: false, ..Default::default() });
        assert_eq!(off.judge(Fetch { user_agent: Some("curl/8"), prefetch: true }), None);
    }

    #[test]
    fn operators_add_their_own_patterns_case_insensitively() {
        let mut config = ClickFilterConfig::default();
        config.user_agents.push("  AcmeMonitor ".into());
        let filter = ClickFilter::new(&config);
        assert_eq!(
            filter.judge(Fetch { user_agent: Some("acmemonitor/3 (uptime)"), prefetch: false }),
            Some(NotAClick::Bot)
        );
    }

    #[test]
    fn config_is_checked() {
        assert!(ClickFilterConfig::default().validate("click_filter").is_ok());
        let bad = ClickFilterConfig { user_agents: vec!["ok".into(), " ".into()], ..Default::default() };
        assert!(bad.validate("click_filter").unwrap_err().to_string().contains("click_filter.user_agents[1]"));
        let bad = ClickFilterConfig { user_agents: vec!["a\nb".into()], ..Default::default() };
        assert!(bad.validate("click_filter").is_err());
    }
}
