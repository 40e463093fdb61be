//! The request contract every entry point shares: the user id and the
//! request context, checked the same way by the gateway (GetAds, POST
//! /v1/ads) and the feature-service (GetFeatures). Each error names its field.

use adserve_proto::v1::RequestContext;

use crate::FeatureRegistry;

/// Longest user id, in bytes.
pub const MAX_USER_ID_LEN: usize = 128;
/// Longest context field (placement, device, surface), in bytes.
pub const MAX_CONTEXT_FIELD_LEN: usize = 64;

/// A request field that fails the contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {why}")]
pub struct FieldError {
    /// The field, as named on the wire (`context.device`, `ad_ids`).
    pub field: &'static str,
    /// What is wrong with it.
    pub why: String,
}

impl FieldError {
    /// `field` fails because `why`.
    pub fn new(field: &'static str, why: impl Into<String>) -> Self {
        Self { field, why: why.into() }
    }
}

/// The context, present and well-formed: placement and device required,
/// every field short and printable, the device one of the registry's.
pub fn check_context<'a>(
    ctx: Option<&'a RequestContext>,
    registry: &FeatureRegistry,
) -> Result<&'a RequestContext, FieldError> {
    let ctx = ctx.ok_or_else(|| FieldError::new("context", "required"))?;
    for (field, value, required) in [
        ("context.placement", &ctx.placement, true),
        ("context.device", &ctx.device, true),
        ("context.surface", &ctx.surface, false),
    ] {
        if required && value.is_empty() {
            return Err(FieldError::new(field, "required"));
        }
        if value.len() > MAX_CONTEXT_FIELD_LEN || value.chars().any(char::is_control) {
            return Err(FieldError::new(field, format!("at most {MAX_CONTEXT_FIELD_LEN} printable bytes")));
        }
    }
    let devices = &registry.request.devices;
    if !devices.contains(&ctx.device) {
        return Err(FieldError::new("context.device", format!("must be one of {devices:?}, got {:?}", ctx.device)));
    }
    Ok(ctx)
}

/// The user id: required, short and printable, unless the request is COPPA
/// (then it may be empty and is never used, but is still bounded).
pub fn check_user_id(user_id: &str, coppa: bool) -> Result<(), FieldError> {
    if user_id.len() > MAX_USER_ID_LEN {
        return Err(FieldError::new("user_id", format!("at most {MAX_USER_ID_LEN} bytes")));
    }
    if coppa {
        return Ok(());
    }
    if user_id.trim().is_empty() {
        return Err(FieldError::new("user_id", "required (may be empty only when context.coppa is true)"));
    }
    if user_id.chars().any(char::is_control) {
        return Err(FieldError::new("user_id", "must not contain control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry;

    fn ctx() -> RequestContext {
        RequestContext { placement: "feed_top".into(), device: "mobile".into(), surface: "home".into(), coppa: false }
    }

    #[test]
    fn a_good_context_passes() {
        assert!(check_context(Some(&ctx()), registry()).is_ok());
    }

    #[test]
    fn each_bad_context_field_is_named() {
        assert_eq!(check_context(None, registry()).unwrap_err().field, "context");
        let bad = |f: fn(&mut RequestContext)| {
            let mut c = ctx();
            f(&mut c);
            check_context(Some(&c), registry()).unwrap_err().field
        };
        assert_eq!(bad(|c| c.placement.clear()), "context.placement");
        assert_eq!(bad(|c| c.device = "toaster".into()), "context.device");
        assert_eq!(bad(|c| c.device.clear()), "context.device");
        assert_eq!(bad(|c| c.surface = "x".repeat(MAX_CONTEXT_FIELD_LEN + 1)), "context.surface");
        assert_eq!(bad(|c| c.placement = "a\nb".into()), "context.placement");
    }

    #[test]
    fn every_registry_device_is_accepted() {
        for device in &registry().request.devices {
            let c = RequestContext { device: device.clone(), ..ctx() };
            assert!(check_context(Some(&c), registry()).is_ok(), "{device}");
        }
    }

    #[test]
    fn user_ids() {
        assert!(check_user_id("u1", false).is_ok());
        assert!(check_user_id("", true).is_ok());
        assert_eq!(check_user_id("", false).unwrap_err().field, "user_id");
        assert_eq!(check_user_id(" ", false).unwrap_err().field, "user_id");
        assert_eq!(check_user_id("a\u{7}", false).unwrap_err().field, "user_id");
        assert_eq!(check_user_id(&"x".repeat(MAX_USER_ID_LEN + 1), true).unwrap_err().field, "user_id");
    }
}
