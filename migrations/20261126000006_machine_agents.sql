-- Machine agents: registration, directives pushed to the agent, and its health.

ALTER TABLE machines
    -- Launched with `kiln agent`, which registers and reports; otherwise the provider
    -- itself says when BuildKit serves (sim, local without agent).
    ADD COLUMN managed_by_agent        boolean NOT NULL DEFAULT false,
    -- BuildKit serves the machine's current directive (its project); builds wait for it.
    ADD COLUMN serving                 boolean NOT NULL DEFAULT false,
    -- Bumped whenever what the agent should do changes; the agent echoes what it applied.
    ADD COLUMN directive_generation    bigint NOT NULL DEFAULT 1,
    ADD COLUMN applied_generation      bigint NOT NULL DEFAULT 0,
    -- The one-time registration token is an HMAC of the machine id and this nonce under
    -- the key-encryption key, so nothing secret is stored; registering clears the nonce.
    ADD COLUMN registration_nonce      text,
    ADD COLUMN registration_expires_at timestamptz,
    ADD COLUMN registered_at           timestamptz,
    ADD COLUMN agent_version           text,
    ADD COLUMN last_health_at          timestamptz,
    ADD COLUMN buildkit_up             boolean NOT NULL DEFAULT false,
    ADD COLUMN disk_free_bytes         bigint,
    ADD COLUMN disk_total_bytes        bigint,
    ADD COLUMN agent_stopped_at        timestamptz;

UPDATE machines SET serving = true WHERE state IN ('ready', 'assigned', 'draining');

-- An agent-managed machine's directive changes when it joins a project or stops being
-- live. Bumping the generation here keeps every writer (any replica, any code path)
-- consistent, and the NOTIFY (sent at commit) wakes the replica holding its stream.
CREATE FUNCTION machines_directive_changed() RETURNS trigger AS $$
BEGIN
    IF NEW.managed_by_agent AND (
        NEW.project_id IS DISTINCT FROM OLD.project_id
        OR (NEW.state IN ('draining', 'terminated', 'failed')) <> (OLD.state IN ('draining', 'terminated', 'failed'))
    ) THEN
        NEW.directive_generation := OLD.directive_generation + 1;
        PERFORM pg_notify('kiln_machines', NEW.id);
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER machines_directive BEFORE UPDATE OF project_id, state ON machines
    FOR EACH ROW EXECUTE FUNCTION machines_directive_changed();

-- The reconciler looks for agents that stopped reporting.
CREATE INDEX machines_agent_health_idx ON machines (last_health_at)
    WHERE managed_by_agent AND state IN ('ready', 'assigned', 'draining');
