//! Things defined once in code and mirrored where code cannot reach (the
//! shell scripts): these tests fail when a mirror drifts from its definition.

use adserve_integration_tests::repo_root;

/// `scripts/env.sh` mirrors `adserve_core::ports` for the local stack.
#[test]
fn env_sh_ports_are_the_config_defaults() {
    let env_sh = std::fs::read_to_string(repo_root().join("scripts/env.sh")).expect("scripts/env.sh");
    for (var, port) in adserve_core::ports::ALL {
        // Lines look like: GATEWAY_HTTP_PORT="${GATEWAY_HTTP_PORT:-8080}"
        let want = format!("{var}=\"${{{var}:-{port}}}\"");
        assert!(env_sh.lines().any(|l| l.trim() == want), "scripts/env.sh lacks `{want}`");
    }
}

/// The services' defaults read the definitions instead of repeating them.
#[test]
fn config_defaults_derive_from_the_definitions() {
    use adserve_core::ports;
    let gateway = adserve_gateway::GatewayConfig::default();
    assert_eq!(gateway.http_addr.port(), ports::GATEWAY_HTTP);
    assert_eq!(gateway.upstreams.ranker, ports::local_url(ports::RANKER_GRPC));
    assert_eq!(gateway.auction.reserve_ecpm_micros, adserve_auction::DEFAULT_RESERVE_ECPM_MICROS);
    assert_eq!(
        gateway.pacing.controller(),
        adserve_auction::pacing::PacingConfig::default(),
        "the gateway's pacing defaults are the controller's"
    );
    assert_eq!(
        adserve_label_joiner::LabelJoinerConfig::default().label_window,
        adserve_features::registry().label.window()
    );
    assert_eq!(adserve_feature_service::FeatureServiceConfig::default().max_ads, adserve_proto::limits::MAX_CANDIDATES);
}
