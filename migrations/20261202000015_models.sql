-- The model registry: AI models served as OCI images. The bytes of every blob (layers,
-- configs, manifests, indexes) live in the object store under their digest, shared by
-- every model that holds them; these rows say what exists and which model holds what.

CREATE TABLE model_blobs (
    digest text PRIMARY KEY CHECK (digest ~ '^sha256:[0-9a-f]{64}$'),
    size_bytes bigint NOT NULL CHECK (size_bytes >= 0),
    media_type text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE models (
    id text PRIMARY KEY,
    -- The repository name under /v2/: the lower-cased hub id, e.g. org/model.
    name text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    -- Where it came from: the hub repository URL, or the directory it was imported from.
    source text,
    hub_repository text,
    license text,
    -- Pulls (GETs of one of its image indexes), flushed from each replica's counters.
    pull_count bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE model_revisions (
    model_id text NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    revision text NOT NULL,
    index_digest text NOT NULL REFERENCES model_blobs (digest),
    file_count integer NOT NULL,
    -- Bytes of the model's files, and of the image's distinct blobs.
    file_bytes bigint NOT NULL,
    image_bytes bigint NOT NULL,
    layer_format text NOT NULL,
    -- [{"path": "...", "size": n}] in path order.
    files jsonb NOT NULL,
    imported_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, revision)
);

-- Every blob a model's images reference, and the manifests themselves: a digest is served
-- under a name only when that model holds it.
CREATE TABLE model_contents (
    model_id text NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    digest text NOT NULL REFERENCES model_blobs (digest),
    PRIMARY KEY (model_id, digest)
);

CREATE TABLE model_tags (
    model_id text NOT NULL,
    tag text NOT NULL,
    revision text NOT NULL,
    digest text NOT NULL REFERENCES model_blobs (digest),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, tag),
    FOREIGN KEY (model_id, revision) REFERENCES model_revisions (model_id, revision) ON DELETE CASCADE
);
