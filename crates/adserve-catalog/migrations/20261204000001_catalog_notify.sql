-- Change notifications for the gateway's in-memory catalog index
-- (crates/adserve-catalog/src/index.rs): every statement that changes what
-- can be served notifies channel adserve_catalog with '<schema>.<table>'.
-- Statement-level, so a bulk edit is one notification per statement, and
-- PostgreSQL folds identical notifications of one transaction into one.
CREATE FUNCTION catalog_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('adserve_catalog', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER ads_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON ads
    FOR EACH STATEMENT EXECUTE FUNCTION catalog_notify();
CREATE TRIGGER campaigns_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON campaigns
    FOR EACH STATEMENT EXECUTE FUNCTION catalog_notify();
CREATE TRIGGER advertisers_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON advertisers
    FOR EACH STATEMENT EXECUTE FUNCTION catalog_notify();
CREATE TRIGGER floors_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON floors
    FOR EACH STATEMENT EXECUTE FUNCTION catalog_notify();
