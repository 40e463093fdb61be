-- Auction inputs: CPM bids beside CPC, ad quality, a cached CTR estimate for
-- retrieval, per-campaign frequency caps, advertiser domains (OpenRTB badv)
-- and reserve floors per placement and content category.
--
-- Spend is no longer kept here: it is a real-time counter (Redis), read by
-- the gateway's pacer. The column nothing wrote is dropped.

ALTER TABLE advertisers ADD COLUMN domain TEXT NOT NULL DEFAULT '';
CREATE INDEX advertisers_domain ON advertisers (domain) WHERE domain <> '';

ALTER TABLE campaigns ALTER COLUMN bid_cpc_micros DROP NOT NULL;
ALTER TABLE campaigns ADD COLUMN bid_cpm_micros BIGINT CHECK (bid_cpm_micros > 0);
ALTER TABLE campaigns ADD CONSTRAINT campaigns_one_bid
    CHECK ((bid_cpc_micros IS NULL) <> (bid_cpm_micros IS NULL));
-- Most impressions per user per UTC day; NULL uses the gateway's default.
ALTER TABLE campaigns ADD COLUMN frequency_cap_per_day INTEGER CHECK (frequency_cap_per_day > 0);
ALTER TABLE campaigns DROP COLUMN spent_today_micros;

-- Quality multiplier of the auction's eCPM (1 is neutral).
ALTER TABLE ads ADD COLUMN quality REAL NOT NULL DEFAULT 1 CHECK (quality > 0 AND quality <= 100);
-- Cached CTR estimate (historical, smoothed) that retrieval ranks by before
-- any model has scored the ad: bid x est_ctr is the cheap eCPM.
ALTER TABLE ads ADD COLUMN est_ctr REAL NOT NULL DEFAULT 0.01 CHECK (est_ctr > 0 AND est_ctr <= 1);

-- Reserve eCPM floors. '*' matches every placement or category; a candidate's
-- floor is the highest row matching its placement and its ad's category.
CREATE TABLE floors (
    placement            TEXT NOT NULL DEFAULT '*',
    category             TEXT NOT NULL DEFAULT '*',
    reserve_ecpm_micros  BIGINT NOT NULL CHECK (reserve_ecpm_micros >= 0),
    updated_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (placement, category)
);
