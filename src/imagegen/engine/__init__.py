"""The job engine: job records and their store, admission, lanes and batching, events, webhooks."""
