-- A stream whose job ended unheard looks for its dead letter by message id (the gateway, once per quiet
-- spell for all its quiet streams; `fleet dlq show`): without this index each look scans the table.
create index if not exists dead_letters_message_id_idx on dead_letters (message_id);
