-- OsmAnd / Traccar devices are looked up by id alone when a node routes a report to the node
-- owning the courier's market (`SqlStore::device_courier`).
CREATE INDEX couriers_device_id ON couriers (device_id) WHERE device_id IS NOT NULL;
