-- GET /events filters by site: an index like those by asset and by kind.
CREATE INDEX events_by_site ON events (site_id, ts DESC, id DESC);
