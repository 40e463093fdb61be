-- The model registry: every model version the ranker may serve, its stage,
-- and an append-only history of stage changes (who, when, why).

CREATE TABLE models (
    name              TEXT NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9_.-]{0,63}$'),
    version           TEXT NOT NULL CHECK (length(version) BETWEEN 1 AND 128),
    -- Directory holding model.onnx and manifest.json, readable by the ranker.
    artifact          TEXT NOT NULL CHECK (artifact <> ''),
    manifest          JSONB NOT NULL,
    -- The manifest's onnx_sha256, checked again by the ranker at load.
    onnx_sha256       TEXT NOT NULL CHECK (onnx_sha256 ~ '^[0-9a-f]{64}$'),
    -- Offline evaluation (the trainer's holdout metrics).
    metrics           JSONB NOT NULL DEFAULT '{}',
    stage             TEXT NOT NULL DEFAULT 'candidate'
                      CHECK (stage IN ('candidate', 'shadow', 'canary', 'production', 'retired')),
    -- Share of users (by hash of user id) a canary serves.
    canary_share      DOUBLE PRECISION NOT NULL DEFAULT 0 CHECK (canary_share >= 0 AND canary_share <= 1),
    registered_by     TEXT NOT NULL,
    registered_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    stage_changed_by  TEXT NOT NULL,
    stage_changed_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);

-- At most one production, one canary and one shadow version per model name.
CREATE UNIQUE INDEX models_one_production ON models (name) WHERE stage = 'production';
CREATE UNIQUE INDEX models_one_canary ON models (name) WHERE stage = 'canary';
CREATE UNIQUE INDEX models_one_shadow ON models (name) WHERE stage = 'shadow';

CREATE TABLE model_stage_changes (
    id          BIGSERIAL PRIMARY KEY,
    name        TEXT NOT NULL,
    version     TEXT NOT NULL,
    from_stage  TEXT,
    to_stage    TEXT NOT NULL,
    actor       TEXT NOT NULL,
    reason      TEXT NOT NULL DEFAULT '',
    -- Set on the two changes a rollback makes: the history of production
    -- versions is then a stack (a promotion pushes, a rollback pops).
    rollback    BOOLEAN NOT NULL DEFAULT false,
    at          TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    FOREIGN KEY (name, version) REFERENCES models (name, version)
);
CREATE INDEX model_stage_changes_by_name ON model_stage_changes (name, id);

-- Followers (the rankers) LISTEN on adserve_models; the payload is the model
-- name. They also poll, so a lost notification costs at most a poll interval.
CREATE FUNCTION models_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('adserve_models', NEW.name);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER models_notify AFTER INSERT OR UPDATE ON models
    FOR EACH ROW EXECUTE FUNCTION models_notify();
