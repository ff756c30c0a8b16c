-- Adoption of warm standbys picks the oldest ready machine with no project.
CREATE INDEX machines_warm_idx ON machines (platform, ready_at) WHERE project_id IS NULL AND state = 'ready';
-- The reaper and the reconciler look machines up by provider and state.
CREATE INDEX machines_provider_state_idx ON machines (provider, state);
