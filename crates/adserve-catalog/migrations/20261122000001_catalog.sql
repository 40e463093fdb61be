-- The ad catalog: who advertises, what they pay, and which creatives may run.

CREATE TABLE advertisers (
    id          BIGSERIAL PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE campaigns (
    id                   BIGSERIAL PRIMARY KEY,
    advertiser_id        BIGINT NOT NULL REFERENCES advertisers (id),
    name                 TEXT NOT NULL,
    status               TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'paused', 'ended')),
    -- Cost-per-click bid, micro currency units.
    bid_cpc_micros       BIGINT NOT NULL CHECK (bid_cpc_micros > 0),
    daily_budget_micros  BIGINT NOT NULL CHECK (daily_budget_micros > 0),
    spent_today_micros   BIGINT NOT NULL DEFAULT 0 CHECK (spent_today_micros >= 0),
    -- Targeting: empty arrays match every placement / device.
    placements           TEXT[] NOT NULL DEFAULT '{}',
    devices              TEXT[] NOT NULL DEFAULT '{}',
    starts_at            TIMESTAMPTZ,
    ends_at              TIMESTAMPTZ,
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (advertiser_id, name)
);

CREATE TABLE ads (
    id            BIGSERIAL PRIMARY KEY,
    campaign_id   BIGINT NOT NULL REFERENCES campaigns (id),
    title         TEXT NOT NULL,
    landing_url   TEXT NOT NULL,
    category      TEXT NOT NULL,
    -- COPPA: only creatives marked safe may be shown to under-13 users.
    under13_safe  BOOLEAN NOT NULL DEFAULT false,
    status        TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'paused', 'rejected')),
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX ads_campaign_active ON ads (campaign_id) WHERE status = 'active';
CREATE INDEX campaigns_active ON campaigns (id) WHERE status = 'active';
