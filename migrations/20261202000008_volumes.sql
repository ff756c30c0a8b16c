-- Layer-cache volumes: one RBD image (or local directory) per project, architecture and
-- cache generation, plus short-lived ones (ephemeral caches for untrusted builds, and
-- copy-on-write clones for autoscaled builders).
--
-- creating -> available <-> attached; resizing (back to available or attached);
-- resetting (retired by a cache reset, waiting for its builder to let go) -> deleting ->
-- deleted; failed when creation gave up. Every transition is a conditional UPDATE.
CREATE TABLE volumes (
    id                  text PRIMARY KEY,
    kind                text NOT NULL CHECK (kind IN ('project', 'ephemeral', 'clone')),
    -- Kept when the project is deleted (SET NULL): the row drives the image's deletion.
    project_id          text REFERENCES projects (id) ON DELETE SET NULL,
    organization_id     text NOT NULL,
    platform            text NOT NULL CHECK (platform IN ('amd64', 'arm64')),
    -- The project's cache generation this volume belongs to.
    generation          integer NOT NULL DEFAULT 0,
    -- Where it lives: the RBD namespace (one per project) and image name.
    namespace           text NOT NULL,
    image               text NOT NULL,
    state               text NOT NULL DEFAULT 'creating'
                        CHECK (state IN ('creating', 'available', 'attached', 'resizing',
                                         'resetting', 'deleting', 'deleted', 'failed')),
    -- Provisioned size, and the size asked for (a grow in flight, or a shrink that waits
    -- for the next reset).
    size_bytes          bigint NOT NULL CHECK (size_bytes > 0),
    target_size_bytes   bigint NOT NULL CHECK (target_size_bytes > 0),
    -- The machine that has it attached, if any.
    machine_id          text,
    -- Clones: the volume they were cloned from. Ephemeral volumes: the build.
    parent_volume_id    text,
    -- Clones: the parent's snapshot they were made from (removed with the clone).
    snapshot            text,
    build_id            text,
    used_bytes          bigint,
    used_measured_at    timestamptz,
    error               text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    deleted_at          timestamptz,
    CONSTRAINT volumes_image_key UNIQUE (namespace, image)
);
-- One live project volume per project and architecture.
CREATE UNIQUE INDEX volumes_live_project ON volumes (project_id, platform)
    WHERE kind = 'project' AND state IN ('creating', 'available', 'attached', 'resizing');
CREATE INDEX volumes_state_idx ON volumes (state);
CREATE INDEX volumes_machine_idx ON volumes (machine_id) WHERE machine_id IS NOT NULL;
CREATE INDEX volumes_build_idx ON volumes (build_id) WHERE build_id IS NOT NULL;

-- A reset of a cache nobody has used since the last one changes nothing, so two resets
-- at once take effect once.
ALTER TABLE projects ADD COLUMN cache_used boolean NOT NULL DEFAULT true;

-- Builds that must not touch the project's cache (fork pull requests) get a volume of
-- their own, deleted when the build ends.
ALTER TABLE builds ADD COLUMN ephemeral_cache boolean NOT NULL DEFAULT false;

-- The volume a machine serves from (its project's, a clone, or an ephemeral one).
ALTER TABLE machines ADD COLUMN volume_id text;

-- Images found in the store that no row owns, removed after a grace period.
CREATE TABLE volume_orphans (
    namespace     text NOT NULL,
    image         text NOT NULL,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, image)
);

-- A machine's directive also changes when it is given a volume.
CREATE OR REPLACE FUNCTION machines_directive_changed() RETURNS trigger AS $$
BEGIN
    IF NEW.managed_by_agent AND (
        NEW.project_id IS DISTINCT FROM OLD.project_id
        OR NEW.volume_id IS DISTINCT FROM OLD.volume_id
        OR (NEW.state IN ('draining', 'terminated', 'failed')) <> (OLD.state IN ('draining', 'terminated', 'failed'))
    ) THEN
        NEW.directive_generation := OLD.directive_generation + 1;
        PERFORM pg_notify('kiln_machines', NEW.id);
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

DROP TRIGGER machines_directive ON machines;
CREATE TRIGGER machines_directive BEFORE UPDATE OF project_id, state, volume_id ON machines
    FOR EACH ROW EXECUTE FUNCTION machines_directive_changed();

-- A machine that is gone holds no volume: whichever path ended it (a terminate job, a
-- failed boot, a silent agent, any replica), its volume is released in the same
-- transaction, its clone is marked for deletion, and a `volumes.release` job revokes
-- its storage key and deletes what it leaves behind.
CREATE FUNCTION machines_release_volumes() RETURNS trigger AS $$
BEGIN
    IF NEW.state IN ('terminated', 'failed') AND OLD.state NOT IN ('terminated', 'failed') THEN
        UPDATE volumes SET machine_id = NULL, updated_at = now(),
            state = CASE WHEN kind = 'clone' AND state NOT IN ('deleted', 'failed') THEN 'deleting'
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

CREATE TRIGGER machines_release_volumes AFTER UPDATE OF state ON machines
    FOR EACH ROW EXECUTE FUNCTION machines_release_volumes();
