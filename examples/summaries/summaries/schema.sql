-- The example's own tables (the fleet's migrations know nothing of them): `python -m summaries init`.
create table if not exists summary_documents (
    document_id text primary key,
    body text not null,
    created_at timestamptz not null default now()
);
create table if not exists document_summaries (
    document_id text primary key references summary_documents (document_id),
    summary text not null,
    model text not null,
    job_id text not null,  -- the fleet's job that wrote it (bus_events.job_id)
    summarized_at timestamptz not null default now()
);
