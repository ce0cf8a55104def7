-- What the chat workers learned of a model from its server (workers/chat/facts.py): its context window and its
-- chat template's tokens. Shared, so that each is learned once for the fleet rather than once per process: on
-- llama-cpp-python learning the window costs a refused prompt, and every question asked cuts a running stream.
create table if not exists chat_model_facts (
  api_base text not null,
  model text not null,
  context_window integer check (context_window > 0),
  window_source text check (window_source in ('server', 'refusal')),
  tokens_per_message integer check (tokens_per_message >= 0),
  template_tokens integer check (template_tokens >= 0),
  updated_at timestamptz not null default now(),
  primary key (api_base, model)
);

alter table chat_model_facts enable row level security;
revoke all on chat_model_facts from anon, authenticated;
grant select, insert, update on chat_model_facts to fleet_worker;
