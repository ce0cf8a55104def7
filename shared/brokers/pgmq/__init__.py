"""A dramatiq broker on pgmq, the Postgres message queue (Supabase Queues).

dramatiq            pgmq
declare_queue       pgmq.create (idempotent, done lazily on first use)
enqueue(delay)      pgmq.send_batch, delay as the message's visibility time (sender.py: the one bulk path)
consume(prefetch)   pgmq.read(qty = free prefetch slots), woken by LISTEN/NOTIFY (a statement trigger on the
                    queue table, notifier.py), polled as a fallback (consumer.py)
in progress         visibility timeout extended by a heartbeat thread (set_vt on all outstanding ids, heartbeat.py)
ack                 pgmq.delete, batched
nack                pgmq.archive, batched (the DeadLetters middleware records the reason)
requeue             set_vt(ids, 0): another worker takes them at once

A message that is not a dramatiq envelope (a producer's `select pgmq.send('embed', '{...}')`)
is wrapped into a message for the queue's actor with the JSON as its one argument (messages.py).
"""

from fleet.shared.brokers.pgmq.broker import PgmqBroker, validate_queue_name
from fleet.shared.brokers.pgmq.messages import PgmqMessage

__all__ = ["PgmqBroker", "PgmqMessage", "validate_queue_name"]
