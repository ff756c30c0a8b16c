-- Server admins: users who operate the installation from the dashboard (every builder
-- machine, the installation's audit log), as operators do with `kiln admin`. Granted and
-- revoked only by an operator.
ALTER TABLE users ADD COLUMN server_admin boolean NOT NULL DEFAULT false;
