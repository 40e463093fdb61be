//! Compiles proto/adserve/v1 with the pure-Rust `protox` compiler (no `protoc`
//! needed), generates prost messages and tonic clients/servers, and writes the
//! encoded descriptor set that gRPC server reflection serves.
use std::{env, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "adserve/v1/common.proto",
    "adserve/v1/events.proto",
    "adserve/v1/gateway.proto",
    "adserve/v1/feature_service.proto",
    "adserve/v1/ranker.proto",
    "adserve/v1/auction.proto",
    "adserve/v1/label_joiner.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let fds = protox::compile(PROTOS, [&root])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(out.join("adserve_descriptor.bin"), fds.encode_to_vec())?;
    // The gateway's HTTP/JSON API uses the same messages as its gRPC API, so
    // the contract is defined once, here in proto.
    let de = "#[derive(serde::Deserialize)] #[serde(deny_unknown_fields)]";
    let ser = "#[derive(serde::Serialize)]";
    // FeatureMatrix has a hand-written codec (src/matrix.rs: its number
    // blocks move in bulk). prost-derive's version of every message is
    // generated too, for that codec's tests to check it against.
    let reference = out.join("reference");
    std::fs::create_dir_all(&reference)?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .out_dir(&reference)
        .compile_fds(fds.clone())?;
    tonic_prost_build::configure()
        .extern_path(".adserve.v1.FeatureMatrix", "crate::matrix::FeatureMatrix")
        .type_attribute(".adserve.v1.GetAdsRequest", de)
        // Optional on the wire: the block lists (user_id, context and slots stay required).
        .field_attribute(".adserve.v1.GetAdsRequest.blocked_categories", "#[serde(default)]")
        .field_attribute(".adserve.v1.GetAdsRequest.blocked_advertisers", "#[serde(default)]")
        .field_attribute(".adserve.v1.GetAdsRequest.tmax_ms", "#[serde(default)]")
        // Missing is refused by the gateway with a message naming the field.
        .field_attribute(".adserve.v1.RecordClickRequest.click_token", "#[serde(default)]")
        .type_attribute(".adserve.v1.RecordClickRequest", de)
        .type_attribute(
            ".adserve.v1.RequestContext",
            "#[derive(serde::Deserialize, serde::Serialize)] #[serde(deny_unknown_fields, default)]",
        )
        .type_attribute(".adserve.v1.GetAdsResponse", ser)
        .type_attribute(".adserve.v1.AdWinner", ser)
        .type_attribute(".adserve.v1.Degradation", ser)
        .type_attribute(".adserve.v1.RecordClickResponse", ser)
        .compile_fds(fds)?;
    Ok(())
}
