-- Learned travel speeds, one table per tenant and vehicle type (the text of
-- `hexfleet_geo::eta::SpeedModel::save`), so a restart does not fall back to the priors.
CREATE TABLE speed_models (
    tenant       TEXT             NOT NULL,
    vehicle      TEXT             NOT NULL,
    model        TEXT             NOT NULL,
    updated_at   BIGINT           NOT NULL,
    PRIMARY KEY (tenant, vehicle)
);
