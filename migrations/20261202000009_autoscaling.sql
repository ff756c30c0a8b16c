-- Builders beyond a project's one per architecture: `extra` builders (autoscaling) serve
-- the project from a copy-on-write clone of its volume; `ephemeral` builders serve one
-- build (untrusted ones, such as fork pull requests) from a volume of its own.
ALTER TABLE machines
    ADD COLUMN role text NOT NULL DEFAULT 'primary'
        CHECK (role IN ('primary', 'extra', 'ephemeral')),
    -- Ephemeral builders: the build they serve.
    ADD COLUMN build_id text;

-- The slot (one live builder per project and architecture) is the primary's alone.
DROP INDEX machines_live_slot;
CREATE UNIQUE INDEX machines_live_slot ON machines (project_id, platform)
    WHERE role = 'primary' AND state IN ('requested', 'launching', 'booting', 'ready', 'assigned');
CREATE INDEX machines_build_idx ON machines (build_id) WHERE build_id IS NOT NULL;

-- Clones and ephemeral volumes go with their machine.
CREATE OR REPLACE FUNCTION machines_release_volumes() RETURNS trigger AS $$
BEGIN
    IF NEW.state IN ('terminated', 'failed') AND OLD.state NOT IN ('terminated', 'failed') THEN
        UPDATE volumes SET machine_id = NULL, updated_at = now(),
            state = CASE WHEN kind IN ('clone', 'ephemeral') AND state NOT IN ('deleted', 'failed') THEN 'deleting'
                         WHEN state = 'attached' THEN 'available'
                         ELSE state END
        WHERE machine_id = NEW.id;
        INSERT INTO jobs (queue, kind, payload, dedupe_key, run_at, max_attempts)
        VALUES ('default', 'volumes.release', jsonb_build_object('machine_id', NEW.id), NEW.id, now(), 20)
        ON CONFLICT (kind, dedupe_key) WHERE dedupe_key IS NOT NULL AND state IN ('pending', 'running')
        DO NOTHING;
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;
