-- The least-privilege role Tidemark's producer connects as (same as dev/stack).
CREATE ROLE tidemark_repl WITH LOGIN REPLICATION PASSWORD 'tidemark-repl-dev';
GRANT CONNECT, CREATE ON DATABASE tidemark TO tidemark_repl;
